//! `recover bench train`: times the `finetune` stage's own training step on one fixed
//! batch of the benchmarks' random model.

use super::measure::{median, mib, proc_status_bytes};
use super::shape::{random_ids, random_model, set_matmul_precision};
use super::BenchShape;
use crate::adapters::{self, AttachSpec, Method, MODULES};
use crate::data::Example;
use crate::nn::frozen::MatmulPrecision;
use crate::train::schedule::LrSchedule;
use crate::train::{Backward, Batch, FinetuneSpec, Objective, ObjectiveKind, Trainer};
use anyhow::{bail, Context, Result};
use candle_core::Device;
use rand::SeedableRng;
use serde::Serialize;

/// The benchmarked shape and schedule. The defaults are the reference benchmark
/// (`BenchShape::Default`); `BenchShape::spec` gives the others.
#[derive(Debug, Clone, Serialize)]
pub struct TrainBenchSpec {
    /// The preset the shape fields came from (a spec built by hand keeps `default`).
    pub shape: BenchShape,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub intermediate: usize,
    pub vocab: usize,
    /// The output head is the embedding matrix (no `lm_head.weight`).
    pub tie_word_embeddings: bool,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// The RoPE table's length (at least `seq_len` is used).
    pub max_position_embeddings: usize,
    pub batch: usize,
    pub seq_len: usize,
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub learning_rate: f64,
    pub max_grad_norm: f64,
    pub warmup: usize,
    pub steps: usize,
    pub seed: u64,
    pub matmul_precision: MatmulPrecision,
    /// `kd`/`kd+lm`: the teacher is a second random model of this shape (seed + 1).
    pub objective: ObjectiveKind,
    /// The gradients' engine: the explicit backward pass (`auto`) or candle's autograd.
    pub backward: Backward,
    /// Recompute each layer's activations in the backward pass.
    pub activation_checkpointing: bool,
}

impl Default for TrainBenchSpec {
    fn default() -> Self {
        Self {
            shape: BenchShape::Default,
            hidden: 512,
            layers: 6,
            heads: 8,
            kv_heads: 8,
            intermediate: 1376,
            vocab: 1000,
            tie_word_embeddings: false,
            rms_norm_eps: 1e-6,
            rope_theta: 10_000.0,
            max_position_embeddings: 512,
            batch: 8,
            seq_len: 128,
            rank: 8,
            alpha: 16.0,
            dropout: 0.0,
            learning_rate: 1e-4,
            max_grad_norm: 1.0,
            warmup: 2,
            steps: 10,
            seed: 0,
            matmul_precision: MatmulPrecision::F32,
            objective: ObjectiveKind::Lm,
            backward: Backward::Auto,
            activation_checkpointing: false,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct TrainBenchReport {
    pub spec: TrainBenchSpec,
    /// Weights, activations and adapters: always f32 here.
    pub dtype: &'static str,
    /// candle's CPU thread count (RAYON_NUM_THREADS, else all cores).
    pub threads: usize,
    /// Base-model parameters, embeddings included.
    pub base_params: u64,
    /// Parameters that enter a matmul per token: the 7 projections of every layer and the
    /// output head (the embedding lookup is not a matmul).
    pub matmul_params: u64,
    pub trainable_params: u64,
    /// Tokens per step: batch × seq_len.
    pub tokens_per_step: u64,
    /// Wall time of every timed step, in order.
    pub step_s: Vec<f64>,
    pub median_step_s: f64,
    /// Median time of each phase of a step: forward and loss; backward; gradient
    /// collection, norm, clipping and the AdamW update.
    pub median_forward_s: f64,
    pub median_backward_s: f64,
    pub median_optimizer_s: f64,
    /// tokens_per_step / median_step_s.
    pub tokens_per_s: f64,
    /// FLOPs per token: 4·P (forward 2·P, input gradients 2·P; the frozen weights get no
    /// gradient, see `model::frozen_matmul`) plus attention scores (12·L·T·h·hd: forward 4,
    /// backward 8) plus LoRA (6 per adapter param).
    pub useful_flops_per_token: f64,
    /// useful_flops_per_token × tokens_per_s / 1e9.
    pub useful_gflops: f64,
    /// Loss of the first and of the last step (random data: about ln(vocab)).
    pub first_loss: f64,
    pub last_loss: f64,
    /// The teacher's weights (`kd`, `kd+lm`), included in the resident sets below.
    pub teacher_weight_bytes: u64,
    /// Resident set after building the model (and the teacher) and attaching adapters,
    /// before any step: the weights. Peak minus this is what the steps added.
    pub rss_after_setup_bytes: Option<u64>,
    /// Peak resident set of the whole process (`VmHWM`, the value getrusage's ru_maxrss gives).
    pub peak_rss_bytes: Option<u64>,
}

impl TrainBenchReport {
    pub fn to_markdown(&self) -> String {
        let s = &self.spec;
        let steps: Vec<String> = self.step_s.iter().map(|t| format!("{t:.3}")).collect();
        let mut out = String::new();
        out.push_str("# recover bench train\n\n");
        out.push_str(&format!(
            "shape: {}; batch {} × {} tokens; \
             f32, frozen products {}; LoRA r={} alpha={} dropout={} on all 7 projections; \
             AdamW lr {:e}; backward {:?}{}; {} threads\n\n",
            s.describe_shape(),
            s.batch,
            s.seq_len,
            s.matmul_precision,
            s.rank,
            s.alpha,
            s.dropout,
            s.learning_rate,
            s.backward,
            if s.activation_checkpointing {
                ", activation checkpointing"
            } else {
                ""
            },
            self.threads
        ));
        out.push_str("| metric | value |\n|---|---|\n");
        let rows = [
            ("tokens/s", format!("{:.1}", self.tokens_per_s)),
            ("median step", format!("{:.3} s", self.median_step_s)),
            (
                "median forward / backward / optimizer",
                format!(
                    "{:.3} / {:.3} / {:.3} s",
                    self.median_forward_s, self.median_backward_s, self.median_optimizer_s
                ),
            ),
            (
                "steps (s)",
                format!("{} (after {} warm-up)", steps.join(", "), s.warmup),
            ),
            (
                "useful GFLOP/s (4·P + attention + LoRA)",
                format!("{:.2}", self.useful_gflops),
            ),
            (
                "params: base / matmul P / trainable",
                format!(
                    "{} / {} / {}",
                    self.base_params, self.matmul_params, self.trainable_params
                ),
            ),
            (
                "objective (teacher weights)",
                format!("{} ({})", s.objective, mib(Some(self.teacher_weight_bytes))),
            ),
            (
                "loss first → last",
                format!("{:.4} → {:.4}", self.first_loss, self.last_loss),
            ),
            ("RSS after setup", mib(self.rss_after_setup_bytes)),
            ("peak RSS", mib(self.peak_rss_bytes)),
            (
                "peak RSS − RSS after setup (the steps' own memory)",
                mib(self
                    .peak_rss_bytes
                    .zip(self.rss_after_setup_bytes)
                    .map(|(p, s)| p.saturating_sub(s))),
            ),
        ];
        for (k, v) in rows {
            out.push_str(&format!("| {k} | {v} |\n"));
        }
        out
    }
}

/// Builds the model, attaches the adapters, and times `spec.steps` training steps after
/// `spec.warmup` untimed ones.
pub fn bench_train(spec: &TrainBenchSpec) -> Result<TrainBenchReport> {
    if spec.steps == 0 {
        bail!("bench train needs --steps of at least 1");
    }
    if spec.vocab < 2 || spec.seq_len < 2 {
        bail!("bench train needs a vocabulary and a sequence of at least 2");
    }
    if spec.batch == 0 || spec.rank == 0 {
        bail!("bench train needs --batch and --rank of at least 1");
    }
    let device = Device::Cpu;
    let mut model = random_model(spec, &device)?;
    let base_params = model.num_params() as u64;
    let matmul_params = (model
        .projections()
        .map(|(_, _, l)| l.weight().elem_count())
        .sum::<usize>()
        + spec.vocab * spec.hidden) as u64;
    let attach = AttachSpec {
        rank: spec.rank,
        alpha: Some(spec.alpha),
        dropout: Some(spec.dropout),
        targets: Some(MODULES.map(String::from).to_vec()),
        ..AttachSpec::new(Method::Lora)
    };
    let attached = adapters::attach(&mut model, &attach, spec.seed)?;
    set_matmul_precision(&mut model, spec, "train")?;
    // One fixed batch of random ids, unpadded: the attention mask is all ones and every
    // shifted position is a target, as `finetune` collates a full-length batch. One
    // micro-batch per step, the learning rate constant.
    let (b, t) = (spec.batch, spec.seq_len);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(spec.seed.wrapping_add(1));
    let examples: Vec<Example> = (0..b)
        .map(|_| Example {
            ids: random_ids(&mut rng, t, spec.vocab as u32),
            targets: vec![true; t],
        })
        .collect();
    let batch = Batch::collate(&examples.iter().collect::<Vec<_>>(), &device)?;
    let schedule = FinetuneSpec {
        objective: spec.objective,
        batch_size: b,
        micro_batch_size: b,
        learning_rate: spec.learning_rate,
        warmup_steps: 0,
        lr_scheduler: LrSchedule::Constant,
        max_grad_norm: spec.max_grad_norm,
        max_steps: Some(spec.warmup + spec.steps),
        activation_checkpointing: spec.activation_checkpointing,
        ..FinetuneSpec::default()
    };
    let teacher = if spec.objective.distills() {
        let other = TrainBenchSpec {
            seed: spec.seed.wrapping_add(1),
            ..spec.clone()
        };
        Some(random_model(&other, &device)?)
    } else {
        None
    };
    let teacher_weight_bytes = teacher.as_ref().map_or(0, |t| 4 * t.num_params() as u64);
    let objective = Objective::from_spec(&schedule, teacher)?;
    let mut trainer = Trainer::from_examples(
        &model,
        &schedule,
        spec.seed,
        objective,
        examples,
        Vec::new(),
    )?;
    trainer.set_backward(spec.backward);
    let rss_after_setup_bytes = proc_status_bytes("VmRSS");

    let mut step_s = Vec::with_capacity(spec.steps);
    let mut phases: [Vec<f64>; 3] = Default::default();
    let (mut first_loss, mut last_loss) = (f64::NAN, f64::NAN);
    for step in 0..spec.warmup + spec.steps {
        let stats = trainer
            .step(std::slice::from_ref(&batch))
            .context("bench train")?;
        if step >= spec.warmup {
            step_s.push(stats.seconds);
            phases[0].push(stats.forward_s);
            phases[1].push(stats.backward_s);
            phases[2].push(stats.optimizer_s);
            if first_loss.is_nan() {
                first_loss = stats.loss;
            }
            last_loss = stats.loss;
        }
    }

    let median_step_s = median(&step_s);
    let tokens_per_step = (b * t) as u64;
    let tokens_per_s = tokens_per_step as f64 / median_step_s;
    let p = matmul_params as f64;
    let attention = 12.0 * (spec.layers * t * spec.heads * (spec.hidden / spec.heads)) as f64;
    let lora = 6.0 * attached.trainable_params as f64;
    let useful_flops_per_token = 4.0 * p + attention + lora;
    Ok(TrainBenchReport {
        spec: spec.clone(),
        dtype: "f32",
        threads: candle_core::utils::get_num_threads(),
        base_params,
        matmul_params,
        trainable_params: attached.trainable_params,
        tokens_per_step,
        step_s,
        median_step_s,
        median_forward_s: median(&phases[0]),
        median_backward_s: median(&phases[1]),
        median_optimizer_s: median(&phases[2]),
        tokens_per_s,
        useful_flops_per_token,
        useful_gflops: useful_flops_per_token * tokens_per_s / 1e9,
        first_loss,
        last_loss,
        teacher_weight_bytes,
        rss_after_setup_bytes,
        peak_rss_bytes: proc_status_bytes("VmHWM"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tied head is the embedding matrix: counted once, no `lm_head.weight`, and still a
    /// matmul per token.
    #[test]
    fn tied_head_is_counted_once() {
        let spec = |tie| TrainBenchSpec {
            hidden: 32,
            layers: 1,
            heads: 4,
            kv_heads: 2,
            intermediate: 48,
            vocab: 50,
            tie_word_embeddings: tie,
            batch: 1,
            seq_len: 8,
            warmup: 0,
            steps: 1,
            ..TrainBenchSpec::default()
        };
        let (tied, untied) = (
            bench_train(&spec(true)).unwrap(),
            bench_train(&spec(false)).unwrap(),
        );
        assert_eq!(untied.base_params - tied.base_params, 50 * 32);
        assert_eq!(tied.matmul_params, untied.matmul_params);
        assert!(
            (tied.first_loss - 50f64.ln()).abs() < 0.5,
            "{}",
            tied.first_loss
        );
    }

    /// `kd`: the teacher is a whole second model (its weights counted), and the KL
    /// between two different random models is positive.
    #[test]
    fn distillation_bench_builds_a_teacher() {
        let spec = TrainBenchSpec {
            hidden: 32,
            layers: 1,
            heads: 4,
            kv_heads: 2,
            intermediate: 48,
            vocab: 50,
            batch: 2,
            seq_len: 8,
            warmup: 0,
            steps: 2,
            objective: ObjectiveKind::Kd,
            ..TrainBenchSpec::default()
        };
        let r = bench_train(&spec).unwrap();
        assert_eq!(r.teacher_weight_bytes, 4 * r.base_params);
        assert!(
            r.first_loss > 0.0 && r.first_loss.is_finite(),
            "{}",
            r.first_loss
        );
        let lm = bench_train(&TrainBenchSpec {
            objective: ObjectiveKind::Lm,
            ..spec
        })
        .unwrap();
        assert_eq!(lm.teacher_weight_bytes, 0);
    }

    #[test]
    fn tiny_bench_runs_and_learns_nothing_strange() {
        let spec = TrainBenchSpec {
            hidden: 32,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            intermediate: 48,
            vocab: 50,
            batch: 2,
            seq_len: 16,
            warmup: 1,
            steps: 3,
            ..TrainBenchSpec::default()
        };
        let r = bench_train(&spec).unwrap();
        assert_eq!(r.step_s.len(), 3);
        assert_eq!(r.tokens_per_step, 32);
        assert!(r.tokens_per_s > 0.0);
        // 2 layers × (q 32×32, k 16×32, v 16×32, o 32×32, gate/up 48×32, down 32×48) + head.
        assert_eq!(
            r.matmul_params,
            2 * (1024 + 512 + 512 + 1024 + 3 * 1536) + 50 * 32
        );
        assert!(
            (r.first_loss - (50f64).ln()).abs() < 0.5,
            "{}",
            r.first_loss
        );
        if cfg!(target_os = "linux") {
            assert!(r.peak_rss_bytes.unwrap() >= r.rss_after_setup_bytes.unwrap());
        }
    }
}
