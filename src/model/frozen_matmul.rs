//! `x Wᵀ` for a frozen weight, with a backward pass for `x` only.
//!
//! candle's `matmul` backward always computes both operand gradients, so every frozen
//! projection paid for a full `dW = dYᵀ X` matmul (as large as the forward) and for a
//! zero-filled gradient buffer the size of the weight, both thrown away. Fine-tuning
//! through adapters never needs `dW`; this op gives candle a backward that returns
//! `dX = dY W` alone.

use anyhow::{bail, Result};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Storage, Tensor};

/// `x`: (..., in), `w`: (out, in) → (..., out). `w` gets no gradient; `x` does.
pub fn frozen_matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims();
    let in_dim = dims[dims.len() - 1];
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let (out_dim, w_in) = w.dims2()?;
    if w_in != in_dim {
        bail!("matmul shape mismatch: input (..., {in_dim}) against weight ({out_dim}, {w_in})");
    }
    if x.dtype() != w.dtype() {
        bail!(
            "matmul dtype mismatch: input {:?}, weight {:?}",
            x.dtype(),
            w.dtype()
        );
    }
    let x2 = x.reshape((rows, in_dim))?;
    // The custom op has a CPU kernel only; elsewhere candle's matmul is used (and
    // computes the unused dW, as before).
    let out = if x.device().is_cpu() {
        x2.apply_op1(FrozenMatmulT { w: w.clone() })?
    } else {
        x2.matmul(&w.t()?)?
    };
    let mut out_dims = dims.to_vec();
    *out_dims.last_mut().expect("x has at least one dim") = out_dim;
    Ok(out.reshape(out_dims)?)
}

struct FrozenMatmulT {
    /// (out, in)
    w: Tensor,
}

impl CustomOp1 for FrozenMatmulT {
    fn name(&self) -> &'static str {
        "frozen-matmul-t"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, in_dim) = x_layout.shape().dims2()?;
        let (w_storage, w_layout) = self.w.storage_and_layout();
        let Storage::Cpu(w) = &*w_storage else {
            candle_core::bail!("frozen-matmul-t: the weight is not on the CPU")
        };
        let (out_dim, _) = w_layout.shape().dims2()?;
        // Wᵀ as a strided view: (in, out).
        let wt_layout = w_layout.transpose(0, 1)?;
        let y = x.matmul(w, (1, rows, out_dim, in_dim), x_layout, &wt_layout)?;
        Ok((y, Shape::from((rows, out_dim))))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _y: &Tensor,
        grad_y: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        // (rows, out) · (out, in) → (rows, in)
        Ok(Some(grad_y.matmul(&self.w)?))
    }
}
