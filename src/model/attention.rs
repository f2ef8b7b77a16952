//! Grouped-query self-attention with a causal + padding mask and an optional KV cache.

use super::kv_cache::LayerKv;
use super::rope::apply_rotary;
use crate::nn::fused::{self, buffers::swap_middle_dims};
use crate::nn::{Linear, Mode};
use anyhow::Result;
use candle_core::{DType, Tensor, D};

#[derive(Clone, Debug)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl Attention {
    /// `x`: (b, t, hidden); `cos`/`sin`: (b, 1, t, head_dim); `mask`: additive, (b, 1, t, T)
    /// where T = prefix + cached + t, or `None` when every key is visible (one new token, no
    /// padding); `prefix`: prefix-tuning keys and values, each (kv_heads, n, head_dim), seen
    /// before the cached ones (the cache holds real tokens only).
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        kv: Option<&mut LayerKv>,
        prefix: Option<&(Tensor, Tensor)>,
        mode: Mode,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (h, kvh, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let qkv = Linear::forward_each(&[&self.q_proj, &self.k_proj, &self.v_proj], x, mode)?;
        let q = split_heads(&qkv[0], b, t, h, hd)?;
        let k = split_heads(&qkv[1], b, t, kvh, hd)?;
        let v = split_heads(&qkv[2], b, t, kvh, hd)?;
        let q = apply_rotary(&q, cos, sin)?;
        let k = apply_rotary(&k, cos, sin)?;
        let (mut k, mut v) = match kv {
            Some(cache) => cache.append(&k, &v)?,
            None => (k, v),
        };
        if let Some((pk, pv)) = prefix {
            let dtype = k.dtype();
            let before = |p: &Tensor| -> Result<Tensor> {
                let (kvh, n, hd) = p.dims3()?;
                Ok(p.to_dtype(dtype)?
                    .unsqueeze(0)?
                    .broadcast_as((b, kvh, n, hd))?)
            };
            k = Tensor::cat(&[&before(pk)?, &k], 2)?;
            v = Tensor::cat(&[&before(pv)?, &v], 2)?;
        }
        let out = scaled_dot_product(&q, &k, &v, mask, self.scale())?; // (b, h, t, hd)
        self.o_proj.forward(&merge_heads(&out)?, mode)
    }

    /// The scores' scale, 1/√head_dim.
    pub fn scale(&self) -> f64 {
        1.0 / (self.head_dim as f64).sqrt()
    }
}

/// A projection's output (b, t, n·hd) or (b·t, n·hd) → (b, n, t, hd), contiguous.
pub fn split_heads(y: &Tensor, b: usize, t: usize, n: usize, hd: usize) -> Result<Tensor> {
    Ok(swap_middle_dims(&y.reshape((b, t, n, hd))?)?)
}

/// (b, n, t, hd) → (b, t, n·hd), the heads side by side again.
pub fn merge_heads(out: &Tensor) -> Result<Tensor> {
    let (b, n, t, hd) = out.dims4()?;
    Ok(swap_middle_dims(out)?.reshape((b, t, n * hd))?)
}

/// `softmax(scale · q kᵀ + mask) v` with `q` (b, heads, t, hd), `k`/`v` (b, kv_heads, T, hd)
/// and an additive `mask` (b, 1, t, T): our fused kernel for f32 on the CPU, candle's ops
/// elsewhere.
pub fn scaled_dot_product(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    if [q, k, v].into_iter().all(fused::applies_to) && mask.is_none_or(fused::applies_to) {
        return Ok(fused::attention::attention(q, k, v, mask, scale)?);
    }
    scaled_dot_product_composite(q, k, v, mask, scale)
}

/// The same from candle's differentiable ops: any dtype and device. Scores and softmax in
/// f32, as Hugging Face does, whatever the weights' dtype.
pub fn scaled_dot_product_composite(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let n_rep = q.dim(1)? / k.dim(1)?;
    // A KV cache hands out views of its buffers; candle's matmul wants them contiguous.
    let k = repeat_kv(&k.contiguous()?, n_rep)?;
    let v = repeat_kv(&v.contiguous()?, n_rep)?;
    let scores = (q
        .to_dtype(DType::F32)?
        .matmul(&k.to_dtype(DType::F32)?.t()?)?
        * scale)?;
    let scores = match mask {
        Some(m) => scores.broadcast_add(m)?,
        None => scores,
    };
    let probs = candle_nn::ops::softmax(&scores, D::Minus1)?.to_dtype(v.dtype())?;
    Ok(probs.matmul(&v)?)
}

/// (b, kv_heads, T, hd) → (b, kv_heads * n_rep, T, hd), each kv head repeated for its
/// group of query heads.
fn repeat_kv(x: &Tensor, n_rep: usize) -> Result<Tensor> {
    if n_rep == 1 {
        return Ok(x.clone());
    }
    let (b, kvh, t, hd) = x.dims4()?;
    Ok(x.unsqueeze(2)?
        .broadcast_as((b, kvh, n_rep, t, hd))?
        .reshape((b, kvh * n_rep, t, hd))?)
}
