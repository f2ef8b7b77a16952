//! `eval.cache`: a second run of the same pipeline reads its evaluations back (the same
//! numbers and records, marked cached); any change of weights or settings misses.

use crate::common::{load_stories, recover, shared_dir, stderr, stories_dir};
use rora::eval::EvalSpec;
use rora::pipeline::eval_cache;
use std::path::Path;

fn pipeline(dir: &Path, cache: &Path) -> std::path::PathBuf {
    let file = dir.join("cached.yaml");
    let text = format!(
        "name: cached\nseed: 3\nstages:\n  - load:\n      model: {model}\n  - eval: &eval\n      \
         label: plain\n      tasks: [ARC-Easy, piqa]\n      data_dir: {data}\n      limit: 5\n      \
         cache: {cache}\n  - attach:\n      method: rora\n      rank: 4\n  \
         - eval:\n      <<: *eval\n      label: adapted\n",
        model = stories_dir().display(),
        data = shared_dir().join("data/commonsense").display(),
        cache = cache.display(),
    );
    std::fs::write(&file, text).unwrap();
    file
}

fn report(run: &Path, label: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(run.join(format!("eval-{label}.json"))).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn a_second_run_reads_its_evaluations_from_the_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let file = pipeline(tmp.path(), &cache);
    let f = file.to_str().unwrap();
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    for run in [&one, &two] {
        let set = format!("run_dir={}", run.display());
        let out = recover(&["--pipeline", f, "--set", &set]);
        assert!(out.status.success(), "{}", stderr(&out));
        if run == &two {
            assert_eq!(stderr(&out).matches("read from the cache").count(), 2);
        }
    }
    // Two models (with and without adapters): two entries, each a report and its records.
    assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 4);
    for label in ["plain", "adapted"] {
        let (mut a, b) = (report(&one, label), report(&two, label));
        assert!(a.get("cached").is_none() && b["cached"] == true, "{label}");
        a["cached"] = serde_json::Value::Bool(true);
        assert_eq!(a, b, "{label}");
        let records = |run: &Path| std::fs::read(run.join(format!("eval-{label}.jsonl"))).unwrap();
        assert_eq!(records(&one), records(&two), "{label}");
    }
    // Another setting misses: a third entry pair for each model.
    let set = format!("run_dir={}", tmp.path().join("three").display());
    let out = recover(&["--pipeline", f, "--set", &set, "--set", "eval.limit=4"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!stderr(&out).contains("read from the cache"));
    assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 8);
}

/// The key sees every weight bit and ignores the label.
#[test]
fn the_cache_key_changes_with_any_weight_and_not_with_the_label() {
    let mut loaded = load_stories();
    let mut spec = EvalSpec::new("a", [rora::data::Task::ArcEasy]);
    let key = |m: &rora::model::LoadedModel, s: &EvalSpec| {
        eval_cache::key(s, &m.model, &m.tokenizer, 0).unwrap()
    };
    let k0 = key(&loaded, &spec);
    spec.label = "b".into();
    assert_eq!(key(&loaded, &spec), k0);
    // The last layer's down_proj with one element nudged by one ulp.
    let (_, _, linear) = loaded.model.projections().last().unwrap();
    let w = linear
        .weight()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let mut nudged = w.clone();
    nudged[0] = f32::from_bits(nudged[0].to_bits() + 1);
    let shape = linear.weight().shape().clone();
    let t = candle_core::Tensor::from_vec(nudged, shape, &candle_core::Device::Cpu).unwrap();
    loaded
        .model
        .projections_mut()
        .last()
        .unwrap()
        .2
        .set_weight(t);
    assert_ne!(key(&loaded, &spec), k0);
}

/// `eval.matmul_precision: bf16` between two f32 evaluations of the same model: the bf16
/// report says so and its option scores stay within bf16's rounding of the f32 ones; the
/// f32 evaluation after it reads the first one's cache entry (the bf16 run neither shares
/// its key nor leaves the model packed) and equals it.
#[test]
fn a_bf16_evaluation_is_recorded_keyed_apart_and_leaves_the_model_at_f32() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("precision.yaml");
    let text = format!(
        "name: precision\nseed: 3\nrun_dir: {run}\nstages:\n  - load:\n      model: {model}\n  \
         - eval: &eval\n      label: f32\n      tasks: [ARC-Easy, piqa, ppl]\n      data_dir: {data}\n      \
         limit: 6\n      ppl_text: {data}/openbookqa/test.json\n      ppl_max_tokens: 300\n      \
         cache: {cache}\n  - eval:\n      <<: *eval\n      label: bf16\n      matmul_precision: bf16\n  \
         - eval:\n      <<: *eval\n      label: f32-again\n",
        run = tmp.path().join("run").display(),
        model = stories_dir().display(),
        data = shared_dir().join("data/commonsense").display(),
        cache = tmp.path().join("cache").display(),
    );
    std::fs::write(&file, text).unwrap();
    let out = recover(&["--pipeline", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stderr(&out).matches("read from the cache").count(), 1);
    let run = tmp.path().join("run");
    let (f32, bf16, again) = (
        report(&run, "f32"),
        report(&run, "bf16"),
        report(&run, "f32-again"),
    );
    assert!(f32.get("matmul_precision").is_none());
    assert_eq!(again["protocols"], f32["protocols"]);
    assert_eq!(again["perplexity"], f32["perplexity"]);
    if bf16.get("matmul_precision").is_none() {
        assert!(stderr(&out).contains("eval.matmul_precision: bf16 needs"));
        rora::require::skip_or_fail(
            "bf16",
            "no bf16 kernel (AMX or AVX512-BF16) on this CPU: the bf16 evaluation ran in f32",
        );
        return;
    }
    assert_eq!(bf16["matmul_precision"], "bf16");
    // Every product's inputs lose their low 16 bits (relative 2⁻⁹ at most each). Measured
    // on these 36 option scores: 0.34% relative at worst, perplexity 0.16%; 1% leaves room
    // for another CPU's summation order, and a bf16 run that changed nothing fails `> 0`.
    let scores = |label: &str| -> Vec<f64> {
        std::fs::read_to_string(run.join(format!("eval-{label}.jsonl")))
            .unwrap()
            .lines()
            .flat_map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                v["scores"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|s| s.as_f64().unwrap())
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    let (a, b) = (scores("f32"), scores("bf16"));
    assert_eq!(a.len(), b.len());
    let worst = a
        .iter()
        .zip(&b)
        .map(|(x, y)| ((x - y) / x).abs())
        .fold(0.0, f64::max);
    assert!(
        worst > 0.0 && worst < 0.01,
        "bf16 scores move by {worst} relative"
    );
    let ppl = |r: &serde_json::Value| r["perplexity"]["perplexity"].as_f64().unwrap();
    assert!((ppl(&bf16) / ppl(&f32) - 1.0).abs() < 0.01);
}
