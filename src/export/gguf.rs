//! The merged model as one GGUF file for llama.cpp, written with candle's
//! `quantized::gguf_file::write` (GGUF v2, 32-byte alignment, which llama.cpp reads).
//!
//! - Architecture `llama` when every layer has the same widths; otherwise `deci`
//!   (llama.cpp's per-layer-width LLaMA) with `deci.attention.head_count`,
//!   `.head_count_kv` and `.feed_forward_length` as one INT32 per layer, as llama.cpp's
//!   `DeciModel` converter writes them. Both use the standard tensor names (through
//!   `model::schema`) and a global head dimension (`attention.key_length`).
//! - q and k rows in llama.cpp's interleaved order ([`permute_qk`], which our loader undoes).
//! - Llama-3 RoPE scaling as the `rope_freqs.weight` divisors llama.cpp computes.
//! - Weights in f32, f16, bf16 or q8_0 (llama.cpp's block of 32 values with one f16 scale,
//!   `d = max|x|/127`, `q = round(x/d)`); norms and `rope_freqs` stay f32, and under q8_0
//!   a matrix whose rows are not a multiple of 32 falls back to f16, as llama.cpp's
//!   converter does.
//! - The tokenizer in its source's form ([`super::gguf_tokenizer`]).

use super::gguf_adapter::fresh_cpu;
use super::gguf_tokenizer::tokenizer_metadata;
use super::merged::model_tensors;
use crate::fsx;
use crate::model::gguf::{llama3_divisors, permute_qk};
use crate::model::schema::{Projection, TensorRole, GGUF_ROPE_FREQS};
use crate::model::{LayerShape, LoadedModel, ModelSource};
use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// One per-layer width of a [`LayerShape`], as the GGUF key it goes under reads it.
type LayerWidth = fn(&LayerShape) -> usize;
/// Tensors under their llama.cpp names, in file order.
type NamedTensors = Vec<(String, QTensor)>;
/// The weight type of a GGUF export (`gguf_dtype:`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum GgufDtype {
    #[serde(rename = "f32")]
    F32,
    /// llama.cpp's converter's default.
    #[default]
    #[serde(rename = "f16")]
    F16,
    #[serde(rename = "bf16")]
    Bf16,
    #[serde(rename = "q8_0")]
    Q8_0,
}

impl GgufDtype {
    pub const ALL: [GgufDtype; 4] = [Self::F32, Self::F16, Self::Bf16, Self::Q8_0];

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
            Self::Q8_0 => "q8_0",
        }
    }

    fn ggml(self) -> GgmlDType {
        match self {
            Self::F32 => GgmlDType::F32,
            Self::F16 => GgmlDType::F16,
            Self::Bf16 => GgmlDType::BF16,
            Self::Q8_0 => GgmlDType::Q8_0,
        }
    }

    /// llama.cpp's `general.file_type` (`LLAMA_FTYPE_ALL_F32`, `MOSTLY_F16`, `MOSTLY_BF16`,
    /// `MOSTLY_Q8_0`).
    fn file_type(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Bf16 => 32,
            Self::Q8_0 => 7,
        }
    }

    /// Allowed max |Δlogit| between the model and its reload from this file, relative to
    /// max(1, max |logit|). f32 is exact (the permutation moves rows, nothing is rounded),
    /// so only summation-order noise remains (measured ≤ 2e-6). The others round every
    /// weight, with an rms relative error of about 2^-11/√3 ≈ 2.8e-4 (f16), 2^-8/√3 ≈
    /// 1.1e-3 (bf16) and, for q8_0 (error uniform in ±max|block|/254), ≈ 4e-3. The tiny
    /// test models turn that into logit errors 3–8× larger (measured: f16 4.5e-4, bf16
    /// 3.9e-3, q8_0 up to 3.1e-2); the bounds are ~25× the per-weight rms error.
    pub fn tolerance(self) -> f64 {
        match self {
            Self::F32 => 1e-5,
            Self::F16 => 1e-2,
            Self::Bf16 => 5e-2,
            Self::Q8_0 => 1e-1,
        }
    }
}

impl std::str::FromStr for GgufDtype {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|d| d.name() == s)
            .ok_or_else(|| anyhow!("GGUF dtype `{s}` is not supported; use f32, f16, bf16 or q8_0"))
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct GgufExport {
    pub path: PathBuf,
    /// `llama` or `deci`.
    pub architecture: String,
    pub dtype: String,
    pub tensors: usize,
    pub bytes: u64,
    /// Matrices written as f16 under q8_0 (rows not a multiple of 32).
    pub f16_fallback: Vec<String>,
}

/// Which weights a GGUF export holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Weights {
    /// Adapters merged in: the recovered model.
    Merged,
    /// Adapters left out: the base an `adapter_gguf` file applies to (`--lora`).
    Base,
}

/// Writes the model to `path` (through a temporary file beside it).
pub fn write_gguf(
    loaded: &LoadedModel,
    path: &Path,
    dtype: GgufDtype,
    weights: Weights,
) -> Result<GgufExport> {
    let m = &loaded.model;
    let shapes = &m.layer_shapes;
    check_expressible(shapes)?;
    let uniform = shapes.windows(2).all(|w| w[0] == w[1]);
    let arch = architecture(shapes);
    let vocab_rows = m.embed_tokens.dim(0)?;

    let mut metadata = model_metadata(loaded, arch, uniform, dtype)?;
    metadata.extend(tokenizer_metadata(loaded, vocab_rows).with_context(|| {
        format!(
            "writing the tokenizer of {} into {}",
            loaded.source,
            path.display()
        )
    })?);

    let (tensors, f16_fallback) = gguf_tensors(loaded, dtype, weights)?;
    let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, q)| (n.as_str(), q)).collect();
    fsx::atomic_write_with(path, |w| {
        gguf_file::write(w, &md, &ts).map_err(|e| anyhow!("writing {}: {e}", path.display()))
    })
    .with_context(|| format!("exporting the GGUF model to {}", path.display()))?;
    Ok(GgufExport {
        path: path.to_path_buf(),
        architecture: arch.into(),
        dtype: dtype.name().into(),
        tensors: tensors.len(),
        bytes: std::fs::metadata(path)?.len(),
        f16_fallback,
    })
}

/// llama.cpp's architecture for a model with these layer widths: `llama` when they agree,
/// `deci` otherwise (an adapter GGUF must name its base model's).
pub fn architecture(shapes: &[LayerShape]) -> &'static str {
    if shapes.windows(2).all(|w| w[0] == w[1]) {
        "llama"
    } else {
        "deci"
    }
}

/// The model's name for `general.name`: the source's file or folder name, or hub repo.
pub fn model_name(source: &ModelSource) -> String {
    match source {
        ModelSource::Folder(p) | ModelSource::Gguf(p) => p
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_default(),
        ModelSource::Hub { repo, .. } => repo.clone(),
    }
}

/// A layer llama.cpp cannot run as rora does: `deci` skips a layer with MLP width 0 whole,
/// attention included, and reads attention with 0 heads as no attention.
fn check_expressible(shapes: &[LayerShape]) -> Result<()> {
    for (i, s) in shapes.iter().enumerate() {
        if s.intermediate_size == 0 {
            bail!(
                "layer {i}'s MLP was pruned to width 0: llama.cpp (`deci`) skips such a layer \
                 whole, attention included, so the GGUF would compute something else; keep at \
                 least one MLP channel per layer (prune.multiple_of keeps more)"
            );
        }
        if s.num_attention_heads == 0 || s.num_key_value_heads == 0 {
            bail!(
                "layer {i} has {} query / {} key-value heads: llama.cpp (`deci`) reads 0 heads \
                 as a layer without attention, so the GGUF cannot express it",
                s.num_attention_heads,
                s.num_key_value_heads
            );
        }
    }
    Ok(())
}

fn model_metadata(
    loaded: &LoadedModel,
    arch: &str,
    uniform: bool,
    dtype: GgufDtype,
) -> Result<Vec<(String, Value)>> {
    let m = &loaded.model;
    let cfg = &m.config;
    let head_dim = cfg.head_dim();
    let u32_of = |x: usize, what: &str| {
        u32::try_from(x).map_err(|_| anyhow!("{what} {x} does not fit llama.cpp's 32 bits"))
    };
    let name = model_name(&loaded.source);
    let mut md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        ("general.name".into(), Value::String(name)),
        ("general.file_type".into(), Value::U32(dtype.file_type())),
        ("general.quantization_version".into(), Value::U32(2)),
    ];
    let mut key = |k: &str, v: Value| md.push((format!("{arch}.{k}"), v));
    key(
        "vocab_size",
        Value::U32(u32_of(m.embed_tokens.dim(0)?, "vocab")?),
    );
    let context = cfg.max_position_embeddings.unwrap_or(2048);
    key("context_length", Value::U32(u32_of(context, "context")?));
    key(
        "embedding_length",
        Value::U32(u32_of(cfg.hidden_size, "hidden size")?),
    );
    key(
        "block_count",
        Value::U32(u32_of(m.layer_shapes.len(), "layers")?),
    );
    let widths: [(&str, LayerWidth); 3] = [
        ("feed_forward_length", |s| s.intermediate_size),
        ("attention.head_count", |s| s.num_attention_heads),
        ("attention.head_count_kv", |s| s.num_key_value_heads),
    ];
    for (k, width) in widths {
        let v = if uniform {
            Value::U32(u32_of(width(&m.layer_shapes[0]), k)?)
        } else {
            let each = m
                .layer_shapes
                .iter()
                .map(|s| {
                    i32::try_from(width(s))
                        .map(Value::I32)
                        .map_err(|_| anyhow!("{k} {} is too large", width(s)))
                })
                .collect::<Result<_>>()?;
            Value::Array(each)
        };
        key(k, v);
    }
    let hd = Value::U32(u32_of(head_dim, "head_dim")?);
    key("attention.key_length", hd.clone());
    key("attention.value_length", hd.clone());
    key("rope.dimension_count", hd);
    key("rope.freq_base", Value::F32(cfg.rope_theta as f32));
    key(
        "attention.layer_norm_rms_epsilon",
        Value::F32(cfg.rms_norm_eps as f32),
    );
    if let Some(s) = &cfg.rope_scaling {
        key(
            "rope.scaling.original_context_length",
            Value::U32(u32_of(s.original_max_position_embeddings, "context")?),
        );
    }
    Ok(md)
}

/// Every tensor under its llama.cpp name, adapters merged (in f32) or left out, q/k permuted,
/// quantized; and the names that fell back to f16.
fn gguf_tensors(
    loaded: &LoadedModel,
    dtype: GgufDtype,
    weights: Weights,
) -> Result<(NamedTensors, Vec<String>)> {
    let m = &loaded.model;
    let head_dim = m.config.head_dim();
    let mut hf = model_tensors(loaded, DType::F32, weights == Weights::Merged)?;
    let tied = m.lm_head.is_none();
    let mut out = Vec::new();
    let mut fallback = Vec::new();
    for role in TensorRole::all(m.layer_shapes.len(), tied) {
        let name = role.gguf_name();
        let t = hf
            .remove(&role.hf_name())
            .with_context(|| format!("the merged model has no {}", role.hf_name()))?;
        let t = fresh_cpu(&t)?;
        let t = match role {
            TensorRole::Projection(_, Projection::Q | Projection::K) => {
                permute_qk(&t, head_dim).with_context(|| format!("tensor {name}"))?
            }
            _ => t,
        };
        let mut ggml = if t.rank() == 1 {
            GgmlDType::F32
        } else {
            dtype.ggml()
        };
        let row = *t.dims().last().unwrap_or(&0);
        if ggml == GgmlDType::Q8_0 && !row.is_multiple_of(ggml.block_size()) {
            ggml = GgmlDType::F16;
            fallback.push(name.clone());
        }
        let q = QTensor::quantize(&t, ggml)
            .map_err(|e| anyhow!("cannot write tensor {name} as {ggml:?}: {e}"))?;
        out.push((name, q));
    }
    if let Some(s) = &m.config.rope_scaling {
        let divisors: Vec<f32> = llama3_divisors(
            head_dim,
            m.config.rope_theta,
            s.factor,
            s.low_freq_factor,
            s.high_freq_factor,
            s.original_max_position_embeddings,
        )
        .into_iter()
        .map(|d| d as f32)
        .collect();
        let t = Tensor::new(divisors.as_slice(), &Device::Cpu)?;
        out.push((
            GGUF_ROPE_FREQS.to_string(),
            QTensor::quantize(&t, GgmlDType::F32)?,
        ));
    }
    Ok((out, fallback))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_llama_cpp_would_skip_are_refused() {
        let layer = |heads, kv, mlp| LayerShape {
            num_attention_heads: heads,
            num_key_value_heads: kv,
            intermediate_size: mlp,
        };
        assert!(check_expressible(&[layer(4, 2, 16), layer(2, 1, 8)]).is_ok());
        let msg = check_expressible(&[layer(4, 2, 16), layer(4, 2, 0)])
            .unwrap_err()
            .to_string();
        assert!(msg.contains("layer 1's MLP was pruned to width 0"), "{msg}");
        assert!(msg.contains("attention included"), "{msg}");
        let msg = check_expressible(&[layer(4, 0, 16)])
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("layer 0 has 4 query / 0 key-value heads"),
            "{msg}"
        );
    }

    #[test]
    fn dtype_names_round_trip() {
        for d in GgufDtype::ALL {
            assert_eq!(d.name().parse::<GgufDtype>().unwrap(), d);
            let yaml = serde_yaml_ng::to_string(&d).unwrap();
            assert_eq!(yaml.trim(), d.name());
        }
    }
}
