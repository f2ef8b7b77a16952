//! Distillation (`finetune.objective: kd | kd+lm`): the blockwise KD loss against the
//! KL of both models' full logits, its gradient against finite differences and f64
//! autograd, teacher = student, `kd_ratio: 0` against `lm`, and bitwise resume.

use crate::common::*;
use candle_core::{DType, Device, Tensor, Var, D};
use rand::{Rng, SeedableRng};
use rora::adapters::{self, AttachSpec};
use rora::model::{Llama, LoadedModel, ModelSource};
use rora::nn::fused::distill::{head_kl_divergence, Divergence};
use rora::nn::Mode;
use rora::train::{self, Batch, FinetuneSpec, Objective, ObjectiveKind};
use std::path::Path;

const CASES: [(Divergence, f64); 4] = [
    (Divergence::Forward, 1.0),
    (Divergence::Forward, 2.0),
    (Divergence::Reverse, 1.0),
    (Divergence::Reverse, 2.0),
];

fn yaml<T: serde::de::DeserializeOwned>(text: &str) -> T {
    serde_yaml_ng::from_str(text).unwrap()
}

/// A tiny random model (hidden 64, vocab 512, stories260K's tokenizer) written to `dir`.
fn tiny(dir: &Path, seed: u64) -> LoadedModel {
    let layer = TinyLayer {
        heads: 8,
        kv_heads: 4,
        mlp: 96,
    };
    write_tiny_model(dir, &[layer, layer], seed);
    rora::model::load(&ModelSource::Folder(dir.into()), DType::F32, &Device::Cpu).unwrap()
}

/// RoRA r4 on every projection, with random B so the adapters change the model.
fn with_adapters(mut model: Llama) -> Llama {
    let spec: AttachSpec = yaml(
        "method: rora\nrank: 4\nalpha: 8\ndropout: 0.0\n\
         targets: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]",
    );
    adapters::attach(&mut model, &spec, 0).unwrap();
    randomize_adapters(&model, 7);
    model
}

/// Two right-padded examples of random tokens, some positions not targets.
fn batch() -> Batch {
    random_batch(5, &[14, 9], 4)
}

fn kd_spec(objective: ObjectiveKind, divergence: Divergence, temperature: f64) -> FinetuneSpec {
    FinetuneSpec {
        objective,
        kd_divergence: divergence,
        kd_temperature: temperature,
        ..FinetuneSpec::default()
    }
}

/// `T² · KL` per row of f64 logits (n, vocab), from log-softmaxes of the full logits.
fn kl_rows_f64(zs: &Tensor, zt: &Tensor, t: f64, divergence: Divergence) -> Tensor {
    let log_softmax = |z: &Tensor| {
        candle_nn::ops::log_softmax(&(z.to_dtype(DType::F64).unwrap() / t).unwrap(), D::Minus1)
            .unwrap()
    };
    let (ls, lt) = (log_softmax(zs), log_softmax(zt));
    let (p, ratio) = match divergence {
        Divergence::Forward => (lt.exp().unwrap(), (&lt - &ls).unwrap()),
        Divergence::Reverse => (ls.exp().unwrap(), (&ls - &lt).unwrap()),
    };
    ((p * ratio).unwrap().sum(D::Minus1).unwrap() * (t * t)).unwrap()
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

#[test]
fn kd_loss_equals_the_kl_of_both_models_full_logits() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let student = with_adapters(tiny(da.path(), 1).model);
    let teacher = tiny(db.path(), 2).model;
    let batch = batch();
    let width = batch.ids.dim(1).unwrap();
    // The reference: both models' logits at every position (Llama::forward), the KL per
    // position in f64, masked and averaged over the target positions.
    let logits = |m: &Llama| {
        m.forward(&batch.ids, Some(&batch.mask), None)
            .unwrap()
            .narrow(1, 0, width - 1)
            .unwrap()
            .flatten_to(1)
            .unwrap()
    };
    let (zs, zt) = (logits(&student), logits(&teacher));
    let mask = batch
        .target_mask
        .flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let count = scalar(&mask.sum_all().unwrap());
    assert!(count > 0.0 && count < mask.elem_count() as f64);
    for (divergence, t) in CASES {
        let spec = kd_spec(ObjectiveKind::Kd, divergence, t);
        let objective = Objective::from_spec(&spec, Some(teacher.clone())).unwrap();
        let loss = objective.loss(&student, &batch, Mode::Eval).unwrap();
        assert_eq!(loss.target_tokens as f64, count);
        let got = scalar(&loss.mean);
        let rows = kl_rows_f64(&zs, &zt, t, divergence);
        let want = scalar(&(rows * &mask).unwrap().sum_all().unwrap()) / count;
        let rel = (got - want).abs() / want.abs();
        assert!(
            rel < 1e-5,
            "{divergence} T={t}: {got} against {want} (rel {rel:.2e})"
        );
        assert!(want > 1e-2, "the models should differ clearly ({want})");

        // kd+lm mixes it with the cross entropy at kd_ratio.
        let mix = FinetuneSpec {
            kd_ratio: 0.3,
            ..kd_spec(ObjectiveKind::KdLm, divergence, t)
        };
        let mixed = Objective::from_spec(&mix, Some(teacher.clone())).unwrap();
        let mixed = scalar(&mixed.loss(&student, &batch, Mode::Eval).unwrap().mean);
        let ce = scalar(
            &Objective::NextToken
                .loss(&student, &batch, Mode::Eval)
                .unwrap()
                .mean,
        );
        let want_mix = 0.7 * ce + 0.3 * got;
        assert!(
            (mixed - want_mix).abs() < 1e-6 * want_mix,
            "{mixed} vs {want_mix}"
        );
    }
}

/// The op's gradient wrt the student's hidden states against (a) f64 autograd of the
/// full-logit composite on every entry and (b) central finite differences of the f64
/// composite on 16 entries. 70 rows cover a full block of 64 and a partial one; each row
/// has its own upstream weight, so the backward pass's scaling is checked too.
#[test]
fn kd_gradient_matches_f64_autograd_and_finite_differences() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (student, teacher) = (tiny(da.path(), 1).model, tiny(db.path(), 2).model);
    let (n, h) = (70, 64);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let mut draw = |len: usize, lo: f32, hi: f32| -> Vec<f32> {
        (0..len).map(|_| rng.random_range(lo..hi)).collect()
    };
    let hs0 = draw(n * h, -1.5, 1.5);
    let ht = Tensor::from_vec(draw(n * h, -1.5, 1.5), (n, h), &Device::Cpu).unwrap();
    let g = Tensor::from_vec(draw(n, 0.5, 1.5), n, &Device::Cpu).unwrap();
    let f64_of = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
    let (ws, wt, g64) = (
        f64_of(student.head_weight()),
        f64_of(teacher.head_weight()),
        f64_of(&g),
    );
    let zt = f64_of(&ht).matmul(&wt.t().unwrap()).unwrap();
    // Σ_i g_i · T² KL_i in f64 for student hidden states `hs` (n, h).
    let reference = |hs: &Tensor, t: f64, divergence: Divergence| -> Tensor {
        let zs = hs.matmul(&ws.t().unwrap()).unwrap();
        (kl_rows_f64(&zs, &zt, t, divergence) * &g64)
            .unwrap()
            .sum_all()
            .unwrap()
    };
    for (divergence, t) in CASES {
        let hs = Var::from_vec(hs0.clone(), (n, h), &Device::Cpu).unwrap();
        let out = head_kl_divergence(
            hs.as_tensor(),
            &student.head(),
            &ht,
            &teacher.head(),
            t,
            divergence,
        )
        .unwrap();
        let loss = (out * &g).unwrap().sum_all().unwrap();
        let grad = loss.backward().unwrap();
        let grad: Vec<f32> = grad
            .get(hs.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();

        let hs64 = Var::from_tensor(&f64_of(hs.as_tensor())).unwrap();
        let want_loss = reference(hs64.as_tensor(), t, divergence);
        let rel = (scalar(&loss) - scalar(&want_loss)).abs() / scalar(&want_loss);
        assert!(rel < 1e-5, "{divergence} T={t}: loss rel error {rel:.2e}");
        let auto: Vec<f64> = want_loss
            .backward()
            .unwrap()
            .get(hs64.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        // f32 logits and softmaxes against f64 ones: 1e-5 of the largest entry.
        let scale = auto.iter().fold(0f64, |m, v| m.max(v.abs()));
        assert!(
            scale > 1e-3,
            "{divergence} T={t}: a vanishing gradient ({scale})"
        );
        let worst = grad
            .iter()
            .zip(&auto)
            .map(|(&a, &b)| (a as f64 - b).abs())
            .fold(0f64, f64::max);
        assert!(
            worst < 1e-5 * scale,
            "{divergence} T={t}: gradient off by {worst:.2e} of {scale:.2e} against f64 autograd"
        );

        // Finite differences, central, step 1e-4 in f64: truncation error O(step²)
        // ≈ 1e-8, far below the f32 kernel's rounding, hence the same 1e-5 · scale.
        let step = 1e-4;
        let mut pick = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for _ in 0..16 {
            let k = pick.random_range(0..n * h);
            let shifted = |delta: f64| {
                let mut v: Vec<f64> = hs0.iter().map(|&x| x as f64).collect();
                v[k] += delta;
                let hs = Tensor::from_vec(v, (n, h), &Device::Cpu).unwrap();
                scalar(&reference(&hs, t, divergence))
            };
            let fd = (shifted(step) - shifted(-step)) / (2.0 * step);
            assert!(
                (grad[k] as f64 - fd).abs() < 1e-5 * scale,
                "{divergence} T={t}: entry {k}: {} against finite difference {fd}",
                grad[k]
            );
        }
    }
}

#[test]
fn teacher_equal_to_the_student_gives_zero_loss_and_zero_gradient() {
    let dir = tempfile::tempdir().unwrap();
    let student = with_adapters(tiny(dir.path(), 1).model);
    let batch = batch();
    for (divergence, t) in CASES {
        let spec = kd_spec(ObjectiveKind::Kd, divergence, t);
        // The clone shares the adapters' variables: its hidden states are detached.
        let objective = Objective::from_spec(&spec, Some(student.clone())).unwrap();
        let loss = objective.loss(&student, &batch, Mode::Eval).unwrap().mean;
        assert!(
            scalar(&loss).abs() < 1e-6,
            "{divergence} T={t}: loss {loss}"
        );
        let grads = loss.backward().unwrap();
        let vars = adapters::trainable_vars(&student);
        assert!(!vars.is_empty());
        for (name, var) in vars {
            let g = grads.get(var.as_tensor()).unwrap();
            let worst = max_abs_diff(g, &g.zeros_like().unwrap());
            assert!(worst < 1e-6, "{divergence} T={t}: {name} gradient {worst}");
        }
    }
}

/// Three steps of stories260K with RoRA (dropout 0.1) on its training text, written to
/// `dir`: the logged loss and gradient norm of each step.
fn three_steps(dir: &Path, keys: &str, teacher: Option<Llama>) -> Vec<(u64, u64)> {
    let loaded = load_stories();
    let mut model = loaded.model;
    let attach: AttachSpec = yaml("method: rora\nrank: 4\nalpha: 8\ndropout: 0.1");
    adapters::attach(&mut model, &attach, 0).unwrap();
    let spec: FinetuneSpec = yaml(&format!(
        "text: [{}/data/stories260K-train.txt]\ncutoff_len: 32\nbatch_size: 4\n\
         micro_batch_size: 2\nlearning_rate: 2.0e-3\nwarmup_steps: 1\nmax_steps: 3\n{keys}",
        env!("CARGO_MANIFEST_DIR")
    ));
    let objective = Objective::from_spec(&spec, teacher).unwrap();
    train::finetune(
        &mut model,
        &loaded.tokenizer,
        &spec,
        objective,
        4,
        dir,
        false,
    )
    .unwrap();
    std::fs::read_to_string(dir.join("train-log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let line: train::LogLine = serde_json::from_str(l).unwrap();
            let step = line.train.expect("a step line");
            (step.loss.to_bits(), step.grad_norm.to_bits())
        })
        .collect()
}

#[test]
fn kd_ratio_zero_trains_exactly_like_lm() {
    let (da, db, dt) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let teacher = tiny(dt.path(), 9).model;
    let lm = three_steps(da.path(), "", None);
    let mixed = three_steps(
        db.path(),
        "objective: kd+lm\nkd_ratio: 0.0\nkd_temperature: 2.0",
        Some(teacher.clone()),
    );
    assert_eq!(lm.len(), 3);
    assert_eq!(lm, mixed, "(loss, grad_norm) bits per step differ");
    // And a non-zero ratio does change them (the teacher is really in the loss).
    let dc = tempfile::tempdir().unwrap();
    let half = three_steps(dc.path(), "objective: kd+lm", Some(teacher));
    assert_ne!(lm[0], half[0]);
}

#[test]
fn resumed_kd_run_from_the_pre_prune_teacher_is_bitwise_equal() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("kd.yaml");
    let text = format!(
        "name: kd\nseed: 3\nstages:\n  - load:\n      model: {model}\n  - prune:\n      \
         calibration: {data}\n      n_samples: 4\n      seq_len: 32\n      mlp_ratio: 0.5\n      \
         layers: [1, 3]\n  - attach:\n      method: rora\n      rank: 4\n      dropout: 0.1\n  \
         - finetune:\n      text: [{data}]\n      objective: kd\n      kd_temperature: 2.0\n      \
         kd_divergence: reverse\n      cutoff_len: 32\n      batch_size: 4\n      \
         micro_batch_size: 2\n      learning_rate: 2.0e-3\n      warmup_steps: 2\n      \
         max_steps: 12\n      save_every: 6\n      val_set_size: 4\n      eval_every: 6\n",
        model = stories_dir().display(),
        data = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("data/stories260K-train.txt")
            .display(),
    );
    std::fs::write(&file, text).unwrap();
    assert_resume_is_bitwise(tmp.path(), &file, 6, 12);
    // The teacher was the dense model: the first step's distillation loss is not 0.
    let log = std::fs::read_to_string(tmp.path().join("a/train-log.jsonl")).unwrap();
    let first: train::LogLine = serde_json::from_str(log.lines().next().unwrap()).unwrap();
    let loss = first.loss().unwrap();
    assert!(loss > 1e-4, "loss {loss}");
}
