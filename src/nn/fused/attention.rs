//! Scaled dot-product attention for grouped-query heads, one (batch row, kv head) group
//! per task: `O = softmax(scale · Q Kᵀ + mask) V`.
//!
//! Only a (t × T) score block per task exists at a time; neither the (b, heads, t, T)
//! scores nor the repeated keys and values are materialised, and the backward pass
//! recomputes the probabilities instead of keeping them. Backward, per head:
//! `dV = Pᵀ dO`, `dP = dO Vᵀ`, `dS = P ⊙ (dP − rowsum(P ⊙ dP))`,
//! `dQ = scale · dS K`, `dK = scale · dSᵀ Q` (dK and dV summed over the group's heads).

use super::math::{dot, exp, max, sum};
use super::{cpu_f32, gemm, with_f32, Mat};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use multiversion::multiversion;
use rayon::prelude::*;

/// `q`: (b, heads, t, hd); `k`, `v`: (b, kv_heads, T, hd); `mask`: additive (b, 1, t, T)
/// or `None` when every key is visible → (b, heads, t, hd). All f32 on the CPU; `heads`
/// a multiple of `kv_heads` (query head `i` reads kv head `i / (heads / kv_heads)`).
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let op = AttentionOp::new(q, k, v, mask, scale)?;
    q.contiguous()?
        .apply_op3(&head_by_head(k)?, &head_by_head(v)?, op)
}

/// `t` (b, kv_heads, T, hd) as the forward kernel reads keys and values: each head's
/// (T × hd) positions contiguous, consecutive heads evenly spaced. A KV cache's views are
/// so already (heads a buffer's capacity apart) and are read in place; anything else is
/// made contiguous.
fn head_by_head(t: &Tensor) -> Result<Tensor> {
    match t.is_contiguous() || head_stride(t.layout()).is_some() {
        true => Ok(t.clone()),
        false => t.contiguous(),
    }
}

/// The distance between consecutive heads of a (b, kv_heads, T, hd) layout read head by
/// head (see [`head_by_head`]), or `None` when it is not one.
fn head_stride(layout: &Layout) -> Option<usize> {
    let (dims, stride) = (layout.dims(), layout.stride());
    let &[_, heads, t, hd] = dims else {
        return None;
    };
    let by_head =
        stride[3] == 1 && stride[2] == hd && stride[1] >= t * hd && stride[0] == heads * stride[1];
    by_head.then_some(stride[1])
}

/// The values of keys or values laid out head by head, from the first, and the distance
/// between heads.
fn head_blocks<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<(&'a [f32], usize)> {
    let CpuStorage::F32(values) = storage else {
        bail!(
            "fused-attention: expected f32 data, got {:?}",
            storage.dtype()
        )
    };
    let (dims, start) = (layout.dims(), layout.start_offset());
    // candle counts a layout as contiguous whatever the strides of its size-1 dimensions
    // (one new token's keys): read those as packed.
    if let (Some((_, end)), &[.., t, hd]) = (layout.contiguous_offsets(), dims) {
        return Ok((&values[start..end], t * hd));
    }
    let Some(stride) = head_stride(layout) else {
        bail!("fused-attention: keys or values are not laid out head by head")
    };
    Ok((&values[start..], stride))
}

#[derive(Clone, Copy)]
struct Dims {
    heads: usize,
    kv_heads: usize,
    /// Query positions.
    t: usize,
    /// Key positions.
    tk: usize,
    hd: usize,
}

impl Dims {
    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }
}

/// The op of [`attention`] (contiguous inputs): applied with candle's `apply_op3` or
/// `apply_op3_no_bwd` and its backward pass called by hand (`model::backprop`).
pub(crate) struct AttentionOp {
    dims: Dims,
    mask: Option<Tensor>,
    scale: f32,
}

/// The inputs of one (batch row, kv head) task.
struct Group<'a> {
    /// The group's query heads, (group, t, hd).
    q: &'a [f32],
    /// (T, hd)
    k: &'a [f32],
    v: &'a [f32],
    /// (t, T), or empty when every key is visible.
    mask: &'a [f32],
}

impl AttentionOp {
    /// The op for `q`, `k`, `v` and `mask` as [`attention`] takes them.
    pub(crate) fn new(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Option<&Tensor>,
        scale: f64,
    ) -> Result<Self> {
        let (b, heads, t, hd) = q.dims4()?;
        let (kb, kv_heads, tk, khd) = k.dims4()?;
        if kb != b || khd != hd || v.dims() != k.dims() || kv_heads == 0 || heads % kv_heads != 0 {
            bail!(
                "attention: q {:?}, k {:?}, v {:?} do not fit together",
                q.dims(),
                k.dims(),
                v.dims()
            );
        }
        if let Some(m) = mask {
            if m.dims() != [b, 1, t, tk] {
                bail!(
                    "attention: mask {:?}, expected [{b}, 1, {t}, {tk}]",
                    m.dims()
                );
            }
        }
        Ok(Self {
            dims: Dims {
                heads,
                kv_heads,
                t,
                tk,
                hd,
            },
            mask: mask.map(Tensor::contiguous).transpose()?,
            scale: scale as f32,
        })
    }

    /// The inputs of group `i` = batch row · kv_heads + kv head, whose keys and values
    /// start `i · kv_strides` values into `k` and `v` (contiguous: T · hd each).
    fn group<'a>(
        &self,
        q: &'a [f32],
        (k, v): (&'a [f32], &'a [f32]),
        mask: &'a [f32],
        i: usize,
        kv_strides: (usize, usize),
    ) -> Group<'a> {
        let d = self.dims;
        let (qn, kn, mn) = (d.group() * d.t * d.hd, d.tk * d.hd, d.t * d.tk);
        let row = i / d.kv_heads;
        Group {
            q: &q[i * qn..][..qn],
            k: &k[i * kv_strides.0..][..kn],
            v: &v[i * kv_strides.1..][..kn],
            mask: if mask.is_empty() {
                mask
            } else {
                &mask[row * mn..][..mn]
            },
        }
    }

    /// `p` (t × T) ← softmax(scale · q kᵀ + mask) for one query head `q` (t × hd).
    fn probs(&self, q: &[f32], g: &Group, p: &mut [f32]) {
        let Dims { t, tk, hd, .. } = self.dims;
        gemm(
            (t, tk, hd),
            p,
            false,
            Mat::rows(q, hd),
            Mat::transposed(g.k, hd),
            self.scale,
        );
        softmax_rows(p, g.mask, tk);
    }

    fn with_mask<R>(&self, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
        match &self.mask {
            Some(m) => with_f32(m, "fused-attention", f),
            None => f(&[]),
        }
    }
}

/// Adds the additive `mask` (same shape, or empty) to the scores `p`, then takes the
/// softmax of each row of `width`. Scores more than 88 below the row's maximum give 0
/// (they underflow in f32 anyway), so masked positions come out exactly 0.
#[multiversion(targets = "simd")]
fn softmax_rows(p: &mut [f32], mask: &[f32], width: usize) {
    if !mask.is_empty() {
        p.iter_mut().zip(mask).for_each(|(s, m)| *s += m);
    }
    for row in p.chunks_mut(width) {
        let top = max(row);
        for s in row.iter_mut() {
            let d = *s - top;
            *s = if d < -88.0 { 0.0 } else { exp(d) };
        }
        let inv = 1.0 / sum(row);
        row.iter_mut().for_each(|s| *s *= inv);
    }
}

/// `ds ← p ⊙ (ds − rowsum(p ⊙ ds))` for rows of `width`: the softmax backward.
#[multiversion(targets = "simd")]
fn softmax_backward_rows(ds: &mut [f32], p: &[f32], width: usize) {
    for (ds, p) in ds.chunks_mut(width).zip(p.chunks(width)) {
        let dot = dot(ds, p);
        ds.iter_mut().zip(p).for_each(|(d, p)| *d = p * (*d - dot));
    }
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        q_layout: &Layout,
        k: &CpuStorage,
        k_layout: &Layout,
        v: &CpuStorage,
        v_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let q = cpu_f32(q, q_layout, self.name())?;
        let (k, k_stride) = head_blocks(k, k_layout)?;
        let (v, v_stride) = head_blocks(v, v_layout)?;
        let Dims { t, tk, hd, .. } = self.dims;
        let mut out = super::buffers::zeros(q.len());
        self.with_mask(|mask| {
            out.par_chunks_mut(self.dims.group() * t * hd)
                .enumerate()
                .for_each(|(i, out)| {
                    let g = self.group(q, (k, v), mask, i, (k_stride, v_stride));
                    let mut p = vec![0f32; t * tk];
                    for (qh, oh) in g.q.chunks(t * hd).zip(out.chunks_mut(t * hd)) {
                        self.probs(qh, &g, &mut p);
                        gemm(
                            (t, hd, tk),
                            oh,
                            false,
                            Mat::rows(&p, tk),
                            Mat::rows(g.v, hd),
                            1.0,
                        );
                    }
                });
            Ok(())
        })?;
        Ok((CpuStorage::F32(out), q_layout.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        grad_out: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        self.vjp(q, k, v, grad_out)
    }
}

impl AttentionOp {
    /// The vector–Jacobian product: the inputs' gradients for the output's gradient `grad_y`
    /// (what candle's backward pass asks of the op; `model::backprop` calls it directly).
    pub(crate) fn vjp(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        grad_out: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let n = self.name();
        let (dq, dk, dv) = with_f32(q, n, |q| {
            with_f32(k, n, |k| {
                with_f32(v, n, |v| {
                    with_f32(grad_out, n, |d_out| {
                        self.with_mask(|mask| Ok(self.backward(q, k, v, mask, d_out)))
                    })
                })
            })
        })?;
        let device = q.device();
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), device)?),
            Some(Tensor::from_vec(dk, k.shape(), device)?),
            Some(Tensor::from_vec(dv, v.shape(), device)?),
        ))
    }
}

impl AttentionOp {
    fn backward(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        mask: &[f32],
        d_out: &[f32],
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let Dims { t, tk, hd, .. } = self.dims;
        let qn = self.dims.group() * t * hd;
        let (mut dq, mut dk, mut dv) = (
            super::buffers::zeros(q.len()),
            super::buffers::zeros(k.len()),
            super::buffers::zeros(v.len()),
        );
        dq.par_chunks_mut(qn)
            .zip(dk.par_chunks_mut(tk * hd).zip(dv.par_chunks_mut(tk * hd)))
            .enumerate()
            .for_each(|(i, (dq, (dk, dv)))| {
                let g = self.group(q, (k, v), mask, i, (tk * hd, tk * hd));
                let d_out = &d_out[i * qn..][..qn];
                let (mut p, mut ds) = (vec![0f32; t * tk], vec![0f32; t * tk]);
                let heads = g.q.chunks(t * hd).zip(d_out.chunks(t * hd));
                for (r, ((qh, doh), dqh)) in heads.zip(dq.chunks_mut(t * hd)).enumerate() {
                    let accumulate = r > 0;
                    self.probs(qh, &g, &mut p);
                    // dV += Pᵀ dO
                    gemm(
                        (tk, hd, t),
                        dv,
                        accumulate,
                        Mat::transposed(&p, tk),
                        Mat::rows(doh, hd),
                        1.0,
                    );
                    // dP = dO Vᵀ, then dS = P ⊙ (dP − rowsum(P ⊙ dP)) in place.
                    gemm(
                        (t, tk, hd),
                        &mut ds,
                        false,
                        Mat::rows(doh, hd),
                        Mat::transposed(g.v, hd),
                        1.0,
                    );
                    softmax_backward_rows(&mut ds, &p, tk);
                    // dQ = scale · dS K;  dK += scale · dSᵀ Q
                    gemm(
                        (t, hd, tk),
                        dqh,
                        false,
                        Mat::rows(&ds, tk),
                        Mat::rows(g.k, hd),
                        self.scale,
                    );
                    gemm(
                        (tk, hd, t),
                        dk,
                        accumulate,
                        Mat::transposed(&ds, tk),
                        Mat::rows(qh, hd),
                        self.scale,
                    );
                }
            });
        (dq, dk, dv)
    }
}
