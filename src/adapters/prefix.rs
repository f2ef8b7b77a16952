//! Prefix tuning in PEFT's terms: a fresh prefix initialised as PEFT's `PrefixEncoder`
//! is, and the `PREFIX_TUNING` folder PEFT saves and loads (`adapter_config.json`, and
//! `adapter_model.safetensors` with one tensor, `prompt_embeddings`, the virtual tokens'
//! rows after the MLP when there is one — PEFT loads it for inference without the MLP).

use super::AttachSpec;
use crate::model::Llama;
use crate::nn::{PrefixParams, PrefixTuning};
use anyhow::{bail, Result};
use candle_core::{Device, Tensor, Var};
use rand::Rng;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// PEFT's key for the saved prefix.
pub const PROMPT_EMBEDDINGS: &str = "prompt_embeddings";

/// Key/value heads and head width shared by every layer; prefix tuning (and PEFT's format)
/// needs one of each.
fn uniform_kv(model: &Llama) -> Result<(usize, usize)> {
    let first = model.layers.first().map_or(0, |l| l.self_attn.num_kv_heads);
    for (i, layer) in model.layers.iter().enumerate() {
        if layer.self_attn.num_kv_heads != first {
            bail!(
                "prefix tuning needs the same number of key/value heads in every layer (PEFT's \
                 format has one); layer 0 has {first}, layer {i} has {}. Use a projection adapter \
                 (lora, rora, series, parallel) on this model",
                layer.self_attn.num_kv_heads
            );
        }
    }
    Ok((first, model.config.head_dim()))
}

fn standard_normal(rng: &mut impl Rng, shape: &[usize], device: &Device) -> Result<Var> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| rng.sample::<f32, _>(rand_distr::StandardNormal))
        .collect();
    Ok(Var::from_tensor(&Tensor::from_vec(v, shape, device)?)?)
}

/// A fresh prefix: the embedding N(0, 1) (`nn.Embedding`'s init) and the MLP's layers
/// U(±1/√fan_in) (`nn.Linear`'s), as PEFT's `PrefixEncoder`. Its token width is the
/// key/value width (`kv_heads · head_dim`), as PEFT sets `token_dim` for grouped-query
/// models.
pub fn fresh_prefix(model: &Llama, spec: &AttachSpec, rng: &mut impl Rng) -> Result<PrefixTuning> {
    let (kv_heads, head_dim) = uniform_kv(model)?;
    let device = model.device().clone();
    let n = spec.num_virtual_tokens;
    let kv_dim = kv_heads * head_dim;
    let row = model.num_layers() * 2 * kv_dim;
    let params = if spec.prefix_projection {
        let e = spec.encoder_hidden_size.unwrap_or(kv_dim);
        let embedding = standard_normal(rng, &[n, kv_dim], &device)?;
        let mut linear = |shape: &[usize], fan_in: usize| {
            super::kaiming_uniform(rng, shape, fan_in, &device).and_then(super::new_var)
        };
        PrefixParams::Projected {
            embedding,
            w1: linear(&[e, kv_dim], kv_dim)?,
            b1: linear(&[e], kv_dim)?,
            w2: linear(&[row, e], e)?,
            b2: linear(&[row], e)?,
        }
    } else {
        PrefixParams::Direct {
            embedding: standard_normal(rng, &[n, row], &device)?,
        }
    };
    Ok(PrefixTuning {
        params,
        num_virtual_tokens: n,
        num_layers: model.num_layers(),
        kv_heads,
        head_dim,
    })
}

/// PEFT's `PrefixTuningConfig` as it writes it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeftPrefixConfig {
    pub peft_type: String,
    #[serde(default)]
    pub task_type: Option<String>,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    pub num_virtual_tokens: usize,
    /// Key/value width per layer (PEFT: hidden size, or kv_heads · head_dim for
    /// grouped-query models).
    pub token_dim: usize,
    #[serde(default = "one")]
    pub num_transformer_submodules: usize,
    /// Key/value heads.
    pub num_attention_heads: usize,
    pub num_layers: usize,
    #[serde(default)]
    pub encoder_hidden_size: Option<usize>,
    #[serde(default)]
    pub prefix_projection: bool,
    #[serde(default)]
    pub inference_mode: bool,
}

fn one() -> usize {
    1
}

impl PeftPrefixConfig {
    pub fn new(prefix: &PrefixTuning, spec: &AttachSpec, base_model: Option<String>) -> Self {
        let token_dim = prefix.kv_heads * prefix.head_dim;
        Self {
            peft_type: "PREFIX_TUNING".into(),
            task_type: Some("CAUSAL_LM".into()),
            base_model_name_or_path: base_model,
            num_virtual_tokens: prefix.num_virtual_tokens,
            token_dim,
            num_transformer_submodules: 1,
            num_attention_heads: prefix.kv_heads,
            num_layers: prefix.num_layers,
            encoder_hidden_size: Some(spec.encoder_hidden_size.unwrap_or(token_dim)),
            prefix_projection: spec.prefix_projection,
            inference_mode: true,
        }
    }

    /// The attach settings of this folder (the prefix loads as the rows PEFT saved,
    /// without an MLP, as PEFT loads it for inference).
    pub fn to_spec(&self) -> AttachSpec {
        AttachSpec {
            num_virtual_tokens: self.num_virtual_tokens,
            ..AttachSpec::new(super::Method::Prefix)
        }
    }
}

/// The prefix of `file` (PEFT's `prompt_embeddings`, (n, layers · 2 · token_dim)) on
/// `model`, after checking that the config fits the model.
pub fn load_prefix(
    model: &Llama,
    cfg: &PeftPrefixConfig,
    rows: Tensor,
    file: &Path,
) -> Result<PrefixTuning> {
    let (kv_heads, head_dim) = uniform_kv(model)?;
    let kv_dim = kv_heads * head_dim;
    if cfg.num_transformer_submodules != 1 {
        bail!(
            "{}: num_transformer_submodules {} (encoder-decoder prefix); a causal LM has 1",
            file.display(),
            cfg.num_transformer_submodules
        );
    }
    if cfg.num_layers != model.num_layers() || cfg.token_dim != kv_dim {
        bail!(
            "{}: the prefix is for {} layers of key/value width {} (token_dim), this model has {} \
             layers of width {kv_dim} ({kv_heads} key/value heads × {head_dim}); a config written \
             with num_attention_heads = query heads for a grouped-query model comes from a PEFT \
             without grouped-query support",
            file.display(),
            cfg.num_layers,
            cfg.token_dim,
            model.num_layers()
        );
    }
    let expected = [cfg.num_virtual_tokens, model.num_layers() * 2 * kv_dim];
    if rows.dims() != expected {
        bail!(
            "{}: tensor `{PROMPT_EMBEDDINGS}` has shape {:?}, the config implies {expected:?}",
            file.display(),
            rows.dims()
        );
    }
    Ok(PrefixTuning {
        params: PrefixParams::Direct {
            embedding: Var::from_tensor(&rows.to_dtype(candle_core::DType::F32)?)?,
        },
        num_virtual_tokens: cfg.num_virtual_tokens,
        num_layers: model.num_layers(),
        kv_heads,
        head_dim,
    })
}
