//! SwiGLU's gate: `y = silu(g) · u` with `silu(g) = g·σ(g)`. Backward:
//! `dg = dy · u · σ(g) · (1 + g·(1 − σ(g)))`, `du = dy · silu(g)`.

use super::math::sigmoid;
use super::{cpu_f32, with_f32};
use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use multiversion::multiversion;
use rayon::prelude::*;

/// Elements per parallel task: large enough to amortise scheduling.
const CHUNK: usize = 16 * 1024;

/// `gate`, `up`: the same shape, f32 on the CPU → `silu(gate) · up`.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let op = SwigluOp::new(gate, up)?;
    gate.contiguous()?.apply_op2(&up.contiguous()?, op)
}

/// The op of [`swiglu`] (contiguous inputs): applied with candle's `apply_op2` or
/// `apply_op2_no_bwd` and its backward pass called by hand (`model::backprop`).
pub(crate) struct SwigluOp;

impl SwigluOp {
    pub(crate) fn new(gate: &Tensor, up: &Tensor) -> Result<Self> {
        if gate.shape() != up.shape() {
            bail!(
                "swiglu: gate {:?} and up {:?} differ in shape",
                gate.dims(),
                up.dims()
            );
        }
        Ok(Self)
    }
}

#[multiversion(targets = "simd")]
fn forward_chunk(g: &[f32], u: &[f32], y: &mut [f32]) {
    for ((y, g), u) in y.iter_mut().zip(g).zip(u) {
        *y = g * sigmoid(*g) * u;
    }
}

#[multiversion(targets = "simd")]
fn backward_chunk(g: &[f32], u: &[f32], dy: &[f32], dg: &mut [f32], du: &mut [f32]) {
    for i in 0..g
        .len()
        .min(u.len())
        .min(dy.len())
        .min(dg.len())
        .min(du.len())
    {
        let s = sigmoid(g[i]);
        dg[i] = dy[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
        du[i] = dy[i] * g[i] * s;
    }
}

impl CustomOp2 for SwigluOp {
    fn name(&self) -> &'static str {
        "fused-swiglu"
    }

    fn cpu_fwd(
        &self,
        gate: &CpuStorage,
        gate_layout: &Layout,
        up: &CpuStorage,
        up_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = cpu_f32(gate, gate_layout, self.name())?;
        let u = cpu_f32(up, up_layout, self.name())?;
        let mut y = super::buffers::zeros(g.len());
        y.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
            .for_each(|(y, (g, u))| forward_chunk(g, u, y));
        Ok((CpuStorage::F32(y), gate_layout.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _y: &Tensor,
        grad_y: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        self.vjp(gate, up, grad_y)
    }
}

impl SwigluOp {
    /// The vector–Jacobian product: the inputs' gradients for the output's gradient `grad_y`
    /// (what candle's backward pass asks of the op; `model::backprop` calls it directly).
    pub(crate) fn vjp(
        &self,
        gate: &Tensor,
        up: &Tensor,
        grad_y: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dg, du) = with_f32(gate, self.name(), |g| {
            with_f32(up, self.name(), |u| {
                with_f32(grad_y, self.name(), |dy| {
                    let mut dg = super::buffers::zeros(g.len());
                    let mut du = super::buffers::zeros(g.len());
                    dg.par_chunks_mut(CHUNK)
                        .zip(du.par_chunks_mut(CHUNK))
                        .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
                        .zip(dy.par_chunks(CHUNK))
                        .for_each(|(((dg, du), (g, u)), dy)| backward_chunk(g, u, dy, dg, du));
                    Ok((dg, du))
                })
            })
        })?;
        let device = gate.device();
        Ok((
            Some(Tensor::from_vec(dg, gate.shape(), device)?),
            Some(Tensor::from_vec(du, up.shape(), device)?),
        ))
    }
}
