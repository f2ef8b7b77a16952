//! Rotary position embeddings in the rotate-half layout Hugging Face uses for Llama
//! (q/k rows stored as [first halves | second halves] of each head), with optional
//! Llama-3 frequency scaling. f32 on the CPU runs our fused kernel; elsewhere a composite
//! of differentiable ops (candle's fused `rope` has no backward pass).

use super::config::LlamaConfig;
use crate::nn::fused;
use anyhow::Result;
use candle_core::{DType, Device, Tensor, D};

#[derive(Clone, Debug)]
pub struct RotaryEmbedding {
    /// (head_dim / 2,) inverse frequencies, f32.
    inv_freq: Tensor,
}

impl RotaryEmbedding {
    pub fn new(cfg: &LlamaConfig, device: &Device) -> Result<Self> {
        let head_dim = cfg.head_dim();
        let base = cfg.rope_theta as f32;
        let mut inv_freq: Vec<f32> = (0..head_dim)
            .step_by(2)
            .map(|i| 1f32 / base.powf(i as f32 / head_dim as f32))
            .collect();
        if let Some(s) = cfg
            .rope_scaling
            .as_ref()
            .filter(|s| s.rope_type == "llama3")
        {
            // Llama 3.1: keep high frequencies, divide low ones by `factor`, blend between.
            let old_ctx = s.original_max_position_embeddings as f32;
            let (factor, low, high) = (
                s.factor as f32,
                s.low_freq_factor as f32,
                s.high_freq_factor as f32,
            );
            let low_freq_wavelen = old_ctx / low;
            let high_freq_wavelen = old_ctx / high;
            for f in inv_freq.iter_mut() {
                let wavelen = 2.0 * std::f32::consts::PI / *f;
                *f = if wavelen < high_freq_wavelen {
                    *f
                } else if wavelen > low_freq_wavelen {
                    *f / factor
                } else {
                    let smooth = (old_ctx / wavelen - low) / (high - low);
                    (1.0 - smooth) * *f / factor + smooth * *f
                };
            }
        }
        let n = inv_freq.len();
        Ok(Self {
            inv_freq: Tensor::from_vec(inv_freq, (1, n), device)?,
        })
    }

    /// cos and sin for `positions` (b, t) u32, each (b, 1, t, head_dim) in `dtype`.
    pub fn cos_sin(&self, positions: &Tensor, dtype: DType) -> Result<(Tensor, Tensor)> {
        let (b, t) = positions.dims2()?;
        let pos = positions.to_dtype(DType::F32)?.reshape((b * t, 1))?;
        let freqs = pos.broadcast_mul(&self.inv_freq)?; // (b*t, hd/2)
        let emb = Tensor::cat(&[&freqs, &freqs], D::Minus1)?; // (b*t, hd)
        let hd = emb.dim(1)?;
        let shape = (b, 1, t, hd);
        let cos = emb.cos()?.reshape(shape)?.to_dtype(dtype)?;
        let sin = emb.sin()?.reshape(shape)?.to_dtype(dtype)?;
        Ok((cos, sin))
    }
}

/// `x`: (b, heads, t, head_dim); `cos`/`sin`: (b, 1, t, head_dim).
pub fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if fused::applies_to(x) && fused::applies_to(cos) && fused::applies_to(sin) {
        return Ok(fused::rope::rope(x, cos, sin)?);
    }
    apply_rotary_composite(x, cos, sin)
}

/// The same from candle's differentiable ops: any dtype and device.
pub fn apply_rotary_composite(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    Ok((x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?)?)
}
