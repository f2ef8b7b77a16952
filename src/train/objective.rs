//! What a training step minimises. The step asks its [`Objective`] for the loss of each
//! micro-batch and never looks inside: distillation from a teacher model is another
//! variant here, not a branch in the training loop.

use super::batch::Batch;
use super::spec::{FinetuneSpec, ObjectiveKind};
use crate::model::loss::{masked_mean_kl_from_hidden, masked_mean_nll_from_hidden};
use crate::model::Llama;
use crate::nn::fused::distill::Divergence;
use crate::nn::Mode;
use anyhow::{bail, Result};
use candle_core::Tensor;
use std::sync::Arc;

/// The loss a [`super::Trainer`] trains (and validates) with.
#[derive(Clone, Default)]
pub enum Objective {
    /// Mean next-token cross entropy over the batch's target tokens.
    #[default]
    NextToken,
    /// Distillation from a frozen teacher, optionally mixed with the cross entropy.
    Distill(Distill),
}

/// `lm_weight · CE + kd_weight · T²·KL` over the target tokens, the KL between the
/// temperature-softened distributions of the teacher and the student at each of them.
#[derive(Clone)]
pub struct Distill {
    /// Runs in [`Mode::Eval`]; its hidden states are detached, so it gets no gradient.
    pub teacher: Arc<Llama>,
    /// 0 for `kd` (the cross entropy is then not computed at all).
    pub lm_weight: f64,
    pub kd_weight: f64,
    pub temperature: f64,
    pub divergence: Divergence,
}

/// The loss of one micro-batch.
pub struct Loss {
    /// Mean over the target tokens: a scalar tensor with the graph for backward.
    pub mean: Tensor,
    /// Target tokens the mean is over.
    pub target_tokens: usize,
}

impl Objective {
    /// The objective `spec` asks for; `teacher` is needed by `kd` and `kd+lm` only. The
    /// teacher's frozen products run at `spec.matmul_precision` (f32 where bf16 cannot).
    pub fn from_spec(spec: &FinetuneSpec, teacher: Option<Llama>) -> Result<Self> {
        let (lm_weight, kd_weight) = match spec.objective {
            ObjectiveKind::Lm => return Ok(Objective::NextToken),
            ObjectiveKind::Kd => (0.0, 1.0),
            ObjectiveKind::KdLm => (1.0 - spec.kd_ratio, spec.kd_ratio),
        };
        let Some(mut teacher) = teacher else {
            bail!("finetune.objective kd and kd+lm distil from a teacher; none was given");
        };
        teacher.set_matmul_precision_or_f32(spec.matmul_precision)?;
        Ok(Objective::Distill(Distill {
            teacher: Arc::new(teacher),
            lm_weight,
            kd_weight,
            temperature: spec.kd_temperature,
            divergence: spec.kd_divergence,
        }))
    }

    /// The loss of `batch` with the model run in `mode`.
    pub fn loss(&self, model: &Llama, batch: &Batch, mode: Mode) -> Result<Loss> {
        let hidden = model.forward_hidden(&batch.ids, Some(&batch.mask), None, mode)?;
        self.loss_at(model, &predicting(&hidden)?, batch)
    }

    /// The loss of `batch` for the student's final hidden states at the positions that
    /// predict a next token, `hidden` (b, t − 1, h) (see [`predicting`]): the half of
    /// [`Objective::loss`] after the model's layers, which an explicit backward pass
    /// differentiates with candle's autograd.
    pub fn loss_at(&self, model: &Llama, hidden: &Tensor, batch: &Batch) -> Result<Loss> {
        let (mean, target_tokens) = match self {
            Objective::NextToken => {
                masked_mean_nll_from_hidden(model, hidden, &batch.targets, &batch.target_mask)?
            }
            Objective::Distill(d) => d.loss(model, hidden, batch)?,
        };
        Ok(Loss {
            mean,
            target_tokens,
        })
    }
}

impl Distill {
    fn loss(&self, model: &Llama, hidden: &Tensor, batch: &Batch) -> Result<(Tensor, usize)> {
        let teacher_hidden =
            self.teacher
                .forward_hidden(&batch.ids, Some(&batch.mask), None, Mode::Eval)?;
        let teacher_hidden = predicting(&teacher_hidden)?.detach();
        let (kd, count) = masked_mean_kl_from_hidden(
            model,
            hidden,
            &self.teacher,
            &teacher_hidden,
            &batch.target_mask,
            self.temperature,
            self.divergence,
        )?;
        if self.lm_weight == 0.0 {
            return Ok(((kd * self.kd_weight)?, count));
        }
        let (ce, _) =
            masked_mean_nll_from_hidden(model, hidden, &batch.targets, &batch.target_mask)?;
        Ok((
            (ce.affine(self.lm_weight, 0.0)? + kd.affine(self.kd_weight, 0.0)?)?,
            count,
        ))
    }
}

/// Of final hidden states (b, t, h), those at the positions that predict the next token
/// (all but the last), (b, t − 1, h).
pub fn predicting(hidden: &Tensor) -> Result<Tensor> {
    let width = hidden.dim(1)?;
    Ok(hidden.narrow(1, 0, width - 1)?)
}
