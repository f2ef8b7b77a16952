//! A merged Hugging Face folder: adapters folded into the base weights (in f32, then
//! cast), safetensors with Hugging Face names (sharded above a size), config.json,
//! generation_config.json and the tokenizer files. Written into a temporary sibling
//! folder that is renamed into place at the end, so an interrupted export leaves no
//! half folder at the destination.

use super::padded;
use crate::adapters::merge::merged_weight;
use crate::fsx;
use crate::model::schema::{layer_prefix, LayerNorm, EMBED_TOKENS, FINAL_NORM, LM_HEAD};
use crate::model::{dtype_name, DtypeName, LayerShape, LoadedModel};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Tokenizer-side files copied from the source folder when it has them.
const TOKENIZER_FILES: [&str; 4] = [
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
];

/// Every tensor of the model under its Hugging Face name, adapters merged, in `dtype`.
pub fn merged_tensors(loaded: &LoadedModel, dtype: DType) -> Result<BTreeMap<String, Tensor>> {
    model_tensors(loaded, dtype, true)
}

/// Every tensor under its Hugging Face name in `dtype`, with the adapters merged in or
/// (`merge_adapters: false`) left out: the base model they sit on.
pub fn model_tensors(
    loaded: &LoadedModel,
    dtype: DType,
    merge_adapters: bool,
) -> Result<BTreeMap<String, Tensor>> {
    let m = &loaded.model;
    let mut out = BTreeMap::new();
    out.insert(EMBED_TOKENS.to_string(), m.embed_tokens.to_dtype(dtype)?);
    out.insert(FINAL_NORM.to_string(), m.norm.weight().to_dtype(dtype)?);
    if let Some(head) = &m.lm_head {
        out.insert(LM_HEAD.to_string(), head.to_dtype(dtype)?);
    }
    for (i, layer) in m.layers.iter().enumerate() {
        for (norm, weight) in [
            (LayerNorm::Input, &layer.input_layernorm),
            (LayerNorm::PostAttention, &layer.post_attention_layernorm),
        ] {
            out.insert(norm.hf_name(i), weight.weight().to_dtype(dtype)?);
        }
    }
    for (i, path, linear) in m.projections() {
        let w = match linear.adapter().filter(|_| merge_adapters) {
            Some(adapter) => merged_weight(linear.weight(), adapter, dtype)?,
            None => linear.weight().to_dtype(dtype)?,
        };
        out.insert(format!("{}.{path}.weight", layer_prefix(i)), w);
    }
    Ok(out)
}

/// How a merged folder holds a model whose layers have different widths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Each layer at its own width, `layer_shapes` in config.json (rora reads it).
    Native,
    /// Every layer zero-padded to the widest widths: a plain config stock
    /// `transformers` loads (see [`super::padded`]).
    Padded,
}

/// config.json for the exported model: the source config with the real widths. A
/// uniform model (or a padded one, at the widest widths) gets them in the standard keys;
/// a non-uniform one also gets `layer_shapes`, which only rora reads.
pub fn export_config(
    loaded: &LoadedModel,
    dtype: DType,
    layout: Layout,
) -> Result<serde_json::Value> {
    let m = &loaded.model;
    let mut cfg = m.config.clone();
    let widest = [padded::widest(&m.layer_shapes)];
    let shapes: &[LayerShape] = match layout {
        Layout::Native => &m.layer_shapes,
        Layout::Padded => &widest,
    };
    let uniform = shapes.windows(2).all(|w| w[0] == w[1]);
    cfg.head_dim = Some(cfg.head_dim());
    cfg.tie_word_embeddings = Some(m.lm_head.is_none());
    if uniform {
        cfg.num_attention_heads = shapes[0].num_attention_heads;
        cfg.num_key_value_heads = Some(shapes[0].num_key_value_heads);
        cfg.intermediate_size = Some(shapes[0].intermediate_size);
        cfg.layer_shapes = None;
    } else {
        cfg.num_attention_heads = shapes
            .iter()
            .map(|s| s.num_attention_heads)
            .max()
            .unwrap_or(0);
        cfg.num_key_value_heads = shapes.iter().map(|s| s.num_key_value_heads).max();
        cfg.intermediate_size = shapes.iter().map(|s| s.intermediate_size).max();
        cfg.layer_shapes = Some(shapes.to_vec());
    }
    let mut v = serde_json::to_value(&cfg)?;
    let obj = v
        .as_object_mut()
        .context("config serialises to an object")?;
    obj.insert(
        "architectures".into(),
        serde_json::json!(["LlamaForCausalLM"]),
    );
    obj.insert("model_type".into(), "llama".into());
    let torch_dtype = DtypeName::of(dtype).unwrap_or_default().torch_name();
    obj.insert("torch_dtype".into(), torch_dtype.into());
    Ok(v)
}

/// Parses `5GB`, `500MB`, `100KB` or a byte count (decimal units, as transformers).
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim().to_ascii_uppercase();
    let (num, mult) = [
        ("GB", 1_000_000_000u64),
        ("MB", 1_000_000),
        ("KB", 1_000),
        ("B", 1),
    ]
    .iter()
    .find_map(|(u, m)| t.strip_suffix(u).map(|n| (n.trim().to_string(), *m)))
    .unwrap_or((t.clone(), 1));
    let n: f64 = num
        .parse()
        .with_context(|| format!("`{s}` is not a size such as 5GB, 500MB or 1000000"))?;
    if n <= 0.0 {
        bail!("size `{s}` must be positive");
    }
    Ok((n * mult as f64) as u64)
}

/// Groups tensors (in name order) into shards of at most `max_bytes` each (a tensor
/// larger than that gets a shard of its own).
fn plan_shards(tensors: &BTreeMap<String, Tensor>, max_bytes: u64) -> Vec<Vec<String>> {
    let mut shards: Vec<Vec<String>> = vec![Vec::new()];
    let mut size = 0u64;
    for (name, t) in tensors {
        let bytes = (t.elem_count() * t.dtype().size_in_bytes()) as u64;
        if size > 0 && size + bytes > max_bytes {
            shards.push(Vec::new());
            size = 0;
        }
        shards
            .last_mut()
            .expect("at least one shard")
            .push(name.clone());
        size += bytes;
    }
    shards
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct MergedExport {
    pub dir: PathBuf,
    pub dtype: String,
    pub shards: usize,
    pub bytes: u64,
    pub uniform: bool,
}

/// Writes the merged model into `dir`, replacing what is there only once the new folder
/// is complete.
pub fn write_merged(
    loaded: &LoadedModel,
    dir: &Path,
    dtype: DType,
    max_shard_bytes: u64,
    layout: Layout,
) -> Result<MergedExport> {
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = dir
        .file_name()
        .context("the export folder needs a name")?
        .to_string_lossy()
        .to_string();
    if !parent.is_dir() {
        bail!(
            "cannot export to {}: its parent folder {} does not exist",
            dir.display(),
            parent.display()
        );
    }
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = write_folder(loaded, &tmp, dtype, max_shard_bytes, layout);
    let info = match result {
        Ok(info) => info,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e.context(format!("exporting the merged model to {}", dir.display())));
        }
    };
    if dir.exists() {
        let old = parent.join(format!(".{name}.old-{}", std::process::id()));
        std::fs::rename(dir, &old).with_context(|| format!("cannot replace {}", dir.display()))?;
        std::fs::rename(&tmp, dir)?;
        std::fs::remove_dir_all(&old)?;
    } else {
        std::fs::rename(&tmp, dir)
            .with_context(|| format!("cannot move the export into {}", dir.display()))?;
    }
    Ok(MergedExport {
        dir: dir.to_path_buf(),
        ..info
    })
}

fn write_folder(
    loaded: &LoadedModel,
    tmp: &Path,
    dtype: DType,
    max_shard_bytes: u64,
    layout: Layout,
) -> Result<MergedExport> {
    std::fs::create_dir(tmp)
        .with_context(|| format!("cannot create {} (is the folder writable?)", tmp.display()))?;
    let mut tensors = merged_tensors(loaded, dtype)?;
    if layout == Layout::Padded {
        tensors = padded::pad_to_widest(
            tensors,
            &loaded.model.layer_shapes,
            loaded.model.config.head_dim(),
        )?;
    }
    let shards = plan_shards(&tensors, max_shard_bytes);
    let total: u64 = tensors
        .values()
        .map(|t| (t.elem_count() * t.dtype().size_in_bytes()) as u64)
        .sum();
    let mut weight_map = BTreeMap::new();
    let n = shards.len();
    for (k, names) in shards.iter().enumerate() {
        let file = if n == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{n:05}.safetensors", k + 1)
        };
        let part: Vec<(&str, &Tensor)> =
            names.iter().map(|nm| (nm.as_str(), &tensors[nm])).collect();
        let metadata: Option<std::collections::HashMap<String, String>> =
            Some([("format".to_string(), "pt".to_string())].into());
        safetensors::serialize_to_file(part, metadata, &tmp.join(&file))?;
        for nm in names {
            weight_map.insert(nm.clone(), file.clone());
        }
    }
    if n > 1 {
        let index =
            serde_json::json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
        fsx::write_json(&tmp.join("model.safetensors.index.json"), &index)?;
    }
    fsx::write_json(
        &tmp.join("config.json"),
        &export_config(loaded, dtype, layout)?,
    )?;
    let cfg = &loaded.model.config;
    let generation = serde_json::json!({
        "_from_model_config": true,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
    });
    match loaded
        .folder
        .as_ref()
        .map(|f| f.join("generation_config.json"))
        .filter(|p| p.is_file())
    {
        Some(src) => {
            std::fs::copy(&src, tmp.join("generation_config.json"))?;
        }
        None => fsx::write_json(&tmp.join("generation_config.json"), &generation)?,
    }
    loaded
        .tokenizer
        .inner()
        .save(tmp.join("tokenizer.json"), true)
        .map_err(|e| anyhow::anyhow!("cannot write tokenizer.json: {e}"))?;
    if let Some(src) = &loaded.folder {
        for f in TOKENIZER_FILES {
            if src.join(f).is_file() {
                std::fs::copy(src.join(f), tmp.join(f))?;
            }
        }
    }
    Ok(MergedExport {
        dir: tmp.to_path_buf(),
        dtype: dtype_name(dtype).to_string(),
        shards: n,
        bytes: total,
        uniform: layout == Layout::Padded
            || loaded.model.layer_shapes.windows(2).all(|w| w[0] == w[1]),
    })
}
