//! RMSNorm, following Hugging Face's `LlamaRMSNorm`: normalise in f32, cast back, then
//! scale. f32 on the CPU runs our fused kernel; elsewhere a composite of differentiable
//! ops (candle's own fused `ops::rms_norm` records no backward pass).

use crate::nn::fused;
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

    pub fn eps(&self) -> f64 {
        self.eps
    }

    /// `x`: (..., hidden) → same shape.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if fused::applies_to(x) && fused::applies_to(&self.weight) {
            return Ok(fused::rms_norm::rms_norm(x, &self.weight, self.eps)?);
        }
        self.forward_composite(x)
    }

    /// The same from candle's differentiable ops: any dtype and device.
    pub fn forward_composite(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let x32 = x.to_dtype(DType::F32)?;
        let mean_sq = x32.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = x32.broadcast_div(&(mean_sq + self.eps)?.sqrt()?)?;
        Ok(normed.to_dtype(dtype)?.broadcast_mul(&self.weight)?)
    }
}
