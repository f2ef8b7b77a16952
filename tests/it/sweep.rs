//! `recover sweep` end to end on stories260K: a grid of runs, the summary, skipping
//! finished runs, resuming unfinished ones, failed runs, and bad axes.

use crate::common::*;
use std::path::{Path, PathBuf};

fn repo_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(name)
}

/// A tiny recovery pipeline: LoRA on two projections, 2 training steps, held-out
/// perplexity and 5 questions of two tasks. `extra` is appended (a `sweep:` block).
fn write_pipeline(dir: &Path, extra: &str) -> PathBuf {
    let yaml = format!(
        "name: tiny\nseed: 1\nstages:\n\
         \x20 - load:\n      model: {model}\n\
         \x20 - attach:\n      method: lora\n      rank: 4\n      targets: [q_proj, v_proj]\n\
         \x20 - finetune:\n      text: [{train}]\n      cutoff_len: 64\n      batch_size: 4\n\
         \x20     micro_batch_size: 4\n      learning_rate: 1.0e-3\n      warmup_steps: 0\n\
         \x20     max_steps: 2\n\
         \x20 - ppl:\n      text: {heldout}\n      max_len: 64\n      label: after\n\
         \x20 - eval:\n      label: after\n      tasks: [ARC-Easy, piqa]\n\
         \x20     data_dir: {data}\n      protocol: content\n      limit: 5\n{extra}",
        model = stories_dir().display(),
        train = repo_file("data/stories260K-train.txt").display(),
        heldout = repo_file("data/stories260K-heldout.txt").display(),
        data = shared_dir().join("data/commonsense").display(),
    );
    let file = dir.join("pipeline.yaml");
    std::fs::write(&file, yaml).unwrap();
    file
}

fn read_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn mtime(path: &Path) -> std::time::SystemTime {
    std::fs::metadata(path).unwrap().modified().unwrap()
}

#[test]
fn grid_sweep_writes_summary_and_skips_finished_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let file = write_pipeline(tmp.path(), "");
    let out = tmp.path().join("sweep");
    let args = [
        "sweep",
        "--pipeline",
        file.to_str().unwrap(),
        "--grid",
        "attach.method=lora,rora",
        "--grid",
        "attach.rank=4,8",
        "--out",
        out.to_str().unwrap(),
    ];
    let t0 = std::time::Instant::now();
    let first = recover(&args);
    eprintln!("first sweep: {:.1} s", t0.elapsed().as_secs_f64());
    assert!(first.status.success(), "{}", stderr(&first));

    let names = [
        "method=lora,rank=4",
        "method=lora,rank=8",
        "method=rora,rank=4",
        "method=rora,rank=8",
    ];
    let summary = read_json(&out.join("sweep.json"));
    let runs = summary["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 4);
    for (run, name) in runs.iter().zip(names) {
        assert_eq!(run["name"], name);
        assert_eq!(run["status"], "ok", "{run}");
        assert_eq!(run["reused"], false);
        assert_eq!(run["protocol"], "content");
        assert_eq!(run["accuracy_from"], "eval-after.json");
        assert_eq!(run["ppl_from"], "ppl-after.json");
        let acc = run["accuracy"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&acc));
        assert!(run["ppl"].as_f64().unwrap() > 1.0);
        // Each run is an ordinary run folder with the cell's values in its manifest.
        let manifest = read_json(&out.join(name).join("manifest.json"));
        assert_eq!(manifest["status"], "ok");
        let attach = &manifest["pipeline"]["stages"][1]["attach"];
        assert_eq!(attach["method"], run["cell"]["attach.method"]);
        assert_eq!(attach["rank"].to_string(), run["cell"]["attach.rank"]);
    }
    assert_eq!(summary["layout"]["rows"], "attach.method");
    assert_eq!(summary["layout"]["columns"], "attach.rank");
    assert_eq!(summary["layout"]["metric"], "accuracy");

    let md = std::fs::read_to_string(out.join("sweep.md")).unwrap();
    for needle in [
        "## Accuracy (%)",
        "## Perplexity",
        "| attach.method \\ attach.rank | 4 | 8 |",
        "| lora | ",
        "| rora | ",
        "`content` protocol",
        "![accuracy against attach.rank](sweep.svg)",
        "| `method=rora,rank=8` | rora | 8 | ok |",
        "recover sweep --pipeline",
        "--grid attach.method=lora,rora --grid attach.rank=4,8",
        "no seed spread",
    ] {
        assert!(md.contains(needle), "sweep.md lacks {needle:?}:\n{md}");
    }
    // stdout is the summary; the runs' own reports stay off it.
    assert_eq!(String::from_utf8_lossy(&first.stdout).trim(), md.trim());
    let svg = std::fs::read_to_string(out.join("sweep.svg")).unwrap();
    assert!(svg.contains("<svg") && svg.contains("lora") && svg.contains("rora"));

    // Again: every run is finished, nothing runs.
    let manifests: Vec<PathBuf> = names
        .iter()
        .map(|n| out.join(n).join("manifest.json"))
        .collect();
    let before: Vec<_> = manifests.iter().map(|m| mtime(m)).collect();
    let second = recover(&args);
    assert!(second.status.success(), "{}", stderr(&second));
    let err = stderr(&second);
    assert_eq!(err.matches("skipping finished cell").count(), 4, "{err}");
    assert!(!err.contains("[1/"), "a stage ran:\n{err}");
    let after: Vec<_> = manifests.iter().map(|m| mtime(m)).collect();
    assert_eq!(before, after);
    let summary = read_json(&out.join("sweep.json"));
    assert!(summary["runs"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["reused"] == true && r["status"] == "ok"));

    // A run interrupted mid-way (its manifest still says running) is resumed, alone.
    let interrupted = &manifests[1];
    let mut m = read_json(interrupted);
    m["status"] = "running".into();
    std::fs::write(interrupted, m.to_string()).unwrap();
    let third = recover(&args);
    assert!(third.status.success(), "{}", stderr(&third));
    let err = stderr(&third);
    assert!(
        err.contains("cell 2/4 method=lora,rank=8 (resuming)"),
        "{err}"
    );
    assert_eq!(err.matches("skipping finished cell").count(), 3, "{err}");
    assert_eq!(read_json(interrupted)["status"], "ok");
}

#[test]
fn yaml_sweep_block_with_repeats_and_best_of() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("sweep");
    // LoRA gets a learning-rate axis that RoRA does not; every cell runs with two seeds.
    let block = format!(
        "sweep:\n  out: {}\n  grids:\n\
         \x20   - {{attach.method: [lora], finetune.learning_rate: [1.0e-3, 3.0e-2]}}\n\
         \x20   - {{attach.method: [rora], finetune.learning_rate: [1.0e-3]}}\n\
         \x20 repeat: {{seed: [1, 2]}}\n  best_of: [finetune.learning_rate]\n  metric: ppl\n",
        out.display()
    );
    let file = write_pipeline(tmp.path(), &block);
    let file_arg = file.to_str().unwrap();

    // The plain run's dry run checks every run of the block and lists them.
    let dry = recover(&["--pipeline", file_arg, "--dry-run"]);
    assert!(dry.status.success(), "{}", stderr(&dry));
    let plan = String::from_utf8_lossy(&dry.stdout);
    assert!(
        plan.contains("## Sweep") && plan.contains("6 runs"),
        "{plan}"
    );
    assert!(
        plan.contains("| `method=lora,lr=0.03,seed=2` | to run |"),
        "{plan}"
    );
    assert!(!out.exists());

    let run = recover(&["sweep", "--pipeline", file_arg, "--json"]);
    assert!(run.status.success(), "{}", stderr(&run));
    let summary: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(summary, read_json(&out.join("sweep.json")));
    let names: Vec<&str> = summary["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "method=lora,lr=0.001,seed=1",
            "method=lora,lr=0.001,seed=2",
            "method=lora,lr=0.03,seed=1",
            "method=lora,lr=0.03,seed=2",
            "method=rora,lr=0.001,seed=1",
            "method=rora,lr=0.001,seed=2",
        ]
    );
    // The seed reached each run.
    let manifest = read_json(&out.join(names[1]).join("manifest.json"));
    assert_eq!(manifest["seed"], 2);
    // One row per method, no columns axis; LoRA's learning rate is the one with the lower
    // mean perplexity, averaged over both seeds.
    let pivot = &summary["pivot"];
    assert_eq!(pivot["rows"], serde_json::json!(["lora", "rora"]));
    let lora = &pivot["cells"][0][0];
    let mean_ppl = |lr: &str| {
        let ppl: Vec<f64> = summary["runs"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["cell"]["attach.method"] == "lora")
            .filter(|r| r["cell"]["finetune.learning_rate"] == lr)
            .map(|r| r["ppl"].as_f64().unwrap())
            .collect();
        ppl.iter().sum::<f64>() / ppl.len() as f64
    };
    let best = if mean_ppl("0.001") <= mean_ppl("0.03") {
        "0.001"
    } else {
        "0.03"
    };
    assert_eq!(lora["chosen"]["finetune.learning_rate"], best);
    assert_eq!(lora["ppl"]["n"], 2);
    assert!((lora["ppl"]["mean"].as_f64().unwrap() - mean_ppl(best)).abs() < 1e-9);
    let md = std::fs::read_to_string(out.join("sweep.md")).unwrap();
    assert!(md.contains(&format!("· lr={best}")), "{md}");
    assert!(md.contains("repeats over seed"), "{md}");
    // Without a columns axis, the papers' table: a column per task and their average, for
    // the kept learning rate, each task's mean over the seeds.
    assert!(
        md.contains("## Accuracy per task (%)\n\n| attach.method | ARC-e | PIQA | average |"),
        "{md}"
    );
    let task_mean = |i: usize| {
        let acc: Vec<f64> = summary["runs"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["cell"]["attach.method"] == "lora")
            .filter(|r| r["cell"]["finetune.learning_rate"] == best)
            .map(|r| r["task_accuracy"][i].as_f64().unwrap())
            .collect();
        acc.iter().sum::<f64>() / acc.len() as f64
    };
    for i in 0..2 {
        let got = lora["per_task"][i]["mean"].as_f64().unwrap();
        assert!((got - task_mean(i)).abs() < 1e-12, "task {i}: {got}");
    }

    // A plain run of the same file runs the pipeline once and says the block is not used.
    let once = recover(&[
        "--pipeline",
        file_arg,
        "--set",
        &format!("run_dir={}", tmp.path().join("once").display()),
    ]);
    assert!(once.status.success(), "{}", stderr(&once));
    assert!(stderr(&once).contains("the `sweep:` block is read by `recover sweep`"));
}

#[test]
fn failed_run_is_recorded_and_the_sweep_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    let empty = tmp.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let yaml = format!(
        "name: ppl-only\nstages:\n  - load:\n      model: {}\n  - ppl:\n      text: x\n",
        stories_dir().display()
    );
    let file = tmp.path().join("p.yaml");
    std::fs::write(&file, yaml).unwrap();
    let out = tmp.path().join("sweep");
    let grid = format!(
        "ppl.text={},{}",
        empty.display(),
        repo_file("data/stories260K-heldout.txt").display()
    );
    let args = [
        "sweep",
        "--pipeline",
        file.to_str().unwrap(),
        "--grid",
        &grid,
        "--out",
        out.to_str().unwrap(),
    ];
    let first = recover(&args);
    assert!(!first.status.success());
    let err = stderr(&first);
    assert!(err.contains("1 of 2 runs failed"), "{err}");
    assert!(err.contains("too few tokens"), "{err}");
    let summary = read_json(&out.join("sweep.json"));
    assert_eq!(summary["layout"]["metric"], "ppl");
    let runs = summary["runs"].as_array().unwrap();
    assert_eq!(runs[0]["status"], "failed");
    assert!(runs[0]["error"]
        .as_str()
        .unwrap()
        .contains("too few tokens"));
    assert_eq!(runs[1]["status"], "ok");
    let md = std::fs::read_to_string(out.join("sweep.md")).unwrap();
    assert!(
        md.contains("**failed**") && md.contains("no result"),
        "{md}"
    );

    // Again: the failed run is tried again, the finished one skipped.
    let second = recover(&args);
    assert!(!second.status.success());
    let err = stderr(&second);
    assert!(err.contains("(resuming)"), "{err}");
    assert_eq!(err.matches("skipping finished cell").count(), 1, "{err}");
}

#[test]
fn bad_axes_fail_before_any_run() {
    let tmp = tempfile::tempdir().unwrap();
    let file = write_pipeline(tmp.path(), "");
    let out = tmp.path().join("sweep");
    let sweep = |extra: &[&str]| {
        let mut args = vec![
            "sweep",
            "--pipeline",
            file.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        recover(&args)
    };
    for (grid, needles) in [
        (
            vec![
                "--grid",
                "attach.method=lora,rora",
                "--grid",
                "attach.rnak=4,8",
            ],
            vec!["sweep axis `attach.rnak`", "unknown field `rnak`"],
        ),
        (
            vec!["--grid", "atach.rank=4"],
            vec!["sweep axis `atach.rank`", "`atach` is neither"],
        ),
        (
            vec!["--grid", "attach.method=lora,dora2"],
            vec!["sweep axis `attach.method` (value dora2)", "dora2"],
        ),
        (
            vec!["--grid", "attach.rank=4,8", "--rows", "attach.method"],
            vec!["`attach.method` is not an axis of the grid"],
        ),
        (vec![], vec!["no `sweep.grids` and no --grid"]),
    ] {
        let o = sweep(&grid);
        let err = stderr(&o);
        assert!(!o.status.success(), "{grid:?} succeeded");
        for n in needles {
            assert!(err.contains(n), "{grid:?}: stderr lacks {n:?}:\n{err}");
        }
        assert!(!err.contains("[1/"), "{grid:?}: a stage ran:\n{err}");
        assert!(!out.exists(), "{grid:?} left {}", out.display());
    }
    // A malformed --grid is a usage error.
    let o = sweep(&["--grid", "attach.rank"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("KEY=V1,V2"));
}

/// `--protocol` picks the protocol the accuracy is read from; finished runs are re-read,
/// not rerun, and a protocol the evaluation did not run is an error naming it.
#[test]
fn protocol_flag_rereads_finished_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let file = write_pipeline(tmp.path(), "");
    let text = std::fs::read_to_string(&file)
        .unwrap()
        .replace("protocol: content", "protocol: [content, choice]");
    std::fs::write(&file, text).unwrap();
    let out = tmp.path().join("sweep");
    let sweep = |extra: &[&str]| {
        let mut args = vec![
            "sweep",
            "--pipeline",
            file.to_str().unwrap(),
            "--grid",
            "attach.rank=4",
            "--out",
            out.to_str().unwrap(),
            "--json",
        ];
        args.extend_from_slice(extra);
        recover(&args)
    };
    let first = sweep(&[]);
    assert!(first.status.success(), "{}", stderr(&first));
    let run = out.join("rank=4");
    let report = read_json(&run.join("eval-after.json"));
    let average = |p: &str| {
        report["protocols"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["protocol"] == p)
            .unwrap()["average"]
            .as_f64()
            .unwrap()
    };
    let accuracy = |o: &std::process::Output| {
        let s: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(
            s["runs"][0]["reused"],
            serde_json::json!(!std::ptr::eq(o, &first))
        );
        s["runs"][0]["accuracy"].as_f64().unwrap()
    };
    assert_eq!(accuracy(&first), average("content"));
    let choice = sweep(&["--protocol", "choice"]);
    assert!(choice.status.success(), "{}", stderr(&choice));
    assert_eq!(accuracy(&choice), average("choice"));
    let missing = sweep(&["--protocol", "generate"]);
    let s: serde_json::Value = serde_json::from_slice(&missing.stdout).unwrap_or_default();
    let error = s["runs"][0]["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        error.contains("`generate` protocol") || stderr(&missing).contains("`generate` protocol"),
        "{error} {}",
        stderr(&missing)
    );
}
