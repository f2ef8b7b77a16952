//! The `finetune` stage: recovery fine-tuning of the adapters. [`finetune`] reads top to
//! bottom like a recipe — set up the trainer (data, schedule, optimizer, or a
//! checkpoint to resume), then for every step: the step, its log line, validation and
//! checkpoints when due.

pub mod batch;
pub mod checkpoint;
pub mod checkpoint_eval;
pub mod curves;
pub mod estimate;
pub mod gradients;
pub mod log;
pub mod objective;
pub mod optim;
pub mod schedule;
pub mod spec;
pub mod trainer;

pub use batch::Batch;
pub use checkpoint_eval::{CheckpointEval, EvalPoint};
pub use gradients::Backward;
pub use log::{LogLine, StepNumbers};
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
    /// The precision the frozen products ran at (`bf16` asked on a CPU without a bf16 kernel: f32).
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
    if model.set_matmul_precision_or_f32(spec.matmul_precision)? != spec.matmul_precision {
        progress::line(&MatmulPrecision::fallback_note("finetune.matmul_precision"));
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
    let mut checkpoint_eval = match &spec.checkpoint_eval {
        Some(eval) => Some(CheckpointEval::new(eval, seed, run_dir)?),
        None => None,
    };

    let started = Instant::now();
    let (mut tokens_done, mut first_loss, mut last_val) =
        (0u64, log.iter().find_map(LogLine::loss), None);
    // Counted over resumes, for the recovery curve's x axis and wall time.
    let (mut tokens_total, mut train_seconds) =
        log.last().map_or((0, 0.0), |l| (l.tokens, l.train_seconds));
    let total_steps = trainer.total_steps();
    let end = spec.stop_after.map_or(total_steps, |s| s.min(total_steps));

    // The model as training finds it: the recovery curve's first point.
    if let Some(ce) = checkpoint_eval.as_mut().filter(|ce| ce.needs_start()) {
        if trainer.steps_done() == 0 {
            let line = LogLine {
                step: 0,
                tokens: 0,
                train_seconds: 0.0,
                train: None,
                val_loss: None,
                eval: Some(ce.evaluate(model, tok, 0)?),
            };
            log::append(&log_path, &line)?;
            log.push(line);
        }
    }

    let pb = progress::bar(total_steps as u64, "finetune");
    pb.set_position(trainer.steps_done() as u64);
    while trainer.steps_done() < end {
        // The step.
        let t0 = Instant::now();
        let batch = trainer.next_batch()?;
        let stats = trainer.step(&batch).inspect_err(|_| pb.abandon())?;
        let done = stats.step;
        let step_seconds = t0.elapsed().as_secs_f64();
        tokens_done += stats.tokens;
        tokens_total += stats.tokens;
        train_seconds += step_seconds;
        let tokens_per_s = stats.tokens as f64 / step_seconds;

        // Validation and the checkpoint evaluation.
        let due = done == total_steps || (spec.eval_every > 0 && done % spec.eval_every == 0);
        let val_loss = if due && trainer.val_examples() > 0 {
            Some(trainer.validate()?)
        } else {
            None
        };
        last_val = val_loss.or(last_val);
        first_loss.get_or_insert(stats.loss);
        let eval = match checkpoint_eval.as_mut() {
            Some(ce) if due || done == end => Some(ce.evaluate(model, tok, done)?),
            _ => None,
        };

        // The log line.
        let line = LogLine {
            step: done,
            tokens: tokens_total,
            train_seconds,
            train: Some(StepNumbers {
                epoch: trainer.epoch(),
                loss: stats.loss,
                lr: stats.lr,
                grad_norm: stats.grad_norm,
                tokens_per_s,
            }),
            val_loss,
            eval,
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
    let mut wrote = vec![log_path, checkpoint::root(run_dir), loss_curve];
    if checkpoint_eval.is_some() {
        wrote.extend(checkpoint_eval::plot_recovery(run_dir, &log)?);
        wrote.push(run_dir.join(checkpoint_eval::DIR));
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(FinetuneReport {
        train_examples: trainer.train_examples(),
        val_examples: trainer.val_examples(),
        steps: end,
        total_steps,
        resumed_from: trainer.resumed_from(),
        stopped_early: end < total_steps,
        first_loss,
        last_loss: log.iter().rev().find_map(LogLine::loss),
        val_loss: last_val,
        tokens: tokens_done,
        seconds,
        tokens_per_s: tokens_done as f64 / seconds.max(1e-9),
        matmul_precision: model.matmul_precision(),
        wrote,
    })
}
