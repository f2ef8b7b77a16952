//! A Hugging Face model folder: `config.json`, `model.safetensors` or shards listed in
//! `model.safetensors.index.json`, and `tokenizer.json`. Safetensors are memory-mapped
//! and each tensor is converted to the requested dtype as it is read.

use super::config::LlamaConfig;
use super::weights::Weights;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

pub fn read_config(dir: &Path) -> Result<LlamaConfig> {
    let path = dir.join("config.json");
    if !path.is_file() {
        bail!(
            "{} has no config.json; a model folder needs config.json, model.safetensors \
             (or shards with model.safetensors.index.json) and tokenizer.json",
            dir.display()
        );
    }
    LlamaConfig::from_file(&path)
}

/// Tensor name → shard file name, from `model.safetensors.index.json`.
type ShardMap = BTreeMap<String, String>;

/// The safetensors files of a folder, and for sharded folders the tensor → file map.
fn weight_files(dir: &Path) -> Result<(Vec<PathBuf>, Option<ShardMap>)> {
    let index_path = dir.join(INDEX_FILE);
    if index_path.is_file() {
        #[derive(serde::Deserialize)]
        struct Index {
            weight_map: BTreeMap<String, String>,
        }
        let text = std::fs::read_to_string(&index_path)
            .with_context(|| format!("cannot read {}", index_path.display()))?;
        let index: Index = serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is not a valid safetensors index (it needs `weight_map`)",
                index_path.display()
            )
        })?;
        let mut files: Vec<PathBuf> = index
            .weight_map
            .values()
            .map(|f| dir.join(f))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        files.sort();
        for f in &files {
            if !f.is_file() {
                bail!(
                    "{} lists shard {} but the file is missing; download the complete model",
                    index_path.display(),
                    f.display()
                );
            }
        }
        return Ok((files, Some(index.weight_map)));
    }
    let single = dir.join(SINGLE_FILE);
    if single.is_file() {
        return Ok((vec![single], None));
    }
    bail!(
        "{} has neither {SINGLE_FILE} nor {INDEX_FILE}; put the model's safetensors weights there",
        dir.display()
    )
}

/// Reads every tensor of the folder into `dtype` on `device`.
pub fn read_weights(dir: &Path, dtype: DType, device: &Device) -> Result<Weights> {
    let (files, index) = weight_files(dir)?;
    let mut tensors = BTreeMap::new();
    let mut found_in: BTreeMap<String, String> = BTreeMap::new();
    for file in &files {
        let file_name = file
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        // SAFETY: the file is mapped read-only; like every safetensors reader we assume
        // nobody truncates it while we read.
        let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(file) }.with_context(
            || {
                format!(
                    "cannot read {}: not a valid safetensors file (truncated or corrupt?); \
                 download it again",
                    file.display()
                )
            },
        )?;
        for (name, _) in st.tensors() {
            let t = st.load(&name, device).with_context(|| {
                format!(
                    "cannot read tensor `{name}` from {} (truncated or corrupt?)",
                    file.display()
                )
            })?;
            if let Some(previous) = found_in.insert(name.clone(), file_name.clone()) {
                bail!(
                    "tensor `{name}` appears in both {previous} and {file_name} in {}",
                    dir.display()
                );
            }
            tensors.insert(name, t.to_dtype(dtype)?);
        }
    }
    if let Some(index) = index {
        for (name, file) in &index {
            match found_in.get(name) {
                Some(actual) if actual == file => {}
                Some(actual) => bail!(
                    "{INDEX_FILE} in {} says tensor `{name}` is in {file} but it is in {actual}",
                    dir.display()
                ),
                None => bail!(
                    "{INDEX_FILE} in {} lists tensor `{name}` in {file} but that file does not hold it",
                    dir.display()
                ),
            }
        }
    }
    Ok(Weights::new(
        tensors,
        format!("the safetensors of {}", dir.display()),
    ))
}
