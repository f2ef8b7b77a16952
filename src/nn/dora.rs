//! DoRA: a LoRA update plus a trainable magnitude per output feature,
//! `y = (m / ‖W + γBA‖_row) ⊙ (x (W + γBA)ᵀ)`, the norm detached as in the DoRA paper and
//! PEFT. In training with dropout the computation follows PEFT's exactly:
//! `x Wᵀ + (s − 1) ⊙ x_d Wᵀ + s ⊙ γ x_d Aᵀ Bᵀ`, with `s = m / ‖W + γBA‖` and
//! `x_d = dropout(x)`; without dropout that is the formula above.

use super::dropout::{self, to_f32};
use super::frozen::{frozen_matmul_t, FrozenWeight};
use super::lora::LoraAdapter;
use super::mode::Mode;
use anyhow::Result;
use candle_core::{Tensor, Var, D};

#[derive(Clone, Debug)]
pub struct DoraAdapter {
    pub lora: LoraAdapter,
    /// (out,), f32, trainable; PEFT's `lora_magnitude_vector`.
    pub magnitude: Var,
}

/// `‖W[i,:] + ΔW[i,:]‖₂` per output feature, (out,), f32.
pub fn row_norms(weight: &Tensor, delta: Option<&Tensor>) -> Result<Tensor> {
    let w = to_f32(weight)?;
    let w = match delta {
        Some(d) => (w + d)?,
        None => w,
    };
    Ok(w.sqr()?.sum(D::Minus1)?.sqrt()?)
}

impl DoraAdapter {
    /// `‖W + γBA‖_row`, detached, (out,), f32.
    pub fn weight_norm(&self, weight: &Tensor) -> Result<Tensor> {
        Ok(row_norms(weight, Some(&self.lora.delta_weight()?.detach()))?.detach())
    }

    /// `x`: (..., in) → (..., out) in `x`'s dtype.
    pub fn forward(&self, x: &Tensor, weight: &FrozenWeight, mode: Mode) -> Result<Tensor> {
        self.forward_with_norm(x, weight, &self.weight_norm(weight.tensor())?, mode)
    }

    /// The forward pass for a given row norm (out,). The backward pass treats the norm as
    /// a constant, so this is the function whose gradient training follows; gradient
    /// checks hold the norm fixed through it.
    pub fn forward_with_norm(
        &self,
        x: &Tensor,
        weight: &FrozenWeight,
        norm: &Tensor,
        mode: Mode,
    ) -> Result<Tensor> {
        let lora = &self.lora;
        let base = frozen_matmul_t(x, weight)?;
        let dropped = dropout::apply(x, mode, lora.dropout, lora.id)?;
        let scale = (self.magnitude.as_tensor() / norm)?;
        // With dropout off, `dropped` is `x` and the base product is reused.
        let dropped_base = if dropped.id() == x.id() {
            base.clone()
        } else {
            frozen_matmul_t(&dropped, weight)?
        };
        let dora = (to_f32(&dropped_base)?.broadcast_mul(&(&scale - 1.0)?)?
            + lora.delta(&dropped)?.broadcast_mul(&scale)?)?;
        Ok((base + dora.to_dtype(x.dtype())?)?)
    }
}
