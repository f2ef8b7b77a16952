//! Helpers shared by the integration tests: where the shared data lives, and tiny
//! random models the tests write themselves.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rora::model::random::{random_weights, Draw, RandomInit};
use rora::model::LlamaConfig;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// `$RORA_SHARED`, default `../shared` (relative to the crate root, where tests run).
pub fn shared_dir() -> PathBuf {
    std::env::var_os("RORA_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared"))
}

/// Runs the `recover` binary offline, with the shared data and without backtraces.
pub fn recover(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_recover"))
        .args(args)
        .env("RORA_SHARED", shared_dir())
        .env("HF_HUB_OFFLINE", "1")
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("recover runs")
}

pub fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

pub fn stories_dir() -> PathBuf {
    shared_dir().join("models/stories260K")
}

pub fn load_stories() -> rora::model::LoadedModel {
    let src = rora::model::ModelSource::Folder(stories_dir());
    rora::model::load(&src, DType::F32, &Device::Cpu).expect("stories260K loads")
}

/// One layer of a test model: query heads, key/value heads, MLP width.
#[derive(Clone, Copy)]
pub struct TinyLayer {
    pub heads: usize,
    pub kv_heads: usize,
    pub mlp: usize,
}

/// Three layers of different widths (heads, key/value groups and MLP), as `prune` and
/// LLM-Pruner leave a model: the export tests' non-uniform model.
pub const NON_UNIFORM_LAYERS: [TinyLayer; 3] = [
    TinyLayer {
        heads: 8,
        kv_heads: 4,
        mlp: 96,
    },
    TinyLayer {
        heads: 4,
        kv_heads: 2,
        mlp: 40,
    },
    TinyLayer {
        heads: 6,
        kv_heads: 3,
        mlp: 64,
    },
];

/// Adapters of `method` on `targets` with no rank or alpha patterns.
pub fn attach_spec(
    method: rora::adapters::Method,
    rank: usize,
    alpha: f64,
    dropout: f64,
    targets: &[&str],
) -> rora::adapters::AttachSpec {
    rora::adapters::AttachSpec {
        rank,
        alpha: Some(alpha),
        dropout: Some(dropout),
        targets: Some(targets.iter().map(|s| s.to_string()).collect()),
        ..rora::adapters::AttachSpec::new(method)
    }
}

/// Writes a random Llama folder (config.json, model.safetensors, stories260K's
/// tokenizer.json) with hidden 64, head_dim 8, vocab 512 and the given layers. The
/// config declares per-layer shapes when the layers differ. Weights: embeddings
/// U(±0.5), projections U(±0.3), norms 1 + U(±0.2), from `model::random`.
pub fn write_tiny_model(dir: &Path, layers: &[TinyLayer], seed: u64) {
    write_tiny_model_with_vocab(dir, layers, seed, 512)
}

/// [`write_tiny_model`] with `vocab` output rows (the tokenizer stays stories260K's).
pub fn write_tiny_model_with_vocab(dir: &Path, layers: &[TinyLayer], seed: u64, vocab: usize) {
    let hidden = 64;
    let head_dim = 8;
    let uniform = layers
        .windows(2)
        .all(|w| (w[0].heads, w[0].kv_heads, w[0].mlp) == (w[1].heads, w[1].kv_heads, w[1].mlp));
    let max = |f: fn(&TinyLayer) -> usize| layers.iter().map(f).max().unwrap();
    let mut config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": max(|l| l.mlp),
        "num_hidden_layers": layers.len(),
        "num_attention_heads": max(|l| l.heads),
        "num_key_value_heads": max(|l| l.kv_heads),
        "head_dim": head_dim,
        "vocab_size": vocab,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": true,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "max_position_embeddings": 512
    });
    if !uniform {
        config["layer_shapes"] = layers
            .iter()
            .map(|l| {
                serde_json::json!({
                    "num_attention_heads": l.heads,
                    "num_key_value_heads": l.kv_heads,
                    "intermediate_size": l.mlp
                })
            })
            .collect();
    }
    let parsed = LlamaConfig::from_json_str(&config.to_string()).unwrap();
    let init = RandomInit {
        embeddings: Draw::Uniform { half_width: 0.5 },
        projections: Draw::Uniform { half_width: 0.3 },
        norms: Draw::OnePlusUniform { half_width: 0.2 },
        head: Draw::Uniform { half_width: 0.5 },
    };
    let weights = random_weights(&parsed, &init, seed, &Device::Cpu).unwrap();
    let tensors: HashMap<String, Tensor> = weights
        .names()
        .map(|name| (name.clone(), weights.get(name).unwrap().clone()))
        .collect();
    std::fs::create_dir_all(dir).unwrap();
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&config).unwrap(),
    )
    .unwrap();
    std::fs::copy(
        stories_dir().join("tokenizer.json"),
        dir.join("tokenizer.json"),
    )
    .unwrap();
}

/// Token ids as a (1, t) tensor.
pub fn ids_tensor(ids: &[u32]) -> Tensor {
    Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap()
}

/// The largest |x| of `t`.
pub fn max_abs(t: &Tensor) -> f32 {
    t.to_dtype(DType::F32)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Runs `pipeline_yaml` (written to a temp dir) with its run folder in that dir.
pub fn run_yaml(
    dir: &Path,
    pipeline_yaml: &str,
    extra: &[&str],
) -> (std::process::Output, std::path::PathBuf) {
    let file = dir.join("pipeline.yaml");
    std::fs::write(&file, pipeline_yaml).unwrap();
    let run_dir = dir.join("run");
    let set = format!("run_dir={}", run_dir.display());
    let mut args = vec!["--pipeline", file.to_str().unwrap(), "--set", &set];
    args.extend_from_slice(extra);
    (recover(&args), run_dir)
}

/// A random model of these layers (see [`write_tiny_model`]), loaded in f32.
pub fn tiny_llama(layers: &[TinyLayer], seed: u64) -> rora::model::Llama {
    let tmp = tempfile::tempdir().unwrap();
    write_tiny_model(tmp.path(), layers, seed);
    let cfg = rora::model::safetensors_dir::read_config(tmp.path()).unwrap();
    let w =
        rora::model::safetensors_dir::read_weights(tmp.path(), DType::F32, &Device::Cpu).unwrap();
    rora::model::Llama::from_weights(cfg, &w).unwrap()
}

/// Sets every adapter's B and bottleneck up-projection (uniform ±0.05) and DoRA magnitude (×0.8–1.2) to random
/// values, so that adapters change the model clearly, as trained ones do.
pub fn randomize_adapters(model: &rora::model::Llama, seed: u64) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    for (name, var) in rora::adapters::trainable_vars(model) {
        if name.ends_with("lora_B.weight") || name.ends_with("adapter_up.weight") {
            let v: Vec<f32> = (0..var.elem_count())
                .map(|_| rng.random_range(-0.05..0.05))
                .collect();
            var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
        if name.ends_with("lora_magnitude_vector") {
            let v: Vec<f32> = (0..var.elem_count())
                .map(|_| rng.random_range(0.8..1.2))
                .collect();
            let scale = Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap();
            var.set(&(var.as_tensor() * scale).unwrap()).unwrap();
        }
    }
}

/// Runs the pipeline `file` three times — uninterrupted into `dir/a`; into `dir/b` stopped
/// after `stop_after` steps; then `--resume` in `dir/b` — and asserts that both end with
/// byte-identical adapters and optimizer moments at `last_step` and the same logged
/// losses, one line per step. The pipeline checkpoints at `stop_after` and `last_step`.
pub fn assert_resume_is_bitwise(dir: &Path, file: &Path, stop_after: usize, last_step: usize) {
    let f = file.to_str().unwrap();
    let (a, b) = (dir.join("a"), dir.join("b"));
    let set_a = format!("run_dir={}", a.display());
    let set_b = format!("run_dir={}", b.display());
    let stop = format!("finetune.stop_after={stop_after}");
    for args in [
        vec!["--pipeline", f, "--set", &set_a],
        vec!["--pipeline", f, "--set", &set_b, "--set", &stop],
    ] {
        let out = recover(&args);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    assert!(b.join(format!("checkpoints/step-{stop_after}")).is_dir());
    assert!(!b.join(format!("checkpoints/step-{last_step}")).exists());
    let out = recover(&["--pipeline", f, "--set", &set_b, "--resume"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains(&format!("resuming from checkpoint step-{stop_after}")));

    let last = format!("checkpoints/step-{last_step}");
    for file in ["adapter_model.safetensors", "optimizer.safetensors"] {
        let x = std::fs::read(a.join(&last).join(file)).unwrap();
        let y = std::fs::read(b.join(&last).join(file)).unwrap();
        assert!(
            x == y,
            "{file} differs between the uninterrupted and the resumed run"
        );
    }
    let log_a = std::fs::read_to_string(a.join("train-log.jsonl")).unwrap();
    let log_b = std::fs::read_to_string(b.join("train-log.jsonl")).unwrap();
    assert_eq!(log_b.lines().count(), last_step);
    let losses = |log: &str| -> Vec<String> {
        log.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].to_string())
            .collect()
    };
    assert_eq!(losses(&log_a), losses(&log_b));
}

/// Right-padded examples of seeded random tokens (ids 3..512), one per length in `lens`;
/// position j is a target when `j >= first_target` or j is odd.
pub fn random_batch(seed: u64, lens: &[usize], first_target: usize) -> rora::train::Batch {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let examples: Vec<rora::data::Example> = lens
        .iter()
        .map(|&len| rora::data::Example {
            ids: (0..len).map(|_| rng.random_range(3..512)).collect(),
            targets: (0..len).map(|j| j >= first_target || j % 2 == 1).collect(),
        })
        .collect();
    let refs: Vec<&rora::data::Example> = examples.iter().collect();
    rora::train::Batch::collate(&refs, &Device::Cpu).unwrap()
}

pub const IDS: [u32; 9] = [1, 45, 300, 7, 99, 12, 401, 3, 250];

pub fn tiny_loss(model: &rora::model::Llama) -> Tensor {
    let logits = model.forward(&ids_tensor(&IDS), None, None).unwrap();
    let n = IDS.len() - 1;
    let mask = Tensor::ones((1, n), candle_core::DType::F32, &Device::Cpu).unwrap();
    rora::model::loss::masked_mean_nll(
        &logits.narrow(1, 0, n).unwrap(),
        &ids_tensor(&IDS[1..]),
        &mask,
    )
    .unwrap()
    .0
}

/// ‖g − fd‖ / ‖fd‖ over the 6 coordinates of `var` with the largest gradient `g`, with
/// central differences of `f` (eps 1e-2: the f32 loss has rounding error ~1e-6, so the
/// quotient's rounding is ~1e-4 relative, and the truncation error ~eps² is as small).
pub fn fd_relative_error(var: &candle_core::Var, g: &Tensor, f: impl Fn() -> f64) -> f64 {
    let g: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
    let x0: Vec<f32> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
    let mut order: Vec<usize> = (0..g.len()).collect();
    order.sort_by(|&a, &b| g[b].abs().total_cmp(&g[a].abs()));
    let (mut num, mut den) = (0f64, 0f64);
    for &i in order.iter().take(6) {
        let eval = |delta: f32| {
            let mut x = x0.clone();
            x[i] += delta;
            var.set(&Tensor::from_vec(x, var.shape(), &Device::Cpu).unwrap())
                .unwrap();
            let l = f();
            var.set(&Tensor::from_vec(x0.clone(), var.shape(), &Device::Cpu).unwrap())
                .unwrap();
            l
        };
        let fd = (eval(1e-2) - eval(-1e-2)) / 2e-2;
        num += (g[i] as f64 - fd).powi(2);
        den += fd.powi(2);
    }
    (num / den).sqrt()
}
