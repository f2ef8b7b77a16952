//! The model: where it comes from (folder, GGUF, hub), its config and per-layer shapes,
//! its tokenizer, and our own LLaMA forward pass.

pub mod attention;
pub mod backprop;
pub mod config;
pub mod dtype;
pub mod gguf;
pub mod hub;
pub mod kv_cache;
pub mod llama;
pub mod loss;
pub mod mlp;
pub mod norm;
pub mod random;
pub mod rope;
pub mod safetensors_dir;
pub mod schema;
pub mod shapes;
pub mod tokenizer;
pub mod weights;

pub use config::{LayerShape, LlamaConfig};
pub use dtype::{dtype_name, DtypeName};
pub use kv_cache::KvCache;
pub use llama::Llama;
pub use tokenizer::TextTokenizer;
pub use weights::Weights;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use std::fmt;
use std::path::{Path, PathBuf};

/// Where a model comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum ModelSource {
    /// A Hugging Face folder (config.json, safetensors, tokenizer.json).
    Folder(PathBuf),
    /// A llama.cpp GGUF file.
    Gguf(PathBuf),
    /// `hf:org/name[@revision]`.
    Hub { repo: String, revision: String },
}

impl ModelSource {
    /// Parses a source string and checks that a local one exists.
    pub fn parse(spec: &str) -> Result<Self> {
        if let Some(id) = spec.strip_prefix("hf:") {
            let (repo, revision) = hub::parse_repo_id(id)?;
            return Ok(Self::Hub { repo, revision });
        }
        let path = PathBuf::from(spec);
        if path.is_dir() {
            return Ok(Self::Folder(path));
        }
        if path.is_file() {
            if path
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
            {
                return Ok(Self::Gguf(path));
            }
            bail!(
                "model source {spec} is a file but not a .gguf; give a Hugging Face folder, a \
                 .gguf file or hf:org/name"
            );
        }
        bail!(
            "model source {spec} does not exist; give a Hugging Face folder (config.json + \
             safetensors + tokenizer.json), a .gguf file, or hf:org/name for the hub cache"
        )
    }

    /// The folder holding config.json and the weights (resolving the hub cache).
    fn folder(&self) -> Result<Option<PathBuf>> {
        Ok(match self {
            Self::Folder(dir) => Some(dir.clone()),
            Self::Gguf(_) => None,
            Self::Hub { repo, revision } => Some(hub::snapshot_dir(repo, revision)?),
        })
    }
}

impl fmt::Display for ModelSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Folder(p) | Self::Gguf(p) => write!(f, "{}", p.display()),
            Self::Hub { repo, revision } => write!(f, "hf:{repo}@{revision}"),
        }
    }
}

/// A model ready to run: the network, its tokenizer and where it came from.
pub struct LoadedModel {
    pub model: Llama,
    pub tokenizer: TextTokenizer,
    pub source: ModelSource,
    /// The local folder of a folder or hub source (export copies tokenizer files from it).
    pub folder: Option<PathBuf>,
}

/// Loads weights, config and tokenizer from any source into `dtype` on `device`.
pub fn load(source: &ModelSource, dtype: DType, device: &Device) -> Result<LoadedModel> {
    let folder = source.folder()?;
    let (config, weights, tokenizer) = match (source, &folder) {
        (ModelSource::Gguf(path), _) => gguf::load(path, dtype, device)?,
        (_, Some(dir)) => {
            let config = safetensors_dir::read_config(dir)?;
            let weights = safetensors_dir::read_weights(dir, dtype, device)?;
            let tok_path = dir.join("tokenizer.json");
            if !tok_path.is_file() {
                bail!(
                    "{} has no tokenizer.json; copy the model's tokenizer.json there",
                    dir.display()
                );
            }
            let tokenizer =
                TextTokenizer::from_file(&tok_path, config.bos_token_id(), config.eos_token_ids())?;
            let add_bos = folder_add_bos(dir, &tokenizer)?;
            (config, weights, tokenizer.with_add_bos(add_bos))
        }
        (_, None) => unreachable!("only GGUF sources have no folder"),
    };
    let model =
        Llama::from_weights(config, &weights).with_context(|| format!("loading model {source}"))?;
    Ok(LoadedModel {
        model,
        tokenizer,
        source: source.clone(),
        folder,
    })
}

/// Whether the folder's tokenizer puts BOS first, as `transformers` decides it:
/// `add_bos_token` in `tokenizer_config.json`; without that key, what `tokenizer.json`'s
/// post-processor does; without a post-processor, yes (rora's default, and a Llama
/// tokenizer's).
fn folder_add_bos(dir: &Path, tokenizer: &TextTokenizer) -> Result<bool> {
    let path = dir.join("tokenizer_config.json");
    if path.is_file() {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
        match json.get("add_bos_token") {
            None | Some(serde_json::Value::Null) => {}
            Some(serde_json::Value::Bool(b)) => return Ok(*b),
            Some(other) => bail!(
                "{}: `add_bos_token` should be true or false, found {other}",
                path.display()
            ),
        }
    }
    let Some(bos) = tokenizer.bos_id() else {
        return Ok(false);
    };
    Ok(tokenizer.post_processor_adds(bos)?.unwrap_or(true))
}

/// Reads only a config: a `config.json` path, a model folder, a GGUF header, or a hub id
/// (from the cache). Used for reference (dense) configs and dry runs.
pub fn read_config_only(spec: &str) -> Result<LlamaConfig> {
    if let Some(id) = spec.strip_prefix("hf:") {
        let (repo, revision) = hub::parse_repo_id(id)?;
        let path = hub::cached_file(&repo, &revision, "config.json")?;
        return LlamaConfig::from_file(&path);
    }
    let path = Path::new(spec);
    if path.is_dir() {
        return safetensors_dir::read_config(path);
    }
    if path.is_file() {
        if path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
        {
            return gguf::read_config(path);
        }
        return LlamaConfig::from_file(path);
    }
    bail!(
        "config {spec} does not exist; give a config.json, a model folder, a .gguf or hf:org/name"
    )
}
