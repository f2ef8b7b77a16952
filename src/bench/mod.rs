//! `recover bench`: micro-benchmarks of the library's own building blocks.
//!
//! `recover bench train` times the `finetune` stage's own training step,
//! [`crate::train::Trainer::step`] (forward with an attention mask, shifted next-token
//! loss, backward, the adapters' gradients, the global gradient norm with clipping at 1.0,
//! AdamW), on one fixed batch of a fixed LLaMA shape with seeded random weights built in
//! memory, so it needs no files. Its peer in PyTorch + PEFT is `benches/peers/peft_train.py` (same shape, same keys in its JSON).
//!
//! `--shape` picks the model's shape for both `train` and `eval` (see [`BenchShape`]): the
//! small reference shape, or SmolLM2-135M's.

use crate::adapters::{self, AttachSpec, Method, MODULES};
use crate::data::Example;
use crate::model::random::{random_weights, RandomInit};
use crate::model::{Llama, LlamaConfig};
use crate::nn::frozen::MatmulPrecision;
use crate::train::schedule::LrSchedule;
use crate::train::{Batch, FinetuneSpec, Objective, Trainer};
use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::{Args, Subcommand, ValueEnum};
use rand::{Rng, SeedableRng};
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::Instant;

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub command: BenchCommand,
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Time LoRA training steps (forward, loss, backward, AdamW) on a fixed random model
    /// (`--shape default`: hidden 512, 6 layers, 8 heads, MLP 1376; `--shape smollm2`:
    /// SmolLM2-135M's), batch 8 × 128 tokens, rank-8 LoRA on all 7 projections.
    /// Threads: RAYON_NUM_THREADS (default: all cores).
    Train(BenchTrainArgs),
    /// Time multiple-choice scoring (the `choice` protocol's work: each question's prompt
    /// once, then every option from its KV cache) on the same random model: 64 questions
    /// of a 96-token prompt and 4 options of 4 tokens, 8 questions per batch.
    Eval(BenchEvalArgs),
}

/// The benchmarked model's shape (`--shape`). Batch, sequence and LoRA settings are the
/// same for every shape; only the model changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BenchShape {
    /// The reference shape: hidden 512, 6 layers, 8 heads (8 kv), MLP 1376, vocab 1000,
    /// untied head, RMSNorm eps 1e-6, RoPE theta 10000 (`LlamaConfig`'s defaults).
    #[default]
    Default,
    /// SmolLM2-135M's `config.json`: hidden 576, 30 layers, 9 heads (3 kv), MLP 1536,
    /// vocab 49152, head tied to the embeddings, RMSNorm eps 1e-5, RoPE theta 100000,
    /// 8192 positions.
    Smollm2,
}

impl BenchShape {
    /// The `--shape` value that selects this shape.
    pub fn name(self) -> &'static str {
        match self {
            Self::Default => "default",
            Self::Smollm2 => "smollm2",
        }
    }

    /// The benchmark spec at this shape, with the default schedule (batch 8 × 128, LoRA r8).
    pub fn spec(self) -> TrainBenchSpec {
        let base = TrainBenchSpec::default();
        match self {
            Self::Default => base,
            Self::Smollm2 => TrainBenchSpec {
                shape: self,
                hidden: 576,
                layers: 30,
                heads: 9,
                kv_heads: 3,
                intermediate: 1536,
                vocab: 49152,
                tie_word_embeddings: true,
                rms_norm_eps: 1e-5,
                rope_theta: 100_000.0,
                max_position_embeddings: 8192,
                ..base
            },
        }
    }
}

#[derive(Debug, Args)]
pub struct BenchEvalArgs {
    /// Timed passes over the questions (the median is reported).
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Questions per pass.
    #[arg(long, default_value_t = 64)]
    pub questions: usize,
    #[command(flatten)]
    pub model: BenchModelArgs,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct BenchTrainArgs {
    /// Timed steps (the median is reported).
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    #[command(flatten)]
    pub model: BenchModelArgs,
    /// Sequences per step [default: 8].
    #[arg(long)]
    pub batch: Option<usize>,
    /// Tokens per sequence [default: 128].
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// LoRA rank (alpha stays 2 × rank) [default: 8].
    #[arg(long)]
    pub rank: Option<usize>,
    /// Inputs of the frozen weights' products: `bf16` runs them on AMX from bf16 inputs
    /// (the finetune stage's `matmul_precision`); fails on a CPU without AMX.
    #[arg(long, value_enum, default_value_t = MatmulPrecision::F32)]
    pub matmul_precision: MatmulPrecision,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// The model both benchmarks build.
#[derive(Debug, Args)]
pub struct BenchModelArgs {
    /// Model shape: `default` (hidden 512, 6 layers) or `smollm2` (SmolLM2-135M's).
    #[arg(long, value_enum, default_value_t = BenchShape::Default)]
    pub shape: BenchShape,
    /// Vocabulary size [default: the shape's, 1000 or 49152] (32000 for a LLaMA-2-sized
    /// output head).
    #[arg(long)]
    pub vocab: Option<usize>,
}

impl BenchModelArgs {
    /// The shape's spec, with `--vocab` over its vocabulary.
    pub fn spec(&self) -> TrainBenchSpec {
        let shape = self.shape.spec();
        TrainBenchSpec {
            vocab: self.vocab.unwrap_or(shape.vocab),
            ..shape
        }
    }
}

impl BenchTrainArgs {
    /// The spec these arguments ask for.
    pub fn spec(&self) -> TrainBenchSpec {
        let base = self.model.spec();
        let rank = self.rank.unwrap_or(base.rank);
        TrainBenchSpec {
            steps: self.steps,
            warmup: self.warmup,
            batch: self.batch.unwrap_or(base.batch),
            seq_len: self.seq_len.unwrap_or(base.seq_len),
            rank,
            alpha: base.alpha / base.rank as f64 * rank as f64,
            matmul_precision: self.matmul_precision,
            ..base
        }
    }
}

impl BenchEvalArgs {
    /// The spec these arguments ask for.
    pub fn spec(&self) -> EvalBenchSpec {
        EvalBenchSpec {
            runs: self.runs,
            questions: self.questions,
            model: self.model.spec(),
            ..EvalBenchSpec::default()
        }
    }
}

/// Runs a parsed `recover bench ...` command.
pub fn run(args: BenchArgs) -> Result<()> {
    match args.command {
        BenchCommand::Train(a) => {
            let report = bench_train(&a.spec())?;
            print_report(&report, &report.to_markdown(), a.json)
        }
        BenchCommand::Eval(a) => {
            let report = bench_eval(&a.spec())?;
            print_report(&report, &report.to_markdown(), a.json)
        }
    }
}

/// One JSON object with `--json`, else the Markdown table.
fn print_report(report: &impl Serialize, markdown: &str, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(report)?);
    } else {
        println!("{markdown}");
    }
    Ok(())
}

/// The scoring benchmark: questions of random tokens on `random_model(model)` (only the
/// model's shape and seed fields of `model` are used).
#[derive(Debug, Clone, Serialize)]
pub struct EvalBenchSpec {
    pub model: TrainBenchSpec,
    pub questions: usize,
    pub prompt_len: usize,
    pub options: usize,
    pub option_len: usize,
    /// Questions scored together (eval's `batch_size`).
    pub batch: usize,
    pub runs: usize,
}

impl Default for EvalBenchSpec {
    fn default() -> Self {
        Self {
            model: TrainBenchSpec::default(),
            questions: 64,
            prompt_len: 96,
            options: 4,
            option_len: 4,
            batch: 8,
            runs: 5,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct EvalBenchReport {
    pub spec: EvalBenchSpec,
    pub dtype: &'static str,
    pub threads: usize,
    /// Wall time of every timed pass over the questions.
    pub run_s: Vec<f64>,
    pub median_run_s: f64,
    pub questions_per_s: f64,
    /// Base-model parameters, embeddings included (a tied head counted once).
    pub base_params: u64,
    /// Tokens the model processed per pass (each prompt once, then each option's tokens).
    pub tokens_per_run: usize,
    /// Checksum of the scores (the sum over questions and options), for comparing builds.
    pub score_sum: f64,
    pub peak_rss_bytes: Option<u64>,
}

impl EvalBenchReport {
    pub fn to_markdown(&self) -> String {
        let s = &self.spec;
        let m = &s.model;
        let runs: Vec<String> = self.run_s.iter().map(|t| format!("{t:.3}")).collect();
        format!(
            "# recover bench eval\n\nshape: {}; \
             {} questions × ({} prompt tokens + {} options × {} tokens), {} per batch; f32; {} threads\n\n\
             | metric | value |\n|---|---|\n\
             | questions/s | {:.1} |\n| median pass | {:.3} s |\n| passes (s) | {} |\n\
             | tokens per pass | {} |\n| params: base | {} |\n| score checksum | {:.4} |\n\
             | peak RSS | {} |\n",
            m.describe_shape(),
            s.questions,
            s.prompt_len,
            s.options,
            s.option_len,
            s.batch,
            self.threads,
            self.questions_per_s,
            self.median_run_s,
            runs.join(", "),
            self.tokens_per_run,
            self.base_params,
            self.score_sum,
            self.peak_rss_bytes
                .map_or("n/a".into(), |b| format!("{:.1} MiB", b as f64 / 1048576.0)),
        )
    }
}

/// Scores `spec.questions` random multiple-choice questions `spec.runs` times (after one
/// untimed pass) with the eval's own batched scorer.
pub fn bench_eval(spec: &EvalBenchSpec) -> Result<EvalBenchReport> {
    use crate::eval::scoring::{score_candidates, Candidate};
    if spec.runs == 0 || spec.questions == 0 || spec.options == 0 || spec.option_len == 0 {
        bail!("bench eval needs at least one run, question, option and option token");
    }
    let model = random_model(&spec.model, &Device::Cpu)?;
    let base_params = model.num_params() as u64;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(spec.model.seed.wrapping_add(2));
    let vocab = spec.model.vocab as u32;
    let questions: Vec<Vec<Candidate>> = (0..spec.questions)
        .map(|_| {
            let prompt: Vec<u32> = (0..spec.prompt_len)
                .map(|_| rng.random_range(0..vocab))
                .collect();
            (0..spec.options)
                .map(|_| {
                    let mut ids = prompt.clone();
                    ids.extend((0..spec.option_len).map(|_| rng.random_range(0..vocab)));
                    Candidate {
                        ids,
                        n_ctx: spec.prompt_len,
                    }
                })
                .collect()
        })
        .collect();
    let pass = || -> Result<(f64, usize)> {
        let (mut sum, mut tokens) = (0.0, 0);
        for batch in questions.chunks(spec.batch.max(1)) {
            let scores = score_candidates(&model, batch)?;
            sum += scores.logprobs.iter().flatten().sum::<f64>();
            tokens += scores.tokens;
        }
        Ok((sum, tokens))
    };
    pass()?;
    let mut run_s = Vec::with_capacity(spec.runs);
    let (mut score_sum, mut tokens_per_run) = (0.0, 0);
    for _ in 0..spec.runs {
        let t0 = Instant::now();
        (score_sum, tokens_per_run) = pass()?;
        run_s.push(t0.elapsed().as_secs_f64());
    }
    let median_run_s = median(&run_s);
    Ok(EvalBenchReport {
        spec: spec.clone(),
        dtype: "f32",
        threads: candle_core::utils::get_num_threads(),
        questions_per_s: spec.questions as f64 / median_run_s,
        run_s,
        median_run_s,
        base_params,
        tokens_per_run,
        score_sum,
        peak_rss_bytes: proc_status_bytes("VmHWM"),
    })
}

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
            dropout: 0.05,
            learning_rate: 1e-4,
            max_grad_norm: 1.0,
            warmup: 2,
            steps: 10,
            seed: 0,
            matmul_precision: MatmulPrecision::F32,
        }
    }
}

impl TrainBenchSpec {
    /// The model's shape in words, for the reports: `smollm2 (hidden 576, ...)`.
    pub fn describe_shape(&self) -> String {
        format!(
            "{} (hidden {}, {} layers, {} heads ({} kv), MLP {}, vocab {}, {} head, \
             RMSNorm eps {:e}, RoPE theta {})",
            self.shape.name(),
            self.hidden,
            self.layers,
            self.heads,
            self.kv_heads,
            self.intermediate,
            self.vocab,
            if self.tie_word_embeddings {
                "tied"
            } else {
                "untied"
            },
            self.rms_norm_eps,
            self.rope_theta,
        )
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
    /// Resident set after building the model and attaching adapters, before any step.
    pub rss_after_setup_bytes: Option<u64>,
    /// Peak resident set of the whole process (`VmHWM`, the value getrusage's ru_maxrss gives).
    pub peak_rss_bytes: Option<u64>,
}

impl TrainBenchReport {
    pub fn to_markdown(&self) -> String {
        let s = &self.spec;
        let mib = |b: Option<u64>| {
            b.map_or("n/a".to_string(), |b| {
                format!("{:.1} MiB", b as f64 / 1024.0 / 1024.0)
            })
        };
        let steps: Vec<String> = self.step_s.iter().map(|t| format!("{t:.3}")).collect();
        let mut out = String::new();
        out.push_str("# recover bench train\n\n");
        out.push_str(&format!(
            "shape: {}; batch {} × {} tokens; \
             f32, frozen products {}; LoRA r={} alpha={} dropout={} on all 7 projections; \
             AdamW lr {:e}; {} threads\n\n",
            s.describe_shape(),
            s.batch,
            s.seq_len,
            s.matmul_precision,
            s.rank,
            s.alpha,
            s.dropout,
            s.learning_rate,
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
                "loss first → last",
                format!("{:.4} → {:.4}", self.first_loss, self.last_loss),
            ),
            ("RSS after setup", mib(self.rss_after_setup_bytes)),
            ("peak RSS", mib(self.peak_rss_bytes)),
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
        from: None,
        method: Some(Method::Lora),
        rank: spec.rank,
        alpha: Some(spec.alpha),
        dropout: spec.dropout,
        targets: MODULES.map(String::from).to_vec(),
        layers: None,
        rank_pattern: BTreeMap::new(),
        alpha_pattern: BTreeMap::new(),
    };
    let attached = adapters::attach(&mut model, &attach, spec.seed)?;
    if !model.set_matmul_precision(spec.matmul_precision)? {
        bail!(
            "bench train: --matmul-precision {} needs a CPU with AMX (Intel Sapphire Rapids or \
             later) and a kernel that grants it; use f32 here",
            spec.matmul_precision
        );
    }
    // One fixed batch of random ids, unpadded: the attention mask is all ones and every
    // shifted position is a target, as `finetune` collates a full-length batch. One
    // micro-batch per step, the learning rate constant.
    let (b, t) = (spec.batch, spec.seq_len);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(spec.seed.wrapping_add(1));
    let examples: Vec<Example> = (0..b)
        .map(|_| Example {
            ids: (0..t)
                .map(|_| rng.random_range(0..spec.vocab as u32))
                .collect(),
            targets: vec![true; t],
        })
        .collect();
    let batch = Batch::collate(&examples.iter().collect::<Vec<_>>(), &device)?;
    let schedule = FinetuneSpec {
        batch_size: b,
        micro_batch_size: b,
        learning_rate: spec.learning_rate,
        warmup_steps: 0,
        lr_scheduler: LrSchedule::Constant,
        max_grad_norm: spec.max_grad_norm,
        max_steps: Some(spec.warmup + spec.steps),
        ..FinetuneSpec::default()
    };
    let mut trainer = Trainer::from_examples(
        &model,
        &schedule,
        spec.seed,
        Objective::NextToken,
        examples,
        Vec::new(),
    )?;
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
        rss_after_setup_bytes,
        peak_rss_bytes: proc_status_bytes("VmHWM"),
    })
}

/// The benchmark's model: a Hugging Face `LlamaForCausalLM` of the spec's shape (head tied
/// or not, RMSNorm eps, RoPE theta as the spec says), weights ~ N(0, 0.02²) from a seeded
/// ChaCha stream, norms 1. A tied head is the embedding matrix itself (no `lm_head.weight`).
fn random_model(spec: &TrainBenchSpec, device: &Device) -> Result<Llama> {
    if spec.heads == 0 || spec.kv_heads == 0 || !spec.hidden.is_multiple_of(spec.heads) {
        bail!("bench train: hidden must be a multiple of the head count");
    }
    let config = LlamaConfig::from_json_str(
        &serde_json::json!({
            "hidden_size": spec.hidden,
            "intermediate_size": spec.intermediate,
            "num_hidden_layers": spec.layers,
            "num_attention_heads": spec.heads,
            "num_key_value_heads": spec.kv_heads,
            "vocab_size": spec.vocab,
            "max_position_embeddings": spec.seq_len.max(spec.max_position_embeddings),
            "rms_norm_eps": spec.rms_norm_eps,
            "rope_theta": spec.rope_theta,
            "tie_word_embeddings": spec.tie_word_embeddings,
        })
        .to_string(),
    )?;
    let weights = random_weights(&config, &RandomInit::hugging_face(), spec.seed, device)?;
    Llama::from_weights(config, &weights)
}

fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// A `kB` line of `/proc/self/status` (`VmRSS`, `VmHWM`) in bytes; `None` off Linux.
fn proc_status_bytes(key: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status
        .lines()
        .find(|l| l.strip_prefix(key).is_some_and(|r| r.starts_with(':')))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The benchmark runs the eval's scorer on the questions it describes: each prompt once
    /// plus every option's tokens, and scores near ln(vocab) per token for random weights.
    #[test]
    fn tiny_eval_bench_scores_like_the_reference_path() {
        let spec = EvalBenchSpec {
            model: TrainBenchSpec {
                hidden: 32,
                layers: 2,
                heads: 4,
                kv_heads: 2,
                intermediate: 48,
                vocab: 50,
                ..TrainBenchSpec::default()
            },
            questions: 3,
            prompt_len: 5,
            options: 2,
            option_len: 2,
            batch: 2,
            runs: 2,
        };
        let r = bench_eval(&spec).unwrap();
        assert_eq!(r.run_s.len(), 2);
        // Each prompt once (5), then each option's tokens but its last (nothing is predicted
        // after it): 3 × (5 + 2 × 1).
        assert_eq!(r.tokens_per_run, 21);
        // Random weights: each option token costs about ln(50), 12 option tokens in all.
        let per_token = -r.score_sum / 12.0;
        assert!((per_token - 50f64.ln()).abs() < 0.5, "{per_token}");
    }

    /// `recover bench <train|eval> ...` parsed as the CLI parses it.
    fn parse(args: &[&str]) -> Result<BenchCommand, clap::Error> {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(subcommand)]
            command: BenchCommand,
        }
        use clap::Parser;
        Cli::try_parse_from(std::iter::once("bench").chain(args.iter().copied())).map(|c| c.command)
    }

    #[test]
    fn shape_flag_selects_the_preset_and_vocab_overrides_it() {
        let train = |args: &[&str]| match parse(args).unwrap() {
            BenchCommand::Train(a) => a.spec(),
            other => panic!("{other:?}"),
        };
        let eval = |args: &[&str]| match parse(args).unwrap() {
            BenchCommand::Eval(a) => a.spec().model,
            other => panic!("{other:?}"),
        };
        // No flag: the reference shape, untied.
        for s in [train(&["train"]), eval(&["eval"])] {
            assert_eq!(s.shape, BenchShape::Default);
            assert_eq!((s.hidden, s.layers, s.heads, s.kv_heads), (512, 6, 8, 8));
            assert_eq!((s.intermediate, s.vocab), (1376, 1000));
            assert!(!s.tie_word_embeddings);
        }
        // SmolLM2-135M's config.json, same batch and LoRA.
        for s in [
            train(&["train", "--shape", "smollm2", "--steps", "1"]),
            eval(&["eval", "--shape", "smollm2"]),
        ] {
            assert_eq!(s.shape, BenchShape::Smollm2);
            assert_eq!((s.hidden, s.layers, s.heads, s.kv_heads), (576, 30, 9, 3));
            assert_eq!((s.intermediate, s.vocab), (1536, 49152));
            assert!(s.tie_word_embeddings);
            assert_eq!((s.rms_norm_eps, s.rope_theta), (1e-5, 100_000.0));
            assert_eq!((s.batch, s.seq_len, s.rank), (8, 128, 8));
            assert!(s.describe_shape().starts_with("smollm2 (hidden 576"));
        }
        assert_eq!(
            train(&["train", "--shape", "smollm2", "--vocab", "1000"]).vocab,
            1000
        );
        assert_eq!(eval(&["eval", "--vocab", "32000"]).vocab, 32000);
        assert_eq!(
            train(&["train", "--shape", "default"]).shape,
            BenchShape::Default
        );
        // The JSON names the shape.
        let json = serde_json::to_value(train(&["train", "--shape", "smollm2"])).unwrap();
        assert_eq!(json["shape"], "smollm2");
        // Unknown shapes are refused with the choices listed.
        let err = parse(&["eval", "--shape", "llama7b"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("default") && err.contains("smollm2"), "{err}");
    }

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

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
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
