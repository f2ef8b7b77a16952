//! The benchmarked model's shape: the `--shape` presets, the model arguments both
//! benchmarks share, and the seeded random model (and random token ids) they run.

use super::TrainBenchSpec;
use crate::model::random::{random_weights, RandomInit};
use crate::model::{Llama, LlamaConfig};
use anyhow::{bail, Result};
use candle_core::Device;
use clap::{Args, ValueEnum};
use rand::Rng;
use serde::Serialize;

/// The benchmarked model's shape (`--shape`). Batch, sequence and LoRA settings are the
/// same for every shape; only the model changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BenchShape {
    /// The reference shape: hidden 512, 6 layers, 8 heads (8 kv), MLP 1376, vocab 1000,
    /// untied head, RMSNorm eps 1e-6, RoPE theta 10000 (`LlamaConfig`'s defaults).
    #[default]
    Default,
    /// SmolLM2-135M's `config.json`: hidden 576, 30 layers, 9 heads (3 kv), MLP 1536,
    /// vocab 49152, head tied to the embeddings, RMSNorm eps 1e-5, RoPE theta 100000,
    /// 8192 positions.
    Smollm2,
    /// Sheared-LLaMA-1.3B's `config.json` (the reference model of the paper's recovery):
    /// hidden 2048, 24 layers, 16 heads (16 kv), MLP 5504, vocab 32000, untied head,
    /// RMSNorm eps 1e-5, RoPE theta 10000, 4096 positions.
    #[value(name = "sheared-1.3b")]
    #[serde(rename = "sheared-1.3b")]
    Sheared13b,
    /// LLaMA-2-7B's: hidden 4096, 32 layers, 32 heads (32 kv), MLP 11008, vocab 32000,
    /// untied head, RMSNorm eps 1e-5, RoPE theta 10000, 4096 positions (27 GB of f32
    /// weights: more than this 24 GB machine holds).
    #[value(name = "llama-7b")]
    #[serde(rename = "llama-7b")]
    Llama7b,
}

impl BenchShape {
    /// The `--shape` value that selects this shape.
    pub fn name(self) -> &'static str {
        match self {
            Self::Default => "default",
            Self::Smollm2 => "smollm2",
            Self::Sheared13b => "sheared-1.3b",
            Self::Llama7b => "llama-7b",
        }
    }

    /// The benchmark spec at this shape, with the default schedule (batch 8 × 128, LoRA r8).
    pub fn spec(self) -> TrainBenchSpec {
        let base = TrainBenchSpec::default();
        match self {
            Self::Default => base,
            Self::Smollm2 => TrainBenchSpec {
                shape: self,
                hidden: 576,
                layers: 30,
                heads: 9,
                kv_heads: 3,
                intermediate: 1536,
                vocab: 49152,
                tie_word_embeddings: true,
                rms_norm_eps: 1e-5,
                rope_theta: 100_000.0,
                max_position_embeddings: 8192,
                ..base
            },
            Self::Sheared13b | Self::Llama7b => {
                let (hidden, layers, heads, intermediate) = match self {
                    Self::Sheared13b => (2048, 24, 16, 5504),
                    _ => (4096, 32, 32, 11008),
                };
                TrainBenchSpec {
                    shape: self,
                    hidden,
                    layers,
                    heads,
                    kv_heads: heads,
                    intermediate,
                    vocab: 32000,
                    tie_word_embeddings: false,
                    rms_norm_eps: 1e-5,
                    rope_theta: 10_000.0,
                    max_position_embeddings: 4096,
                    ..base
                }
            }
        }
    }
}

/// The model both benchmarks build.
#[derive(Debug, Args)]
pub struct BenchModelArgs {
    /// Model shape: `default` (hidden 512, 6 layers), `smollm2` (SmolLM2-135M's),
    /// `sheared-1.3b` or `llama-7b`.
    #[arg(long, value_enum, default_value_t = BenchShape::Default)]
    pub shape: BenchShape,
    /// Vocabulary size [default: the shape's: 1000, 49152 or 32000].
    #[arg(long)]
    pub vocab: Option<usize>,
}

impl BenchModelArgs {
    /// The shape's spec, with `--vocab` over its vocabulary.
    pub fn spec(&self) -> TrainBenchSpec {
        let shape = self.shape.spec();
        TrainBenchSpec {
            vocab: self.vocab.unwrap_or(shape.vocab),
            ..shape
        }
    }
}

impl TrainBenchSpec {
    /// The model's shape in words, for the reports: `smollm2 (hidden 576, ...)`.
    pub fn describe_shape(&self) -> String {
        format!(
            "{} (hidden {}, {} layers, {} heads ({} kv), MLP {}, vocab {}, {} head, \
             RMSNorm eps {:e}, RoPE theta {})",
            self.shape.name(),
            self.hidden,
            self.layers,
            self.heads,
            self.kv_heads,
            self.intermediate,
            self.vocab,
            if self.tie_word_embeddings {
                "tied"
            } else {
                "untied"
            },
            self.rms_norm_eps,
            self.rope_theta,
        )
    }
}

/// The benchmark's model: a Hugging Face `LlamaForCausalLM` of the spec's shape (head tied
/// or not, RMSNorm eps, RoPE theta as the spec says), weights ~ N(0, 0.02²) from a seeded
/// ChaCha stream, norms 1. A tied head is the embedding matrix itself (no `lm_head.weight`).
pub(super) fn random_model(spec: &TrainBenchSpec, device: &Device) -> Result<Llama> {
    if spec.heads == 0 || spec.kv_heads == 0 || !spec.hidden.is_multiple_of(spec.heads) {
        bail!("bench train: hidden must be a multiple of the head count");
    }
    let config = LlamaConfig::from_json_str(
        &serde_json::json!({
            "hidden_size": spec.hidden,
            "intermediate_size": spec.intermediate,
            "num_hidden_layers": spec.layers,
            "num_attention_heads": spec.heads,
            "num_key_value_heads": spec.kv_heads,
            "vocab_size": spec.vocab,
            "max_position_embeddings": spec.seq_len.max(spec.max_position_embeddings),
            "rms_norm_eps": spec.rms_norm_eps,
            "rope_theta": spec.rope_theta,
            "tie_word_embeddings": spec.tie_word_embeddings,
        })
        .to_string(),
    )?;
    let weights = random_weights(&config, &RandomInit::hugging_face(), spec.seed, device)?;
    Llama::from_weights(config, &weights)
}

/// Packs `model`'s frozen weights for `spec.matmul_precision`; an error where bf16
/// cannot run (a benchmark that silently measured f32 would mislabel its numbers).
pub(super) fn set_matmul_precision(
    model: &mut Llama,
    spec: &TrainBenchSpec,
    bench: &str,
) -> Result<()> {
    if !model.set_matmul_precision(spec.matmul_precision)? {
        bail!(
            "bench {bench}: --matmul-precision {} needs a CPU with AMX or AVX512-BF16 \
             (Intel Sapphire Rapids, AMD Zen 4 or later); use f32 here",
            spec.matmul_precision
        );
    }
    Ok(())
}

/// `len` token ids drawn uniformly from `0..vocab`, in order from `rng`.
pub(super) fn random_ids(rng: &mut impl Rng, len: usize, vocab: u32) -> Vec<u32> {
    (0..len).map(|_| rng.random_range(0..vocab)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::schema::{layer_params, outer_params};
    use crate::model::LayerShape;

    /// The presets' parameter counts (from the tensor schema, without building the
    /// weights) are the published models': Sheared-LLaMA-1.3B 1,345,423,360 and
    /// LLaMA-2-7B 6,738,415,616 (`sum(p.numel())` of the Hugging Face checkpoints),
    /// SmolLM2-135M 134,515,008.
    #[test]
    fn presets_have_the_published_models_parameter_counts() {
        let count = |shape: BenchShape| {
            let s = shape.spec();
            let layer = LayerShape {
                num_attention_heads: s.heads,
                num_key_value_heads: s.kv_heads,
                intermediate_size: s.intermediate,
            };
            s.layers as u64 * layer_params(s.hidden, s.hidden / s.heads, &layer)
                + outer_params(s.hidden, s.vocab, s.tie_word_embeddings)
        };
        assert_eq!(count(BenchShape::Sheared13b), 1_345_423_360);
        assert_eq!(count(BenchShape::Llama7b), 6_738_415_616);
        assert_eq!(count(BenchShape::Smollm2), 134_515_008);
        assert_eq!(BenchShape::Sheared13b.name(), "sheared-1.3b");
        assert_eq!(
            BenchShape::from_str("llama-7b", false).ok(),
            Some(BenchShape::Llama7b)
        );
    }
}
