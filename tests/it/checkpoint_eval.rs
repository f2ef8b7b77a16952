//! `finetune.checkpoint_eval`: the recovery curve a run draws of itself. Its first and
//! last points are checked against the eval stages before and after fine-tuning (the
//! same settings and model through the stage's own path), its paired test against a
//! count made here from the per-question files, and a run cut by `stop_after` resumes
//! without redoing the first point.

use crate::common::{recover, shared_dir, stderr, stories_dir};
use rora::report::paired::mcnemar_exact;
use rora::train::LogLine;
use std::collections::HashMap;
use std::path::Path;

fn pipeline(dir: &Path) -> std::path::PathBuf {
    let file = dir.join("curve.yaml");
    let text = format!(
        "name: curve\nseed: 5\nrun_dir: {run}\nstages:\n  - load:\n      model: {model}\n  \
         - eval: &eval\n      label: before\n      tasks: [ARC-Easy, piqa, ppl]\n      \
         data_dir: {data}\n      limit: 6\n      ppl_text: {root}/data/stories260K-heldout.txt\n      \
         ppl_max_tokens: 300\n  - attach:\n      method: rora\n      rank: 4\n      dropout: 0.0\n  \
         - finetune:\n      text: [{root}/data/stories260K-train.txt]\n      cutoff_len: 32\n      \
         batch_size: 4\n      micro_batch_size: 4\n      learning_rate: 5.0e-3\n      \
         warmup_steps: 0\n      max_steps: 4\n      eval_every: 2\n      save_every: 2\n      \
         checkpoint_eval: *eval\n  - eval:\n      <<: *eval\n      label: after\n",
        run = dir.join("run").display(),
        model = stories_dir().display(),
        data = shared_dir().join("data/commonsense").display(),
        root = env!("CARGO_MANIFEST_DIR"),
    );
    std::fs::write(&file, text).unwrap();
    file
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Correctness per (task, index) of an `eval-*.jsonl`-style file.
fn correctness(path: &Path) -> HashMap<(String, u64), bool> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let key = (v["task"].to_string(), v["index"].as_u64().unwrap());
            (key, v["correct"].as_bool().unwrap())
        })
        .collect()
}

#[test]
fn checkpoint_eval_draws_a_paired_recovery_curve_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let file = pipeline(tmp.path());
    let f = file.to_str().unwrap();
    let out = recover(&["--pipeline", f, "--set", "finetune.stop_after=3"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = recover(&["--pipeline", f, "--resume"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let run = tmp.path().join("run");

    // Step 0 (no step numbers), the steps, evaluations at 0, 2, 3 (where the first
    // sitting stopped) and 4; step 0 was not evaluated again on resuming.
    let log: Vec<LogLine> = std::fs::read_to_string(run.join("train-log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let steps: Vec<usize> = log.iter().map(|l| l.step).collect();
    assert_eq!(steps, [0, 1, 2, 3, 4]);
    assert!(log[0].train.is_none() && log[1..].iter().all(|l| l.train.is_some()));
    let evaluated: Vec<usize> = log
        .iter()
        .filter(|l| l.eval.is_some())
        .map(|l| l.step)
        .collect();
    assert_eq!(evaluated, [0, 2, 3, 4]);
    assert_eq!(stderr(&out).matches("checkpoint eval, step 0").count(), 0);
    // Tokens and training time add up over the sitting boundary.
    for w in log.windows(2) {
        assert!(w[1].tokens > w[0].tokens && w[1].train_seconds >= w[0].train_seconds);
    }
    assert_eq!(log[4].tokens, 4 * 4 * 32);

    // First and last points: the eval stages' pooled numbers on the same model.
    let pooled = |report: &serde_json::Value| {
        let tasks = report["protocols"][0]["tasks"].as_array().unwrap();
        let n: u64 = tasks.iter().map(|t| t["n"].as_u64().unwrap()).sum();
        let c: u64 = tasks.iter().map(|t| t["correct"].as_u64().unwrap()).sum();
        (
            n as usize,
            c as f64 / n as f64,
            report["perplexity"]["perplexity"].as_f64().unwrap(),
        )
    };
    for (line, stage) in [(&log[0], "eval-before.json"), (&log[4], "eval-after.json")] {
        let point = line.eval.as_ref().unwrap();
        let (n, acc, ppl) = pooled(&json(&run.join(stage)));
        assert_eq!(point.questions, 12);
        assert_eq!(n, 12);
        assert_eq!(point.accuracy, acc, "{stage}");
        assert!(
            (point.perplexity.unwrap() - ppl).abs() < 1e-9 * ppl,
            "{stage}"
        );
        assert_eq!(point.tasks.len(), 2);
    }

    // The paired test against step 0, counted here from the per-question files.
    let start = correctness(&run.join("checkpoint-evals/step-000000.jsonl"));
    let last = correctness(&run.join("checkpoint-evals/step-000004.jsonl"));
    assert_eq!(last, correctness(&run.join("eval-after.jsonl")));
    let only_start = start.iter().filter(|(k, &c)| c && !last[*k]).count();
    let only_now = start.iter().filter(|(k, &c)| !c && last[*k]).count();
    let vs = log[4].eval.as_ref().unwrap().vs_start.as_ref().unwrap();
    assert_eq!((vs.only_start, vs.only_now), (only_start, only_now));
    assert_eq!(vs.p_value, mcnemar_exact(only_start, only_now));
    assert!(vs.acc_norm_p_value.is_some());
    assert!(log[0].eval.as_ref().unwrap().vs_start.is_none());

    let svg = std::fs::read_to_string(run.join("recovery-curve.svg")).unwrap();
    assert!(
        svg.contains("accuracy (pooled), 95% Wilson interval") && svg.contains("acc_norm (pooled)")
    );
    assert!(run.join("recovery-perplexity.svg").is_file());
}

#[test]
fn checkpoint_eval_without_a_commonsense_task_is_refused_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let file = pipeline(tmp.path());
    let f = file.to_str().unwrap();
    let out = recover(&[
        "--pipeline",
        f,
        "--set",
        "finetune.checkpoint_eval.tasks=[ppl]",
    ]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("checkpoint_eval") && err.contains("commonsense"),
        "{err}"
    );
    assert!(!tmp.path().join("run/eval-before.json").exists(), "{err}");
}
