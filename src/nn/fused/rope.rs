//! Rotary embeddings in the rotate-half layout: with `x = [x1 | x2]` per head,
//! `y = [x1·c1 − x2·s1 | x2·c2 + x1·s2]`. Backward: `dx1 = dy1·c1 + dy2·s2`,
//! `dx2 = dy2·c2 − dy1·s1`.

use super::{cpu_f32, with_f32};
use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// `x`: (b, heads, t, head_dim) f32 on the CPU; `cos`/`sin`: (b, 1, t, head_dim).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let op = RopeOp::new(x, cos, sin)?;
    x.contiguous()?.apply_op1(op)
}

/// The op of [`rope`] (contiguous input): applied with candle's `apply_op1` or
/// `apply_op1_no_bwd` and its backward pass called by hand (`model::backprop`).
pub(crate) struct RopeOp {
    cos: Tensor,
    sin: Tensor,
}

impl RopeOp {
    pub(crate) fn new(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Self> {
        let (b, _, t, hd) = x.dims4()?;
        if cos.dims() != [b, 1, t, hd] || sin.dims() != cos.dims() {
            bail!(
                "rope: cos/sin have shapes {:?}/{:?}, expected [{b}, 1, {t}, {hd}]",
                cos.dims(),
                sin.dims()
            );
        }
        Ok(Self {
            cos: cos.contiguous()?,
            sin: sin.contiguous()?,
        })
    }
}

#[derive(Clone, Copy)]
enum Direction {
    Forward,
    Backward,
}

impl RopeOp {
    /// The rotation (forward) or its transpose (backward) of `src` shaped like `shape`.
    fn rotate(&self, src: &[f32], shape: &Shape, direction: Direction) -> Result<Vec<f32>> {
        let (_, heads, t, hd) = shape.dims4()?;
        let half = hd / 2;
        let mut dst = vec![0f32; src.len()];
        with_f32(&self.cos, "fused-rope", |cos| {
            with_f32(&self.sin, "fused-rope", |sin| {
                // One chunk per (batch row, head): t positions of head_dim values.
                dst.par_chunks_mut(t * hd)
                    .zip(src.par_chunks(t * hd))
                    .enumerate()
                    .for_each(|(bh, (dst, src))| {
                        let table = (bh / heads) * t * hd;
                        for pos in 0..t {
                            let o = pos * hd;
                            let (c, s) = (&cos[table + o..][..hd], &sin[table + o..][..hd]);
                            let (x, y) = (&src[o..o + hd], &mut dst[o..o + hd]);
                            for j in 0..half {
                                let (x1, x2) = (x[j], x[j + half]);
                                (y[j], y[j + half]) = match direction {
                                    Direction::Forward => {
                                        (x1 * c[j] - x2 * s[j], x2 * c[j + half] + x1 * s[j + half])
                                    }
                                    Direction::Backward => {
                                        (x1 * c[j] + x2 * s[j + half], x2 * c[j + half] - x1 * s[j])
                                    }
                                };
                            }
                        }
                    });
                Ok(())
            })
        })?;
        Ok(dst)
    }
}

impl CustomOp1 for RopeOp {
    fn name(&self) -> &'static str {
        "fused-rope"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = cpu_f32(storage, layout, self.name())?;
        let y = self.rotate(x, layout.shape(), Direction::Forward)?;
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad_y: &Tensor) -> Result<Option<Tensor>> {
        self.vjp(x, grad_y)
    }
}

impl RopeOp {
    /// The vector–Jacobian product: the inputs' gradients for the output's gradient `grad_y`
    /// (what candle's backward pass asks of the op; `model::backprop` calls it directly).
    pub(crate) fn vjp(&self, x: &Tensor, grad_y: &Tensor) -> Result<Option<Tensor>> {
        let dx = with_f32(grad_y, self.name(), |dy| {
            self.rotate(dy, x.shape(), Direction::Backward)
        })?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}
