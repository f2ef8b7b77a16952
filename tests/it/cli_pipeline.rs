//! The `recover` binary end to end: pipelines, run folders, and bad input.

use crate::common::*;
use std::path::Path;
use std::process::Output;

/// Asserts a failed run: non-zero exit, the message mentions every needle, and no run
/// folder was left behind.
fn assert_clean_failure(out: &Output, run_dir: &Path, needles: &[&str]) {
    let err = stderr(out);
    assert!(
        !out.status.success(),
        "expected failure, got success; stderr: {err}"
    );
    for n in needles {
        assert!(err.contains(n), "stderr lacks `{n}`:\n{err}");
    }
    assert!(!run_dir.exists(), "a failed run left {}", run_dir.display());
}

fn stories_yaml(extra_stages: &str) -> String {
    format!(
        "name: t\nseed: 1\nstages:\n  - load:\n      model: {}\n{extra_stages}",
        stories_dir().display()
    )
}

#[test]
fn stories_inspect_pipeline_writes_manifest_and_reports() {
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path().join("run");
    let set = format!("run_dir={}", run_dir.display());
    let out = recover(&[
        "--pipeline",
        "pipelines/stories-inspect.yaml",
        "--set",
        &set,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    for f in ["manifest.json", "inspect.json", "inspect.md"] {
        assert!(run_dir.join(f).is_file(), "{f} missing");
    }
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("manifest.json")).unwrap())
            .unwrap();
    assert_eq!(manifest["status"], "ok");
    assert_eq!(manifest["seed"], 42);
    assert_eq!(manifest["rora_version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(manifest["stages"].as_array().unwrap().len(), 2);
    assert!(manifest["stages"][0]["wall_s"].as_f64().unwrap() >= 0.0);
    // The resolved pipeline carries the override and the expanded variable.
    assert_eq!(
        manifest["pipeline"]["run_dir"],
        run_dir.display().to_string()
    );
    assert!(!manifest["pipeline"]["stages"][0]["load"]["model"]
        .as_str()
        .unwrap()
        .contains("${"));
    let inspect: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("inspect.json")).unwrap())
            .unwrap();
    // 5 layers × 45,440 + 512 × 64 embeddings + 64 final norm (tied head): the numel sum of
    // the safetensors file.
    assert_eq!(inspect["params"], 260_032);
    assert_eq!(inspect["layers"][0]["mlp_width"], 172);
    assert_eq!(inspect["reference"]["pruned_ratio"], 0.0);
}

#[test]
fn anchors_aliases_and_set_overrides_work() {
    let tmp = tempfile::tempdir().unwrap();
    let text = tmp.path().join("story.txt");
    std::fs::write(
        &text,
        "Once upon a time, there was a little girl named Lily. She liked to play.",
    )
    .unwrap();
    let yaml = stories_yaml(&format!(
        "  - ppl: &ppl_settings\n      text: {}\n      max_len: 16\n      label: a\n  - ppl: *ppl_settings\n",
        text.display()
    ));
    // The alias repeats the first ppl stage; --set then changes the second only.
    let (out, run_dir) = run_yaml(
        tmp.path(),
        &yaml,
        &["--set", "stages.2.label=b", "--set", "stages.2.bos=false"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let a: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("ppl-a.json")).unwrap())
            .unwrap();
    let b: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("ppl-b.json")).unwrap())
            .unwrap();
    assert_eq!(a["max_len"], 16);
    assert_eq!(b["max_len"], 16);
    assert_eq!(a["bos"], true);
    assert_eq!(b["bos"], false);
    // Without BOS the first token of each chunk is not scored.
    assert!(b["scored_tokens"].as_u64() < a["scored_tokens"].as_u64());
}

#[test]
fn unknown_key_names_key_line_and_allowed_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let yaml = stories_yaml("  - inspect:\n      referense: x\n");
    let (out, run_dir) = run_yaml(tmp.path(), &yaml, &[]);
    assert_clean_failure(
        &out,
        &run_dir,
        &["unknown field `referense`", "line 7", "`reference`"],
    );
}

#[test]
fn unknown_stage_lists_the_stages() {
    let tmp = tempfile::tempdir().unwrap();
    let (out, run_dir) = run_yaml(tmp.path(), &stories_yaml("  - frobnicate: {}\n"), &[]);
    assert_clean_failure(
        &out,
        &run_dir,
        &["unknown variant `frobnicate`", "finetune", "line 6"],
    );
}

#[test]
fn unknown_matmul_precision_lists_the_choices() {
    let tmp = tempfile::tempdir().unwrap();
    let yaml = stories_yaml("  - finetune:\n      text: [x.txt]\n      matmul_precision: fp16\n");
    let (out, run_dir) = run_yaml(tmp.path(), &yaml, &[]);
    assert_clean_failure(
        &out,
        &run_dir,
        &["unknown variant `fp16`", "`f32`", "`bf16`", "line 8"],
    );
}

#[test]
fn bad_eval_settings_are_refused_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let yaml = stories_yaml("  - eval:\n      label: before\n      tasks: [boolq, sciq]\n");
    let (out, run_dir) = run_yaml(tmp.path(), &yaml, &[]);
    assert_clean_failure(&out, &run_dir, &["sciq", "stages[1].eval"]);
}

#[test]
fn missing_model_path_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let yaml = "name: t\nstages:\n  - load:\n      model: /no/such/model\n";
    let (out, run_dir) = run_yaml(tmp.path(), yaml, &[]);
    assert_clean_failure(
        &out,
        &run_dir,
        &["/no/such/model does not exist", "load.model"],
    );
    let out = recover(&["inspect", "/no/such/model"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("/no/such/model does not exist"));
}

/// A copy of stories260K in a temp dir, to be damaged by a test.
fn stories_copy(dir: &Path) -> std::path::PathBuf {
    let model = dir.join("model");
    std::fs::create_dir_all(&model).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(stories_dir().join(f), model.join(f)).unwrap();
    }
    model
}

#[test]
fn truncated_safetensors_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let model = stories_copy(tmp.path());
    let st = model.join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() / 2]).unwrap();
    let yaml = format!(
        "name: t\nstages:\n  - load:\n      model: {}\n",
        model.display()
    );
    let (out, run_dir) = run_yaml(tmp.path(), &yaml, &[]);
    assert_clean_failure(
        &out,
        &run_dir,
        &["model.safetensors", "truncated or corrupt"],
    );
}

#[test]
fn config_disagreeing_with_tensors_names_the_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let model = stories_copy(tmp.path());
    let cfg_path = model.join("config.json");
    let cfg = std::fs::read_to_string(&cfg_path)
        .unwrap()
        .replace("\"hidden_size\": 64", "\"hidden_size\": 96");
    std::fs::write(&cfg_path, cfg).unwrap();
    let yaml = format!(
        "name: t\nstages:\n  - load:\n      model: {}\n",
        model.display()
    );
    let (out, run_dir) = run_yaml(tmp.path(), &yaml, &[]);
    assert_clean_failure(
        &out,
        &run_dir,
        &["model.embed_tokens.weight", "[512, 64]", "hidden_size 96"],
    );
}

#[test]
fn ppl_command_prints_json() {
    let tmp = tempfile::tempdir().unwrap();
    let text = tmp.path().join("t.txt");
    std::fs::write(
        &text,
        "Once upon a time, there was a little girl named Lily.",
    )
    .unwrap();
    let out = recover(&[
        "ppl",
        "--model",
        stories_dir().to_str().unwrap(),
        "--text",
        text.to_str().unwrap(),
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["bos"], true);
    assert!(v["perplexity"].as_f64().unwrap() > 1.0);
    let inspect = recover(&["inspect", stories_dir().to_str().unwrap(), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
    assert_eq!(v["num_layers"], 5);
}

#[test]
fn every_shipped_pipeline_passes_a_dry_run() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_recover"))
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .args(["--pipeline", path.to_str().unwrap(), "--dry-run"])
            .env("RORA_SHARED", shared_dir())
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}: {}", path.display(), stderr(&out));
        let plan = String::from_utf8_lossy(&out.stdout);
        assert!(
            plan.contains("## Plan:") && plan.contains("| **total** |"),
            "{}: {plan}",
            path.display()
        );
        seen += 1;
    }
    assert!(seen >= 2);
}

#[test]
fn dry_run_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path().join("run");
    let set = format!("run_dir={}", run_dir.display());
    let out = recover(&[
        "--pipeline",
        "pipelines/stories-recover.yaml",
        "--dry-run",
        "--set",
        &set,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("Trainable: 31.7K"));
    assert!(!run_dir.exists());
}

#[test]
fn kd_without_a_teacher_or_a_prune_stage_is_refused_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let yaml = stories_yaml(
        "  - attach:\n      method: rora\n  - finetune:\n      text: [data/stories260K-train.txt]\n      \
         objective: kd\n",
    );
    let (out, run_dir) = run_yaml(tmp.path(), &yaml, &[]);
    assert_clean_failure(
        &out,
        &run_dir,
        &["stages[2].finetune", "objective kd", "teacher", "prune"],
    );
}

#[test]
fn a_teacher_with_another_vocabulary_is_refused_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let teacher = tmp.path().join("teacher");
    let layer = TinyLayer {
        heads: 8,
        kv_heads: 4,
        mlp: 96,
    };
    write_tiny_model_with_vocab(&teacher, &[layer], 1, 1024);
    let yaml = stories_yaml(&format!(
        "  - attach:\n      method: rora\n  - finetune:\n      text: [data/stories260K-train.txt]\n      \
         objective: kd+lm\n      teacher: {}\n",
        teacher.display()
    ));
    let (out, run_dir) = run_yaml(tmp.path(), &yaml, &[]);
    assert_clean_failure(
        &out,
        &run_dir,
        &[
            "stages[2].finetune.teacher",
            &format!("{} has a vocabulary of 1024 tokens", teacher.display()),
            "stories260K one of 512",
        ],
    );
}

#[test]
fn a_teacher_with_other_token_strings_is_refused_before_any_training_step() {
    let tmp = tempfile::tempdir().unwrap();
    let teacher = stories_copy(tmp.path());
    let tok_path = teacher.join("tokenizer.json");
    let mut tok: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&tok_path).unwrap()).unwrap();
    let vocab = tok["model"]["vocab"].as_object_mut().unwrap();
    let id = vocab.remove("<0x00>").unwrap();
    vocab.insert("<zz>".into(), id);
    std::fs::write(&tok_path, tok.to_string()).unwrap();
    let yaml = stories_yaml(&format!(
        "  - attach:\n      method: rora\n  - finetune:\n      text: [data/stories260K-train.txt]\n      \
         objective: kd\n      teacher: {}\n",
        teacher.display()
    ));
    let (out, run_dir) = run_yaml(tmp.path(), &yaml, &[]);
    let err = stderr(&out);
    assert!(!out.status.success(), "expected failure: {err}");
    for needle in [
        "stage `finetune` (stages[2]) failed",
        "another vocabulary than the student",
        "token 3 is `<zz>` against `<0x00>`",
    ] {
        assert!(err.contains(needle), "stderr lacks `{needle}`:\n{err}");
    }
    assert!(!run_dir.join("train-log.jsonl").exists());
}
