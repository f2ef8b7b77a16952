//! The adapter as a GGUF for llama.cpp's `--lora`: convert_lora_to_gguf.py's keys and
//! tensor names, and llama.cpp's rule applied to the file (`alpha / r` with `r` the rank of
//! each pair, q/k rows in its order) gives exactly rora's γ·B·A, for RoRA with one rank
//! and with per-module ranks and alphas; DoRA is refused.

use crate::common::*;
use crate::gguf::llama_cpp_permute;
use candle_core::quantized::gguf_file::Content;
use candle_core::{DType, Device, Tensor};
use rora::adapters::{self, AttachSpec, Method};
use rora::export::{self, ExportSpec};
use rora::model::schema::Projection;
use std::path::Path;

fn spec(
    method: Method,
    rank_pattern: &[(&str, usize)],
    alpha_pattern: &[(&str, f64)],
) -> AttachSpec {
    AttachSpec {
        rank_pattern: rank_pattern
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect(),
        alpha_pattern: alpha_pattern
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect(),
        ..attach_spec(
            method,
            4,
            8.0,
            0.0,
            &[
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "up_proj",
                "down_proj",
            ],
        )
    }
}

fn export_spec(path: &Path) -> ExportSpec {
    serde_yaml_ng::from_str(&format!("adapter_gguf: {}\ndtype: f32\n", path.display())).unwrap()
}

/// Reads a tensor of the adapter file as f32.
fn read(content: &Content, file: &Path, name: &str) -> Tensor {
    let mut f = std::fs::File::open(file).unwrap();
    content
        .tensor(&mut f, name, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{name}: {e}"))
        .dequantize(&Device::Cpu)
        .unwrap()
}

#[test]
fn adapter_gguf_applies_as_rora_in_llama_cpps_arithmetic() {
    let cases = [
        (
            "RoRA, one rank",
            spec(Method::Rora, &[], &[]),
            16.0f64,
            0usize,
        ),
        // q_proj rank 2 (γ = 8/√2), down_proj alpha 4 (γ = 4/2): B folded for 5 layers each.
        (
            "RoRA, per-module rank and alpha",
            spec(Method::Rora, &[("q_proj", 2)], &[("down_proj", 4.0)]),
            16.0,
            10,
        ),
        ("LoRA", spec(Method::Lora, &[], &[]), 8.0, 0),
    ];
    for (label, attach, want_alpha, want_folded) in cases {
        let mut loaded = load_stories();
        adapters::attach(&mut loaded.model, &attach, 1).unwrap();
        randomize_adapters(&loaded.model, 2);
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("adapter.gguf");
        let report = export::export(&loaded, Some(&attach), &export_spec(&path)).unwrap();
        let info = report.adapter_gguf.unwrap();
        assert_eq!(info.alpha, want_alpha, "{label}: α·√r for RoRA, α for LoRA");
        assert_eq!(info.folded, want_folded, "{label}");
        assert_eq!(info.pairs, 6 * 5, "{label}");

        let mut f = std::fs::File::open(&path).unwrap();
        let content = Content::read(&mut f).unwrap();
        let md = &content.metadata;
        assert_eq!(md["general.type"].to_string().unwrap(), "adapter");
        assert_eq!(md["general.architecture"].to_string().unwrap(), "llama");
        assert_eq!(md["adapter.type"].to_string().unwrap(), "lora");
        let alpha = md["adapter.lora.alpha"].to_f32().unwrap() as f64;
        assert_eq!(alpha, want_alpha);
        assert_eq!(content.tensor_infos.len(), 2 * 6 * 5);

        for (i, path_in_layer, linear) in loaded.model.projections() {
            let proj = Projection::ALL
                .into_iter()
                .find(|p| p.path() == path_in_layer)
                .unwrap();
            let Some(adapter) = linear.adapter() else {
                assert!(!content
                    .tensor_infos
                    .contains_key(&format!("blk.{i}.{}.weight.lora_a", proj.gguf_part())));
                continue;
            };
            // rora's update, HF row order, then llama.cpp's row order for q and k.
            let lora = adapter.lora().unwrap();
            let mut want =
                (lora.b.as_tensor().matmul(lora.a.as_tensor()).unwrap() * lora.scale).unwrap();
            let n_head = want.dim(0).unwrap() / 8;
            if matches!(proj, Projection::Q | Projection::K) {
                want = llama_cpp_permute(&want, n_head);
            }
            // llama.cpp: scale = alpha / rank, rank = lora_b's ne[0] (its r columns).
            let base = format!("blk.{i}.{}.weight", proj.gguf_part());
            let a = read(&content, &path, &format!("{base}.lora_a"));
            let b = read(&content, &path, &format!("{base}.lora_b"));
            let rank = b.dim(1).unwrap() as f64;
            assert_eq!(a.dim(0).unwrap() as f64, rank);
            let got = (b.matmul(&a).unwrap() * (alpha / rank)).unwrap();
            let scale = max_abs_diff(
                &want,
                &Tensor::zeros(want.dims(), DType::F32, &Device::Cpu).unwrap(),
            );
            let d = max_abs_diff(&got, &want);
            assert!(
                d <= 1e-6 * scale.max(1e-3),
                "{label} {base}: {d} (max {scale})"
            );
        }
    }
}

#[test]
fn dora_is_refused_with_a_reason() {
    let mut loaded = load_stories();
    let attach = spec(Method::Dora, &[], &[]);
    adapters::attach(&mut loaded.model, &attach, 1).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("adapter.gguf");
    let msg = format!(
        "{:#}",
        export::export(&loaded, Some(&attach), &export_spec(&path)).unwrap_err()
    );
    assert!(
        msg.contains("holds a DoRA adapter") && msg.contains("no LoRA adapter"),
        "{msg}"
    );
    assert!(msg.contains("gguf:"), "{msg}");
    assert!(!path.exists());
}

/// `gguf_base` (the model without its adapters) plus the adapter file, combined by
/// llama.cpp's rule `W + (alpha / r)·B·A` tensor by tensor, is the merged `gguf` export;
/// and the base alone reloads to the unadapted model's logits.
#[test]
fn base_gguf_plus_adapter_gguf_is_the_merged_gguf() {
    let mut loaded = load_stories();
    let attach = spec(Method::Rora, &[("v_proj", 2)], &[]);
    adapters::attach(&mut loaded.model, &attach, 1).unwrap();
    randomize_adapters(&loaded.model, 4);
    let tmp = tempfile::tempdir().unwrap();
    let (base, adapter, merged) = (
        tmp.path().join("base.gguf"),
        tmp.path().join("adapter.gguf"),
        tmp.path().join("merged.gguf"),
    );
    let spec: ExportSpec = serde_yaml_ng::from_str(&format!(
        "gguf: {}\ngguf_base: {}\nadapter_gguf: {}\ngguf_dtype: f32\n",
        merged.display(),
        base.display(),
        adapter.display()
    ))
    .unwrap();
    export::export(&loaded, Some(&attach), &spec).unwrap();
    let open = |p: &Path| Content::read(&mut std::fs::File::open(p).unwrap()).unwrap();
    let (cb, ca, cm) = (open(&base), open(&adapter), open(&merged));
    let alpha = ca.metadata["adapter.lora.alpha"].to_f32().unwrap() as f64;
    let mut checked = 0;
    for name in cm.tensor_infos.keys() {
        let w_base = read(&cb, &base, name);
        let w_merged = read(&cm, &merged, name);
        let want = if ca.tensor_infos.contains_key(&format!("{name}.lora_a")) {
            let a = read(&ca, &adapter, &format!("{name}.lora_a"));
            let b = read(&ca, &adapter, &format!("{name}.lora_b"));
            let rank = b.dim(1).unwrap() as f64;
            checked += 1;
            (w_base + (b.matmul(&a).unwrap() * (alpha / rank)).unwrap()).unwrap()
        } else {
            w_base
        };
        let d = max_abs_diff(&want, &w_merged);
        assert!(d <= 1e-6, "{name}: {d}");
    }
    assert_eq!(checked, 6 * 5);
    let plain = load_stories();
    let ids = ids_tensor(&plain.tokenizer.encode("Once upon a time", true).unwrap());
    let back = rora::model::load(
        &rora::model::ModelSource::Gguf(base.clone()),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let d = max_abs_diff(
        &back.model.forward(&ids, None, None).unwrap(),
        &plain.model.forward(&ids, None, None).unwrap(),
    );
    assert!(d <= 1e-5, "{d}");
}
