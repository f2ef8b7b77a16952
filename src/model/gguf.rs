//! llama.cpp GGUF files: config from the metadata, weights dequantized and renamed to
//! Hugging Face names, q/k rows put back in rotate-half order, and the tokenizer rebuilt
//! from the metadata as a Hugging Face `tokenizers::Tokenizer`.
//!
//! Notes on the format, as candle reads it:
//! - candle's reader reverses GGUF's dimension order (ggml lists the fastest axis first),
//!   so a tensor's shape is already row-major `(out, in)` like Hugging Face's.
//! - llama.cpp's `convert_hf_to_gguf.py` permutes the rows of `q_proj` and `k_proj` so
//!   that ggml's interleaved RoPE works: `w.reshape(n_head, 2, rows/n_head/2, cols)
//!   .swapaxes(1, 2)`. We invert that (see [`unpermute_qk`]); the head count of each layer
//!   comes from the tensor's rows and `head_dim`.
//! - Llama 3.1-style RoPE scaling is stored by llama.cpp only as a `rope_freqs.weight`
//!   tensor of per-frequency divisors. We recognise it by recomputing the divisors of the
//!   usual Llama-3 parameter sets and record the match as `rope_scaling` (type
//!   `llama3`) in the config; a table that matches none is an error, a table of ones is
//!   ignored. That tiny tensor is the only data `read_config` reads.

use super::config::{LayerShape, LlamaConfig, RopeScaling};
use super::{TextTokenizer, Weights};
use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Map, Value as Json};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{BufReader, Seek, SeekFrom};
use std::path::Path;
use std::str::FromStr;

/// Loads config, weights (in `dtype` on `device`) and tokenizer from a GGUF file.
pub fn load(
    path: &Path,
    dtype: DType,
    device: &Device,
) -> Result<(LlamaConfig, Weights, TextTokenizer)> {
    let (mut reader, content) = open(path)?;
    let plan = Plan::new(path, &content, &mut reader)?;
    let tokenizer = build_tokenizer(path, &content.metadata, &plan.config)?;

    // Read in file order: sequential I/O.
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort_by_key(|n| content.tensor_infos[*n].offset);
    let mut tensors = BTreeMap::new();
    for gguf_name in names {
        let Some(target) = hf_name(gguf_name) else {
            continue; // rope_freqs.weight: folded into the config by `Plan`.
        };
        let target = target.map_err(|e| anyhow!("{e} in {}", path.display()))?;
        let t = read_tensor(path, &content, &mut reader, gguf_name)?;
        let t = match &target {
            HfName::Q(layer) => unpermute_qk(&t, plan.head_dim)
                .with_context(|| format!("tensor `{gguf_name}` of layer {layer}"))?,
            HfName::K(layer) => unpermute_qk(&t, plan.head_dim)
                .with_context(|| format!("tensor `{gguf_name}` of layer {layer}"))?,
            HfName::Other(_) => t,
        };
        let t = t.to_dtype(dtype)?.to_device(device)?;
        tensors.insert(target.name(), t);
    }
    let weights = Weights::new(tensors, format!("GGUF file {}", path.display()));
    Ok((plan.config, weights, tokenizer))
}

/// The config from the GGUF header and metadata (plus the tiny `rope_freqs.weight`
/// tensor when there is one); the weights are not read.
pub fn read_config(path: &Path) -> Result<LlamaConfig> {
    let (mut reader, content) = open(path)?;
    Ok(Plan::new(path, &content, &mut reader)?.config)
}

fn not_gguf(path: &Path) -> String {
    format!(
        "{} is not a valid GGUF file (truncated or corrupt?); download it again",
        path.display()
    )
}

/// Opens the file and reads its header, checking that every tensor's data fits in it.
fn open(path: &Path) -> Result<(BufReader<File>, Content)> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut reader = BufReader::new(file);
    let content = Content::read(&mut reader).with_context(|| not_gguf(path))?;
    let file_size = reader.seek(SeekFrom::End(0))?;
    for (name, info) in &content.tensor_infos {
        let block = info.ggml_dtype.block_size();
        let elems = info.shape.elem_count();
        let bytes = (elems / block.max(1)) as u64 * info.ggml_dtype.type_size() as u64;
        let end = content
            .tensor_data_offset
            .saturating_add(info.offset)
            .saturating_add(bytes);
        if end > file_size {
            return Err(anyhow!(
                "tensor `{name}` needs bytes up to offset {end} but the file has {file_size}"
            )
            .context(not_gguf(path)));
        }
    }
    Ok((reader, content))
}

/// Reads one tensor, dequantized to f32 on the CPU.
fn read_tensor(
    path: &Path,
    content: &Content,
    reader: &mut BufReader<File>,
    name: &str,
) -> Result<Tensor> {
    let q = content
        .tensor(reader, name, &Device::Cpu)
        .with_context(|| format!("cannot read tensor `{name}`: {}", not_gguf(path)))?;
    let t = q
        .dequantize(&Device::Cpu)
        .with_context(|| format!("cannot dequantize tensor `{name}` of {}", path.display()))?;
    Ok(t.to_dtype(DType::F32)?)
}

// ---------------------------------------------------------------------------------------
// Tensor names

enum HfName {
    Q(usize),
    K(usize),
    Other(String),
}

impl HfName {
    fn name(&self) -> String {
        match self {
            HfName::Q(i) => format!("model.layers.{i}.self_attn.q_proj.weight"),
            HfName::K(i) => format!("model.layers.{i}.self_attn.k_proj.weight"),
            HfName::Other(n) => n.clone(),
        }
    }
}

/// The Hugging Face name of a llama.cpp tensor; `None` for tensors we skip
/// (`rope_freqs.weight`), an error naming the tensor for unknown ones.
fn hf_name(gguf: &str) -> Option<Result<HfName>> {
    let other = |s: &str| Some(Ok(HfName::Other(s.to_string())));
    match gguf {
        "token_embd.weight" => return other("model.embed_tokens.weight"),
        "output_norm.weight" => return other("model.norm.weight"),
        "output.weight" => return other("lm_head.weight"),
        "rope_freqs.weight" => return None,
        _ => {}
    }
    let unknown = || {
        Some(Err(anyhow!(
            "tensor `{gguf}` is not part of a LLaMA model as rora knows it (expected \
             token_embd, output_norm, output, rope_freqs and blk.N.{{attn_norm, attn_q, attn_k, \
             attn_v, attn_output, ffn_norm, ffn_gate, ffn_up, ffn_down}})"
        )))
    };
    let Some(rest) = gguf.strip_prefix("blk.") else {
        return unknown();
    };
    let Some((layer, part)) = rest.split_once('.') else {
        return unknown();
    };
    let Ok(i) = layer.parse::<usize>() else {
        return unknown();
    };
    let p = format!("model.layers.{i}");
    let name = match part {
        "attn_q.weight" => return Some(Ok(HfName::Q(i))),
        "attn_k.weight" => return Some(Ok(HfName::K(i))),
        "attn_v.weight" => format!("{p}.self_attn.v_proj.weight"),
        "attn_output.weight" => format!("{p}.self_attn.o_proj.weight"),
        "ffn_gate.weight" => format!("{p}.mlp.gate_proj.weight"),
        "ffn_up.weight" => format!("{p}.mlp.up_proj.weight"),
        "ffn_down.weight" => format!("{p}.mlp.down_proj.weight"),
        "attn_norm.weight" => format!("{p}.input_layernorm.weight"),
        "ffn_norm.weight" => format!("{p}.post_attention_layernorm.weight"),
        _ => return unknown(),
    };
    Some(Ok(HfName::Other(name)))
}

/// Inverts llama.cpp's q/k row permutation: GGUF row `h*hd + 2j + s` holds Hugging Face
/// row `h*hd + s*hd/2 + j` of head `h` (`hd` = head_dim).
pub fn unpermute_qk(w: &Tensor, head_dim: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    if head_dim == 0 || !head_dim.is_multiple_of(2) || !rows.is_multiple_of(head_dim) {
        bail!("{rows} rows cannot be split into heads of an even head_dim {head_dim}");
    }
    let n_head = rows / head_dim;
    Ok(w.reshape((n_head, head_dim / 2, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

/// llama.cpp's permutation (Hugging Face → GGUF), the inverse of [`unpermute_qk`]; for
/// writing GGUF files in tests and tools.
pub fn permute_qk(w: &Tensor, head_dim: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    if head_dim == 0 || !head_dim.is_multiple_of(2) || !rows.is_multiple_of(head_dim) {
        bail!("{rows} rows cannot be split into heads of an even head_dim {head_dim}");
    }
    let n_head = rows / head_dim;
    Ok(w.reshape((n_head, 2, head_dim / 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

// ---------------------------------------------------------------------------------------
// Metadata

struct Meta<'a> {
    md: &'a HashMap<String, Value>,
    path: &'a Path,
}

fn as_usize(v: &Value) -> Option<usize> {
    match v {
        Value::U8(x) => Some(*x as usize),
        Value::U16(x) => Some(*x as usize),
        Value::U32(x) => Some(*x as usize),
        Value::U64(x) => usize::try_from(*x).ok(),
        Value::I8(x) => usize::try_from(*x).ok(),
        Value::I16(x) => usize::try_from(*x).ok(),
        Value::I32(x) => usize::try_from(*x).ok(),
        Value::I64(x) => usize::try_from(*x).ok(),
        _ => None,
    }
}

fn as_f64(v: &Value) -> Option<f64> {
    match v {
        Value::F32(x) => Some(*x as f64),
        Value::F64(x) => Some(*x),
        other => as_usize(other).map(|x| x as f64),
    }
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

impl<'a> Meta<'a> {
    fn opt(&self, key: &str) -> Option<&'a Value> {
        self.md.get(key)
    }

    fn req(&self, key: &str) -> Result<&'a Value> {
        self.md.get(key).ok_or_else(|| {
            anyhow!(
                "GGUF file {} has no metadata key `{key}`",
                self.path.display()
            )
        })
    }

    fn bad(&self, key: &str, what: &str, v: &Value) -> anyhow::Error {
        let shown = format!("{v:?}");
        let shown: String = shown.chars().take(80).collect();
        anyhow!(
            "GGUF metadata `{key}` in {} should be {what}, found {shown}",
            self.path.display()
        )
    }

    fn usize(&self, key: &str) -> Result<usize> {
        let v = self.req(key)?;
        as_usize(v).ok_or_else(|| self.bad(key, "a non-negative integer", v))
    }

    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.opt(key) {
            None => Ok(None),
            Some(v) => as_usize(v)
                .map(Some)
                .ok_or_else(|| self.bad(key, "a non-negative integer", v)),
        }
    }

    fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.opt(key) {
            None => Ok(None),
            Some(v) => as_f64(v)
                .map(Some)
                .ok_or_else(|| self.bad(key, "a number", v)),
        }
    }

    fn str(&self, key: &str) -> Result<&'a str> {
        let v = self.req(key)?;
        match v {
            Value::String(s) => Ok(s),
            _ => Err(self.bad(key, "a string", v)),
        }
    }

    fn opt_str(&self, key: &str) -> Result<Option<&'a str>> {
        match self.opt(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.bad(key, "a string", v)),
        }
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.opt(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => as_usize(v)
                .map(|x| Some(x != 0))
                .ok_or_else(|| self.bad(key, "a boolean", v)),
        }
    }

    fn array(&self, key: &str) -> Result<&'a Vec<Value>> {
        let v = self.req(key)?;
        match v {
            Value::Array(a) => Ok(a),
            _ => Err(self.bad(key, "an array", v)),
        }
    }

    fn strings(&self, key: &str) -> Result<Vec<&'a str>> {
        self.array(key)?
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.as_str()),
                other => Err(self.bad(key, "an array of strings", other)),
            })
            .collect()
    }

    fn per_layer(&self, key: &str, layers: usize) -> Result<PerLayer> {
        let v = self.req(key)?;
        if let Value::Array(a) = v {
            if a.len() != layers {
                bail!(
                    "GGUF metadata `{key}` in {} has {} entries, expected one per layer ({layers})",
                    self.path.display(),
                    a.len()
                );
            }
            let each = a
                .iter()
                .map(|x| as_usize(x).ok_or_else(|| self.bad(key, "integers", x)))
                .collect::<Result<Vec<_>>>()?;
            return Ok(PerLayer::Each(each));
        }
        as_usize(v)
            .map(PerLayer::One)
            .ok_or_else(|| self.bad(key, "an integer or one integer per layer", v))
    }
}

// ---------------------------------------------------------------------------------------
// Config

struct Plan {
    config: LlamaConfig,
    head_dim: usize,
}

impl Plan {
    fn new(path: &Path, content: &Content, reader: &mut BufReader<File>) -> Result<Self> {
        let meta = Meta {
            md: &content.metadata,
            path,
        };
        let arch = meta.str("general.architecture")?;
        if arch != "llama" {
            bail!(
                "GGUF file {} holds a `{arch}` model (general.architecture); rora loads only \
                 LLaMA-architecture models (`llama`)",
                path.display()
            );
        }
        let hidden = meta.usize("llama.embedding_length")?;
        let layers = meta.usize("llama.block_count")?;
        if hidden == 0 || layers == 0 {
            bail!(
                "GGUF file {} says embedding_length {hidden}, block_count {layers}; both must be \
                 positive",
                path.display()
            );
        }
        let heads = meta.per_layer("llama.attention.head_count", layers)?;
        let kv_heads = match meta.opt("llama.attention.head_count_kv") {
            Some(_) => meta.per_layer("llama.attention.head_count_kv", layers)?,
            None => heads.clone(),
        };
        let ffn = meta.per_layer("llama.feed_forward_length", layers)?;
        let context = meta.usize("llama.context_length")?;
        let theta = meta.opt_f64("llama.rope.freq_base")?.unwrap_or(10_000.0);
        let eps = meta
            .opt_f64("llama.attention.layer_norm_rms_epsilon")?
            .ok_or_else(|| {
                anyhow!(
                    "GGUF file {} has no metadata key `llama.attention.layer_norm_rms_epsilon`",
                    path.display()
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
        let head_dim = match meta.opt_usize("llama.attention.key_length")? {
            Some(k) => k,
            None => match (&heads, meta.opt_usize("llama.rope.dimension_count")?) {
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

        // Per-layer shapes from the tensors' shapes (the header; no data read).
        let dims = |name: &str| -> Result<Vec<usize>> {
            content
                .tensor_infos
                .get(name)
                .map(|i| i.shape.dims().to_vec())
                .ok_or_else(|| {
                    anyhow!(
                        "tensor `{name}` is missing from GGUF file {}",
                        path.display()
                    )
                })
        };
        let rows = |name: &str| -> Result<usize> {
            let d = dims(name)?;
            match d.as_slice() {
                [r, c] if *c == hidden => Ok(*r),
                _ => bail!(
                    "tensor `{name}` in GGUF file {} has shape {d:?}, expected [_, {hidden}] \
                     (embedding_length {hidden})",
                    path.display()
                ),
            }
        };
        let mut shapes = Vec::with_capacity(layers);
        for i in 0..layers {
            let q = rows(&format!("blk.{i}.attn_q.weight"))?;
            let k = rows(&format!("blk.{i}.attn_k.weight"))?;
            let f = rows(&format!("blk.{i}.ffn_gate.weight"))?;
            for (name, r) in [("attn_q", q), ("attn_k", k)] {
                if r == 0 || !r.is_multiple_of(head_dim) {
                    bail!(
                        "tensor `blk.{i}.{name}.weight` in GGUF file {} has {r} rows, not a \
                         positive multiple of head_dim {head_dim}",
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
                    "llama.attention.head_count",
                    &heads,
                    found.num_attention_heads,
                    "attn_q",
                ),
                (
                    "llama.attention.head_count_kv",
                    &kv_heads,
                    found.num_key_value_heads,
                    "attn_k",
                ),
                (
                    "llama.feed_forward_length",
                    &ffn,
                    found.intermediate_size,
                    "ffn_gate",
                ),
            ];
            for (key, declared, got, tensor) in checks {
                // One number for all layers is the dense width (a pruned layer may be
                // narrower); a per-layer list must match exactly.
                let bad = match declared {
                    PerLayer::One(x) => got > *x,
                    PerLayer::Each(v) => got != v[i],
                };
                if bad {
                    bail!(
                        "tensor `blk.{i}.{tensor}.weight` in GGUF file {} gives layer {i} {got} \
                         (head_dim {head_dim}), but metadata `{key}` says {}",
                        path.display(),
                        declared.get(i)
                    );
                }
            }
            shapes.push(found);
        }
        let uniform = shapes.iter().all(|s| *s == shapes[0]);

        let emb = dims("token_embd.weight")?;
        let vocab = match emb.as_slice() {
            [v, h] if *h == hidden => *v,
            _ => bail!(
                "tensor `token_embd.weight` in GGUF file {} has shape {emb:?}, expected \
                 [vocab, {hidden}]",
                path.display()
            ),
        };
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
        let tied = !content.tensor_infos.contains_key("output.weight");

        let rope_scaling = rope_scaling(path, content, reader, &meta, head_dim, theta)?;

        let bos = meta.opt_usize("tokenizer.ggml.bos_token_id")?;
        let mut eos: Vec<usize> = Vec::new();
        for key in [
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.eot_token_id",
            "tokenizer.ggml.eom_token_id",
        ] {
            if let Some(id) = meta.opt_usize(key)? {
                if !eos.contains(&id) {
                    eos.push(id);
                }
            }
        }

        let mut cfg = Map::new();
        cfg.insert("architectures".into(), json!(["LlamaForCausalLM"]));
        cfg.insert("model_type".into(), json!("llama"));
        cfg.insert("hidden_act".into(), json!("silu"));
        cfg.insert("hidden_size".into(), json!(hidden));
        cfg.insert("intermediate_size".into(), json!(ffn.max()));
        cfg.insert("num_hidden_layers".into(), json!(layers));
        cfg.insert("num_attention_heads".into(), json!(heads_max));
        cfg.insert("num_key_value_heads".into(), json!(kv_heads.max()));
        if head_dim != default_head_dim {
            cfg.insert("head_dim".into(), json!(head_dim));
        }
        cfg.insert("vocab_size".into(), json!(vocab));
        cfg.insert("max_position_embeddings".into(), json!(context));
        cfg.insert("rms_norm_eps".into(), json!(eps));
        cfg.insert("rope_theta".into(), json!(theta));
        if let Some(s) = rope_scaling {
            cfg.insert("rope_scaling".into(), serde_json::to_value(s)?);
        }
        cfg.insert("tie_word_embeddings".into(), json!(tied));
        if let Some(b) = bos {
            cfg.insert("bos_token_id".into(), json!(b));
        }
        match eos.as_slice() {
            [] => {}
            [one] => {
                cfg.insert("eos_token_id".into(), json!(one));
            }
            many => {
                cfg.insert("eos_token_id".into(), json!(many));
            }
        }
        cfg.insert("attention_bias".into(), json!(false));
        cfg.insert("mlp_bias".into(), json!(false));
        if !uniform {
            cfg.insert("layer_shapes".into(), serde_json::to_value(&shapes)?);
        }
        let config = LlamaConfig::from_json_str(&Json::Object(cfg).to_string())
            .with_context(|| format!("building a config from GGUF file {}", path.display()))?;
        Ok(Self { config, head_dim })
    }
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
    head_dim: usize,
    theta: f64,
) -> Result<Option<RopeScaling>> {
    if let Some(kind) = meta.opt_str("llama.rope.scaling.type")? {
        let factor = meta.opt_f64("llama.rope.scaling.factor")?.unwrap_or(1.0);
        if !matches!(kind, "none" | "") && factor != 1.0 {
            bail!(
                "GGUF file {} uses RoPE scaling `{kind}` (factor {factor}); rora supports only \
                 Llama-3 scaling (rope_freqs.weight)",
                path.display()
            );
        }
    }
    if !content.tensor_infos.contains_key("rope_freqs.weight") {
        return Ok(None);
    }
    let t = read_tensor(path, content, reader, "rope_freqs.weight")?;
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
    if let Some(c) = meta.opt_usize("llama.rope.scaling.original_context_length")? {
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

/// The divisors llama.cpp writes to `rope_freqs.weight` for Llama-3 scaling.
fn llama3_divisors(
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

// ---------------------------------------------------------------------------------------
// Tokenizer

/// llama.cpp token types (`tokenizer.ggml.token_type`).
const TOKEN_UNKNOWN: i64 = 2;
const TOKEN_CONTROL: i64 = 3;
const TOKEN_USER_DEFINED: i64 = 4;

fn build_tokenizer(
    path: &Path,
    md: &HashMap<String, Value>,
    config: &LlamaConfig,
) -> Result<TextTokenizer> {
    let meta = Meta { md, path };
    let bos = config.bos_token_id();
    let eos = config.eos_token_ids();
    if let Some(json) = meta.opt_str("tokenizer.huggingface.json")? {
        let inner = tokenizers::Tokenizer::from_str(json).map_err(|e| {
            anyhow!(
                "GGUF metadata `tokenizer.huggingface.json` in {} is not a valid tokenizer.json: {e}",
                path.display()
            )
        })?;
        return Ok(TextTokenizer::new(inner, bos, eos));
    }
    let model = meta.str("tokenizer.ggml.model")?;
    let json = match model {
        "gpt2" => gpt2_tokenizer_json(&meta)?,
        "llama" => llama_tokenizer_json(&meta)?,
        other => bail!(
            "GGUF file {} has a `{other}` tokenizer (tokenizer.ggml.model); rora can build \
             `gpt2` (byte-level BPE) and `llama` (sentencepiece) tokenizers",
            path.display()
        ),
    };
    let inner = tokenizers::Tokenizer::from_str(&json.to_string()).map_err(|e| {
        anyhow!(
            "cannot build the `{model}` tokenizer from the metadata of {}: {e}",
            path.display()
        )
    })?;
    Ok(TextTokenizer::new(inner, bos, eos))
}

fn token_types(meta: &Meta, n: usize) -> Result<Vec<i64>> {
    let key = "tokenizer.ggml.token_type";
    let Some(_) = meta.opt(key) else {
        return Ok(vec![1; n]);
    };
    let a = meta.array(key)?;
    if a.len() != n {
        bail!(
            "GGUF metadata `{key}` in {} has {} entries but `tokenizer.ggml.tokens` has {n}",
            meta.path.display(),
            a.len()
        );
    }
    a.iter()
        .map(|v| match v {
            Value::I32(x) => Ok(*x as i64),
            Value::I64(x) => Ok(*x),
            other => as_usize(other)
                .map(|x| x as i64)
                .ok_or_else(|| meta.bad(key, "integers", other)),
        })
        .collect()
}

/// Vocab (first id wins for a duplicated string) and the added-token entries.
fn vocab_and_added(tokens: &[&str], types: &[i64]) -> (Map<String, Json>, Vec<Json>) {
    let mut vocab = Map::new();
    let mut added = Vec::new();
    for (id, (tok, ty)) in tokens.iter().zip(types).enumerate() {
        if vocab.contains_key(*tok) {
            continue;
        }
        vocab.insert(tok.to_string(), json!(id));
        if matches!(*ty, TOKEN_UNKNOWN | TOKEN_CONTROL | TOKEN_USER_DEFINED) {
            added.push(json!({
                "id": id,
                "content": tok,
                "single_word": false,
                "lstrip": false,
                "rstrip": false,
                "normalized": false,
                "special": *ty != TOKEN_USER_DEFINED,
            }));
        }
    }
    (vocab, added)
}

/// Llama 3's word-splitting regex (llama.cpp `llama-bpe`).
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Byte-level BPE (`tokenizer.ggml.model == "gpt2"`), with the pre-tokenizer that
/// llama.cpp associates with `tokenizer.ggml.pre`.
fn gpt2_tokenizer_json(meta: &Meta) -> Result<Json> {
    let tokens = meta.strings("tokenizer.ggml.tokens")?;
    let types = token_types(meta, tokens.len())?;
    let merges: Vec<Json> = meta
        .strings("tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| json!([a, b]))
                .ok_or_else(|| {
                    anyhow!(
                        "GGUF metadata `tokenizer.ggml.merges` in {} holds `{m}`, not two \
                         tokens separated by a space",
                        meta.path.display()
                    )
                })
        })
        .collect::<Result<_>>()?;
    let (vocab, added) = vocab_and_added(&tokens, &types);
    let byte_level = |use_regex: bool| {
        json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
               "use_regex": use_regex})
    };
    let pre = meta.opt_str("tokenizer.ggml.pre")?.unwrap_or("default");
    let mut ignore_merges = false;
    let pre_tokenizer = match pre {
        // ByteLevel's own regex is GPT-2's. llama.cpp's "default" (no `pre` key, old
        // files) differs a little; GPT-2's is what Hugging Face does for such vocabularies.
        "default" | "gpt2" | "gpt-2" | "mpt" | "olmo" | "jais" => byte_level(true),
        // llama.cpp splits every number character off, then applies the GPT-2 regex;
        // Hugging Face's tokenizer.json for these (SmolLM, StarCoder) says the same with
        // Digits(individual_digits) + ByteLevel.
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => {
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                byte_level(true),
            ]})
        }
        "llama-bpe" | "llama3" | "llama-v3" => {
            ignore_merges = true;
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": LLAMA3_REGEX}, "behavior": "Isolated",
                 "invert": false},
                byte_level(false),
            ]})
        }
        other => bail!(
            "GGUF file {} asks for the `{other}` pre-tokenizer (tokenizer.ggml.pre), which rora \
             does not know; known: default, gpt-2, mpt, olmo, jais, smollm, starcoder, refact, command-r, codeshell, exaone, minerva-7b, llama-bpe",
            meta.path.display()
        ),
    };
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false,
                           "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
                    "use_regex": true},
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": ignore_merges,
            "vocab": vocab,
            "merges": merges,
        },
    }))
}

/// Merges of a sentencepiece BPE vocabulary, as Hugging Face's `SentencePieceExtractor`
/// derives them: every split of a piece into two pieces of the vocab is a merge, ranked by
/// the merged piece's score (highest first; ties keep vocab order, and the splits of one
/// piece go shortest left half first). This is the order of the merges in the
/// `tokenizer.json` that `transformers`' LlamaConverter wrote for stories260K.
pub fn sentencepiece_merges(tokens: &[&str], scores: &[f32]) -> Vec<(String, String)> {
    let mut index: HashMap<&str, usize> = HashMap::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        index.entry(t).or_insert(i);
    }
    let mut seen = HashSet::new();
    let mut merges: Vec<(usize, usize, f32)> = Vec::new();
    for (i, piece) in tokens.iter().enumerate() {
        if !seen.insert(*piece) {
            continue;
        }
        for (at, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(at);
            if let (Some(&li), Some(&ri)) = (index.get(l), index.get(r)) {
                merges.push((li, ri, scores[i]));
            }
        }
    }
    // Stable sort, highest score first.
    merges.sort_by(|a, b| b.2.total_cmp(&a.2));
    merges
        .into_iter()
        .map(|(l, r, _)| (tokens[l].to_string(), tokens[r].to_string()))
        .collect()
}

/// Sentencepiece BPE (`tokenizer.ggml.model == "llama"`), built like Hugging Face's
/// `LlamaConverter`: BPE with byte fallback, merges from the scores, Metaspace.
fn llama_tokenizer_json(meta: &Meta) -> Result<Json> {
    let tokens = meta.strings("tokenizer.ggml.tokens")?;
    let types = token_types(meta, tokens.len())?;
    let key = "tokenizer.ggml.scores";
    let scores: Vec<f32> = meta
        .array(key)?
        .iter()
        .map(|v| {
            as_f64(v)
                .map(|x| x as f32)
                .ok_or_else(|| meta.bad(key, "numbers", v))
        })
        .collect::<Result<_>>()?;
    if scores.len() != tokens.len() {
        bail!(
            "GGUF metadata `{key}` in {} has {} entries but `tokenizer.ggml.tokens` has {}",
            meta.path.display(),
            scores.len(),
            tokens.len()
        );
    }
    let merges: Vec<Json> = sentencepiece_merges(&tokens, &scores)
        .into_iter()
        .map(|(a, b)| json!([a, b]))
        .collect();
    let (vocab, added) = vocab_and_added(&tokens, &types);
    let unk = meta
        .opt_usize("tokenizer.ggml.unknown_token_id")?
        .and_then(|id| tokens.get(id))
        .map(|t| json!(t))
        .unwrap_or(Json::Null);
    let prefix = meta
        .opt_bool("tokenizer.ggml.add_space_prefix")?
        .unwrap_or(true);
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if prefix {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Metaspace", "replacement": "\u{2581}",
                          "prepend_scheme": if prefix { "first" } else { "never" },
                          "split": false},
        "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": unk,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": true,
            "byte_fallback": true,
            "ignore_merges": false,
            "vocab": vocab,
            "merges": merges,
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_round_trips_and_matches_llama_cpp() -> Result<()> {
        // 2 heads of head_dim 4, 1 column: HF rows [a0 a1 b0 b1 | c0 c1 d0 d1] where a/b are
        // the halves of head 0. llama.cpp interleaves the halves: [a0 b0 a1 b1 | ...].
        let hf = Tensor::from_vec((0..8u32).map(|x| x as f32).collect(), (8, 1), &Device::Cpu)?;
        let gguf = permute_qk(&hf, 4)?;
        let rows: Vec<f32> = gguf.flatten_all()?.to_vec1()?;
        assert_eq!(rows, vec![0., 2., 1., 3., 4., 6., 5., 7.]);
        let back: Vec<f32> = unpermute_qk(&gguf, 4)?.flatten_all()?.to_vec1()?;
        assert_eq!(back, (0..8).map(|x| x as f32).collect::<Vec<_>>());
        Ok(())
    }

    #[test]
    fn merges_follow_scores() {
        let tokens = ["a", "b", "c", "ab", "abc", "bc"];
        let scores = [0.0, 0.0, 0.0, -1.0, -3.0, -2.0];
        let m = sentencepiece_merges(&tokens, &scores);
        let m: Vec<(&str, &str)> = m.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        assert_eq!(m, vec![("a", "b"), ("b", "c"), ("a", "bc"), ("ab", "c")]);
    }

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
