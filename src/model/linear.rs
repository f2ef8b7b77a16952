//! The bias-free projections of a Llama layer. Each keeps its frozen weight and is the
//! one place where an adapter hooks in, so the forward pass never changes when one is
//! attached.

use crate::adapters::Adapter;
use anyhow::Result;
use candle_core::Tensor;

#[derive(Clone, Debug)]
pub struct Linear {
    /// (out, in), frozen.
    weight: Tensor,
    adapter: Option<Adapter>,
}

impl Linear {
    pub fn new(weight: Tensor) -> Self {
        Self {
            weight,
            adapter: None,
        }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn set_weight(&mut self, weight: Tensor) {
        self.weight = weight;
    }

    pub fn adapter(&self) -> Option<&Adapter> {
        self.adapter.as_ref()
    }

    pub fn set_adapter(&mut self, adapter: Option<Adapter>) {
        self.adapter = adapter;
    }

    /// `x`: (..., in) → (..., out).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match &self.adapter {
            None => matmul_t(x, &self.weight),
            Some(adapter) => adapter.forward(x, &self.weight),
        }
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
