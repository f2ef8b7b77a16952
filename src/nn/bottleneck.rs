//! Bottleneck adapters (Houlsby et al. 2019; He et al. 2021), as LLM-Adapters' `bottleneck`
//! tuner computes them: `adapter(z) = s · up(act(down(dropout(z))))`, a residual branch
//! placed around a frozen projection `W` in one of three ways:
//!
//! - [`Placement::Before`] (LLM-Adapters' `mh_adapter`, series on `gate_proj`/`up_proj`):
//!   `y = (x + adapter(x)) Wᵀ`, the adapter (in → b → in);
//! - [`Placement::After`] (`output_adapter`, series on `down_proj`): `z = x Wᵀ`,
//!   `y = z + adapter(z)`, the adapter (out → b → out);
//! - [`Placement::Parallel`] (`parallel_adapter`): `y = x Wᵀ + adapter(x)` (in → b → out).
//!
//! The branch is nonlinear, so unlike LoRA it cannot be folded into `W`.

use super::dropout::{self, to_f32};
use super::frozen::{frozen_matmul_t, matmul_t, FrozenWeight};
use super::mode::Mode;
use anyhow::Result;
use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

/// Where the adapter sits relative to its projection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Placement {
    Before,
    After,
    Parallel,
}

/// The bottleneck's activation: transformers' `ACT2FN` names, as LLM-Adapters takes them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NonLinearity {
    #[default]
    Tanh,
    Relu,
    /// The exact (erf) GELU, transformers' `gelu`.
    Gelu,
    Silu,
}

impl NonLinearity {
    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            NonLinearity::Tanh => x.tanh()?,
            NonLinearity::Relu => x.relu()?,
            NonLinearity::Gelu => x.gelu_erf()?,
            NonLinearity::Silu => candle_nn::ops::silu(x)?,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            NonLinearity::Tanh => "tanh",
            NonLinearity::Relu => "relu",
            NonLinearity::Gelu => "gelu",
            NonLinearity::Silu => "silu",
        }
    }
}

#[derive(Clone, Debug)]
pub struct BottleneckAdapter {
    /// (bottleneck, d), f32, trainable; LLM-Adapters' `adapter_down.weight`.
    pub down: Var,
    /// (d', bottleneck), f32, trainable; `adapter_up.weight`.
    pub up: Var,
    pub placement: Placement,
    pub non_linearity: NonLinearity,
    pub scaling: f64,
    pub dropout: f64,
    /// Distinguishes this adapter's dropout masks from the others'.
    pub id: u64,
}

impl BottleneckAdapter {
    /// `s · up(act(down(dropout(z))))` for `z` (..., d) → (..., d') in f32.
    pub fn branch(&self, z: &Tensor, mode: Mode) -> Result<Tensor> {
        let dropped = dropout::apply(&to_f32(z)?, mode, self.dropout, self.id)?;
        let hidden = self
            .non_linearity
            .apply(&matmul_t(&dropped, self.down.as_tensor())?)?;
        Ok((matmul_t(&hidden, self.up.as_tensor())? * self.scaling)?)
    }

    /// `x`: (..., in) → (..., out) in `x`'s dtype.
    pub fn forward(&self, x: &Tensor, weight: &FrozenWeight, mode: Mode) -> Result<Tensor> {
        match self.placement {
            Placement::Before => {
                let adapted = (x + self.branch(x, mode)?.to_dtype(x.dtype())?)?;
                frozen_matmul_t(&adapted, weight)
            }
            Placement::After => {
                let z = frozen_matmul_t(x, weight)?;
                Ok((&z + self.branch(&z, mode)?.to_dtype(z.dtype())?)?)
            }
            Placement::Parallel => {
                let z = frozen_matmul_t(x, weight)?;
                Ok((z + self.branch(x, mode)?.to_dtype(x.dtype())?)?)
            }
        }
    }
}
