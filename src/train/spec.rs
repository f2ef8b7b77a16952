//! Settings of the `finetune` stage and their checks.

use super::schedule::LrSchedule;
use crate::data::DataFormat;
use crate::eval::{EvalSpec, EvalTask};
use crate::nn::frozen::MatmulPrecision;
use crate::nn::fused::distill::Divergence;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// Settings of the `finetune` stage. Defaults are DoRA's commonsense recipe; a key left
/// out of the pipeline file takes its value from [`FinetuneSpec::default`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FinetuneSpec {
    /// LLM-Adapters JSON files (paths or globs).
    pub data: Vec<String>,
    /// Plain-text files (paths or globs) for language-model recovery.
    pub text: Vec<String>,
    /// How `data` items become text: `instructions` (LLM-Adapters' prompt, the papers'
    /// recipe) or `answers` (the question with its correct answer written out).
    pub data_format: DataFormat,
    /// Concatenate the examples (EOS after each) into rows of exactly `cutoff_len`
    /// tokens, every position a target, the last partial row dropped; `limit` and
    /// `val_set_size` then count rows.
    pub packing: bool,
    /// Use at most this many examples (a seeded random subset).
    pub limit: Option<usize>,
    pub cutoff_len: usize,
    pub train_on_inputs: bool,
    /// Examples held out for validation loss (seeded).
    pub val_set_size: usize,
    pub batch_size: usize,
    pub micro_batch_size: usize,
    pub learning_rate: f64,
    pub weight_decay: f64,
    pub warmup_steps: usize,
    pub lr_scheduler: LrSchedule,
    /// Clip the global gradient norm to this (0 = no clipping).
    pub max_grad_norm: f64,
    pub epochs: usize,
    /// Overrides `epochs` when set.
    pub max_steps: Option<usize>,
    /// Checkpoint every N steps (0: only at the end).
    pub save_every: usize,
    /// Checkpoints to keep (the newest).
    pub keep_checkpoints: usize,
    /// Validation loss (and `checkpoint_eval`) every N steps (0: only at the end).
    pub eval_every: usize,
    /// Evaluation settings (an `eval` stage's: write `checkpoint_eval: *eval` to reuse
    /// one) run on the model being trained before the first step, every `eval_every`
    /// steps and at the end: pooled accuracy and perplexity into `train-log.jsonl`
    /// (`eval`), `recovery-curve.svg` and `checkpoint-evals/`. Use a fixed question set
    /// (`limit`, or `sample` with the run's seed) so that the points are paired.
    pub checkpoint_eval: Option<EvalSpec>,
    /// Stop after this step as if interrupted (a checkpoint is written), to resume later
    /// with `--resume`: for time-boxed sessions.
    pub stop_after: Option<usize>,
    /// Inputs of the frozen weights' products: `f32`, or `bf16` (on AMX or AVX512-BF16, as PyTorch's
    /// bf16 autocast rounds them; adapters, attention and the optimizer stay f32). A CPU
    /// without either trains in f32 and says so.
    pub matmul_precision: MatmulPrecision,
    /// Keep only each layer's input from the forward pass and run the layer again in the
    /// backward pass: activation memory of one layer instead of all, for one more forward
    /// pass of the layers. Needs the explicit backward pass (f32 on the CPU, no prefix
    /// tuning).
    pub activation_checkpointing: bool,
    /// What training minimises: `lm` (next-token cross entropy), `kd` (distillation from
    /// `teacher` alone) or `kd+lm` (`(1 − kd_ratio)·CE + kd_ratio·KD`, torchtune's).
    pub objective: ObjectiveKind,
    /// The distillation share of a `kd+lm` loss.
    pub kd_ratio: f64,
    /// Both models' logits are divided by it before the softmax; the KL is scaled by T².
    pub kd_temperature: f64,
    /// `forward`: KL(teacher ‖ student); `reverse`: KL(student ‖ teacher).
    pub kd_divergence: Divergence,
    /// The model distilled from: `pre_prune` (the model as the pipeline's `prune` stage
    /// found it, the default after a `prune`) or a model source (folder, GGUF, `hf:`).
    pub teacher: Option<String>,
}

/// The `teacher` value naming the model before `prune`.
pub const PRE_PRUNE: &str = "pre_prune";

/// `finetune.objective` (and `recover bench train --objective`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum ObjectiveKind {
    #[default]
    #[serde(rename = "lm")]
    #[value(name = "lm")]
    Lm,
    #[serde(rename = "kd")]
    #[value(name = "kd")]
    Kd,
    #[serde(rename = "kd+lm")]
    #[value(name = "kd+lm")]
    KdLm,
}

impl std::fmt::Display for ObjectiveKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ObjectiveKind::Lm => "lm",
            ObjectiveKind::Kd => "kd",
            ObjectiveKind::KdLm => "kd+lm",
        })
    }
}

impl ObjectiveKind {
    /// Whether the objective needs a teacher.
    pub fn distills(self) -> bool {
        self != ObjectiveKind::Lm
    }
}

impl Default for FinetuneSpec {
    /// DoRA's commonsense recipe: cutoff 256, batch 16 of micro-batches 4, lr 2e-4 with
    /// 100 warmup steps and linear decay, 3 epochs, gradient clipping at 1.0, no weight
    /// decay.
    fn default() -> Self {
        Self {
            data: Vec::new(),
            text: Vec::new(),
            data_format: DataFormat::default(),
            packing: false,
            limit: None,
            cutoff_len: 256,
            train_on_inputs: true,
            val_set_size: 0,
            batch_size: 16,
            micro_batch_size: 4,
            learning_rate: 2e-4,
            weight_decay: 0.0,
            warmup_steps: 100,
            lr_scheduler: LrSchedule::default(),
            max_grad_norm: 1.0,
            epochs: 3,
            max_steps: None,
            save_every: 0,
            keep_checkpoints: 2,
            eval_every: 0,
            checkpoint_eval: None,
            stop_after: None,
            matmul_precision: MatmulPrecision::default(),
            activation_checkpointing: false,
            objective: ObjectiveKind::default(),
            kd_ratio: 0.5,
            kd_temperature: 1.0,
            kd_divergence: Divergence::default(),
            teacher: None,
        }
    }
}

impl FinetuneSpec {
    /// Checks the whole spec: a data source, then [`FinetuneSpec::validate_schedule`].
    pub fn validate(&self) -> Result<()> {
        if self.data.is_empty() && self.text.is_empty() {
            bail!("finetune needs `data` (LLM-Adapters JSON files) or `text` (plain text files)");
        }
        if !self.train_on_inputs {
            // Only the instruction template has a prompt to leave out of the loss.
            if self.packing {
                bail!("finetune.packing makes every token a target; it cannot go with train_on_inputs: false");
            }
            if self.data_format == DataFormat::Answers && !self.data.is_empty() {
                bail!(
                    "finetune.data_format: answers has no prompt to mask; remove train_on_inputs: false"
                );
            }
        }
        if let Some(eval) = &self.checkpoint_eval {
            eval.validate().context("finetune.checkpoint_eval")?;
            if !eval
                .tasks
                .iter()
                .any(|t| matches!(t, EvalTask::Commonsense(_)))
            {
                bail!(
                    "finetune.checkpoint_eval pools accuracy over commonsense tasks; its tasks \
                     have none (add e.g. ARC-Easy, piqa, hellaswag)"
                );
            }
        }
        self.validate_schedule()
    }

    /// Checks batch sizes, cutoff, learning rate and step count: everything a trainer
    /// given its examples in memory needs.
    pub fn validate_schedule(&self) -> Result<()> {
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
        self.validate_objective()
    }

    /// Checks the distillation keys (the teacher's presence is the pipeline's to check:
    /// `pre_prune` needs a `prune` stage before).
    pub fn validate_objective(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.kd_ratio) {
            bail!("finetune.kd_ratio must be in [0, 1], not {}", self.kd_ratio);
        }
        if !(self.kd_temperature.is_finite() && self.kd_temperature > 0.0) {
            bail!(
                "finetune.kd_temperature must be positive, not {}",
                self.kd_temperature
            );
        }
        if self.teacher.is_some() && !self.objective.distills() {
            bail!(
                "finetune.teacher is read by `objective: kd` or `kd+lm` only; this finetune has \
                 `objective: lm`"
            );
        }
        Ok(())
    }

    /// Micro-batches per optimizer step.
    pub fn accumulation(&self) -> usize {
        self.batch_size / self.micro_batch_size
    }

    /// The learning rate of optimizer step `step` (0-based) of `total_steps`.
    pub fn lr(&self, step: usize, total_steps: usize) -> f64 {
        self.lr_scheduler
            .lr(self.learning_rate, step, self.warmup_steps, total_steps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pipeline that names only its data gets the recipe's values.
    #[test]
    fn missing_keys_take_the_recipe_defaults() {
        let parsed: FinetuneSpec = serde_json::from_str(r#"{"data": ["x.json"]}"#).unwrap();
        let recipe = FinetuneSpec {
            data: vec!["x.json".into()],
            ..FinetuneSpec::default()
        };
        assert_eq!(
            serde_json::to_value(&parsed).unwrap(),
            serde_json::to_value(&recipe).unwrap()
        );
        assert_eq!(parsed.cutoff_len, 256);
        assert_eq!((parsed.batch_size, parsed.micro_batch_size), (16, 4));
        assert_eq!(parsed.learning_rate, 2e-4);
        assert_eq!((parsed.warmup_steps, parsed.epochs), (100, 3));
        assert_eq!((parsed.max_grad_norm, parsed.weight_decay), (1.0, 0.0));
        assert!(parsed.train_on_inputs);
        assert_eq!(parsed.keep_checkpoints, 2);
        assert_eq!(parsed.data_format, DataFormat::Instructions);
        assert!(!parsed.packing);
        assert_eq!(parsed.objective, ObjectiveKind::Lm);
        assert_eq!((parsed.kd_ratio, parsed.kd_temperature), (0.5, 1.0));
        assert_eq!(parsed.kd_divergence, Divergence::Forward);
    }

    #[test]
    fn objective_names_parse_and_bad_distillation_keys_are_refused() {
        let parsed: FinetuneSpec =
            serde_json::from_str(r#"{"objective": "kd+lm", "kd_divergence": "reverse"}"#).unwrap();
        assert_eq!(parsed.objective, ObjectiveKind::KdLm);
        assert_eq!(parsed.kd_divergence, Divergence::Reverse);
        let bad = |json: &str| {
            let spec: FinetuneSpec = serde_json::from_str(json).unwrap();
            format!("{:#}", spec.validate_objective().unwrap_err())
        };
        assert!(bad(r#"{"objective": "kd", "kd_ratio": 1.5}"#).contains("kd_ratio"));
        assert!(bad(r#"{"objective": "kd", "kd_temperature": 0}"#).contains("kd_temperature"));
        assert!(bad(r#"{"teacher": "pre_prune"}"#).contains("objective: lm"));
    }
}
