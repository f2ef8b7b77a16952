//! RMSNorm: `y = x / sqrt(mean(x²) + eps) · w` over the last dim.
//!
//! Backward, per row with `r = 1/sqrt(mean(x²) + eps)`, `n = x·r`, `g = dy·w`:
//! `dx = r · (g − n · mean(g·n))`; and `dw = Σ_rows dy·n`.

use super::math::dot;
use super::{cpu_f32, with_f32};
use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use multiversion::multiversion;
use rayon::prelude::*;

/// Rows per parallel task.
const ROWS_PER_TASK: usize = 64;

/// `x`: (..., hidden), `weight`: (hidden,), f32 on the CPU → the shape of `x`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let op = RmsNormOp::new(x, weight, eps)?;
    x.contiguous()?.apply_op2(&weight.contiguous()?, op)
}

/// The op of [`rms_norm`] (contiguous inputs): applied with candle's `apply_op2` or
/// `apply_op2_no_bwd` and its backward pass called by hand (`model::backprop`).
pub(crate) struct RmsNormOp {
    eps: f32,
}

impl RmsNormOp {
    pub(crate) fn new(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Self> {
        let hidden = x.dim(candle_core::D::Minus1)?;
        if weight.dims() != [hidden] {
            bail!(
                "rms_norm: weight {:?} for inputs (..., {hidden})",
                weight.dims()
            );
        }
        Ok(Self { eps: eps as f32 })
    }
}

/// 1/sqrt(mean(x²) + eps) of one row.
#[inline(always)]
fn inv_rms(row: &[f32], eps: f32) -> f32 {
    let mean_sq = dot(row, row) / row.len() as f32;
    1.0 / (mean_sq + eps).sqrt()
}

impl CustomOp2 for RmsNormOp {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        w: &CpuStorage,
        w_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = cpu_f32(x, x_layout, self.name())?;
        let w = cpu_f32(w, w_layout, self.name())?;
        let mut y = super::buffers::zeros(x.len());
        let block = ROWS_PER_TASK * w.len();
        y.par_chunks_mut(block)
            .zip(x.par_chunks(block))
            .for_each(|(y, x)| forward_rows(x, w, self.eps, y));
        Ok((CpuStorage::F32(y), x_layout.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _y: &Tensor,
        grad_y: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        self.vjp(x, weight, grad_y)
    }
}

impl RmsNormOp {
    /// The vector–Jacobian product: the inputs' gradients for the output's gradient `grad_y`
    /// (what candle's backward pass asks of the op; `model::backprop` calls it directly).
    pub(crate) fn vjp(
        &self,
        x: &Tensor,
        weight: &Tensor,
        grad_y: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let n = self.name();
        let (dx, dw) = with_f32(x, n, |x| {
            with_f32(grad_y, n, |dy| {
                with_f32(weight, n, |w| Ok(self.backward(x, dy, w)))
            })
        })?;
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), x.device())?),
            Some(Tensor::from_vec(dw, weight.shape(), x.device())?),
        ))
    }
}

/// `y = x · r · w` for each row of `w.len()` values.
#[multiversion(targets = "simd")]
fn forward_rows(x: &[f32], w: &[f32], eps: f32, y: &mut [f32]) {
    for (y, x) in y.chunks_mut(w.len()).zip(x.chunks(w.len())) {
        let r = inv_rms(x, eps);
        for ((y, x), w) in y.iter_mut().zip(x).zip(w) {
            *y = x * r * w;
        }
    }
}

/// `dx` for each row of `w.len()` values, and the rows' sum of `dy · n` added to `dw`.
#[multiversion(targets = "simd")]
fn backward_rows(x: &[f32], dy: &[f32], w: &[f32], eps: f32, dx: &mut [f32], dw: &mut [f32]) {
    let hidden = w.len();
    let rows = dx
        .chunks_mut(hidden)
        .zip(x.chunks(hidden).zip(dy.chunks(hidden)));
    for (dx, (x, dy)) in rows {
        let r = inv_rms(x, eps);
        let mut mean_gn = 0f32;
        for j in 0..hidden {
            let n = x[j] * r;
            mean_gn += dy[j] * w[j] * n;
            dw[j] += dy[j] * n;
        }
        mean_gn /= hidden as f32;
        for j in 0..hidden {
            dx[j] = r * (dy[j] * w[j] - x[j] * r * mean_gn);
        }
    }
}

impl RmsNormOp {
    fn backward(&self, x: &[f32], dy: &[f32], w: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let hidden = w.len();
        let block = ROWS_PER_TASK * hidden;
        let mut dx = super::buffers::zeros(x.len());
        // Each task: dx for its rows, and its rows' share of dw.
        let dw = dx
            .par_chunks_mut(block)
            .zip(x.par_chunks(block).zip(dy.par_chunks(block)))
            .map(|(dx, (x, dy))| {
                let mut dw = vec![0f32; hidden];
                backward_rows(x, dy, w, self.eps, dx, &mut dw);
                dw
            })
            .reduce(
                || vec![0f32; hidden],
                |mut a, b| {
                    a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
                    a
                },
            );
        (dx, dw)
    }
}
