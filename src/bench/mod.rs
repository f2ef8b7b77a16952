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

mod eval;
mod generate;
mod measure;
mod products;
mod shape;
mod train;

pub use eval::{bench_eval, EvalBenchReport, EvalBenchSpec};
pub use generate::{bench_generate, GenerateBenchReport, GenerateBenchSpec};
pub use products::{bench_products, ProductsBenchReport, ProductsBenchSpec};
pub use shape::{BenchModelArgs, BenchShape};
pub use train::{bench_train, TrainBenchReport, TrainBenchSpec};

use crate::nn::frozen::MatmulPrecision;
use crate::train::{Backward, ObjectiveKind};
use anyhow::Result;
use clap::{Args, Subcommand};
use serde::Serialize;

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
    /// Time greedy decoding (the `generate` protocol's work: batched, left-padded, KV
    /// cache) on the same random model: 16 prompts of 64 tokens, 32 new tokens each, 8
    /// prompts per batch.
    Generate(BenchGenerateArgs),
    /// Time each matrix product of a training step at the shape (every projection forward
    /// and backward, the adapters', the head's) alone, on every kernel this CPU has (AMX,
    /// AVX512-BF16, f32 gemm), against each kernel's ceiling measured on this machine.
    Products(BenchProductsArgs),
}

#[derive(Debug, Args)]
pub struct BenchProductsArgs {
    /// Rows of every product: a step's tokens (batch 8 × 128).
    #[arg(long, default_value_t = 1024)]
    pub rows: usize,
    /// The adapters' rank.
    #[arg(long, default_value_t = 32)]
    pub rank: usize,
    /// Timed calls per product and kernel (the fastest is reported).
    #[arg(long, default_value_t = 10)]
    pub runs: usize,
    /// Only the products whose name contains this text (`dA`, `down_proj`, `lm_head`):
    /// one product alone under `perf`.
    #[arg(long, value_name = "TEXT")]
    pub only: Option<String>,
    #[command(flatten)]
    pub model: BenchModelArgs,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// `--matmul-precision` of the benchmarks that run the model.
#[derive(Debug, Args)]
pub struct BenchPrecisionArgs {
    /// Inputs of the frozen weights' products: `bf16` runs them from bf16 inputs on AMX or
    /// AVX512-BF16 (the finetune and eval stages' `matmul_precision`); fails on a CPU
    /// with neither.
    #[arg(long, value_enum, default_value_t = MatmulPrecision::F32)]
    pub matmul_precision: MatmulPrecision,
}

#[derive(Debug, Args)]
pub struct BenchGenerateArgs {
    /// Timed passes over the prompts (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Prompts per pass.
    #[arg(long, default_value_t = 16)]
    pub prompts: usize,
    /// New tokens per prompt.
    #[arg(long, default_value_t = 32)]
    pub new_tokens: usize,
    #[command(flatten)]
    pub precision: BenchPrecisionArgs,
    #[command(flatten)]
    pub model: BenchModelArgs,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
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
    pub precision: BenchPrecisionArgs,
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
    /// Adapter dropout [default: 0, PEFT's `lora_dropout` default]. Dropout masks cost
    /// time of their own: measure both settings users run.
    #[arg(long, default_value_t = 0.0)]
    pub dropout: f64,
    #[command(flatten)]
    pub precision: BenchPrecisionArgs,
    /// What the step minimises: `kd` and `kd+lm` distil from a second random model of
    /// the same shape (a whole second copy of the weights: the `teacher: <model>` case; a
    /// `pre_prune` teacher shares the layers `prune` left alone).
    #[arg(long, value_enum, default_value_t = ObjectiveKind::Lm)]
    pub objective: ObjectiveKind,
    /// The gradients' engine: `auto` (the explicit backward pass where it applies, as
    /// `finetune` runs) or `autograd` (candle's, the reference).
    #[arg(long, value_enum, default_value_t = Backward::Auto)]
    pub backward: Backward,
    /// Recompute each layer's activations in the backward pass
    /// (`finetune.activation_checkpointing`).
    #[arg(long)]
    pub activation_checkpointing: bool,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
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
            matmul_precision: self.precision.matmul_precision,
            objective: self.objective,
            dropout: self.dropout,
            backward: self.backward,
            activation_checkpointing: self.activation_checkpointing,
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
            model: TrainBenchSpec {
                matmul_precision: self.precision.matmul_precision,
                ..self.model.spec()
            },
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
        BenchCommand::Generate(a) => {
            let spec = GenerateBenchSpec {
                runs: a.runs,
                prompts: a.prompts,
                new_tokens: a.new_tokens,
                model: TrainBenchSpec {
                    matmul_precision: a.precision.matmul_precision,
                    ..a.model.spec()
                },
                ..GenerateBenchSpec::default()
            };
            let report = bench_generate(&spec)?;
            print_report(&report, &report.to_markdown(), a.json)
        }
        BenchCommand::Products(a) => {
            let spec = ProductsBenchSpec {
                model: a.model.spec(),
                rows: a.rows,
                rank: a.rank,
                runs: a.runs,
                only: a.only.clone(),
            };
            let report = bench_products(&spec)?;
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
