//! RMSNorm built from differentiable ops.
//!
//! candle's fused `ops::rms_norm` records no backward pass (its gradient is silently
//! missing), so training needs this composite form. It follows Hugging Face's
//! `LlamaRMSNorm`: normalise in f32, cast back, then scale.

use anyhow::Result;
use candle_core::{DType, Tensor, D};

#[derive(Clone, Debug)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn new(weight: Tensor, eps: f64) -> Self {
        Self { weight, eps }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// `x`: (..., hidden) → same shape.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let x32 = x.to_dtype(DType::F32)?;
        let mean_sq = x32.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = x32.broadcast_div(&(mean_sq + self.eps)?.sqrt()?)?;
        Ok(normed.to_dtype(dtype)?.broadcast_mul(&self.weight)?)
    }
}
