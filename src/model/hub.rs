//! `hf:org/name[@revision]`: a model in the Hugging Face hub, found in the local hub
//! cache (the layout `huggingface-cli download` and hf-hub write:
//! `models--org--name/{refs,snapshots,blobs}`), downloaded through hf-hub when missing
//! and the network allows.

use super::safetensors_dir::{INDEX_FILE, SINGLE_FILE};
use anyhow::{anyhow, bail, Context, Result};
use hf_hub::{Cache, Repo, RepoType};
use std::path::{Path, PathBuf};

/// The hub cache folder: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
/// `~/.cache/huggingface/hub` — the same order as `huggingface_hub`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("HF_HUB_CACHE").filter(|v| !v.is_empty()) {
        return PathBuf::from(dir);
    }
    if let Some(home) = std::env::var_os("HF_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(home).join("hub");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    home.join(".cache").join("huggingface").join("hub")
}

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| matches!(v.as_str(), "1" | "true" | "ON" | "YES"))
}

/// Splits `org/name@rev` into the repo id and its revision (default `main`).
pub fn parse_repo_id(spec: &str) -> Result<(String, String)> {
    let (repo, revision) = match spec.split_once('@') {
        Some((r, rev)) => (r, rev),
        None => (spec, "main"),
    };
    let valid = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    match repo.split_once('/') {
        Some((org, name)) if valid(org) && valid(name) && !revision.is_empty() => {
            Ok((repo.to_string(), revision.to_string()))
        }
        _ => bail!(
            "`hf:{spec}` is not a hub model id; write it as hf:org/name or hf:org/name@revision"
        ),
    }
}

/// The local snapshot folder of `repo@revision` holding config.json, the weights and
/// tokenizer.json, downloading what the cache lacks unless offline.
pub fn snapshot_dir(repo: &str, revision: &str) -> Result<PathBuf> {
    let cache_root = cache_dir();
    if let Some(dir) = cached_snapshot(&cache_root, repo, revision) {
        return Ok(dir);
    }
    let how = format!(
        "on a machine with internet run `huggingface-cli download {repo} --revision {revision}` and \
         copy its cache folder `models--{}` into {}, or set HF_HUB_CACHE to a cache that holds it",
        repo.replace('/', "--"),
        cache_root.display()
    );
    if offline() {
        bail!(
            "model hf:{repo}@{revision} is not in the Hugging Face cache at {} and HF_HUB_OFFLINE \
             is set; {how}",
            cache_root.display()
        );
    }
    download(&cache_root, repo, revision).map_err(|e| {
        anyhow!(
            "model hf:{repo}@{revision} is not in the Hugging Face cache at {} and downloading it \
             failed ({e:#}); {how}",
            cache_root.display()
        )
    })
}

/// The snapshot folder if the cache holds a complete model (config, weights, tokenizer).
fn cached_snapshot(cache_root: &Path, repo: &str, revision: &str) -> Option<PathBuf> {
    let cache_repo = Cache::new(cache_root.to_path_buf()).repo(Repo::with_revision(
        repo.to_string(),
        RepoType::Model,
        revision.to_string(),
    ));
    let config = cache_repo.get("config.json").or_else(|| {
        // A full commit hash has no refs/ entry: its snapshot folder is named after it.
        let by_hash = cache_root
            .join(format!("models--{}", repo.replace('/', "--")))
            .join("snapshots")
            .join(revision)
            .join("config.json");
        by_hash.is_file().then_some(by_hash)
    })?;
    let dir = config.parent()?.to_path_buf();
    let has_weights = dir.join(SINGLE_FILE).is_file() || dir.join(INDEX_FILE).is_file();
    (has_weights && dir.join("tokenizer.json").is_file()).then_some(dir)
}

fn download(cache_root: &Path, repo: &str, revision: &str) -> Result<PathBuf> {
    let api = hf_hub::api::sync::ApiBuilder::new()
        .with_cache_dir(cache_root.to_path_buf())
        .with_retries(1)
        .build()?;
    let api_repo = api.repo(Repo::with_revision(
        repo.to_string(),
        RepoType::Model,
        revision.to_string(),
    ));
    let config = api_repo.get("config.json")?;
    api_repo.get("tokenizer.json")?;
    match api_repo.get(INDEX_FILE) {
        Ok(index_path) => {
            let text = std::fs::read_to_string(&index_path)?;
            let index: serde_json::Value = serde_json::from_str(&text)?;
            let shards: std::collections::BTreeSet<String> = index["weight_map"]
                .as_object()
                .context("index has no weight_map")?
                .values()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect();
            for shard in shards {
                api_repo.get(&shard)?;
            }
        }
        Err(_) => {
            api_repo.get(SINGLE_FILE)?;
        }
    }
    config
        .parent()
        .map(Path::to_path_buf)
        .context("downloaded config.json has no parent folder")
}

/// One file of `repo@revision` from the cache only (no download): for reading a
/// reference config without the weights.
pub fn cached_file(repo: &str, revision: &str, file: &str) -> Result<PathBuf> {
    let cache_root = cache_dir();
    let cache_repo = Cache::new(cache_root.clone()).repo(Repo::with_revision(
        repo.to_string(),
        RepoType::Model,
        revision.to_string(),
    ));
    cache_repo.get(file).ok_or_else(|| {
        anyhow!(
            "{file} of hf:{repo}@{revision} is not in the Hugging Face cache at {}; run \
             `huggingface-cli download {repo} {file}` on a machine with internet and copy the \
             cache, or give a local path instead",
            cache_root.display()
        )
    })
}
