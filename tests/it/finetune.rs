//! The finetune stage: learning a synthetic task, bitwise resume, NaN handling, data
//! formatting, and the stories-recover pipeline end to end.

use crate::common::*;
use rora::adapters::{self, AttachSpec};
use rora::data;
use rora::nn::frozen::MatmulPrecision;
use rora::nn::fused::bf16;
use rora::train::{self, FinetuneSpec};
use std::path::Path;
use std::process::Command;

fn yaml<T: serde::de::DeserializeOwned>(text: &str) -> T {
    serde_yaml_ng::from_str(text).unwrap()
}

/// 64 examples of "copy the word after X" in LLM-Adapters' format, written to `dir`.
fn copy_task_data(dir: &Path) -> std::path::PathBuf {
    let words = ["cat", "dog", "ball", "tree", "sun", "car", "fish", "bird"];
    let items: Vec<serde_json::Value> = (0..64)
        .map(|i| {
            let w = words[i % 8];
            let filler = words[(i / 8) % 8];
            serde_json::json!({
                "instruction": format!("Copy the word after X: {filler} X {w}"),
                "input": "",
                "output": w,
                "answer": w
            })
        })
        .collect();
    let data_path = dir.join("copy.json");
    std::fs::write(&data_path, serde_json::to_string(&items).unwrap()).unwrap();
    data_path
}

/// Fine-tunes stories260K with RoRA r8 on the copy task for `steps` steps (batch 4, lr
/// 3e-3; `extra`: more finetune keys), in `dir/run`. Returns the report, the logged
/// steps, and the model's matmul precision afterwards.
fn train_copy_task(
    dir: &Path,
    steps: usize,
    extra: &str,
) -> (train::FinetuneReport, Vec<train::LogLine>, MatmulPrecision) {
    let data_path = copy_task_data(dir);
    let loaded = load_stories();
    let mut model = loaded.model;
    let attach: AttachSpec = yaml("method: rora\nrank: 8\nalpha: 16\ndropout: 0.0");
    adapters::attach(&mut model, &attach, 0).unwrap();
    let spec: FinetuneSpec = yaml(&format!(
        "data: [{}]\ncutoff_len: 160\nbatch_size: 4\nmicro_batch_size: 4\nlearning_rate: 3.0e-3\n\
         warmup_steps: 3\nmax_steps: {steps}\n{extra}",
        data_path.display()
    ));
    let run_dir = dir.join("run");
    std::fs::create_dir_all(&run_dir).unwrap();
    let objective = train::Objective::from_spec(&spec, None).unwrap();
    let report = train::finetune(
        &mut model,
        &loaded.tokenizer,
        &spec,
        objective,
        0,
        &run_dir,
        false,
    )
    .unwrap();
    let log: Vec<train::LogLine> = std::fs::read_to_string(run_dir.join("train-log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (report, log, model.matmul_precision())
}

#[test]
fn rora_learns_a_synthetic_copy_task() {
    // The issue asks for a 50% lower loss within 100 steps; 40 steps of batch 4 suffice.
    let tmp = tempfile::tempdir().unwrap();
    let (report, log, _) = train_copy_task(tmp.path(), 40, "");
    assert_eq!(log.len(), 40);
    let first = log[0].loss().unwrap();
    let last5 = log[35..].iter().filter_map(|l| l.loss()).sum::<f64>() / 5.0;
    println!(
        "copy task: loss {first:.3} → {last5:.3} (mean of the last 5 steps), {:.0} tokens/s",
        report.tokens_per_s
    );
    assert!(last5 < 0.5 * first, "loss {first} → {last5}");
    assert!(tmp.path().join("run/loss-curve.svg").is_file());
}

#[test]
fn instruction_examples_follow_llm_adapters_tokenization() {
    let tok = load_stories().tokenizer;
    let item = data::InstructionItem {
        instruction: "Is the sky blue?".into(),
        input: String::new(),
        output: "the correct answer is true".into(),
        answer: Some("true".into()),
    };
    let full = data::instruction_example(&tok, &item, 512, true).unwrap();
    let prompt_only = tok
        .encode(
            &rora::data::prompt::training_prompt(&item.instruction, ""),
            true,
        )
        .unwrap();
    assert_eq!(full.ids[0], 1, "BOS first");
    assert_eq!(*full.ids.last().unwrap(), 2, "EOS appended");
    assert!(!full.targets[0] && full.targets[1..].iter().all(|&t| t));
    let masked = data::instruction_example(&tok, &item, 512, false).unwrap();
    assert_eq!(masked.ids, full.ids);
    let first_target = masked.targets.iter().position(|&t| t).unwrap();
    assert_eq!(first_target, prompt_only.len());
    // Truncated at cutoff: no EOS.
    let cut = data::instruction_example(&tok, &item, 20, true).unwrap();
    assert_eq!(cut.ids.len(), 20);
    assert_eq!(cut.ids[..], full.ids[..20]);
}

/// bf16 products (where the CPU has AMX or AVX512-BF16) follow the f32 run's loss curve closely, are
/// reported, and are dropped after training (evaluation and export use f32 weights).
#[test]
fn bf16_products_train_like_f32_and_end_with_training() {
    let (dir32, dir16) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (report32, log32, after32) = train_copy_task(dir32.path(), 12, "");
    let (report16, log16, after16) = train_copy_task(dir16.path(), 12, "matmul_precision: bf16\n");
    assert_eq!(report32.matmul_precision, MatmulPrecision::F32);
    assert_eq!(
        (after32, after16),
        (MatmulPrecision::F32, MatmulPrecision::F32)
    );
    if !bf16::available() {
        rora::require::skip_or_fail(
            "bf16",
            "this CPU has no bf16 kernel (AMX or AVX512-BF16): only the f32 fallback is checked",
        );
        // Without a bf16 kernel, bf16 falls back to f32 products, bit for bit.
        assert_eq!(report16.matmul_precision, MatmulPrecision::F32);
        assert_eq!(report16.last_loss, report32.last_loss);
        return;
    }
    assert_eq!(report16.matmul_precision, MatmulPrecision::Bf16);
    let mut worst = 0f64;
    for (a, b) in log32.iter().zip(&log16) {
        let (a, b) = (a.loss().unwrap(), b.loss().unwrap());
        worst = worst.max((a - b).abs() / a);
    }
    println!("bf16 vs f32 over 12 steps: largest relative loss difference {worst:.2e}");
    // bf16 inputs carry 8 significant bits (relative rounding ≤ 2^-9 ≈ 2e-3 per operand);
    // summed over a product and fed back through 12 updates, the curves stay within a
    // few 1e-3. A broken kernel would be off by orders of magnitude more.
    assert!(
        worst < 1e-2,
        "bf16 loss curve drifts from f32 by {worst:.2e}"
    );
    assert!(
        worst > 0.0,
        "bf16 products gave bit-identical losses: were they used?"
    );
}

fn resume_pipeline(dir: &Path) -> std::path::PathBuf {
    let file = dir.join("resume.yaml");
    let text = format!(
        "name: resume\nseed: 3\nstages:\n  - load:\n      model: {}\n  - attach:\n      method: rora\n      \
         rank: 4\n      dropout: 0.1\n  - finetune:\n      text: [{}/data/stories260K-train.txt]\n      \
         cutoff_len: 32\n      batch_size: 4\n      micro_batch_size: 2\n      learning_rate: 2.0e-3\n      \
         warmup_steps: 5\n      max_steps: 60\n      save_every: 10\n      keep_checkpoints: 2\n      \
         val_set_size: 4\n      eval_every: 20\n",
        stories_dir().display(),
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::write(&file, text).unwrap();
    file
}

#[test]
fn resumed_run_ends_bitwise_equal_to_an_uninterrupted_one() {
    let tmp = tempfile::tempdir().unwrap();
    let file = resume_pipeline(tmp.path());
    assert_resume_is_bitwise(tmp.path(), &file, 30, 60);
    // Only the newest two checkpoints are kept.
    let kept: Vec<_> = std::fs::read_dir(tmp.path().join("b/checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(kept.len(), 2);
}

#[test]
fn exploding_loss_stops_with_the_step_and_keeps_the_last_checkpoint() {
    // lr 1e6 is not enough here: RMSNorm rescales the blown-up activations and the loss
    // saturates at ln(512) with zero gradients. 1e20 overflows f32 at step 2.
    let tmp = tempfile::tempdir().unwrap();
    let file = resume_pipeline(tmp.path());
    let run = tmp.path().join("nan");
    let set = format!("run_dir={}", run.display());
    let out = recover(&[
        "--pipeline",
        file.to_str().unwrap(),
        "--set",
        &set,
        "--set",
        "finetune.learning_rate=1.0e20",
        "--set",
        "finetune.warmup_steps=0",
        "--set",
        "finetune.save_every=1",
        "--set",
        "finetune.max_grad_norm=0",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("the loss became"), "{err}");
    let step: usize = err
        .split("at step ")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(step >= 2, "{err}");
    // The checkpoint of the step before is complete and finite.
    let last = run.join(format!("checkpoints/step-{}", step - 1));
    assert!(err.contains(&last.display().to_string()), "{err}");
    let adapter = candle_core::safetensors::load(
        last.join("adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    for (name, t) in adapter {
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        assert!(v.iter().all(|x| x.is_finite()), "{name} is not finite");
    }
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["status"], "failed");
}

#[test]
fn stories_recover_pipeline_runs_end_to_end() {
    // The shipped pipeline with fewer steps (the full 60 take about 80 s on 2 cores).
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let set = format!("run_dir={}", run.display());
    let out = Command::new(env!("CARGO_BIN_EXE_recover"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args([
            "--pipeline",
            "pipelines/stories-recover.yaml",
            "--set",
            &set,
        ])
        .args([
            "--set",
            "finetune.max_steps=10",
            "--set",
            "finetune.eval_every=5",
            "--set",
            "finetune.save_every=5",
        ])
        .env("RORA_SHARED", shared_dir())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for f in [
        "manifest.json",
        "inspect.json",
        "attach.json",
        "finetune.json",
        "ppl-before.json",
        "ppl-after.json",
        "loss-curve.svg",
        "train-log.jsonl",
        "export.json",
        "merged/model.safetensors",
        "merged/config.json",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "eval-before.json",
        "eval-after.json",
        "report.md",
        "eval-comparison.svg",
    ] {
        assert!(run.join(f).is_file(), "{f} missing");
    }
    let log = std::fs::read_to_string(run.join("train-log.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 10);
    assert_eq!(log.lines().filter(|l| l.contains("val_loss")).count(), 2);
    let svg = std::fs::read_to_string(run.join("loss-curve.svg")).unwrap();
    assert!(svg.contains("<svg") && svg.contains("val loss"));
    let attach: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("attach.json")).unwrap()).unwrap();
    assert_eq!(attach["scaling"].as_f64().unwrap(), 16.0 / 8f64.sqrt());
}

#[test]
fn compare_prints_rows_and_the_difference_and_draws_bars() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let out = Command::new(env!("CARGO_BIN_EXE_recover"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args([
            "--pipeline",
            "pipelines/stories-recover.yaml",
            "--set",
            &format!("run_dir={}", run.display()),
        ])
        .args([
            "--set",
            "finetune.max_steps=4",
            "--set",
            "finetune.val_set_size=0",
            "--set",
            "eval.limit=8",
        ])
        .args(["--set", "eval.tasks=[ppl, ARC-Easy, piqa]"])
        .args(["--set", "eval.ppl_text=data/stories260K-heldout.txt"])
        .env("RORA_SHARED", shared_dir())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = std::fs::read_to_string(run.join("report.md")).unwrap();
    assert!(
        report.contains("| before |")
            && report.contains("| after |")
            && report.contains("| after − before |"),
        "{report}"
    );
    assert!(
        report.contains("### Perplexity") && report.contains("stories260K-heldout.txt"),
        "{report}"
    );
    // Paired tests on the same 8 questions per task, from the per-question records: the
    // before → after row for each task with its counts and a verdict.
    assert!(
        report.contains("### Paired tests (same questions)"),
        "{report}"
    );
    for (task, n) in [("ARC-e", 8), ("PIQA", 8), ("**pooled**", 16)] {
        let row = report
            .lines()
            .find(|l| l.starts_with("| before → after | Content acc |") && l.contains(task))
            .unwrap_or_else(|| panic!("no paired row for {task}:\n{report}"));
        assert!(
            row.contains(&format!("| {n} |"))
                && (row.contains("within noise") || row.contains("(p < 0.05)")),
            "{row}"
        );
    }
    let svg = tmp.path().join("bars.svg");
    let out = recover(&[
        "compare",
        run.join("eval-before.json").to_str().unwrap(),
        run.join("eval-after.json").to_str().unwrap(),
        "--svg",
        svg.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("run/before") && table.contains("ARC-e") && table.contains("PIQA"),
        "{table}"
    );
    assert!(std::fs::read_to_string(&svg).unwrap().contains("<rect"));
}
