//! `LlamaConfig` from a GGUF file's metadata, plus what llama.cpp keeps only in the
//! header (per-layer widths of pruned models: the q/k/gate rows) and in the tiny
//! `rope_freqs.weight` tensor (Llama-3 RoPE scaling). The tensors' full shapes are checked
//! by `model::shapes` when the model is built.

use super::{as_usize, read_tensor, Meta};
use crate::model::config::{LayerShape, LlamaConfig, RopeScaling, TokenIds};
use crate::model::schema::{Projection, TensorRole, GGUF_ROPE_FREQS};
use anyhow::{anyhow, bail, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use serde_json::{json, Map};
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

/// The `general.architecture` values rora loads: LLaMA, and `deci` (llama.cpp's LLaMA whose
/// layers each have their own head counts and MLP width, the form rora exports a pruned
/// model in). Both use the same tensor names and q/k permutation.
pub const ARCHITECTURES: [&str; 2] = ["llama", "deci"];

/// The config of the GGUF file at `path` (header `content`, data through `reader`).
pub(super) fn read(
    path: &Path,
    content: &Content,
    reader: &mut BufReader<File>,
) -> Result<LlamaConfig> {
    let meta = Meta {
        md: &content.metadata,
        path,
    };
    let arch = meta.str("general.architecture")?;
    if !ARCHITECTURES.contains(&arch) {
        bail!(
            "GGUF file {} holds a `{arch}` model (general.architecture); rora loads only \
             LLaMA-architecture models (`llama`, or `deci`: llama.cpp's LLaMA with per-layer \
             widths)",
            path.display()
        );
    }
    // Every hyperparameter key is prefixed with the architecture's name.
    let key = |k: &str| format!("{arch}.{k}");
    let hidden = meta.usize(&key("embedding_length"))?;
    let layers = meta.usize(&key("block_count"))?;
    if hidden == 0 || layers == 0 {
        bail!(
            "GGUF file {} says embedding_length {hidden}, block_count {layers}; both must be \
             positive",
            path.display()
        );
    }
    let heads = per_layer(&meta, &key("attention.head_count"), layers)?;
    let kv_heads = match meta.opt(&key("attention.head_count_kv")) {
        Some(_) => per_layer(&meta, &key("attention.head_count_kv"), layers)?,
        None => heads.clone(),
    };
    let ffn = per_layer(&meta, &key("feed_forward_length"), layers)?;
    let context = meta.usize(&key("context_length"))?;
    let theta = meta.opt_f64(&key("rope.freq_base"))?.unwrap_or(10_000.0);
    let eps = meta
        .opt_f64(&key("attention.layer_norm_rms_epsilon"))?
        .ok_or_else(|| {
            anyhow!(
                "GGUF file {} has no metadata key `{}`",
                path.display(),
                key("attention.layer_norm_rms_epsilon")
            )
        })?;
    // f32 metadata: 1e-5 arrives as 9.999999747378752e-06; round to 7 significant digits.
    let eps = round_sig(eps, 7);
    let theta = round_sig(theta, 7);

    let heads_max = heads.max();
    if heads_max == 0 {
        bail!(
            "GGUF metadata `llama.attention.head_count` in {} is zero",
            path.display()
        );
    }
    let default_head_dim = hidden / heads_max;
    let head_dim = match meta.opt_usize(&key("attention.key_length"))? {
        Some(k) => k,
        None => match (&heads, meta.opt_usize(&key("rope.dimension_count"))?) {
            (PerLayer::Each(_), Some(r)) => r,
            _ => default_head_dim,
        },
    };
    if head_dim == 0 || !head_dim.is_multiple_of(2) {
        bail!(
            "GGUF file {} gives head_dim {head_dim}; it must be a positive even number",
            path.display()
        );
    }

    let declared = Declared {
        arch,
        heads: &heads,
        kv_heads: &kv_heads,
        ffn: &ffn,
    };
    let shapes = layer_shapes(path, content, layers, head_dim, &declared)?;
    let uniform = shapes.iter().all(|s| *s == shapes[0]);

    let vocab = rows(path, content, &TensorRole::Embeddings.gguf_name())?;
    if let Some(n) = meta.opt("tokenizer.ggml.tokens").and_then(|v| match v {
        Value::Array(a) => Some(a.len()),
        _ => None,
    }) {
        if n > vocab {
            bail!(
                "GGUF file {} has {n} tokens in `tokenizer.ggml.tokens` but only {vocab} \
                 embedding rows",
                path.display()
            );
        }
    }
    let tied = !content
        .tensor_infos
        .contains_key(&TensorRole::Head.gguf_name());

    let rope_scaling = rope_scaling(path, content, reader, &meta, arch, head_dim, theta)?;
    let (bos_token_id, eos_token_id) = special_tokens(&meta)?;

    // Keys rora does not read but an exported config.json should carry.
    let mut extra = Map::new();
    extra.insert("architectures".into(), json!(["LlamaForCausalLM"]));
    extra.insert("model_type".into(), json!("llama"));
    extra.insert("hidden_act".into(), json!("silu"));
    extra.insert("attention_bias".into(), json!(false));
    extra.insert("mlp_bias".into(), json!(false));
    Ok(LlamaConfig {
        hidden_size: hidden,
        intermediate_size: Some(ffn.max()),
        num_hidden_layers: layers,
        num_attention_heads: heads_max,
        num_key_value_heads: Some(kv_heads.max()),
        head_dim: (head_dim != default_head_dim).then_some(head_dim),
        vocab_size: vocab,
        rms_norm_eps: eps,
        rope_theta: theta,
        rope_scaling,
        tie_word_embeddings: Some(tied),
        max_position_embeddings: Some(context),
        bos_token_id,
        eos_token_id,
        layer_shapes: (!uniform).then_some(shapes),
        extra,
    })
}

/// The rows of the header's matrix `name` (no data read).
fn rows(path: &Path, content: &Content, name: &str) -> Result<usize> {
    let info = content.tensor_infos.get(name).ok_or_else(|| {
        anyhow!(
            "tensor `{name}` is missing from GGUF file {}",
            path.display()
        )
    })?;
    match info.shape.dims() {
        [r, _] => Ok(*r),
        d => bail!(
            "tensor `{name}` in GGUF file {} has shape {d:?}, expected a matrix",
            path.display()
        ),
    }
}

/// The per-layer widths the metadata declares.
struct Declared<'a> {
    arch: &'a str,
    heads: &'a PerLayer,
    kv_heads: &'a PerLayer,
    ffn: &'a PerLayer,
}

/// Every layer's widths from the rows of its q, k and gate projections (a pruned model's
/// metadata may give only the dense widths), checked against the metadata.
fn layer_shapes(
    path: &Path,
    content: &Content,
    layers: usize,
    head_dim: usize,
    declared: &Declared,
) -> Result<Vec<LayerShape>> {
    let mut shapes = Vec::with_capacity(layers);
    for i in 0..layers {
        let q = rows(path, content, &Projection::Q.gguf_name(i))?;
        let k = rows(path, content, &Projection::K.gguf_name(i))?;
        let f = rows(path, content, &Projection::Gate.gguf_name(i))?;
        for (proj, r) in [(Projection::Q, q), (Projection::K, k)] {
            if r == 0 || !r.is_multiple_of(head_dim) {
                bail!(
                    "tensor `{}` in GGUF file {} has {r} rows, not a positive multiple of \
                     head_dim {head_dim}",
                    proj.gguf_name(i),
                    path.display()
                );
            }
        }
        let found = LayerShape {
            num_attention_heads: q / head_dim,
            num_key_value_heads: k / head_dim,
            intermediate_size: f,
        };
        let checks = [
            (
                format!("{}.attention.head_count", declared.arch),
                declared.heads,
                found.num_attention_heads,
                Projection::Q,
            ),
            (
                format!("{}.attention.head_count_kv", declared.arch),
                declared.kv_heads,
                found.num_key_value_heads,
                Projection::K,
            ),
            (
                format!("{}.feed_forward_length", declared.arch),
                declared.ffn,
                found.intermediate_size,
                Projection::Gate,
            ),
        ];
        for (key, declared, got, proj) in checks {
            // One number for all layers is the dense width (a pruned layer may be
            // narrower); a per-layer list must match exactly.
            let bad = match declared {
                PerLayer::One(x) => got > *x,
                PerLayer::Each(v) => got != v[i],
            };
            if bad {
                bail!(
                    "tensor `{}` in GGUF file {} gives layer {i} {got} (head_dim {head_dim}), \
                     but metadata `{key}` says {}",
                    proj.gguf_name(i),
                    path.display(),
                    declared.get(i)
                );
            }
        }
        shapes.push(found);
    }
    Ok(shapes)
}

/// `bos_token_id` and `eos_token_id` (llama.cpp's eos, eot and eom ids, deduplicated).
fn special_tokens(meta: &Meta) -> Result<(Option<TokenIds>, Option<TokenIds>)> {
    let token_id = |key: &str| -> Result<Option<u32>> {
        meta.opt_usize(key)?
            .map(|id| {
                u32::try_from(id).map_err(|_| {
                    anyhow!(
                        "GGUF metadata `{key}` in {} is {id}, not a token id",
                        meta.path.display()
                    )
                })
            })
            .transpose()
    };
    let bos = token_id("tokenizer.ggml.bos_token_id")?;
    let mut eos: Vec<u32> = Vec::new();
    for key in [
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.eot_token_id",
        "tokenizer.ggml.eom_token_id",
    ] {
        if let Some(id) = token_id(key)? {
            if !eos.contains(&id) {
                eos.push(id);
            }
        }
    }
    let eos = match eos.as_slice() {
        [] => None,
        [one] => Some(TokenIds::One(*one)),
        _ => Some(TokenIds::Many(eos)),
    };
    Ok((bos.map(TokenIds::One), eos))
}

/// A metadata value that is one number for all layers or one per layer.
#[derive(Debug, Clone)]
enum PerLayer {
    One(usize),
    Each(Vec<usize>),
}

impl PerLayer {
    fn get(&self, layer: usize) -> usize {
        match self {
            PerLayer::One(x) => *x,
            PerLayer::Each(v) => v[layer],
        }
    }
    fn max(&self) -> usize {
        match self {
            PerLayer::One(x) => *x,
            PerLayer::Each(v) => v.iter().copied().max().unwrap_or(0),
        }
    }
}

/// `key` as one value for all layers or one per layer.
fn per_layer(meta: &Meta, key: &str, layers: usize) -> Result<PerLayer> {
    let v = meta.req(key)?;
    if let Value::Array(a) = v {
        if a.len() != layers {
            bail!(
                "GGUF metadata `{key}` in {} has {} entries, expected one per layer ({layers})",
                meta.path.display(),
                a.len()
            );
        }
        let each = a
            .iter()
            .map(|x| as_usize(x).ok_or_else(|| meta.bad(key, "integers", x)))
            .collect::<Result<Vec<_>>>()?;
        return Ok(PerLayer::Each(each));
    }
    as_usize(v)
        .map(PerLayer::One)
        .ok_or_else(|| meta.bad(key, "an integer or one integer per layer", v))
}

fn round_sig(x: f64, digits: i32) -> f64 {
    if x == 0.0 || !x.is_finite() {
        return x;
    }
    let mag = x.abs().log10().floor() as i32;
    let scale = 10f64.powi(digits - 1 - mag);
    (x * scale).round() / scale
}

/// Llama-3 RoPE scaling from `rope_freqs.weight` (llama.cpp stores only the per-frequency
/// divisors), or from `llama.rope.scaling.*` metadata for the types rora supports.
fn rope_scaling(
    path: &Path,
    content: &Content,
    reader: &mut BufReader<File>,
    meta: &Meta,
    arch: &str,
    head_dim: usize,
    theta: f64,
) -> Result<Option<RopeScaling>> {
    let key = |k: &str| format!("{arch}.{k}");
    if let Some(kind) = meta.opt_str(&key("rope.scaling.type"))? {
        let factor = meta.opt_f64(&key("rope.scaling.factor"))?.unwrap_or(1.0);
        if !matches!(kind, "none" | "") && factor != 1.0 {
            bail!(
                "GGUF file {} uses RoPE scaling `{kind}` (factor {factor}); rora supports only \
                 Llama-3 scaling (rope_freqs.weight)",
                path.display()
            );
        }
    }
    if !content.tensor_infos.contains_key(GGUF_ROPE_FREQS) {
        return Ok(None);
    }
    let t = read_tensor(path, content, reader, GGUF_ROPE_FREQS)?;
    let found: Vec<f32> = t.flatten_all()?.to_vec1()?;
    if found.len() != head_dim / 2 {
        bail!(
            "tensor `rope_freqs.weight` in GGUF file {} has {} entries, expected head_dim/2 = {}",
            path.display(),
            found.len(),
            head_dim / 2
        );
    }
    if found.iter().all(|f| (f - 1.0).abs() < 1e-6) {
        return Ok(None);
    }
    let factor = found.iter().copied().fold(f32::MIN, f32::max) as f64;
    let mut contexts = vec![8192usize, 4096, 2048, 16384, 32768, 65536, 131072];
    if let Some(c) = meta.opt_usize(&key("rope.scaling.original_context_length"))? {
        contexts.insert(0, c);
    }
    for &orig in &contexts {
        for low in [1.0f64, 0.5, 2.0, 4.0] {
            for high in [4.0f64, 2.0, 8.0, 16.0, 32.0] {
                if high <= low {
                    continue;
                }
                let want = llama3_divisors(head_dim, theta, factor, low, high, orig);
                let ok = want
                    .iter()
                    .zip(&found)
                    .all(|(w, f)| ((*f as f64) - w).abs() <= 1e-3 * w.abs().max(1.0));
                if ok {
                    return Ok(Some(RopeScaling {
                        rope_type: "llama3".into(),
                        factor,
                        low_freq_factor: low,
                        high_freq_factor: high,
                        original_max_position_embeddings: orig,
                    }));
                }
            }
        }
    }
    bail!(
        "tensor `rope_freqs.weight` in GGUF file {} holds RoPE frequency factors that match no \
         Llama-3 scaling rora knows (factor {factor}); this RoPE scaling is not supported",
        path.display()
    )
}

/// The divisors llama.cpp writes to `rope_freqs.weight` for Llama-3 scaling (the GGUF
/// export writes them too).
pub fn llama3_divisors(
    head_dim: usize,
    theta: f64,
    factor: f64,
    low: f64,
    high: f64,
    orig: usize,
) -> Vec<f64> {
    let orig = orig as f64;
    let low_wavelen = orig / low;
    let high_wavelen = orig / high;
    (0..head_dim)
        .step_by(2)
        .map(|i| {
            let freq = 1.0 / theta.powf(i as f64 / head_dim as f64);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor
            } else {
                let smooth = (orig / wavelen - low) / (high - low);
                1.0 / ((1.0 - smooth) / factor + smooth)
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_divisors_are_recognised() {
        let d = llama3_divisors(64, 500_000.0, 8.0, 1.0, 4.0, 8192);
        assert_eq!(d[0], 1.0);
        assert_eq!(*d.last().unwrap(), 8.0);
    }

    #[test]
    fn sig_rounding() {
        assert_eq!(round_sig(9.999999747378752e-06, 7), 1e-5);
        assert_eq!(round_sig(100000.0, 7), 100000.0);
    }
}
