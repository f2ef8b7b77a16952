//! The LLaMA decoder: embeddings → layers → final norm → output head, with logits for
//! every position. Each layer reads its own widths from its tensors (see `shapes`).

use super::attention::Attention;
use super::config::{LayerShape, LlamaConfig};
use super::kv_cache::{KvCache, LayerKv};
use super::mlp::Mlp;
use super::norm::RmsNorm;
use super::rope::RotaryEmbedding;
use super::schema::{LayerNorm, Projection, EMBED_TOKENS, FINAL_NORM, LM_HEAD};
use super::shapes::read_layer_shapes;
use super::weights::Weights;
use crate::nn::frozen::{frozen_matmul_t, FrozenWeight, MatmulPrecision};
use crate::nn::{Linear, Mode, PrefixTuning};
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};

/// A large negative instead of -inf, so that a fully masked row (a left-padding query)
/// gives a uniform softmax rather than NaN.
const MASKED: f32 = -1e30;

#[derive(Clone, Debug)]
pub struct DecoderLayer {
    pub input_layernorm: RmsNorm,
    pub self_attn: Attention,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: Mlp,
}

impl DecoderLayer {
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        kv: Option<&mut LayerKv>,
        prefix: Option<&(Tensor, Tensor)>,
        mode: Mode,
    ) -> Result<Tensor> {
        let h = self.input_layernorm.forward(x)?;
        let x = (x + self
            .self_attn
            .forward(&h, cos, sin, mask, kv, prefix, mode)?)?;
        let h = self.post_attention_layernorm.forward(&x)?;
        Ok((&x + self.mlp.forward(&h, mode)?)?)
    }
}

#[derive(Clone, Debug)]
pub struct Llama {
    pub config: LlamaConfig,
    pub layer_shapes: Vec<LayerShape>,
    pub embed_tokens: Tensor,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    /// `None` when the output head is tied to the embeddings.
    pub lm_head: Option<Tensor>,
    /// Prefix-tuning vectors, when attached: every layer's attention sees them first.
    pub prefix: Option<PrefixTuning>,
    rope: RotaryEmbedding,
    /// The output head packed for bf16 products (see [`Llama::set_matmul_precision`]).
    head_bf16: Option<FrozenWeight>,
}

impl Llama {
    /// Builds the model from Hugging Face–named tensors, reading and checking every
    /// layer's shape first.
    pub fn from_weights(config: LlamaConfig, weights: &Weights) -> Result<Self> {
        let layer_shapes = read_layer_shapes(&config, weights)?;
        let hidden = config.hidden_size;
        let eps = config.rms_norm_eps;
        let head_dim = config.head_dim();
        let embed_tokens = weights.get(EMBED_TOKENS)?.clone();
        let device = embed_tokens.device().clone();
        let norm = |name: &str| -> Result<RmsNorm> {
            Ok(RmsNorm::new(weights.vector(name, hidden)?.clone(), eps))
        };
        let mut layers = Vec::with_capacity(layer_shapes.len());
        for (i, shape) in layer_shapes.iter().enumerate() {
            let linear = |p: Projection| -> Result<Linear> {
                Ok(Linear::new(weights.get(&p.hf_name(i))?.clone()))
            };
            layers.push(DecoderLayer {
                input_layernorm: norm(&LayerNorm::Input.hf_name(i))?,
                self_attn: Attention {
                    q_proj: linear(Projection::Q)?,
                    k_proj: linear(Projection::K)?,
                    v_proj: linear(Projection::V)?,
                    o_proj: linear(Projection::O)?,
                    num_heads: shape.num_attention_heads,
                    num_kv_heads: shape.num_key_value_heads,
                    head_dim,
                },
                post_attention_layernorm: norm(&LayerNorm::PostAttention.hf_name(i))?,
                mlp: Mlp {
                    gate_proj: linear(Projection::Gate)?,
                    up_proj: linear(Projection::Up)?,
                    down_proj: linear(Projection::Down)?,
                },
            });
        }
        let lm_head = if weights.contains(LM_HEAD) {
            let (t, rows, cols) = weights.matrix(LM_HEAD)?;
            if (rows, cols) != (config.vocab_size, hidden) {
                bail!(
                    "tensor `lm_head.weight` has shape [{rows}, {cols}], expected [{}, {hidden}]",
                    config.vocab_size
                );
            }
            Some(t.clone())
        } else {
            // Tied (or an exporter dropped the head of a tied model): reuse the embeddings.
            None
        };
        Ok(Self {
            rope: RotaryEmbedding::new(&config, &device)?,
            norm: norm(FINAL_NORM)?,
            config,
            layer_shapes,
            embed_tokens,
            layers,
            lm_head,
            prefix: None,
            head_bf16: None,
        })
    }

    pub fn device(&self) -> &Device {
        self.embed_tokens.device()
    }

    pub fn dtype(&self) -> DType {
        self.embed_tokens.dtype()
    }

    /// `ids`: (b, t) u32 → embeddings (b, t, hidden).
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let flat = self.embed_tokens.index_select(&ids.flatten_all()?, 0)?;
        Ok(flat.reshape((b, t, self.config.hidden_size))?)
    }

    /// Logits for every position, (b, t, vocab), in the model's dtype, in evaluation mode
    /// (inference; training goes through [`Llama::forward_hidden`] with its mode).
    ///
    /// `attention_mask` is (b, T) with 1 for real tokens and 0 for padding, where T covers
    /// the cached positions and the new ones; `None` means no padding.
    pub fn forward(
        &self,
        ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        self.lm_head(&self.forward_hidden(ids, attention_mask, cache, Mode::Eval)?)
    }

    /// Final hidden states (after the last norm), (b, t, hidden): `forward` without the
    /// output head, for callers that need logits at a few positions only.
    pub fn forward_hidden(
        &self,
        ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
        mode: Mode,
    ) -> Result<Tensor> {
        self.forward_embeds(&self.embed(ids)?, attention_mask, cache, mode)
    }

    /// Final hidden states (after the last norm), (b, t, hidden), for input embeddings
    /// (b, t, hidden).
    pub fn forward_embeds(
        &self,
        embeds: &Tensor,
        attention_mask: Option<&Tensor>,
        mut cache: Option<&mut KvCache>,
        mode: Mode,
    ) -> Result<Tensor> {
        let (b, t, _) = embeds.dims3()?;
        let past = cache.as_ref().map_or(0, |c| c.seq_len());
        // A prefix counts as `n` real tokens before the cached ones.
        let n = self.prefix_len();
        let prefix_kv = self.prefix.as_ref().map(|p| p.key_values()).transpose()?;
        let with_prefix = match (attention_mask, n) {
            (Some(m), n) if n > 0 => Some(Tensor::cat(
                &[&Tensor::ones((b, n), m.dtype(), m.device())?, m],
                1,
            )?),
            (m, _) => m.cloned(),
        };
        let (cos, sin, mask) =
            self.rotary_and_mask(b, t, n + past, with_prefix.as_ref(), embeds.dtype())?;
        let mut x = embeds.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            let kv = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            let prefix = prefix_kv.as_ref().map(|p| &p[i]);
            x = layer.forward(&x, &cos, &sin, mask.as_ref(), kv, prefix, mode)?;
        }
        self.norm.forward(&x)
    }

    /// The rotary tables `cos`, `sin` (b, 1, t, head_dim) in `dtype` and the additive mask
    /// (b, 1, t, past + t) of `t` new positions after `past` earlier ones; `attention_mask`
    /// (b, past + t) as [`Llama::forward`] takes it.
    pub(crate) fn rotary_and_mask(
        &self,
        b: usize,
        t: usize,
        past: usize,
        attention_mask: Option<&Tensor>,
        dtype: DType,
    ) -> Result<(Tensor, Tensor, Option<Tensor>)> {
        let (positions, mask) = positions_and_mask(b, t, past, attention_mask, self.device())?;
        let (cos, sin) = self.rope.cos_sin(&positions, dtype)?;
        Ok((cos, sin, mask))
    }

    /// (..., hidden) → (..., vocab).
    pub fn lm_head(&self, hidden: &Tensor) -> Result<Tensor> {
        frozen_matmul_t(hidden, &self.head())
    }

    /// The output head as a frozen weight: packed for bf16 products when
    /// [`Llama::set_matmul_precision`] packed this very tensor.
    pub fn head(&self) -> FrozenWeight {
        let weight = self.head_weight();
        match &self.head_bf16 {
            Some(packed) if packed.tensor().id() == weight.id() => packed.clone(),
            _ => FrozenWeight::new(weight.clone()),
        }
    }

    /// The output head's weight (vocab, hidden): its own, or the embeddings when tied.
    pub fn head_weight(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }

    /// Number of prefix-tuning virtual tokens (0 without a prefix).
    pub fn prefix_len(&self) -> usize {
        self.prefix.as_ref().map_or(0, |p| p.num_virtual_tokens)
    }

    /// Whether any adapter (projection adapter or prefix) is attached.
    pub fn has_adapters(&self) -> bool {
        self.prefix.is_some() || self.projections().any(|(_, _, l)| l.adapter().is_some())
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Parameters of the base model (adapters excluded).
    pub fn num_params(&self) -> usize {
        let mut n = self.embed_tokens.elem_count() + self.norm.weight().elem_count();
        n += self.lm_head.as_ref().map_or(0, Tensor::elem_count);
        for layer in &self.layers {
            n += layer.input_layernorm.weight().elem_count()
                + layer.post_attention_layernorm.weight().elem_count();
        }
        n + self
            .projections()
            .map(|(_, _, l)| l.weight().elem_count())
            .sum::<usize>()
    }

    /// Every projection as (layer, path such as `self_attn.q_proj`, linear), in layer order
    /// (each layer's in [`Projection::ALL`] order).
    pub fn projections(&self) -> impl Iterator<Item = (usize, &'static str, &Linear)> {
        self.layers.iter().enumerate().flat_map(|(i, l)| {
            let a = &l.self_attn;
            let m = &l.mlp;
            [
                (Projection::Q, &a.q_proj),
                (Projection::K, &a.k_proj),
                (Projection::V, &a.v_proj),
                (Projection::O, &a.o_proj),
                (Projection::Gate, &m.gate_proj),
                (Projection::Up, &m.up_proj),
                (Projection::Down, &m.down_proj),
            ]
            .map(|(p, lin)| (i, p.path(), lin))
        })
    }

    /// Sets how the projections' and the output head's frozen weights multiply (see
    /// [`MatmulPrecision`]); packing bf16 copies takes as much memory as the f32 weights.
    /// Returns whether every product runs at `precision` (bf16 falls back to f32 without
    /// AMX or AVX512-BF16). Weights replaced afterwards multiply in f32 until this is called again.
    pub fn set_matmul_precision(&mut self, precision: MatmulPrecision) -> Result<bool> {
        let mut all = true;
        for (_, _, linear) in self.projections_mut() {
            all &= linear.set_matmul_precision(precision)?;
        }
        let mut head = FrozenWeight::new(self.head_weight().clone());
        all &= head.set_precision(precision)?;
        self.head_bf16 = head.packed().is_some().then_some(head);
        Ok(all)
    }

    /// [`Llama::set_matmul_precision`], or f32 for every product where `precision` cannot
    /// run on this CPU (never a mix): returns the precision the products now run at.
    pub fn set_matmul_precision_or_f32(
        &mut self,
        precision: MatmulPrecision,
    ) -> Result<MatmulPrecision> {
        if self.set_matmul_precision(precision)? {
            return Ok(precision);
        }
        self.set_matmul_precision(MatmulPrecision::F32)?;
        Ok(MatmulPrecision::F32)
    }

    /// The precision the projections' products run at: bf16 when every one is packed.
    pub fn matmul_precision(&self) -> MatmulPrecision {
        let mut projections = self.projections().peekable();
        if projections.peek().is_some() && projections.all(|(_, _, l)| l.is_packed()) {
            MatmulPrecision::Bf16
        } else {
            MatmulPrecision::F32
        }
    }

    /// Like [`Llama::projections`], mutable (for attaching and merging adapters).
    pub fn projections_mut(&mut self) -> impl Iterator<Item = (usize, &'static str, &mut Linear)> {
        self.layers.iter_mut().enumerate().flat_map(|(i, l)| {
            let a = &mut l.self_attn;
            let m = &mut l.mlp;
            [
                (Projection::Q, &mut a.q_proj),
                (Projection::K, &mut a.k_proj),
                (Projection::V, &mut a.v_proj),
                (Projection::O, &mut a.o_proj),
                (Projection::Gate, &mut m.gate_proj),
                (Projection::Up, &mut m.up_proj),
                (Projection::Down, &mut m.down_proj),
            ]
            .map(|(p, lin)| (i, p.path(), lin))
        })
    }
}

/// Position ids (b, t) and the additive attention mask (b, 1, t, past + t).
///
/// Positions count real tokens only (Hugging Face's `cumsum(mask) - 1`), so a left-padded
/// row sees the same positions as the unpadded sequence would.
fn positions_and_mask(
    b: usize,
    t: usize,
    past: usize,
    attention_mask: Option<&Tensor>,
    device: &Device,
) -> Result<(Tensor, Option<Tensor>)> {
    let total = past + t;
    let valid: Option<Vec<Vec<f32>>> = match attention_mask {
        Some(m) => {
            let rows = m.to_dtype(DType::F32)?.to_vec2::<f32>()?;
            if rows.len() != b || rows.iter().any(|r| r.len() != total) {
                bail!(
                    "attention mask has shape {:?}, expected [{b}, {total}] (prefix + cached + new positions)",
                    m.dims()
                );
            }
            Some(rows)
        }
        None => None,
    };
    let mut positions = Vec::with_capacity(b * t);
    for r in 0..b {
        let mut seen = 0u32;
        for j in 0..total {
            let is_real = valid.as_ref().is_none_or(|v| v[r][j] > 0.5);
            if j >= past {
                // Padding gets the next real position; it is masked out anyway.
                positions.push(seen);
            }
            if is_real {
                seen += 1;
            }
        }
    }
    let positions = Tensor::from_vec(positions, (b, t), device)?;
    let needs_mask = t > 1 || valid.is_some();
    let mask = if needs_mask {
        let mut m = vec![0f32; b * t * total];
        for r in 0..b {
            for i in 0..t {
                for j in 0..total {
                    let causal = j <= past + i;
                    let real = valid.as_ref().is_none_or(|v| v[r][j] > 0.5);
                    if !(causal && real) {
                        m[(r * t + i) * total + j] = MASKED;
                    }
                }
            }
        }
        Some(Tensor::from_vec(m, (b, 1, t, total), device)?)
    } else {
        None
    };
    Ok((positions, mask))
}
