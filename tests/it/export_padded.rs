//! The zero-padded merged folder (`export.merged_uniform`): a non-uniform pruned model,
//! adapted, written at the widest widths with a plain config (no `layer_shapes`), reloads
//! through the plain-config path with the adapted model's logits; the padding is zeros
//! where the pruned rows and columns were, and the kept weights are the native export's.

use crate::common::*;
use candle_core::{DType, Device, IndexOp, Tensor};
use rora::adapters::{self, Method, MODULES};
use rora::export::{self, ExportSpec};
use rora::model::{self, DtypeName, LayerShape, ModelSource};

#[test]
fn padded_folder_loads_as_a_plain_llama_with_the_same_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    write_tiny_model(&dir, &NON_UNIFORM_LAYERS, 11);
    let mut loaded = model::load(&ModelSource::Folder(dir), DType::F32, &Device::Cpu).unwrap();
    let attach = attach_spec(Method::Lora, 4, 8.0, 0.0, &MODULES);
    adapters::attach(&mut loaded.model, &attach, 1).unwrap();
    randomize_adapters(&loaded.model, 3);
    let (native, padded) = (tmp.path().join("merged"), tmp.path().join("merged-hf"));
    let spec = ExportSpec {
        merged: Some(native.clone()),
        merged_uniform: Some(padded.clone()),
        gguf: None,
        gguf_dtype: Default::default(),
        adapter: None,
        adapter_gguf: None,
        gguf_base: None,
        dtype: DtypeName::F32,
        max_shard_size: "5GB".into(),
        base_model_name_or_path: None,
        verify: true,
    };
    let report = export::export(&loaded, Some(&attach), &spec).unwrap();
    assert!(report.merged_uniform.unwrap().uniform);
    assert!(report.merged_uniform_verify.is_some());

    // A plain config: the widest widths, no layer_shapes.
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(padded.join("config.json")).unwrap())
            .unwrap();
    assert!(cfg.get("layer_shapes").is_none(), "{cfg}");
    assert_eq!(cfg["num_attention_heads"], 8);
    assert_eq!(cfg["num_key_value_heads"], 4);
    assert_eq!(cfg["intermediate_size"], 96);
    assert_eq!(cfg["architectures"][0], "LlamaForCausalLM");

    let back = model::load(
        &ModelSource::Folder(padded.clone()),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    assert!(back.model.config.layer_shapes.is_none());
    let dense = LayerShape {
        num_attention_heads: 8,
        num_key_value_heads: 4,
        intermediate_size: 96,
    };
    assert!(back.model.layer_shapes.iter().all(|s| *s == dense));
    let ids = ids_tensor(
        &loaded
            .tokenizer
            .encode(
                "Once upon a time, there was a little girl named Lily.",
                true,
            )
            .unwrap(),
    );
    let want = loaded.model.forward(&ids, None, None).unwrap();
    let got = back.model.forward(&ids, None, None).unwrap();
    let rel = max_abs_diff(&got, &want) / max_abs(&want);
    println!("padded folder vs adapted model: max |Δlogit| / max |logit| = {rel:.2e}");
    assert!(rel <= 1e-5, "{rel}");

    // Layer 1 (4 heads, 2 kv groups, 40 channels): the native weights, then zeros.
    let load = |d: &std::path::Path| {
        candle_core::safetensors::load(d.join("model.safetensors"), &Device::Cpu).unwrap()
    };
    let (n, p) = (load(&native), load(&padded));
    let check = |name: &str, kept: (usize, usize), axis: usize| {
        let a = &n[name];
        let b = &p[name];
        let kept_part = b
            .narrow(axis, 0, if axis == 0 { kept.0 } else { kept.1 })
            .unwrap();
        assert_eq!(max_abs_diff(&kept_part, a), 0.0, "{name}");
        let len = b.dim(axis).unwrap() - a.dim(axis).unwrap();
        let pad = b.narrow(axis, a.dim(axis).unwrap(), len).unwrap();
        let zero = Tensor::zeros(pad.dims(), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(max_abs_diff(&pad, &zero), 0.0, "{name} padding");
    };
    let l = "model.layers.1";
    check(&format!("{l}.self_attn.q_proj.weight"), (32, 64), 0);
    check(&format!("{l}.self_attn.k_proj.weight"), (16, 64), 0);
    check(&format!("{l}.self_attn.v_proj.weight"), (16, 64), 0);
    check(&format!("{l}.self_attn.o_proj.weight"), (64, 32), 1);
    check(&format!("{l}.mlp.gate_proj.weight"), (40, 64), 0);
    check(&format!("{l}.mlp.up_proj.weight"), (40, 64), 0);
    check(&format!("{l}.mlp.down_proj.weight"), (64, 40), 1);
    assert_eq!(p[&format!("{l}.mlp.down_proj.weight")].dims(), &[64, 96]);
    assert_eq!(
        p["model.layers.0.self_attn.q_proj.weight"]
            .i((0..64, ..))
            .unwrap()
            .dims(),
        &[64, 64]
    );
}

/// The demo's export in miniature: stories260K pruned by rora's own `prune` (MLP channels
/// and whole key/value groups in layers 1–3), exported by a pipeline as the native folder,
/// the padded folder and a `deci` GGUF in the run folder, each verified on reload.
#[test]
fn a_pruning_pipeline_exports_all_three_forms() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("p.yaml");
    std::fs::write(
        &file,
        format!(
            "name: p\nstages:\n  - load:\n      model: {}\n  - prune:\n      calibration: \
             {}/data/stories260K-train.txt\n      n_samples: 4\n      seq_len: 64\n      \
             mlp_ratio: 0.5\n      head_ratio: 0.25\n      layers: [1, 3]\n  - export:\n      \
             merged: merged\n      merged_uniform: merged-hf\n      gguf: model.gguf\n      \
             gguf_dtype: f32\n      dtype: f32\n",
            stories_dir().display(),
            env!("CARGO_MANIFEST_DIR")
        ),
    )
    .unwrap();
    let run = tmp.path().join("run");
    let out = recover(&[
        "--pipeline",
        file.to_str().unwrap(),
        "--set",
        &format!("run_dir={}", run.display()),
    ]);
    let log = stderr(&out);
    assert!(out.status.success(), "{log}");
    for what in ["merged", "zero-padded merged", "GGUF"] {
        assert!(
            log.contains(&format!("verified: reloaded {what} model matches")),
            "{what}: {log}"
        );
    }
    let gguf = run.join("model.gguf");
    let mut f = std::fs::File::open(&gguf).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
    assert_eq!(
        content.metadata["general.architecture"]
            .to_string()
            .unwrap(),
        "deci"
    );
    let native = model::load(
        &ModelSource::Folder(run.join("merged")),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let from_gguf = model::load(&ModelSource::Gguf(gguf), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(from_gguf.model.layer_shapes, native.model.layer_shapes);
    assert_eq!(native.model.layer_shapes[2].num_key_value_heads, 3);
    assert_eq!(native.model.layer_shapes[2].intermediate_size, 86);
    let padded = model::load(
        &ModelSource::Folder(run.join("merged-hf")),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    assert!(padded.model.config.layer_shapes.is_none());
    let ids = ids_tensor(&native.tokenizer.encode("Once upon a time", true).unwrap());
    let want = native.model.forward(&ids, None, None).unwrap();
    for (name, m) in [("padded", &padded), ("gguf", &from_gguf)] {
        let d = max_abs_diff(&m.model.forward(&ids, None, None).unwrap(), &want);
        assert!(d <= 1e-4, "{name}: {d}");
    }
}
