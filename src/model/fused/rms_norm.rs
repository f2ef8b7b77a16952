//! RMSNorm: `y = x / sqrt(mean(x²) + eps) · w` over the last dim.
//!
//! Backward, per row with `r = 1/sqrt(mean(x²) + eps)`, `n = x·r`, `g = dy·w`:
//! `dx = r · (g − n · mean(g·n))`; and `dw = Σ_rows dy·n`.

use super::{cpu_f32, with_f32};
use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Rows per task when summing the weight gradient.
const ROWS_PER_TASK: usize = 64;

/// `x`: (..., hidden), `weight`: (hidden,), f32 on the CPU → the shape of `x`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let hidden = x.dim(candle_core::D::Minus1)?;
    if weight.dims() != [hidden] {
        bail!(
            "rms_norm: weight {:?} for inputs (..., {hidden})",
            weight.dims()
        );
    }
    x.contiguous()?
        .apply_op2(&weight.contiguous()?, RmsNormOp { eps: eps as f32 })
}

struct RmsNormOp {
    eps: f32,
}

/// 1/sqrt(mean(x²) + eps) of one row.
fn inv_rms(row: &[f32], eps: f32) -> f32 {
    let mean_sq = row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32;
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
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(w.len())
            .zip(x.par_chunks(w.len()))
            .for_each(|(y, x)| {
                let r = inv_rms(x, self.eps);
                for ((y, x), w) in y.iter_mut().zip(x).zip(w) {
                    *y = x * r * w;
                }
            });
        Ok((CpuStorage::F32(y), x_layout.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _y: &Tensor,
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

impl RmsNormOp {
    fn backward(&self, x: &[f32], dy: &[f32], w: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let hidden = w.len();
        let block = ROWS_PER_TASK * hidden;
        let mut dx = vec![0f32; x.len()];
        // Each task: dx for its rows, and its rows' share of dw.
        let dw = dx
            .par_chunks_mut(block)
            .zip(x.par_chunks(block).zip(dy.par_chunks(block)))
            .map(|(dx, (x, dy))| {
                let mut dw = vec![0f32; hidden];
                let rows = dx
                    .chunks_mut(hidden)
                    .zip(x.chunks(hidden).zip(dy.chunks(hidden)));
                for (dx, (x, dy)) in rows {
                    let r = inv_rms(x, self.eps);
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
