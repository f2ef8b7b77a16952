//! The bias-free projections of a Llama layer. Each keeps its frozen weight and is the
//! one place where an adapter hooks in, so the forward pass never changes when one is
//! attached.

use anyhow::Result;
use candle_core::Tensor;

#[derive(Clone, Debug)]
pub struct Linear {
    /// (out, in), frozen.
    weight: Tensor,
}

impl Linear {
    pub fn new(weight: Tensor) -> Self {
        Self { weight }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// `x`: (..., in) → (..., out).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        matmul_t(x, &self.weight)
    }
}

/// `x Wᵀ` for `x` of any rank (..., in) and `w` (out, in), as one 2-D matmul.
pub fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims();
    let in_dim = dims[dims.len() - 1];
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let out = x.reshape((rows, in_dim))?.matmul(&w.t()?)?;
    let mut out_dims = dims.to_vec();
    *out_dims
        .last_mut()
        .expect("matmul_t input has at least one dim") = w.dim(0)?;
    Ok(out.reshape(out_dims)?)
}
