//! The `finetune` stage: recovery fine-tuning of the adapters. The loop below reads top
//! to bottom — data, schedule, optimizer, (resume), then for every step: micro-batches,
//! gradient clipping, the update, logging, validation and checkpoints.

pub mod checkpoint;
pub mod optim;
pub mod schedule;

use crate::adapters::trainable_vars;
use crate::data::{
    expand_globs, instruction_example, read_instruction_file, text_examples, Example,
};
use crate::model::loss::masked_mean_nll_from_hidden;
use crate::model::{Llama, TextTokenizer};
use crate::nn::frozen::MatmulPrecision;
use crate::nn::Mode;
use crate::report::plot::{line_chart, Series};
use crate::{fsx, progress};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use optim::{AdamW, AdamWConfig};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use schedule::LrSchedule;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Settings of the `finetune` stage. Defaults are DoRA's commonsense recipe.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FinetuneSpec {
    /// LLM-Adapters JSON files (paths or globs).
    #[serde(default)]
    pub data: Vec<String>,
    /// Plain-text files (paths or globs) for language-model recovery.
    #[serde(default)]
    pub text: Vec<String>,
    /// Use at most this many examples (a seeded random subset).
    #[serde(default)]
    pub limit: Option<usize>,
    #[serde(default = "d_cutoff")]
    pub cutoff_len: usize,
    #[serde(default = "d_true")]
    pub train_on_inputs: bool,
    /// Examples held out for validation loss (seeded).
    #[serde(default)]
    pub val_set_size: usize,
    #[serde(default = "d_batch")]
    pub batch_size: usize,
    #[serde(default = "d_micro")]
    pub micro_batch_size: usize,
    #[serde(default = "d_lr")]
    pub learning_rate: f64,
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default = "d_warmup")]
    pub warmup_steps: usize,
    #[serde(default)]
    pub lr_scheduler: LrSchedule,
    /// Clip the global gradient norm to this (0 = no clipping).
    #[serde(default = "d_clip")]
    pub max_grad_norm: f64,
    #[serde(default = "d_epochs")]
    pub epochs: usize,
    /// Overrides `epochs` when set.
    #[serde(default)]
    pub max_steps: Option<usize>,
    /// Checkpoint every N steps (0: only at the end).
    #[serde(default)]
    pub save_every: usize,
    /// Checkpoints to keep (the newest).
    #[serde(default = "d_keep")]
    pub keep_checkpoints: usize,
    /// Validation loss every N steps (0: only at the end); needs `val_set_size`.
    #[serde(default)]
    pub eval_every: usize,
    /// Stop after this step as if interrupted (a checkpoint is written), to resume later
    /// with `--resume`: for time-boxed sessions.
    #[serde(default)]
    pub stop_after: Option<usize>,
    /// Inputs of the frozen weights' products: `f32`, or `bf16` (on AMX, as PyTorch's
    /// bf16 autocast rounds them; adapters, attention and the optimizer stay f32). A CPU
    /// without AMX trains in f32 and says so.
    #[serde(default)]
    pub matmul_precision: MatmulPrecision,
}

fn d_cutoff() -> usize {
    256
}
fn d_true() -> bool {
    true
}
fn d_batch() -> usize {
    16
}
fn d_micro() -> usize {
    4
}
fn d_lr() -> f64 {
    2e-4
}
fn d_warmup() -> usize {
    100
}
fn d_clip() -> f64 {
    1.0
}
fn d_epochs() -> usize {
    3
}
fn d_keep() -> usize {
    2
}

impl FinetuneSpec {
    pub fn validate(&self) -> Result<()> {
        if self.data.is_empty() && self.text.is_empty() {
            bail!("finetune needs `data` (LLM-Adapters JSON files) or `text` (plain text files)");
        }
        if self.batch_size == 0
            || self.micro_batch_size == 0
            || !self.batch_size.is_multiple_of(self.micro_batch_size)
        {
            bail!(
                "finetune.batch_size ({}) must be a positive multiple of micro_batch_size ({})",
                self.batch_size,
                self.micro_batch_size
            );
        }
        if self.cutoff_len < 2 {
            bail!("finetune.cutoff_len must be at least 2");
        }
        if self.learning_rate.is_nan() || self.learning_rate <= 0.0 {
            bail!("finetune.learning_rate must be positive");
        }
        if self.max_steps == Some(0) || (self.max_steps.is_none() && self.epochs == 0) {
            bail!("finetune needs at least one step: set epochs or max_steps above 0");
        }
        Ok(())
    }
}

/// One line of `train-log.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LogLine {
    pub step: usize,
    pub epoch: f64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens_per_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
}

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

/// Trains the model's adapters. Outputs go to `run_dir`: `train-log.jsonl`,
/// `checkpoints/`, `loss-curve.svg`. The frozen products run at `spec.matmul_precision`
/// during training and at f32 again afterwards.
pub fn finetune(
    model: &mut Llama,
    tok: &TextTokenizer,
    spec: &FinetuneSpec,
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
    let report = train_adapters(model, tok, spec, seed, run_dir, resume);
    // Drops the packed bf16 copies: evaluation and export use the f32 weights.
    model.set_matmul_precision(MatmulPrecision::F32)?;
    report
}

fn train_adapters(
    model: &Llama,
    tok: &TextTokenizer,
    spec: &FinetuneSpec,
    seed: u64,
    run_dir: &Path,
    resume: bool,
) -> Result<FinetuneReport> {
    let device = model.device().clone();

    // Data: all examples, a seeded validation split, then the training set.
    let mut examples = load_examples(tok, spec)?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    examples.shuffle(&mut rng);
    if let Some(limit) = spec.limit {
        examples.truncate(limit + spec.val_set_size);
    }
    if examples.len() <= spec.val_set_size {
        bail!(
            "finetune has {} examples, not more than val_set_size {}",
            examples.len(),
            spec.val_set_size
        );
    }
    let train = examples.split_off(spec.val_set_size);
    let val = examples;

    // Schedule: the data is a stream of seeded per-epoch orders; step s takes the next
    // `batch_size` examples of it.
    let steps_per_epoch = train.len().div_ceil(spec.batch_size);
    let total_steps = spec.max_steps.unwrap_or(spec.epochs * steps_per_epoch);
    let order = EpochOrder::new(train.len(), seed);

    // Optimizer over the adapters only; the base model has no trainable tensor.
    let vars = trainable_vars(model);
    if vars.is_empty() {
        bail!("finetune found no adapter to train; put an `attach` stage before it");
    }
    let adamw = AdamWConfig {
        weight_decay: spec.weight_decay,
        ..Default::default()
    };
    let mut opt = AdamW::new(vars.clone(), adamw)?;
    let ckpt_root = run_dir.join("checkpoints");
    let log_path = run_dir.join("train-log.jsonl");
    let mut log: Vec<LogLine> = Vec::new();
    let mut start = 0;
    let mut resumed_from = None;
    if resume {
        if let Some(&step) = checkpoint::list(&ckpt_root).last() {
            let state = checkpoint::load(
                &checkpoint::checkpoint_dir(&ckpt_root, step),
                &vars,
                &mut opt,
                &device,
            )?;
            if state.seed != seed || state.total_steps != total_steps {
                bail!(
                    "the checkpoint at step {step} was made with seed {} and {} total steps, this run has \
                     seed {seed} and {total_steps}; resume with the same pipeline",
                    state.seed,
                    state.total_steps
                );
            }
            start = state.step;
            resumed_from = Some(step);
            log = read_log(&log_path)?
                .into_iter()
                .filter(|l| l.step <= step)
                .collect();
            eprintln!("resuming from checkpoint step-{step}");
        } else {
            eprintln!(
                "--resume: no checkpoint in {}, starting from step 0",
                ckpt_root.display()
            );
        }
    }
    rewrite_log(&log_path, &log)?;

    let started = std::time::Instant::now();
    let (mut tokens_done, mut first_loss, mut last_val) = (0u64, log.first().map(|l| l.loss), None);
    let end = spec.stop_after.map_or(total_steps, |s| s.min(total_steps));
    let pb = progress::bar((total_steps) as u64, "finetune");
    pb.set_position(start as u64);
    let accumulation = spec.batch_size / spec.micro_batch_size;
    for step in start..end {
        let t0 = std::time::Instant::now();
        let batch: Vec<&Example> = (0..spec.batch_size)
            .map(|k| &train[order.at(step * spec.batch_size + k)])
            .collect();

        // Forward and backward per micro-batch, summing gradients.
        let mut grads: Vec<Option<Tensor>> = vec![None; vars.len()];
        let (mut loss_sum, mut step_tokens) = (0f64, 0u64);
        for (m, micro) in batch.chunks(spec.micro_batch_size).enumerate() {
            let mode = Mode::train(seed ^ ((step * accumulation + m) as u64) << 16);
            let (loss, _, tokens) = next_token_loss(model, micro, &device, mode)?;
            step_tokens += tokens;
            let loss = (loss / accumulation as f64)?;
            loss_sum += loss.to_scalar::<f32>()? as f64;
            let g = loss.backward()?;
            for (slot, (_, var)) in grads.iter_mut().zip(&vars) {
                if let Some(gv) = g.get(var.as_tensor()) {
                    *slot = Some(match slot.take() {
                        Some(acc) => (acc + gv)?,
                        None => gv.clone(),
                    });
                }
            }
        }
        let grads: Vec<Tensor> = grads
            .into_iter()
            .zip(&vars)
            .map(|(g, (_, v))| g.map_or_else(|| v.zeros_like(), Ok))
            .collect::<candle_core::Result<_>>()?;

        // A bad step stops the run before its update, so the last checkpoint stays good.
        let (grads, grad_norm) = clip_grad_norm(grads, spec.max_grad_norm)?;
        if !loss_sum.is_finite() || !grad_norm.is_finite() {
            pb.abandon();
            let last =
                checkpoint::list(&ckpt_root)
                    .last()
                    .map_or("none was written".to_string(), |s| {
                        checkpoint::checkpoint_dir(&ckpt_root, *s)
                            .display()
                            .to_string()
                    });
            bail!(
                "the loss became {} at step {} (learning rate {:.3e}); training stopped before \
                 applying that update. The last good checkpoint: {last}. Lower \
                 finetune.learning_rate or check the data",
                if loss_sum.is_nan() || grad_norm.is_nan() {
                    "NaN"
                } else {
                    "infinite"
                },
                step + 1,
                spec.lr_scheduler
                    .lr(spec.learning_rate, step, spec.warmup_steps, total_steps)
            );
        }
        let lr = spec
            .lr_scheduler
            .lr(spec.learning_rate, step, spec.warmup_steps, total_steps);
        opt.step(&grads, lr)?;

        // Logging, validation, checkpoints.
        let done = step + 1;
        tokens_done += step_tokens;
        let tokens_per_s = step_tokens as f64 / t0.elapsed().as_secs_f64();
        let val_due = !val.is_empty()
            && (done == total_steps || (spec.eval_every > 0 && done % spec.eval_every == 0));
        let val_loss = if val_due {
            Some(validation_loss(
                model,
                &val,
                spec.micro_batch_size,
                &device,
            )?)
        } else {
            None
        };
        last_val = val_loss.or(last_val);
        first_loss.get_or_insert(loss_sum);
        let line = LogLine {
            step: done,
            epoch: (done * spec.batch_size) as f64 / train.len() as f64,
            loss: loss_sum,
            lr,
            grad_norm,
            tokens_per_s,
            val_loss,
        };
        append_log(&log_path, &line)?;
        log.push(line);
        pb.set_position(done as u64);
        pb.set_message(format!(
            "loss {loss_sum:.4} lr {lr:.2e} {tokens_per_s:.0} tok/s"
        ));
        let save_due = (spec.save_every > 0 && done % spec.save_every == 0) || done == end;
        if save_due {
            let state = checkpoint::TrainState {
                step: done,
                total_steps,
                examples_seen: done * spec.batch_size,
                seed,
                rng: "dropout masks and data order derive from (seed, step)".into(),
            };
            checkpoint::save(&ckpt_root, &vars, &opt, &state, spec.keep_checkpoints)?;
        }
    }
    pb.finish_and_clear();
    let loss_curve = run_dir.join("loss-curve.svg");
    plot_losses(&loss_curve, &log)?;
    let seconds = started.elapsed().as_secs_f64();
    Ok(FinetuneReport {
        train_examples: train.len(),
        val_examples: val.len(),
        steps: end,
        total_steps,
        resumed_from,
        stopped_early: end < total_steps,
        first_loss,
        last_loss: log.last().map(|l| l.loss),
        val_loss: last_val,
        tokens: tokens_done,
        seconds,
        tokens_per_s: tokens_done as f64 / seconds.max(1e-9),
        matmul_precision: model.matmul_precision(),
        wrote: vec![log_path, ckpt_root, loss_curve],
    })
}

fn load_examples(tok: &TextTokenizer, spec: &FinetuneSpec) -> Result<Vec<Example>> {
    let mut out = Vec::new();
    for path in expand_globs(&spec.data, "finetune.data")? {
        for (i, item) in read_instruction_file(&path)?.iter().enumerate() {
            out.push(
                instruction_example(tok, item, spec.cutoff_len, spec.train_on_inputs)
                    .with_context(|| format!("{} item {i}", path.display()))?,
            );
        }
    }
    for path in expand_globs(&spec.text, "finetune.text")? {
        out.extend(text_examples(tok, &path, spec.cutoff_len)?);
    }
    out.retain(|e| e.targets.iter().any(|&t| t));
    if out.is_empty() {
        bail!("finetune found no usable example in its data");
    }
    Ok(out)
}

/// The data stream: epoch e is a permutation seeded by (seed, e).
struct EpochOrder {
    n: usize,
    seed: u64,
    cache: std::cell::RefCell<(usize, Vec<usize>)>,
}

impl EpochOrder {
    fn new(n: usize, seed: u64) -> Self {
        Self {
            n,
            seed,
            cache: std::cell::RefCell::new((usize::MAX, Vec::new())),
        }
    }

    /// Index of the k-th example of the stream.
    fn at(&self, k: usize) -> usize {
        let (epoch, pos) = (k / self.n, k % self.n);
        let mut cache = self.cache.borrow_mut();
        if cache.0 != epoch {
            let mut perm: Vec<usize> = (0..self.n).collect();
            let mut rng =
                rand_chacha::ChaCha8Rng::seed_from_u64(self.seed.wrapping_add(1 + epoch as u64));
            perm.shuffle(&mut rng);
            *cache = (epoch, perm);
        }
        cache.1[pos]
    }
}

/// Right-padded batch: input ids (b, T), attention mask (b, T), next-token targets
/// (b, T-1) and their loss mask (b, T-1), f32.
fn collate(examples: &[&Example], device: &Device) -> Result<(Tensor, Tensor, Tensor, Tensor)> {
    let width = examples
        .iter()
        .map(|e| e.ids.len())
        .max()
        .unwrap_or(2)
        .max(2);
    let b = examples.len();
    let (mut ids, mut mask, mut targets, mut tmask) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for e in examples {
        let n = e.ids.len();
        for j in 0..width {
            ids.push(if j < n { e.ids[j] } else { 0 });
            mask.push(u32::from(j < n));
            if j >= 1 {
                targets.push(if j < n { e.ids[j] } else { 0 });
                tmask.push(if j < n && e.targets[j] { 1f32 } else { 0.0 });
            }
        }
    }
    Ok((
        Tensor::from_vec(ids, (b, width), device)?,
        Tensor::from_vec(mask, (b, width), device)?,
        Tensor::from_vec(targets, (b, width - 1), device)?,
        Tensor::from_vec(tmask, (b, width - 1), device)?,
    ))
}

/// Mean next-token loss of a batch over its target tokens, the number of target
/// tokens, and the number of real (unpadded) tokens.
fn next_token_loss(
    model: &Llama,
    batch: &[&Example],
    device: &Device,
    mode: Mode,
) -> Result<(Tensor, usize, u64)> {
    let (ids, mask, targets, target_mask) = collate(batch, device)?;
    let width = ids.dim(1)?;
    let hidden = model
        .forward_hidden(&ids, Some(&mask), None, mode)?
        .narrow(1, 0, width - 1)?;
    let (loss, count) = masked_mean_nll_from_hidden(model, &hidden, &targets, &target_mask)?;
    let real_tokens = batch.iter().map(|e| e.ids.len() as u64).sum();
    Ok((loss, count, real_tokens))
}

/// Mean next-token loss over every target token of `val` (no dropout).
fn validation_loss(model: &Llama, val: &[Example], micro: usize, device: &Device) -> Result<f64> {
    let (mut sum, mut count) = (0f64, 0usize);
    for chunk in val.chunks(micro) {
        let refs: Vec<&Example> = chunk.iter().collect();
        let (mean, n, _) = next_token_loss(model, &refs, device, Mode::Eval)?;
        sum += mean.to_scalar::<f32>()? as f64 * n as f64;
        count += n;
    }
    Ok(sum / count.max(1) as f64)
}

/// PyTorch's `clip_grad_norm_`: the global L2 norm of `grads`, and the gradients scaled
/// by `max_norm / (norm + 1e-6)` when the norm exceeds `max_norm` (0 = no clipping).
pub fn clip_grad_norm(grads: Vec<Tensor>, max_norm: f64) -> Result<(Vec<Tensor>, f64)> {
    let mut total = 0f64;
    for g in &grads {
        total += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    }
    let norm = total.sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        let clipped = grads
            .iter()
            .map(|g| g * scale)
            .collect::<candle_core::Result<_>>()?;
        return Ok((clipped, norm));
    }
    Ok((grads, norm))
}

fn read_log(path: &Path) -> Result<Vec<LogLine>> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    std::fs::read_to_string(path)?
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).with_context(|| format!("bad line in {}", path.display())))
        .collect()
}

fn rewrite_log(path: &Path, lines: &[LogLine]) -> Result<()> {
    let mut text = String::new();
    for l in lines {
        text.push_str(&serde_json::to_string(l)?);
        text.push('\n');
    }
    fsx::atomic_write(path, text.as_bytes())
}

fn append_log(path: &Path, line: &LogLine) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)?;
    writeln!(f, "{}", serde_json::to_string(line)?)?;
    Ok(())
}

fn plot_losses(path: &Path, log: &[LogLine]) -> Result<()> {
    if log.is_empty() {
        return Ok(());
    }
    let mut series = vec![Series {
        name: "train loss".into(),
        points: log.iter().map(|l| (l.step as f64, l.loss)).collect(),
    }];
    let val: Vec<(f64, f64)> = log
        .iter()
        .filter_map(|l| Some((l.step as f64, l.val_loss?)))
        .collect();
    if !val.is_empty() {
        series.push(Series {
            name: "val loss".into(),
            points: val,
        });
    }
    line_chart(path, "Fine-tuning loss", "step", "loss", &series)
}
