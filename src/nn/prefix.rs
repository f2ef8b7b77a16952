//! Prefix tuning (Li & Liang 2021) as PEFT computes it for a causal LM: `n` trainable key
//! and value vectors per layer and key/value head, seen by every query as if they were `n`
//! tokens before the sequence (the model places real tokens at positions `n, n+1, …`, as
//! transformers does with a past of length `n`). The keys are used as given: no rotary
//! embedding is applied to them.
//!
//! PEFT's layout, kept here so that its files load unchanged: one flat row per virtual
//! token, `(layers · 2 · kv_heads · head_dim)`, layer `i`'s keys at block `2i` and its
//! values at block `2i + 1`. The row either is the trainable tensor itself or comes out
//! of a two-layer MLP (`prefix_projection`): `Linear(token_dim → e) → tanh →
//! Linear(e → layers · 2 · kv_dim)` over an `(n, token_dim)` embedding.

use anyhow::{bail, Result};
use candle_core::{Tensor, Var};

#[derive(Clone, Debug)]
pub enum PrefixParams {
    /// (n, layers · 2 · kv_dim): PEFT's `prompt_encoder.embedding.weight` without projection.
    Direct { embedding: Var },
    /// PEFT's `PrefixEncoder` with `prefix_projection`.
    Projected {
        /// (n, token_dim)
        embedding: Var,
        /// (e, token_dim), (e,)
        w1: Var,
        b1: Var,
        /// (layers · 2 · kv_dim, e), (layers · 2 · kv_dim,)
        w2: Var,
        b2: Var,
    },
}

#[derive(Clone, Debug)]
pub struct PrefixTuning {
    pub params: PrefixParams,
    pub num_virtual_tokens: usize,
    pub num_layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl PrefixTuning {
    /// Width of one virtual token's row: layers · 2 · kv_heads · head_dim.
    pub fn row_width(&self) -> usize {
        self.num_layers * 2 * self.kv_heads * self.head_dim
    }

    /// The virtual tokens' rows, (n, layers · 2 · kv_dim), f32: what PEFT saves as
    /// `prompt_embeddings`.
    pub fn rows(&self) -> Result<Tensor> {
        let rows = match &self.params {
            PrefixParams::Direct { embedding } => embedding.as_tensor().clone(),
            PrefixParams::Projected {
                embedding,
                w1,
                b1,
                w2,
                b2,
            } => {
                let h = embedding
                    .as_tensor()
                    .matmul(&w1.as_tensor().t()?)?
                    .broadcast_add(b1.as_tensor())?
                    .tanh()?;
                h.matmul(&w2.as_tensor().t()?)?
                    .broadcast_add(b2.as_tensor())?
            }
        };
        if rows.dims() != [self.num_virtual_tokens, self.row_width()] {
            bail!(
                "prefix rows have shape {:?}, expected [{}, {}]",
                rows.dims(),
                self.num_virtual_tokens,
                self.row_width()
            );
        }
        Ok(rows)
    }

    /// Every layer's (keys, values), each (kv_heads, n, head_dim), f32.
    pub fn key_values(&self) -> Result<Vec<(Tensor, Tensor)>> {
        let (n, kvh, hd) = (self.num_virtual_tokens, self.kv_heads, self.head_dim);
        // (n, layers·2, kvh, hd) → (layers·2, kvh, n, hd)
        let blocks = self
            .rows()?
            .reshape((n, self.num_layers * 2, kvh, hd))?
            .permute((1, 2, 0, 3))?;
        (0..self.num_layers)
            .map(|i| {
                Ok((
                    blocks.get(2 * i)?.contiguous()?,
                    blocks.get(2 * i + 1)?.contiguous()?,
                ))
            })
            .collect()
    }

    /// Trainable tensors under PEFT's training-state names (after `prompt_encoder.default.`).
    pub fn vars(&self) -> Vec<(&'static str, &Var)> {
        match &self.params {
            PrefixParams::Direct { embedding } => vec![("embedding.weight", embedding)],
            PrefixParams::Projected {
                embedding,
                w1,
                b1,
                w2,
                b2,
            } => vec![
                ("embedding.weight", embedding),
                ("transform.0.weight", w1),
                ("transform.0.bias", b1),
                ("transform.2.weight", w2),
                ("transform.2.bias", b2),
            ],
        }
    }
}
