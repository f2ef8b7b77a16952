//! The `finetune` stage: recovery fine-tuning of the adapters. [`finetune`] reads top to
//! bottom like a recipe — set up the trainer (data, schedule, optimizer, or a
//! checkpoint to resume), then for every step: the step, its log line, validation and
//! checkpoints when due.

pub mod batch;
pub mod checkpoint;
pub mod log;
pub mod objective;
pub mod optim;
pub mod schedule;
pub mod spec;
pub mod trainer;

pub use batch::Batch;
pub use log::LogLine;
pub use objective::{Distill, Loss, Objective};
pub use spec::{FinetuneSpec, ObjectiveKind, PRE_PRUNE};
pub use trainer::{StepStats, Trainer};

use crate::model::{Llama, TextTokenizer};
use crate::nn::frozen::MatmulPrecision;
use crate::progress;
use anyhow::Result;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Debug, Clone, Serialize)]
pub struct FinetuneReport {
    pub train_examples: usize,
    pub val_examples: usize,
    pub steps: usize,
    pub total_steps: usize,
    pub resumed_from: Option<usize>,
    pub stopped_early: bool,
    pub first_loss: Option<f64>,
    pub last_loss: Option<f64>,
    pub val_loss: Option<f64>,
    pub tokens: u64,
    pub seconds: f64,
    pub tokens_per_s: f64,
    /// The precision the frozen products ran at (`bf16` asked on a CPU without AMX: f32).
    pub matmul_precision: MatmulPrecision,
    /// What training wrote into the run folder itself (log, checkpoints, loss curve):
    /// for the manifest, not part of `finetune.json`.
    #[serde(skip)]
    pub wrote: Vec<PathBuf>,
}

/// Trains the model's adapters to minimise `objective` (see [`Objective::from_spec`]).
/// Outputs go to `run_dir`: `train-log.jsonl`, `checkpoints/`, `loss-curve.svg`. The
/// frozen products run at `spec.matmul_precision` during training and at f32 again
/// afterwards.
pub fn finetune(
    model: &mut Llama,
    tok: &TextTokenizer,
    spec: &FinetuneSpec,
    objective: Objective,
    seed: u64,
    run_dir: &Path,
    resume: bool,
) -> Result<FinetuneReport> {
    spec.validate()?;
    if !model.set_matmul_precision(spec.matmul_precision)? {
        progress::line(&format!(
            "finetune: matmul_precision {} needs f32 weights on a CPU with AMX (Intel \
             Sapphire Rapids or later); the frozen products run in the weights' own dtype",
            spec.matmul_precision
        ));
        model.set_matmul_precision(MatmulPrecision::F32)?;
    }
    let report = train_adapters(model, tok, spec, objective, seed, run_dir, resume);
    // Drops the packed bf16 copies: evaluation and export use the f32 weights.
    model.set_matmul_precision(MatmulPrecision::F32)?;
    report
}

fn train_adapters(
    model: &Llama,
    tok: &TextTokenizer,
    spec: &FinetuneSpec,
    objective: Objective,
    seed: u64,
    run_dir: &Path,
    resume: bool,
) -> Result<FinetuneReport> {
    // Setup: data split, schedule and optimizer, or all of it as the newest checkpoint
    // left it; the log keeps the steps that checkpoint had done.
    let mut trainer = if resume {
        Trainer::resume(model, tok, spec, seed, objective, run_dir)?
    } else {
        Trainer::new(model, tok, spec, seed, objective, run_dir)?
    };
    let log_path = run_dir.join("train-log.jsonl");
    let mut log: Vec<LogLine> = match trainer.resumed_from() {
        Some(step) => log::read(&log_path)?
            .into_iter()
            .filter(|l| l.step <= step)
            .collect(),
        None => Vec::new(),
    };
    log::rewrite(&log_path, &log)?;

    let started = Instant::now();
    let (mut tokens_done, mut first_loss, mut last_val) = (0u64, log.first().map(|l| l.loss), None);
    let total_steps = trainer.total_steps();
    let end = spec.stop_after.map_or(total_steps, |s| s.min(total_steps));
    let pb = progress::bar(total_steps as u64, "finetune");
    pb.set_position(trainer.steps_done() as u64);
    while trainer.steps_done() < end {
        // The step.
        let t0 = Instant::now();
        let batch = trainer.next_batch()?;
        let stats = trainer.step(&batch).inspect_err(|_| pb.abandon())?;
        let done = stats.step;
        tokens_done += stats.tokens;
        let tokens_per_s = stats.tokens as f64 / t0.elapsed().as_secs_f64();

        // Validation.
        let val_due = trainer.val_examples() > 0
            && (done == total_steps || (spec.eval_every > 0 && done % spec.eval_every == 0));
        let val_loss = if val_due {
            Some(trainer.validate()?)
        } else {
            None
        };
        last_val = val_loss.or(last_val);
        first_loss.get_or_insert(stats.loss);

        // The log line.
        let line = LogLine {
            step: done,
            epoch: trainer.epoch(),
            loss: stats.loss,
            lr: stats.lr,
            grad_norm: stats.grad_norm,
            tokens_per_s,
            val_loss,
        };
        log::append(&log_path, &line)?;
        log.push(line);
        pb.set_position(done as u64);
        pb.set_message(format!(
            "loss {:.4} lr {:.2e} {tokens_per_s:.0} tok/s",
            stats.loss, stats.lr
        ));

        // The checkpoint.
        if (spec.save_every > 0 && done % spec.save_every == 0) || done == end {
            trainer.checkpoint()?;
        }
    }
    pb.finish_and_clear();
    let loss_curve = run_dir.join("loss-curve.svg");
    log::plot_losses(&loss_curve, &log)?;
    let seconds = started.elapsed().as_secs_f64();
    Ok(FinetuneReport {
        train_examples: trainer.train_examples(),
        val_examples: trainer.val_examples(),
        steps: end,
        total_steps,
        resumed_from: trainer.resumed_from(),
        stopped_early: end < total_steps,
        first_loss,
        last_loss: log.last().map(|l| l.loss),
        val_loss: last_val,
        tokens: tokens_done,
        seconds,
        tokens_per_s: tokens_done as f64 / seconds.max(1e-9),
        matmul_precision: model.matmul_precision(),
        wrote: vec![log_path, checkpoint::root(run_dir), loss_curve],
    })
}
