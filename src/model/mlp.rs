//! SwiGLU feed-forward: `down(silu(gate(x)) * up(x))`.

use crate::nn::fused;
use crate::nn::{Linear, Mode};
use anyhow::Result;
use candle_core::Tensor;

#[derive(Clone, Debug)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

impl Mlp {
    /// `x`: (b, t, hidden) → (b, t, hidden).
    pub fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let gate_up = Linear::forward_each(&[&self.gate_proj, &self.up_proj], x, mode)?;
        self.down_proj
            .forward(&silu_mul(&gate_up[0], &gate_up[1])?, mode)
    }
}

/// `silu(gate) · up`: our fused kernel for f32 on the CPU, candle's ops elsewhere.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if fused::applies_to(gate) && fused::applies_to(up) {
        return Ok(fused::swiglu::swiglu(gate, up)?);
    }
    silu_mul_composite(gate, up)
}

/// The same from candle's differentiable ops: any dtype and device.
pub fn silu_mul_composite(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    Ok((candle_nn::ops::silu(gate)? * up)?)
}
