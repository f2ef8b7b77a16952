//! What a training step minimises. The step asks its [`Objective`] for the loss of each
//! micro-batch and never looks inside: another objective (distillation from a teacher
//! model, say) is another variant here, not a branch in the training loop.

use super::batch::Batch;
use crate::model::loss::masked_mean_nll_from_hidden;
use crate::model::Llama;
use crate::nn::Mode;
use anyhow::Result;
use candle_core::Tensor;

/// The loss a [`super::Trainer`] trains (and validates) with.
#[derive(Clone, Default)]
pub enum Objective {
    /// Mean next-token cross entropy over the batch's target tokens.
    #[default]
    NextToken,
}

/// The loss of one micro-batch.
pub struct Loss {
    /// Mean over the target tokens: a scalar tensor with the graph for backward.
    pub mean: Tensor,
    /// Target tokens the mean is over.
    pub target_tokens: usize,
}

impl Objective {
    /// The loss of `batch` with the model run in `mode`.
    pub fn loss(&self, model: &Llama, batch: &Batch, mode: Mode) -> Result<Loss> {
        match self {
            Objective::NextToken => next_token_loss(model, batch, mode),
        }
    }
}

/// Mean next-token loss of a batch over its target tokens.
fn next_token_loss(model: &Llama, batch: &Batch, mode: Mode) -> Result<Loss> {
    let width = batch.ids.dim(1)?;
    let hidden = model
        .forward_hidden(&batch.ids, Some(&batch.mask), None, mode)?
        .narrow(1, 0, width - 1)?;
    let (mean, target_tokens) =
        masked_mean_nll_from_hidden(model, &hidden, &batch.targets, &batch.target_mask)?;
    Ok(Loss {
        mean,
        target_tokens,
    })
}
