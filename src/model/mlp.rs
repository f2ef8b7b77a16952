//! SwiGLU feed-forward: `down(silu(gate(x)) * up(x))`.

use super::linear::Linear;
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
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate = candle_nn::ops::silu(&self.gate_proj.forward(x)?)?;
        self.down_proj.forward(&(gate * self.up_proj.forward(x)?)?)
    }
}
