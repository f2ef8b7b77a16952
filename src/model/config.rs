//! `config.json` as Hugging Face writes it for `LlamaForCausalLM`, plus the
//! per-layer shapes that a pruned model may have.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Llama-3 style RoPE frequency scaling (`rope_scaling.rope_type == "llama3"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeScaling {
    #[serde(alias = "type")]
    pub rope_type: String,
    #[serde(default = "one")]
    pub factor: f64,
    #[serde(default = "one")]
    pub low_freq_factor: f64,
    #[serde(default = "four")]
    pub high_freq_factor: f64,
    #[serde(default = "default_original_max")]
    pub original_max_position_embeddings: usize,
}

fn one() -> f64 {
    1.0
}
fn four() -> f64 {
    4.0
}
fn default_original_max() -> usize {
    8192
}

/// One layer's widths. A dense model has the same for every layer; a pruned one
/// (LLM-Pruner, our `prune` stage) may not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerShape {
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub intermediate_size: usize,
}

/// `bos_token_id` / `eos_token_id` may be a number, a list or null.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn ids(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

/// The subset of a Hugging Face `LlamaConfig` that the forward pass needs.
/// Unknown keys are kept in `extra` so an export can write them back unchanged.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LlamaConfig {
    pub hidden_size: usize,
    #[serde(default)]
    pub intermediate_size: Option<usize>,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    pub vocab_size: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    #[serde(default)]
    pub tie_word_embeddings: Option<bool>,
    #[serde(default)]
    pub max_position_embeddings: Option<usize>,
    #[serde(default)]
    pub bos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    /// rora's extension for non-uniform (pruned) models: one entry per layer.
    /// Stock `transformers` ignores it and cannot load such a model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_shapes: Option<Vec<LayerShape>>,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10_000.0
}

impl LlamaConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read model config {}", path.display()))?;
        Self::from_json_str(&text).with_context(|| {
            format!(
                "{} is not a valid Llama config.json (it needs hidden_size, num_hidden_layers, \
                 num_attention_heads and vocab_size)",
                path.display()
            )
        })
    }

    pub fn from_json_str(text: &str) -> Result<Self> {
        let cfg: LlamaConfig = serde_json::from_str(text)?;
        if cfg.num_attention_heads == 0 || cfg.hidden_size == 0 || cfg.num_hidden_layers == 0 {
            bail!("hidden_size, num_hidden_layers and num_attention_heads must be positive");
        }
        if let Some(scaling) = &cfg.rope_scaling {
            if !matches!(scaling.rope_type.as_str(), "llama3" | "default") {
                bail!(
                    "rope_scaling type `{}` is not supported (supported: llama3, default)",
                    scaling.rope_type
                );
            }
        }
        Ok(cfg)
    }

    /// Width of one attention head; constant across layers even after pruning.
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    pub fn num_key_value_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn tie_word_embeddings(&self) -> bool {
        self.tie_word_embeddings.unwrap_or(false)
    }

    /// The shape `config.json` declares for `layer`: its per-layer entry when it has
    /// one, else the uniform values.
    pub fn declared_layer_shape(&self, layer: usize) -> Option<LayerShape> {
        if let Some(shapes) = &self.layer_shapes {
            return shapes.get(layer).copied();
        }
        Some(LayerShape {
            num_attention_heads: self.num_attention_heads,
            num_key_value_heads: self.num_key_value_heads(),
            intermediate_size: self.intermediate_size?,
        })
    }

    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_token_id
            .as_ref()
            .and_then(|t| t.ids().first().copied())
    }

    pub fn eos_token_ids(&self) -> Vec<u32> {
        self.eos_token_id
            .as_ref()
            .map(|t| t.ids())
            .unwrap_or_default()
    }
}
