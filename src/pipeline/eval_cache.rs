//! `eval.cache`: an evaluation is a pure function of the model's weights, the eval
//! settings, the seed and the code, so one already run is read back instead of run again.
//! The demo evaluates the same dense model on 1,500 questions on every run (8 minutes on
//! 2 cores); with the cache only the first run pays for it.
//!
//! The key is xxh3-128 over rora's version, the settings (label and cache folder left
//! out: they do not change a number), the precision the products ran at, the seed, the
//! resolved BOS, the tokenizer, the model config and every tensor — embeddings, norms,
//! head, each projection's weight and its adapter's tensors and scale — bit for bit. An
//! entry is `<key>.json` (the report) and `<key>.jsonl` (its question records), written
//! atomically.

use crate::eval::{EvalReport, EvalRun, EvalSpec, QuestionRecord};
use crate::fsx;
use crate::model::{Llama, TextTokenizer};
use crate::nn::frozen::MatmulPrecision;
use anyhow::{Context, Result};
use candle_core::{DType, Tensor};
use std::path::{Path, PathBuf};
use xxhash_rust::xxh3::Xxh3;

/// The cache key of evaluating `model` with `spec` and `seed`, as 32 hex digits.
pub fn key(spec: &EvalSpec, model: &Llama, tok: &TextTokenizer, seed: u64) -> Result<String> {
    let mut h = Xxh3::new();
    let mut field = |bytes: &[u8]| {
        h.update(&(bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    field(env!("CARGO_PKG_VERSION").as_bytes());
    let mut settings = spec.clone();
    settings.label = String::new();
    settings.cache = None;
    // What ran, not what was asked (bf16 falls back to f32 without a bf16 kernel); f32
    // adds nothing, so the keys of earlier f32 evaluations still match.
    settings.matmul_precision = MatmulPrecision::F32;
    field(serde_json::to_string(&settings)?.as_bytes());
    if !model.matmul_precision().is_f32() {
        field(format!("matmul_precision {}", model.matmul_precision()).as_bytes());
    }
    field(&seed.to_le_bytes());
    field(&[spec.bos_for(tok) as u8]);
    field(
        tok.inner()
            .to_string(false)
            .map_err(|e| anyhow::anyhow!("eval.cache: cannot serialise the tokenizer: {e}"))?
            .as_bytes(),
    );
    field(serde_json::to_string(&model.config)?.as_bytes());
    let mut tensors: Vec<(String, &Tensor)> = vec![
        ("embed".into(), &model.embed_tokens),
        ("norm".into(), model.norm.weight()),
    ];
    if let Some(head) = &model.lm_head {
        tensors.push(("head".into(), head));
    }
    for (i, layer) in model.layers.iter().enumerate() {
        tensors.push((format!("{i}.input_norm"), layer.input_layernorm.weight()));
        tensors.push((
            format!("{i}.post_norm"),
            layer.post_attention_layernorm.weight(),
        ));
    }
    for (i, name, linear) in model.projections() {
        tensors.push((format!("{i}.{name}"), linear.weight()));
        if let Some(adapter) = linear.adapter() {
            field(format!("{i}.{name} {}", adapter.settings()).as_bytes());
            for (suffix, var) in adapter.vars() {
                tensors.push((format!("{i}.{name}.{suffix}"), var.as_tensor()));
            }
        }
    }
    let prefix_rows = model.prefix.as_ref().map(|p| p.rows()).transpose()?;
    if let Some(rows) = &prefix_rows {
        tensors.push(("prefix".into(), rows));
    }
    for (name, t) in tensors {
        field(name.as_bytes());
        field(format!("{:?} {:?}", t.dtype(), t.dims()).as_bytes());
        let flat = t.flatten_all()?;
        // f32 bits for every float dtype (exact for f16/bf16 too), so one reader serves all.
        let values = flat.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let bytes: Vec<u8> = values
            .iter()
            .flat_map(|v| v.to_bits().to_le_bytes())
            .collect();
        field(&bytes);
    }
    Ok(format!("{:032x}", h.digest128()))
}

fn paths(dir: &Path, key: &str) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{key}.json")),
        dir.join(format!("{key}.jsonl")),
    )
}

/// The cached evaluation under `key`, relabelled `label` and marked cached; none when the
/// folder has no complete entry.
pub fn read(dir: &Path, key: &str, label: &str) -> Result<Option<EvalRun>> {
    let (json, jsonl) = paths(dir, key);
    if !(json.is_file() && jsonl.is_file()) {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&json)?;
    let mut report: EvalReport = serde_json::from_str(&text).with_context(|| {
        format!(
            "eval.cache: {} is not an eval report; delete it",
            json.display()
        )
    })?;
    let records = std::fs::read_to_string(&jsonl)?
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(serde_json::from_str::<QuestionRecord>)
        .collect::<serde_json::Result<Vec<_>>>()
        .with_context(|| format!("eval.cache: {} is damaged; delete it", jsonl.display()))?;
    report.label = label.to_string();
    report.cached = true;
    Ok(Some(EvalRun { report, records }))
}

/// Stores `run` under `key` (records first: an entry counts once its report exists).
pub fn write(dir: &Path, key: &str, run: &EvalRun) -> Result<()> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("eval.cache: cannot create {}", dir.display()))?;
    let (json, jsonl) = paths(dir, key);
    fsx::atomic_write(&jsonl, run.records_jsonl()?.as_bytes())?;
    fsx::write_json(&json, &run.report)
}
