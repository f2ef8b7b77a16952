//! The adapter alone as a GGUF file for llama.cpp's `--lora`, in the layout
//! `convert_lora_to_gguf.py` writes: `general.type = adapter`, `adapter.type = lora`,
//! `adapter.lora.alpha`, the base model's `general.architecture`, and per adapted
//! projection `blk.N.<tensor>.weight.lora_a` (A, r × in) and `.lora_b` (B, out × r), f32,
//! with q/k rows of B in llama.cpp's interleaved order (the permutation acts on output
//! rows, so it moves B's rows and leaves A alone).
//!
//! Scaling. llama.cpp scales every pair by `alpha / r`, with one `alpha` for the file and
//! `r` the pair's own rank (and by 1 when alpha is 0). rora's scaling γ is `alpha / r`
//! (LoRA) or `alpha / sqrt(r)` (RoRA, rsLoRA), possibly different per module. The file's
//! alpha is the γ·r most adapted projections share — LoRA's own alpha, RoRA's
//! `alpha · sqrt(r)` — so that llama.cpp's `alpha / r` is γ there; a projection whose
//! γ·r differs (other rank or alpha by `rank_pattern` / `alpha_pattern`) has
//! `γ·r / alpha` folded into its B, which keeps the product exact. The alpha written here
//! already holds RoRA's sqrt(r), so the file does not depend on whether a converter
//! honours PEFT's `use_rslora`; llama.cpp's own rule (`alpha / r`) is all it assumes.
//!
//! DoRA cannot be expressed: its output is rescaled row by row by `m / ‖W + γBA‖`, which
//! depends on W and is no low-rank update; it is refused rather than written wrong (the
//! merged GGUF holds a DoRA model exactly).

use super::gguf::{architecture, model_name};
use crate::fsx;
use crate::model::gguf::permute_qk;
use crate::model::schema::Projection;
use crate::model::LoadedModel;
use crate::nn::adapter::Adapter;
use crate::nn::lora::LoraAdapter;
use anyhow::{anyhow, bail, Result};
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use serde::Serialize;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize)]
pub struct AdapterGgufExport {
    pub path: PathBuf,
    pub architecture: String,
    /// `adapter.lora.alpha`.
    pub alpha: f64,
    /// Adapted projections (each a lora_a / lora_b pair).
    pub pairs: usize,
    /// Projections whose scaling was folded into B (see the module notes).
    pub folded: usize,
}

/// Writes the model's LoRA/RoRA adapters to `path` (through a temporary file beside it).
pub fn write_adapter_gguf(loaded: &LoadedModel, path: &Path) -> Result<AdapterGgufExport> {
    let m = &loaded.model;
    let head_dim = m.config.head_dim();
    if m.prefix.is_some() {
        bail!(
            "export.adapter_gguf: llama.cpp's --lora adapters are LoRA pairs; a prefix-tuning \
             adapter is none (export it with `adapter: DIR`, PEFT's PREFIX_TUNING format)"
        );
    }
    let mut pairs = Vec::new();
    for (i, path_in_layer, linear) in m.projections() {
        let Some(adapter) = linear.adapter() else {
            continue;
        };
        let proj = Projection::ALL
            .into_iter()
            .find(|p| p.path() == path_in_layer)
            .ok_or_else(|| anyhow!("unknown projection {path_in_layer}"))?;
        if let Adapter::Dora(_) = adapter {
            bail!(
                "layer {i} {} holds a DoRA adapter: its magnitude rescales each output row by \
                 m / ‖W + γBA‖, which no LoRA adapter (llama.cpp's --lora) can express; export \
                 the merged model (`gguf:`) instead, which holds it exactly",
                proj.module()
            );
        }
        let Some(lora) = adapter.lora() else {
            bail!(
                "layer {i} {} holds a bottleneck adapter, which is nonlinear: llama.cpp's --lora \
                 cannot express it; export it with `adapter: DIR` (LLM-Adapters' format)",
                proj.module()
            );
        };
        pairs.push((i, proj, lora));
    }
    let gamma_r = |l: &LoraAdapter| l.scale * l.a.dim(0).unwrap_or(0) as f64;
    // The file's alpha: the γ·r most projections share, so the fewest need folding.
    let mut counts: Vec<(f64, usize)> = Vec::new();
    for (_, _, l) in &pairs {
        match counts.iter_mut().find(|(v, _)| *v == gamma_r(l)) {
            Some(c) => c.1 += 1,
            None => counts.push((gamma_r(l), 1)),
        }
    }
    let Some(&(alpha, _)) = counts.iter().max_by_key(|(_, n)| *n) else {
        bail!(
            "export.adapter_gguf: the model has no adapters; put an `attach` stage before `export`"
        );
    };
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut folded = 0;
    for (i, proj, lora) in pairs {
        let a = lora.a.as_tensor().to_dtype(DType::F32)?;
        let b = lora.b.as_tensor().to_dtype(DType::F32)?;
        let factor = gamma_r(lora) / alpha;
        let b = if factor == 1.0 {
            b
        } else {
            folded += 1;
            (b * factor)?
        };
        let b = match proj {
            Projection::Q | Projection::K => permute_qk(&b, head_dim)?,
            _ => b,
        };
        let base = proj.gguf_name(i);
        for (suffix, t) in [("lora_a", a), ("lora_b", b)] {
            let t = fresh_cpu(&t)?;
            tensors.push((
                format!("{base}.{suffix}"),
                QTensor::quantize(&t, GgmlDType::F32)?,
            ));
        }
    }
    let arch = architecture(&m.layer_shapes);
    let metadata: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String(arch.into())),
        ("general.type", Value::String("adapter".into())),
        (
            "general.name",
            Value::String(format!("{} adapter", model_name(&loaded.source))),
        ),
        ("adapter.type", Value::String("lora".into())),
        ("adapter.lora.alpha", Value::F32(alpha as f32)),
    ];
    let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, q)| (n.as_str(), q)).collect();
    fsx::atomic_write_with(path, |w| {
        gguf_file::write(w, &md, &ts).map_err(|e| anyhow!("writing {}: {e}", path.display()))
    })?;
    Ok(AdapterGgufExport {
        path: path.to_path_buf(),
        architecture: arch.into(),
        alpha,
        pairs: tensors.len() / 2,
        folded,
    })
}

/// A contiguous f32 copy on the CPU with storage of its own (`QTensor::quantize` reads a
/// view's whole storage).
pub(super) fn fresh_cpu(t: &Tensor) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let v: Vec<f32> = t
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1()?;
    Ok(Tensor::from_vec(v, dims, &Device::Cpu)?)
}
