//! The trainer: the adapters' optimizer, the data stream and the schedule of one
//! fine-tuning run, and [`Trainer::step`], the one training step (`finetune` and
//! `recover bench train` both run it).

use super::batch::{Batch, EpochOrder};
use super::checkpoint;
use super::gradients::{micro_step, Backward, BackwardSettings};
use super::objective::Objective;
use super::optim::{clip_grad_norm, AdamW, AdamWConfig};
use super::spec::FinetuneSpec;
use crate::adapters::trainable_vars;
use crate::data::{
    expand_globs, is_test_file, item_document, item_example, pack, read_instruction_file,
    text_document, text_examples, Example,
};
use crate::model::{Llama, TextTokenizer};
use crate::nn::Mode;
use crate::progress;
use crate::runtime;
use anyhow::{bail, Context, Result};
use candle_core::{Tensor, Var};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What one [`Trainer::step`] did.
#[derive(Debug, Clone, Copy)]
pub struct StepStats {
    /// Optimizer steps done, this one included (the 1-based number of this step).
    pub step: usize,
    /// The batch's loss: the sum over micro-batches of each one's mean / accumulation.
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// The learning rate of this update.
    pub lr: f64,
    /// Real (unpadded) tokens of the batch.
    pub tokens: u64,
    /// Wall time of the step.
    pub seconds: f64,
    /// Of which: forward passes and losses; backward passes; the rest (gradient
    /// accumulation and collection, norm, clipping, the AdamW update).
    pub forward_s: f64,
    pub backward_s: f64,
    pub optimizer_s: f64,
}

/// One fine-tuning run's state: model (whose adapters it trains), objective, data and
/// its seeded order, schedule, AdamW over the adapter variables, and the steps done.
pub struct Trainer<'a> {
    model: &'a Llama,
    spec: FinetuneSpec,
    seed: u64,
    objective: Objective,
    train: Vec<Example>,
    val: Vec<Example>,
    order: EpochOrder,
    total_steps: usize,
    vars: Vec<(String, Var)>,
    opt: AdamW,
    steps_done: usize,
    resumed_from: Option<usize>,
    /// `RUN/checkpoints`; none for a trainer of in-memory examples.
    checkpoints: Option<PathBuf>,
    /// The gradients' engine (see [`Trainer::set_backward`]).
    backward: Backward,
}

impl<'a> Trainer<'a> {
    /// A fresh run: reads the spec's data, holds out a seeded validation split, and
    /// checkpoints into `run_dir/checkpoints`.
    pub fn new(
        model: &'a Llama,
        tok: &TextTokenizer,
        spec: &FinetuneSpec,
        seed: u64,
        objective: Objective,
        run_dir: &Path,
    ) -> Result<Self> {
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
        let mut trainer = Self::from_examples(model, spec, seed, objective, train, examples)?;
        trainer.checkpoints = Some(checkpoint::root(run_dir));
        Ok(trainer)
    }

    /// A run over examples already in memory (`val` may be empty), without a run folder:
    /// [`Trainer::checkpoint`] fails. `spec`'s data keys are not read.
    pub fn from_examples(
        model: &'a Llama,
        spec: &FinetuneSpec,
        seed: u64,
        objective: Objective,
        train: Vec<Example>,
        val: Vec<Example>,
    ) -> Result<Self> {
        spec.validate_schedule()?;
        if train.is_empty() {
            bail!("finetune has no training example");
        }
        // Schedule: the data is a stream of seeded per-epoch orders; step s takes the
        // next `batch_size` examples of it.
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
        let opt = AdamW::new(vars.clone(), adamw)?;
        BackwardSettings {
            activation_checkpointing: spec.activation_checkpointing,
            ..Default::default()
        }
        .check(model)?;
        Ok(Self {
            model,
            spec: spec.clone(),
            seed,
            objective,
            train,
            val,
            order,
            total_steps,
            vars,
            opt,
            steps_done: 0,
            resumed_from: None,
            checkpoints: None,
            backward: Backward::default(),
        })
    }

    /// Which engine computes the gradients: the explicit backward pass where it applies
    /// (the default), or candle's autograd (`recover bench train --backward autograd`,
    /// and the tests that compare the two).
    pub fn set_backward(&mut self, backward: Backward) {
        self.backward = backward;
    }

    /// [`Trainer::new`], then adapters, optimizer moments and step as the newest
    /// checkpoint under `run_dir/checkpoints` left them (a fresh run when there is none).
    /// The checkpoint must come from the same seed and schedule.
    pub fn resume(
        model: &'a Llama,
        tok: &TextTokenizer,
        spec: &FinetuneSpec,
        seed: u64,
        objective: Objective,
        run_dir: &Path,
    ) -> Result<Self> {
        let mut trainer = Self::new(model, tok, spec, seed, objective, run_dir)?;
        let root = checkpoint::root(run_dir);
        let Some(&step) = checkpoint::list(&root).last() else {
            eprintln!(
                "--resume: no checkpoint in {}, starting from step 0",
                root.display()
            );
            return Ok(trainer);
        };
        let state = checkpoint::load(
            &checkpoint::checkpoint_dir(&root, step),
            &trainer.vars,
            &mut trainer.opt,
            model.device(),
        )?;
        let total_steps = trainer.total_steps;
        if state.seed != seed || state.total_steps != total_steps {
            bail!(
                "the checkpoint at step {step} was made with seed {} and {} total steps, this run has \
                 seed {seed} and {total_steps}; resume with the same pipeline",
                state.seed,
                state.total_steps
            );
        }
        trainer.steps_done = state.step;
        trainer.resumed_from = Some(step);
        eprintln!("resuming from checkpoint step-{step}");
        Ok(trainer)
    }

    /// The micro-batches of the next step: its `batch_size` examples of the data stream,
    /// collated `micro_batch_size` at a time.
    pub fn next_batch(&self) -> Result<Vec<Batch>> {
        let size = self.spec.batch_size;
        let examples: Vec<&Example> = (0..size)
            .map(|k| &self.train[self.order.at(self.steps_done * size + k)])
            .collect();
        examples
            .chunks(self.spec.micro_batch_size)
            .map(|micro| Batch::collate(micro, self.model.device()))
            .collect()
    }

    /// One optimizer step on `micro_batches` (`batch_size / micro_batch_size` of them):
    /// forward and backward of each with its own dropout masks, gradients summed,
    /// clipped, checked, and the AdamW update at the schedule's learning rate.
    pub fn step(&mut self, micro_batches: &[Batch]) -> Result<StepStats> {
        // Hundreds of parallel products with serial work between them.
        let on_cpu = self.model.device().is_cpu();
        runtime::with_workers_spinning(on_cpu, || self.take_step(micro_batches))
    }

    fn take_step(&mut self, micro_batches: &[Batch]) -> Result<StepStats> {
        let accumulation = self.spec.accumulation();
        if micro_batches.len() != accumulation {
            bail!(
                "a step of batch_size {} takes {accumulation} micro-batches of {}, not {}",
                self.spec.batch_size,
                self.spec.micro_batch_size,
                micro_batches.len()
            );
        }
        let t0 = Instant::now();
        let step = self.steps_done;

        // Forward and backward per micro-batch, summing gradients.
        let mut grads: Vec<Option<Tensor>> = vec![None; self.vars.len()];
        let (mut loss_sum, mut tokens) = (0f64, 0u64);
        let (mut forward_s, mut backward_s) = (0f64, 0f64);
        for (m, micro) in micro_batches.iter().enumerate() {
            let mode = Mode::train(self.seed ^ ((step * accumulation + m) as u64) << 16);
            let micro_step = micro_step(
                &self.objective,
                self.model,
                micro,
                mode,
                accumulation,
                &self.vars,
                BackwardSettings {
                    engine: self.backward,
                    activation_checkpointing: self.spec.activation_checkpointing,
                },
            )?;
            tokens += micro.real_tokens;
            loss_sum += micro_step.loss;
            forward_s += micro_step.forward_s;
            backward_s += micro_step.backward_s;
            for (slot, (_, var)) in grads.iter_mut().zip(&self.vars) {
                if let Some(gv) = micro_step.grads.get(var.as_tensor()) {
                    *slot = Some(match slot.take() {
                        Some(acc) => (acc + gv)?,
                        None => gv.clone(),
                    });
                }
            }
        }
        let grads: Vec<Tensor> = grads
            .into_iter()
            .zip(&self.vars)
            .map(|(g, (_, v))| g.map_or_else(|| v.zeros_like(), Ok))
            .collect::<candle_core::Result<_>>()?;

        // A bad step stops the run before its update, so the last checkpoint stays good.
        let (grads, grad_norm) = clip_grad_norm(grads, self.spec.max_grad_norm)?;
        let lr = self.spec.lr(step, self.total_steps);
        if !loss_sum.is_finite() || !grad_norm.is_finite() {
            let last = self
                .checkpoints
                .as_deref()
                .and_then(|root| {
                    Some(checkpoint::checkpoint_dir(
                        root,
                        *checkpoint::list(root).last()?,
                    ))
                })
                .map_or("none was written".to_string(), |dir| {
                    dir.display().to_string()
                });
            bail!(
                "the loss became {} at step {} (learning rate {lr:.3e}); training stopped before \
                 applying that update. The last good checkpoint: {last}. Lower \
                 finetune.learning_rate or check the data",
                if loss_sum.is_nan() || grad_norm.is_nan() {
                    "NaN"
                } else {
                    "infinite"
                },
                step + 1,
            );
        }
        self.opt.step(&grads, lr)?;
        self.steps_done += 1;
        let seconds = t0.elapsed().as_secs_f64();
        Ok(StepStats {
            step: self.steps_done,
            loss: loss_sum,
            grad_norm,
            lr,
            tokens,
            seconds,
            forward_s,
            backward_s,
            optimizer_s: seconds - forward_s - backward_s,
        })
    }

    /// The objective's mean loss over every target token of the validation set, in
    /// micro-batches, without dropout (0 when there is no validation set).
    pub fn validate(&self) -> Result<f64> {
        let (mut sum, mut count) = (0f64, 0usize);
        for chunk in self.val.chunks(self.spec.micro_batch_size) {
            let refs: Vec<&Example> = chunk.iter().collect();
            let batch = Batch::collate(&refs, self.model.device())?;
            let loss = self.objective.loss(self.model, &batch, Mode::Eval)?;
            sum += loss.mean.to_scalar::<f32>()? as f64 * loss.target_tokens as f64;
            count += loss.target_tokens;
        }
        Ok(sum / count.max(1) as f64)
    }

    /// Writes `checkpoints/step-N` for the steps done (adapters, optimizer moments,
    /// state) and keeps the newest `keep_checkpoints`.
    pub fn checkpoint(&self) -> Result<PathBuf> {
        let Some(root) = &self.checkpoints else {
            bail!("this trainer has no run folder to write checkpoints into");
        };
        let state = checkpoint::TrainState {
            step: self.steps_done,
            total_steps: self.total_steps,
            examples_seen: self.steps_done * self.spec.batch_size,
            seed: self.seed,
            rng: "dropout masks and data order derive from (seed, step)".into(),
        };
        checkpoint::save(
            root,
            &self.vars,
            &self.opt,
            &state,
            self.spec.keep_checkpoints,
        )
    }

    /// Optimizer steps done.
    pub fn steps_done(&self) -> usize {
        self.steps_done
    }

    /// Steps of the whole schedule (`max_steps`, or `epochs` over the training set).
    pub fn total_steps(&self) -> usize {
        self.total_steps
    }

    /// The checkpoint step [`Trainer::resume`] continued from.
    pub fn resumed_from(&self) -> Option<usize> {
        self.resumed_from
    }

    /// Epochs done: examples consumed over the training set's size.
    pub fn epoch(&self) -> f64 {
        (self.steps_done * self.spec.batch_size) as f64 / self.train.len() as f64
    }

    pub fn train_examples(&self) -> usize {
        self.train.len()
    }

    pub fn val_examples(&self) -> usize {
        self.val.len()
    }
}

/// Every example of the spec's data: items in `data_format` and chunks of the text
/// files, or (`packing`) all of them as documents packed into `cutoff_len` rows.
fn load_examples(tok: &TextTokenizer, spec: &FinetuneSpec) -> Result<Vec<Example>> {
    let mut items = Vec::new();
    for path in expand_globs(&spec.data, "finetune.data")? {
        if is_test_file(&path) {
            bail!(
                "finetune.data {} is named like a task's test file; training on the questions                  evaluation asks would make the evaluation meaningless (use the train files)",
                path.display()
            );
        }
        items.push((read_instruction_file(&path)?, path));
    }
    let at = |path: &Path, i: usize| format!("{} item {i}", path.display());
    let texts = expand_globs(&spec.text, "finetune.text")?;
    if spec.packing {
        let Some(&eos) = tok.eos_ids().first() else {
            bail!("finetune.packing puts EOS between examples, but the model's tokenizer has no EOS token");
        };
        let mut documents = Vec::new();
        for (file, path) in &items {
            for (i, item) in file.iter().enumerate() {
                documents
                    .push(item_document(tok, item, spec.data_format).with_context(|| at(path, i))?);
            }
        }
        for path in &texts {
            documents.push(text_document(tok, path)?);
        }
        let packed = pack(&documents, eos, spec.cutoff_len);
        if packed.rows.is_empty() {
            bail!(
                "finetune.packing: the data has {} tokens, fewer than one row of cutoff_len {}",
                packed.stream_tokens,
                spec.cutoff_len
            );
        }
        progress::line(&format!(
            "finetune: packed {} documents ({} tokens) into {} rows of {} tokens; the last {} \
             tokens (a partial row) are left out",
            documents.len(),
            packed.stream_tokens,
            packed.rows.len(),
            spec.cutoff_len,
            packed.dropped_tokens
        ));
        return Ok(packed.rows);
    }
    let mut out = Vec::new();
    for (file, path) in &items {
        for (i, item) in file.iter().enumerate() {
            out.push(
                item_example(
                    tok,
                    item,
                    spec.data_format,
                    spec.cutoff_len,
                    spec.train_on_inputs,
                )
                .with_context(|| at(path, i))?,
            );
        }
    }
    for path in &texts {
        out.extend(text_examples(tok, path, spec.cutoff_len)?);
    }
    out.retain(|e| e.targets.iter().any(|&t| t));
    if out.is_empty() {
        bail!("finetune found no usable example in its data");
    }
    Ok(out)
}
