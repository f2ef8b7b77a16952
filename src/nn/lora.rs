//! LoRA / RoRA: `y = x Wᵀ + γ · dropout(x) Aᵀ Bᵀ`, with `γ = alpha / r` (LoRA) or
//! `alpha / sqrt(r)` (RoRA, PEFT's `use_rslora`).

use super::dropout::{self, to_f32};
use super::frozen::{frozen_matmul_t, matmul_t, FrozenWeight};
use super::fused;
use super::mode::Mode;
use anyhow::Result;
use candle_core::{Tensor, Var};

#[derive(Clone, Debug)]
pub struct LoraAdapter {
    /// (r, in), f32, trainable.
    pub a: Var,
    /// (out, r), f32, trainable.
    pub b: Var,
    pub scale: f64,
    pub dropout: f64,
    /// Distinguishes this adapter's dropout masks from the others'.
    pub id: u64,
}

impl LoraAdapter {
    /// `γ · x Aᵀ Bᵀ` for an already dropped-out `x` (..., in) → (..., out), in f32.
    pub fn delta(&self, x: &Tensor) -> Result<Tensor> {
        let down = matmul_t(&to_f32(x)?, self.a.as_tensor())?;
        Ok((matmul_t(&down, self.b.as_tensor())? * self.scale)?)
    }

    /// Whether the fused LoRA kernel takes `x` with `weight`: everything f32 on the CPU.
    pub fn fuses(&self, x: &Tensor, weight: &FrozenWeight) -> bool {
        [x, weight.tensor(), self.a.as_tensor(), self.b.as_tensor()]
            .into_iter()
            .all(fused::applies_to)
    }

    /// `x`: (..., in) → (..., out) in `x`'s dtype.
    pub fn forward(&self, x: &Tensor, weight: &FrozenWeight, mode: Mode) -> Result<Tensor> {
        let (a, b) = (self.a.as_tensor(), self.b.as_tensor());
        if self.fuses(x, weight) {
            let mask = dropout::mask(mode, self.dropout, self.id);
            return Ok(fused::lora::lora_linear(x, weight, a, b, self.scale, mask)?);
        }
        self.forward_composite(x, weight, mode)
    }

    /// The same from candle's differentiable ops: any dtype and device.
    pub fn forward_composite(
        &self,
        x: &Tensor,
        weight: &FrozenWeight,
        mode: Mode,
    ) -> Result<Tensor> {
        let base = frozen_matmul_t(x, weight)?;
        let dropped = dropout::apply(x, mode, self.dropout, self.id)?;
        let delta = self.delta(&dropped)?;
        Ok((base + delta.to_dtype(x.dtype())?)?)
    }

    /// `γ · B A`, (out, in), f32.
    pub fn delta_weight(&self) -> Result<Tensor> {
        Ok((self.b.as_tensor().matmul(self.a.as_tensor())? * self.scale)?)
    }
}
