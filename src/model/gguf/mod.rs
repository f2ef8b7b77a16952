//! llama.cpp GGUF files: config from the metadata (`config`), weights dequantized and
//! renamed to Hugging Face names with q/k rows put back in rotate-half order (`names`),
//! and the tokenizer rebuilt from the metadata as a Hugging Face `tokenizers::Tokenizer`
//! (`tokenizer`). Shapes are checked by `model::shapes` when the model is built.
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

mod config;
mod names;
pub mod tokenizer;

pub use config::{llama3_divisors, ARCHITECTURES};
pub use names::{permute_qk, unpermute_qk};
pub use tokenizer::{byte_level_pre_tokenizer, sentencepiece_merges, BYTE_LEVEL_PRE};

use super::{LlamaConfig, TextTokenizer, Weights};
use anyhow::{anyhow, Context, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufReader, Seek, SeekFrom};
use std::path::Path;

/// Loads config, weights (in `dtype` on `device`) and tokenizer from a GGUF file.
pub fn load(
    path: &Path,
    dtype: DType,
    device: &Device,
) -> Result<(LlamaConfig, Weights, TextTokenizer)> {
    let (mut reader, content) = open(path)?;
    let config = config::read(path, &content, &mut reader)?;
    let head_dim = config.head_dim();
    let tokenizer = tokenizer::build(path, &content.metadata, &config)?;

    // Read in file order: sequential I/O.
    let mut in_file_order: Vec<&String> = content.tensor_infos.keys().collect();
    in_file_order.sort_by_key(|n| content.tensor_infos[*n].offset);
    let mut tensors = BTreeMap::new();
    for gguf_name in in_file_order {
        let Some(role) = names::tensor_role(gguf_name) else {
            continue; // rope_freqs.weight: folded into the config.
        };
        let role = role.map_err(|e| anyhow!("{e} in {}", path.display()))?;
        let mut t = read_tensor(path, &content, &mut reader, gguf_name)?;
        if let Some(layer) = names::permuted_layer(role) {
            t = unpermute_qk(&t, head_dim)
                .with_context(|| format!("tensor `{gguf_name}` of layer {layer}"))?;
        }
        let t = t.to_dtype(dtype)?.to_device(device)?;
        tensors.insert(role.hf_name(), t);
    }
    let weights = Weights::new(tensors, format!("GGUF file {}", path.display()));
    Ok((config, weights, tokenizer))
}

/// The config from the GGUF header and metadata (plus the tiny `rope_freqs.weight`
/// tensor when there is one); the weights are not read.
pub fn read_config(path: &Path) -> Result<LlamaConfig> {
    let (mut reader, content) = open(path)?;
    config::read(path, &content, &mut reader)
}

/// The metadata of the GGUF file at `path` (the export copies a GGUF source's tokenizer
/// keys from it).
pub fn read_metadata(path: &Path) -> Result<HashMap<String, Value>> {
    Ok(open(path)?.1.metadata)
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

/// The metadata of one file, read with errors that name the key and the file.
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
}
