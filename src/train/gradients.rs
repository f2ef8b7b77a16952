//! One micro-batch's loss and the gradients of the trainable tensors, by one of two
//! engines that compute the same thing: the explicit backward pass of
//! [`crate::model::backprop`] (the default, where it applies: f32 on the CPU, no prefix
//! tuning) or candle's autograd over the whole graph (everything else, and the reference
//! the tests compare against).

use super::batch::Batch;
use super::objective::{predicting, Objective};
use crate::model::{backprop, Llama};
use crate::nn::tape::Gradients;
use crate::nn::Mode;
use anyhow::{bail, Context, Result};
use candle_core::{Tensor, Var};
use std::time::Instant;

/// Which engine computes the gradients.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backward {
    /// The explicit backward pass where it applies, candle's autograd elsewhere.
    #[default]
    Auto,
    /// Candle's autograd always.
    Autograd,
}

/// A micro-batch's share of a step.
pub struct MicroStep {
    /// The loss divided by the step's number of micro-batches.
    pub loss: f64,
    pub grads: Gradients,
    /// Forward pass and loss; backward pass.
    pub forward_s: f64,
    pub backward_s: f64,
}

/// How a micro-step computes its gradients.
#[derive(Debug, Clone, Copy, Default)]
pub struct BackwardSettings {
    pub engine: Backward,
    /// Recompute each layer's activations in the backward pass (explicit engine only).
    pub activation_checkpointing: bool,
}

impl BackwardSettings {
    /// Whether these settings can train `model`; an error says why not.
    pub fn check(&self, model: &Llama) -> Result<()> {
        if self.activation_checkpointing
            && (self.engine == Backward::Autograd || !backprop::applies_to(model))
        {
            bail!(
                "finetune.activation_checkpointing needs the explicit backward pass: f32 \
                 weights on the CPU and no prefix tuning (set dtype: f32, or turn \
                 activation_checkpointing off)"
            );
        }
        Ok(())
    }
}

/// The loss of `batch` (its mean over target tokens, divided by `accumulation`) and the
/// gradients of `vars`, the model run in `mode`.
pub fn micro_step(
    objective: &Objective,
    model: &Llama,
    batch: &Batch,
    mode: Mode,
    accumulation: usize,
    vars: &[(String, Var)],
    settings: BackwardSettings,
) -> Result<MicroStep> {
    settings.check(model)?;
    let t0 = Instant::now();
    if settings.engine == Backward::Autograd || !backprop::applies_to(model) {
        let loss = (objective.loss(model, batch, mode)?.mean / accumulation as f64)?;
        let value = loss.to_scalar::<f32>()? as f64;
        let t1 = Instant::now();
        let store = loss.backward()?;
        return Ok(MicroStep {
            loss: value,
            grads: Gradients::from_store(&store, vars.iter().map(|(_, v)| v)),
            forward_s: (t1 - t0).as_secs_f64(),
            backward_s: t1.elapsed().as_secs_f64(),
        });
    }
    // The layers by hand; the loss after them (head, log-softmax, KL) by autograd on a
    // small graph rooted at the predicting positions' hidden states.
    let (hidden, tape) = backprop::forward(
        model,
        &batch.ids,
        Some(&batch.mask),
        mode,
        settings.activation_checkpointing,
    )?;
    let predicting = Var::from_tensor(&predicting(&hidden)?)?;
    let loss = (objective
        .loss_at(model, predicting.as_tensor(), batch)?
        .mean
        / accumulation as f64)?;
    let value = loss.to_scalar::<f32>()? as f64;
    let t1 = Instant::now();
    let d_predicting = loss
        .backward()?
        .remove(predicting.as_tensor())
        .context("the loss does not depend on the hidden states")?;
    // The last position predicts nothing: its gradient is zero.
    let (b, _, h) = hidden.dims3()?;
    let last = Tensor::zeros((b, 1, h), hidden.dtype(), hidden.device())?;
    let d_hidden = Tensor::cat(&[&d_predicting, &last], 1)?;
    let grads = backprop::backward(model, tape, &d_hidden)?;
    Ok(MicroStep {
        loss: value,
        grads,
        forward_s: (t1 - t0).as_secs_f64(),
        backward_s: t1.elapsed().as_secs_f64(),
    })
}
