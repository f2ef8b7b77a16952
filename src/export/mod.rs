//! The `export` stage: the merged model as a Hugging Face folder and as a GGUF file for
//! llama.cpp, the adapter alone in PEFT's format, and a check that each merged model, as
//! reloaded, computes what the adapted model did.

pub mod gguf;
pub mod gguf_adapter;
pub mod gguf_tokenizer;
pub mod merged;
pub mod padded;

pub use gguf::{GgufDtype, GgufExport};
pub use merged::Layout;

use crate::adapters::{peft, AttachSpec};
use crate::model::{self, DtypeName, LoadedModel, ModelSource};
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportSpec {
    /// Folder for the merged Hugging Face model (relative: inside the run folder).
    #[serde(default)]
    pub merged: Option<PathBuf>,
    /// Folder for the merged model with every layer zero-padded to the widest widths, which
    /// stock `transformers` loads (relative: inside the run folder). Same function, no size
    /// savings.
    #[serde(default)]
    pub merged_uniform: Option<PathBuf>,
    /// GGUF file for llama.cpp, the merged model (relative: inside the run folder).
    #[serde(default)]
    pub gguf: Option<PathBuf>,
    /// Weight type of the GGUF file: f32, f16 (default), bf16 or q8_0.
    #[serde(default)]
    pub gguf_dtype: GgufDtype,
    /// The model without its adapters as a GGUF file (in `gguf_dtype`): the base that
    /// `adapter_gguf` applies to with llama.cpp's `--lora`, pruned like the model.
    #[serde(default)]
    pub gguf_base: Option<PathBuf>,
    /// The adapter alone as a GGUF file for llama.cpp's `--lora` (relative: inside the run
    /// folder). LoRA and RoRA; DoRA is refused.
    #[serde(default)]
    pub adapter_gguf: Option<PathBuf>,
    /// Folder for the adapter alone (PEFT format; relative: inside the run folder).
    #[serde(default)]
    pub adapter: Option<PathBuf>,
    /// dtype of the merged weights (merging itself is done in f32).
    #[serde(default = "default_dtype")]
    pub dtype: DtypeName,
    /// Shard the safetensors above this size (`5GB`, `500MB`, bytes).
    #[serde(default = "default_shard")]
    pub max_shard_size: String,
    /// Written into adapter_config.json; default: the loaded model's source.
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// Reload the merged folder and compare its logits with the adapted model's.
    #[serde(default = "yes")]
    pub verify: bool,
}

fn default_dtype() -> DtypeName {
    DtypeName::Bf16
}
fn default_shard() -> String {
    "5GB".into()
}
fn yes() -> bool {
    true
}

impl ExportSpec {
    /// The requested outputs that hold merged weights (`adapter_gguf`, LoRA pairs, checks
    /// the adapters itself; `gguf_base` holds none).
    pub fn merging_outputs(&self) -> Vec<&'static str> {
        [
            (&self.merged, "merged"),
            (&self.merged_uniform, "merged_uniform"),
            (&self.gguf, "gguf"),
        ]
        .into_iter()
        .filter(|(p, _)| p.is_some())
        .map(|(_, k)| k)
        .collect()
    }

    pub fn validate(&self) -> Result<()> {
        let outputs = [
            &self.merged,
            &self.merged_uniform,
            &self.gguf,
            &self.adapter,
            &self.adapter_gguf,
            &self.gguf_base,
        ];
        if outputs.iter().all(|o| o.is_none()) {
            bail!(
                "export needs at least one of `merged: DIR`, `merged_uniform: DIR`, \
                 `gguf: FILE`, `adapter: DIR`, `adapter_gguf: FILE`, `gguf_base: FILE`"
            );
        }
        merged::parse_size(&self.max_shard_size)?;
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ExportReport {
    pub merged: Option<merged::MergedExport>,
    pub adapter: Option<PathBuf>,
    /// Max |logit difference| between the reloaded merged model and the adapted model.
    pub verify_max_abs_diff: Option<f64>,
    pub verify_tolerance: Option<f64>,
    /// The zero-padded folder stock `transformers` loads.
    pub merged_uniform: Option<merged::MergedExport>,
    pub merged_uniform_verify: Option<Verified>,
    pub gguf: Option<GgufExport>,
    pub gguf_verify: Option<Verified>,
    pub adapter_gguf: Option<gguf_adapter::AdapterGgufExport>,
    pub gguf_base: Option<GgufExport>,
    pub warnings: Vec<String>,
}

/// How closely a reloaded export reproduces the adapted model's logits.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Verified {
    pub max_abs_diff: f64,
    pub tolerance: f64,
}

/// Allowed max |Δlogit| relative to max(1, max |logit|): the rounding of the export
/// dtype (bf16 keeps 8 bits of mantissa, f16 11) accumulated over the layers.
pub fn verify_tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::BF16 => 5e-2,
        DType::F16 => 1e-2,
        _ => 1e-4,
    }
}

/// Reloads `exported` and checks its logits against the adapted model's within
/// `relative` × max(1, max |logit|); an error names `what` and the format `format`.
fn verify(
    loaded: &LoadedModel,
    exported: &ModelSource,
    relative: f64,
    what: &str,
    format: &str,
) -> Result<Verified> {
    let (diff, scale) = compare_logits(loaded, exported)?;
    let tolerance = relative * scale.max(1.0);
    if diff.is_nan() || diff > tolerance {
        bail!(
            "the {what} {exported} differs from the adapted model by {diff:.3e} in the logits \
             (tolerance {tolerance:.3e} for {format}); the export is wrong, please report it"
        );
    }
    Ok(Verified {
        max_abs_diff: diff,
        tolerance,
    })
}

/// Runs the export for a loaded (possibly adapted) model. `attach` describes the
/// adapters when there are any.
pub fn export(
    loaded: &LoadedModel,
    attach: Option<&AttachSpec>,
    spec: &ExportSpec,
) -> Result<ExportReport> {
    spec.validate()?;
    for key in spec.merging_outputs() {
        crate::adapters::merge::ensure_mergeable(&loaded.model, &format!("export.{key}"))?;
    }
    let mut report = ExportReport {
        merged: None,
        adapter: None,
        verify_max_abs_diff: None,
        verify_tolerance: None,
        merged_uniform: None,
        merged_uniform_verify: None,
        gguf: None,
        gguf_verify: None,
        adapter_gguf: None,
        gguf_base: None,
        warnings: Vec::new(),
    };
    if let Some(dir) = &spec.adapter {
        let Some(attach) = attach else {
            bail!(
                "export.adapter: the model has no adapters; put an `attach` stage before `export`"
            );
        };
        let base = spec
            .base_model_name_or_path
            .clone()
            .unwrap_or_else(|| loaded.source.to_string());
        peft::write_adapter(&loaded.model, attach, Some(base), dir)?;
        report.adapter = Some(dir.clone());
    }
    if let Some(path) = &spec.adapter_gguf {
        report.adapter_gguf = Some(gguf_adapter::write_adapter_gguf(loaded, path)?);
    }
    let dtype = spec.dtype.dtype();
    let shard = merged::parse_size(&spec.max_shard_size)?;
    if let Some(dir) = &spec.merged {
        let info = merged::write_merged(loaded, dir, dtype, shard, Layout::Native)?;
        if !info.uniform {
            report.warnings.push(format!(
                "{} has a different width per layer (rora's `layer_shapes` in config.json): rora loads it, \
                 stock transformers cannot (`merged_uniform:` writes a zero-padded folder it loads)",
                dir.display()
            ));
        }
        report.merged = Some(info);
        if spec.verify {
            let source = ModelSource::Folder(dir.clone());
            let v = verify(
                loaded,
                &source,
                verify_tolerance(dtype),
                "merged model",
                model::dtype_name(dtype),
            )?;
            report.verify_max_abs_diff = Some(v.max_abs_diff);
            report.verify_tolerance = Some(v.tolerance);
        }
    }
    if let Some(dir) = &spec.merged_uniform {
        let info = merged::write_merged(loaded, dir, dtype, shard, Layout::Padded)?;
        report.merged_uniform = Some(info);
        if spec.verify {
            let source = ModelSource::Folder(dir.clone());
            report.merged_uniform_verify = Some(verify(
                loaded,
                &source,
                verify_tolerance(dtype),
                "zero-padded merged model",
                model::dtype_name(dtype),
            )?);
        }
    }
    if let Some(path) = &spec.gguf {
        let merged = gguf::Weights::Merged;
        report.gguf = Some(gguf::write_gguf(loaded, path, spec.gguf_dtype, merged)?);
        if spec.verify {
            let source = ModelSource::Gguf(path.clone());
            let (tolerance, name) = (spec.gguf_dtype.tolerance(), spec.gguf_dtype.name());
            report.gguf_verify = Some(verify(loaded, &source, tolerance, "GGUF model", name)?);
        }
    }
    if let Some(path) = &spec.gguf_base {
        let base = gguf::Weights::Base;
        report.gguf_base = Some(gguf::write_gguf(loaded, path, spec.gguf_dtype, base)?);
    }
    Ok(report)
}

/// Max |logit difference| on a fixed text between the adapted model and the exported
/// model reloaded from `exported`, and max |logit| of the adapted model. The export runs
/// in the adapted model's dtype, so the difference measures the export (merge and
/// rounding to the export dtype), not a change of compute precision.
pub fn compare_logits(loaded: &LoadedModel, exported: &ModelSource) -> Result<(f64, f64)> {
    let text =
        "The quick brown fox jumps over the lazy dog. Once upon a time, a little girl found a key.";
    let mut ids = loaded.tokenizer.encode(text, true)?;
    ids.truncate(48);
    let device = loaded.model.device();
    let input = Tensor::new(ids.as_slice(), device)?.unsqueeze(0)?;
    let adapted = loaded
        .model
        .forward(&input, None, None)?
        .to_dtype(DType::F32)?;
    let reloaded = model::load(exported, loaded.model.dtype(), device)?;
    let merged = reloaded
        .model
        .forward(&input, None, None)?
        .to_dtype(DType::F32)?;
    let diff = (&adapted - &merged)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()? as f64;
    let scale = adapted.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()? as f64;
    Ok((diff, scale))
}
