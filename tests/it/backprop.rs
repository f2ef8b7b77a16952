//! The explicit backward pass (`model::backprop`, the trainer's default engine) against
//! candle's autograd over the whole graph, the independent reference: the same loss, the
//! same final hidden states bit for bit, and every adapter tensor's gradient within 1e-5
//! relative, for every adapter method, with and without dropout, on a non-uniform GQA
//! model with padding.
//!
//! Why 1e-5: both engines run the same kernels in f32; they differ only in the order in
//! which the residual stream's and the shared inputs' gradient contributions are summed
//! (autograd adds each into a buffer in graph order, the explicit pass adds the branches
//! directly). Each such sum is exact to ~1e-7 relative per add over 3 layers, so
//! differences of ~1e-6 are expected; 1e-5 leaves a margin and still catches any missed
//! or doubled term (those are O(1) relative).

use crate::common::*;
use candle_core::{DType, Device, Tensor};
use rora::adapters::{self, Method};
use rora::model::{backprop, safetensors_dir, Llama};
use rora::nn::Mode;
use rora::train::gradients::{micro_step, Backward, BackwardSettings, MicroStep};
use rora::train::{Batch, FinetuneSpec, Objective, ObjectiveKind};

const ALL: [&str; 7] = rora::model::schema::MODULES;

/// Two right-padded examples of random tokens, some positions not targets.
fn batch() -> Batch {
    random_batch(5, &[13, 8], 3)
}

fn model_with(method: Method, dropout: f64, targets: &[&str]) -> Llama {
    model_with_rank(method, 4, dropout, targets)
}

/// [`model_with`] at `rank` (alpha 2 · rank).
fn model_with_rank(method: Method, rank: usize, dropout: f64, targets: &[&str]) -> Llama {
    let mut model = tiny_llama(&NON_UNIFORM_LAYERS, 21);
    let spec = attach_spec(method, rank, 2.0 * rank as f64, dropout, targets);
    adapters::attach(&mut model, &spec, 3).unwrap();
    randomize_adapters(&model, 9);
    model
}

fn step(model: &Llama, objective: &Objective, engine: Backward) -> MicroStep {
    step_with(
        model,
        objective,
        BackwardSettings {
            engine,
            activation_checkpointing: false,
        },
    )
}

fn step_with(model: &Llama, objective: &Objective, settings: BackwardSettings) -> MicroStep {
    let vars = adapters::trainable_vars(model);
    let mode = Mode::train(0xABCD);
    micro_step(objective, model, &batch(), mode, 2, &vars, settings).unwrap()
}

fn relative_error(a: &Tensor, b: &Tensor) -> f64 {
    let diff = (a - b).unwrap().sqr().unwrap().sum_all().unwrap();
    let norm = b.sqr().unwrap().sum_all().unwrap();
    let diff = diff.to_scalar::<f32>().unwrap() as f64;
    let norm = norm.to_scalar::<f32>().unwrap() as f64;
    (diff / norm).sqrt()
}

/// Asserts both engines agree on `model`: loss to 1e-6, each gradient to 1e-5 relative.
fn assert_engines_agree(model: &Llama, objective: &Objective, what: &str) {
    assert!(
        backprop::applies_to(model),
        "{what}: the explicit pass must apply"
    );
    let explicit = step(model, objective, Backward::Auto);
    let reference = step(model, objective, Backward::Autograd);
    let loss_err = (explicit.loss - reference.loss).abs() / reference.loss.abs();
    assert!(
        loss_err < 1e-6,
        "{what}: loss {} vs {}",
        explicit.loss,
        reference.loss
    );
    let vars = adapters::trainable_vars(model);
    assert!(!vars.is_empty());
    for (name, var) in &vars {
        let r = reference
            .grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{what}: autograd gave {name} no gradient"));
        let e = explicit
            .grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{what}: the explicit pass gave {name} no gradient"));
        assert!(max_abs(r) > 0.0, "{what}: {name}'s gradient is zero");
        let err = relative_error(e, r);
        assert!(err < 1e-5, "{what}: {name} relative error {err:.2e}");
    }
}

#[test]
fn final_hidden_states_equal_the_model_forward_pass_bit_for_bit() {
    for dropout in [0.0, 0.1] {
        let model = model_with(Method::Rora, dropout, &ALL);
        assert_explicit_forward_is_the_models(&model, &format!("dropout {dropout}"));
    }
}

/// The explicit pass's final hidden states equal the model's own forward pass bit for bit.
fn assert_explicit_forward_is_the_models(model: &Llama, what: &str) {
    let b = batch();
    let mode = Mode::train(77);
    let (hidden, _) = backprop::forward(model, &b.ids, Some(&b.mask), mode, false).unwrap();
    let reference = model
        .forward_hidden(&b.ids, Some(&b.mask), None, mode)
        .unwrap();
    let (x, y): (Vec<f32>, Vec<f32>) = (
        hidden.flatten_all().unwrap().to_vec1().unwrap(),
        reference.flatten_all().unwrap().to_vec1().unwrap(),
    );
    assert!(
        x.iter().zip(&y).all(|(a, b)| a.to_bits() == b.to_bits()),
        "{what}: max difference {}",
        max_abs_diff(&hidden, &reference)
    );
}

/// With bf16 products from rank 32, the explicit pass runs q, k and v (and gate and up)
/// as one pass over one conversion of their shared input where there is no dropout
/// (`tape::forward_shared`), one by one where there is: both must equal the model's own
/// forward pass (each projection alone) bit for bit, and the gradients autograd's.
#[test]
fn shared_bf16_projections_equal_the_model_forward_pass_bit_for_bit() {
    if !rora::nn::fused::bf16::available() {
        rora::require::skip_or_fail("bf16", "no bf16 kernel on this CPU (AMX or AVX512-BF16)");
        return;
    }
    for dropout in [0.0, 0.1] {
        let mut model = model_with_rank(Method::Rora, 32, dropout, &ALL);
        let bf16 = rora::nn::MatmulPrecision::Bf16;
        assert!(model.set_matmul_precision(bf16).unwrap());
        let what = format!("bf16, dropout {dropout}");
        assert_explicit_forward_is_the_models(&model, &what);
        assert_engines_agree(&model, &Objective::NextToken, &what);
    }
}

#[test]
fn every_low_rank_method_gets_autograds_gradients() {
    for method in [Method::Lora, Method::Rora, Method::Dora, Method::RoraDora] {
        for dropout in [0.0, 0.1] {
            let model = model_with(method, dropout, &ALL);
            let what = format!("{method:?} dropout {dropout}");
            assert_engines_agree(&model, &Objective::NextToken, &what);
        }
    }
}

#[test]
fn projections_without_adapters_pass_gradients_through() {
    // o_proj, gate_proj and down_proj keep no adapter: their frozen backward carries the
    // gradient to the adapters below them.
    let model = model_with(Method::Rora, 0.05, &["q_proj", "v_proj", "up_proj"]);
    assert_engines_agree(&model, &Objective::NextToken, "rora on q, v, up");
}

#[test]
fn bottleneck_adapters_go_through_the_recorded_path() {
    for method in [Method::Series, Method::Parallel] {
        let model = model_with(method, 0.0, &["up_proj", "down_proj"]);
        assert_engines_agree(&model, &Objective::NextToken, &format!("{method:?}"));
    }
}

#[test]
fn distillation_gets_autograds_gradients() {
    let teacher = tiny_llama(&NON_UNIFORM_LAYERS, 22);
    for objective in [ObjectiveKind::Kd, ObjectiveKind::KdLm] {
        let spec = FinetuneSpec {
            objective,
            kd_temperature: 2.0,
            ..FinetuneSpec::default()
        };
        let objective = Objective::from_spec(&spec, Some(teacher.clone())).unwrap();
        let model = model_with(Method::Rora, 0.1, &ALL);
        assert_engines_agree(&model, &objective, &format!("{:?}", spec.objective));
    }
}

#[test]
fn prefix_tuning_and_other_dtypes_fall_back_to_autograd() {
    let mut model = tiny_llama(&[NON_UNIFORM_LAYERS[0]; 2], 4);
    let spec = rora::adapters::AttachSpec {
        num_virtual_tokens: 3,
        ..rora::adapters::AttachSpec::new(Method::Prefix)
    };
    adapters::attach(&mut model, &spec, 0).unwrap();
    assert!(!backprop::applies_to(&model));
    // Auto then runs autograd: the two engines give the very same numbers.
    let auto = step(&model, &Objective::NextToken, Backward::Auto);
    let reference = step(&model, &Objective::NextToken, Backward::Autograd);
    assert_eq!(auto.loss.to_bits(), reference.loss.to_bits());

    // bf16 weights: the fused kernels do not take them, so neither does the explicit pass.
    let tmp = tempfile::tempdir().unwrap();
    write_tiny_model(tmp.path(), &NON_UNIFORM_LAYERS, 21);
    let cfg = safetensors_dir::read_config(tmp.path()).unwrap();
    let w = safetensors_dir::read_weights(tmp.path(), DType::BF16, &Device::Cpu).unwrap();
    let mut bf16 = Llama::from_weights(cfg, &w).unwrap();
    adapters::attach(&mut bf16, &attach_spec(Method::Rora, 4, 8.0, 0.0, &ALL), 3).unwrap();
    assert!(!backprop::applies_to(&bf16));
}

#[test]
fn activation_checkpointing_recomputes_the_same_gradients_bit_for_bit() {
    // Dropout on: the recomputed layers must draw the very same masks.
    for method in [Method::Rora, Method::Dora] {
        let model = model_with(method, 0.1, &ALL);
        let settings = |activation_checkpointing| BackwardSettings {
            engine: Backward::Auto,
            activation_checkpointing,
        };
        let kept = step_with(&model, &Objective::NextToken, settings(false));
        let recomputed = step_with(&model, &Objective::NextToken, settings(true));
        assert_eq!(kept.loss.to_bits(), recomputed.loss.to_bits());
        for (name, var) in adapters::trainable_vars(&model) {
            let bits = |m: &MicroStep| -> Vec<u32> {
                let g = m.grads.get(var.as_tensor()).unwrap();
                let v: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
                v.into_iter().map(f32::to_bits).collect()
            };
            assert!(
                bits(&kept) == bits(&recomputed),
                "{method:?}: {name} differs"
            );
        }
    }
    // Candle's autograd cannot recompute: asking for both is a clear error.
    let model = model_with(Method::Rora, 0.0, &ALL);
    let vars = adapters::trainable_vars(&model);
    let settings = BackwardSettings {
        engine: Backward::Autograd,
        activation_checkpointing: true,
    };
    let err = micro_step(
        &Objective::NextToken,
        &model,
        &batch(),
        Mode::Eval,
        1,
        &vars,
        settings,
    )
    .err()
    .expect("refused");
    assert!(
        err.to_string().contains("activation_checkpointing"),
        "{err}"
    );
}

#[test]
fn activation_checkpointing_without_the_explicit_pass_is_refused_before_any_work() {
    for (setting, attach) in [("dtype: bf16\n", "rora"), ("", "prefix")] {
        let tmp = tempfile::tempdir().unwrap();
        let (out, run) = run_yaml(
            tmp.path(),
            &format!(
                "name: t\n{setting}stages:\n  - load:\n      model: {}\n  - attach:\n      method: {attach}\n  \
                 - finetune:\n      text: [{}/data/stories260K-train.txt]\n      max_steps: 1\n      \
                 activation_checkpointing: true\n",
                stories_dir().display(),
                env!("CARGO_MANIFEST_DIR")
            ),
            &[],
        );
        let err = stderr(&out);
        assert!(!out.status.success(), "{setting}{attach}: accepted");
        assert!(
            err.contains("finetune.activation_checkpointing") && err.contains("dtype: f32"),
            "{err}"
        );
        assert!(!run.exists());
    }
}

/// `--dry-run` says when a run will not fit (Sheared-LLaMA-1.3B at micro-batch 128 × 256
/// needs 69 GiB of activations, more than a CI machine or a workstation has), and
/// activation checkpointing shrinks the activations' estimate to the layers' inputs plus
/// one layer.
#[test]
fn dry_run_says_when_a_run_will_not_fit_and_what_checkpointing_saves() {
    let activations = |extra: &[&str]| -> (String, f64) {
        let mut args = vec![
            "--pipeline",
            "pipelines/sheared13b.yaml",
            "--dry-run",
            "--set",
            "dtype=f32",
            "--set",
            "finetune.micro_batch_size=128",
            "--set",
            "finetune.batch_size=128",
        ];
        args.extend_from_slice(extra);
        let out = recover(&args);
        assert!(out.status.success(), "{}", stderr(&out));
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let row = text
            .lines()
            .find(|l| l.starts_with("| activations |"))
            .unwrap_or_else(|| panic!("no activations row in\n{text}"))
            .to_string();
        let gib: f64 = row
            .split('|')
            .nth(2)
            .unwrap()
            .trim()
            .trim_end_matches(" GiB")
            .parse()
            .unwrap();
        (text, gib)
    };
    // Values kept per token: 24 layers × (4·2048 + 2·2048 + 2·5504) + 2·2048; with
    // checkpointing 24 · 2048 + one layer + 2·2048. Tokens 128 × 256, 4 bytes each.
    let gib = |per_token: u64| (per_token * 128 * 256 * 4) as f64 / (1u64 << 30) as f64;
    let (full, full_gib) = activations(&[]);
    assert!(full.contains("**Will not fit**"), "{full}");
    assert!(full.contains("activation_checkpointing: true"), "{full}");
    let want = gib(24 * (4 * 2048 + 2 * 2048 + 2 * 5504) + 2 * 2048);
    assert!((full_gib - want).abs() < 0.1, "{full_gib} vs {want}");
    let (_, kept_gib) = activations(&["--set", "finetune.activation_checkpointing=true"]);
    let want = gib(24 * 2048 + (4 * 2048 + 2 * 2048 + 2 * 5504) + 2 * 2048);
    assert!((kept_gib - want).abs() < 0.1, "{kept_gib} vs {want}");
}

/// `--dry-run --measure` times a calibration step and scales it to the run.
#[test]
fn dry_run_measure_prints_the_time_per_step_and_for_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("p.yaml");
    std::fs::write(
        &file,
        format!(
            "name: t\nstages:\n  - load:\n      model: {}\n  - attach:\n      method: rora\n      rank: 4\n  \
             - finetune:\n      text: [{}/data/stories260K-train.txt]\n      cutoff_len: 32\n      \
             batch_size: 4\n      micro_batch_size: 2\n      max_steps: 10\n",
            stories_dir().display(),
            env!("CARGO_MANIFEST_DIR")
        ),
    )
    .unwrap();
    let f = file.to_str().unwrap();
    let out = recover(&["--pipeline", f, "--dry-run", "--measure"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(text.contains("per step** of 4 × 32 tokens"), "{text}");
    assert!(text.contains("10 steps (max_steps)"), "{text}");
    let plain = recover(&["--pipeline", f, "--dry-run"]);
    assert!(String::from_utf8_lossy(&plain.stdout).contains("add `--measure`"));
}
