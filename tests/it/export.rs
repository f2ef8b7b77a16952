//! Export: merged folders that reload to the same logits, PEFT adapters that round-trip
//! and look like PEFT's, sharding, and exports that never leave half a folder.

use crate::common::*;
use candle_core::{DType, Device, Tensor};
use rora::adapters::{self, peft, AttachSpec, Method};
use rora::export::{self, ExportSpec};
use rora::model::DtypeName;
use rora::model::{self, LoadedModel, ModelSource};
use std::path::Path;

fn adapted_stories(method: Method, targets: &[&str]) -> (LoadedModel, AttachSpec) {
    let mut loaded = load_stories();
    let spec = attach_spec(method, 8, 16.0, 0.05, targets);
    adapters::attach(&mut loaded.model, &spec, 1).unwrap();
    randomize_adapters(&loaded.model, 2);
    (loaded, spec)
}

fn prompt_ids(loaded: &LoadedModel) -> Tensor {
    ids_tensor(
        &loaded
            .tokenizer
            .encode("Once upon a time, there was a little girl named Lily", true)
            .unwrap(),
    )
}

fn export_spec(
    merged: Option<&Path>,
    adapter: Option<&Path>,
    dtype: DtypeName,
    shard: &str,
) -> ExportSpec {
    ExportSpec {
        merged: merged.map(Path::to_path_buf),
        merged_uniform: None,
        gguf: None,
        gguf_dtype: Default::default(),
        adapter: adapter.map(Path::to_path_buf),
        adapter_gguf: None,
        gguf_base: None,
        dtype,
        max_shard_size: shard.into(),
        base_model_name_or_path: Some("stories260K".into()),
        verify: true,
    }
}

const ALL_TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

#[test]
fn merged_exports_reload_with_the_adapted_logits() {
    for method in [Method::Lora, Method::Rora, Method::Dora] {
        let (loaded, spec) = adapted_stories(method, &ALL_TARGETS);
        let ids = prompt_ids(&loaded);
        let adapted = loaded.model.forward(&ids, None, None).unwrap();
        for (dtype, name) in [(DtypeName::F32, "f32"), (DtypeName::Bf16, "bf16")] {
            let tmp = tempfile::tempdir().unwrap();
            let out = tmp.path().join("merged");
            let report = export::export(
                &loaded,
                Some(&spec),
                &export_spec(Some(&out), None, dtype, "5GB"),
            )
            .unwrap();
            // Run the merged weights in f32 like the adapted model: the difference is the
            // export's (merge + rounding to the export dtype).
            let reloaded =
                model::load(&ModelSource::Folder(out.clone()), DType::F32, &Device::Cpu).unwrap();
            assert!(reloaded
                .model
                .projections()
                .all(|(_, _, l)| l.adapter().is_none()));
            let diff = max_abs_diff(&adapted, &reloaded.model.forward(&ids, None, None).unwrap());
            println!(
                "{method:?} {name}: max |Δlogit| {diff:.2e} (verify said {:.2e})",
                report.verify_max_abs_diff.unwrap()
            );
            if dtype == DtypeName::F32 {
                assert!(diff < 1e-4, "{method:?} f32: {diff}");
            } else {
                // bf16 keeps 8 mantissa bits: each weight moves by up to 2^-9 relative, and
                // over five layers the logits (max ~15 here) by a few hundredths. The
                // export's own check allows 5e-2 × max |logit|; here we ask for 0.25.
                assert!(diff < 0.25, "{method:?} bf16: {diff}");
            }
            for f in [
                "config.json",
                "generation_config.json",
                "tokenizer.json",
                "tokenizer_config.json",
                "model.safetensors",
            ] {
                assert!(out.join(f).is_file(), "{f} missing");
            }
            let cfg: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                    .unwrap();
            assert_eq!(
                cfg["torch_dtype"],
                if name == "f32" { "float32" } else { "bfloat16" }
            );
            assert_eq!(cfg["architectures"][0], "LlamaForCausalLM");
            assert!(cfg.get("layer_shapes").is_none());
        }
    }
}

#[test]
fn peft_adapter_round_trips_to_identical_logits() {
    for method in [Method::Rora, Method::RoraDora] {
        let (loaded, spec) = adapted_stories(method, &["q_proj", "v_proj", "down_proj"]);
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("adapter");
        export::export(
            &loaded,
            Some(&spec),
            &export_spec(None, Some(&dir), DtypeName::F32, "5GB"),
        )
        .unwrap();
        let mut fresh = load_stories();
        let (read_spec, _) = peft::attach_from_folder(&mut fresh.model, &dir).unwrap();
        assert_eq!(read_spec.method, Some(method));
        let ids = prompt_ids(&loaded);
        let a = loaded.model.forward(&ids, None, None).unwrap();
        let b = fresh.model.forward(&ids, None, None).unwrap();
        assert_eq!(max_abs_diff(&a, &b), 0.0, "{method:?}");
    }
}

#[test]
fn adapter_files_look_like_what_peft_writes() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft-lora");
    let (loaded, spec) = adapted_stories(Method::Rora, &["q_proj", "v_proj"]);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("adapter");
    export::export(
        &loaded,
        Some(&spec),
        &export_spec(None, Some(&dir), DtypeName::F32, "5GB"),
    )
    .unwrap();

    let ours: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap())
            .unwrap();
    let peft: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    for key in [
        "peft_type",
        "task_type",
        "r",
        "lora_alpha",
        "lora_dropout",
        "target_modules",
        "use_rslora",
        "use_dora",
        "bias",
        "fan_in_fan_out",
        "rank_pattern",
        "alpha_pattern",
        "base_model_name_or_path",
        "inference_mode",
        "init_lora_weights",
        "modules_to_save",
        "layers_to_transform",
    ] {
        assert_eq!(ours[key], peft[key], "adapter_config.json `{key}`");
    }
    let names: std::collections::BTreeSet<String> =
        candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap()
            .into_keys()
            .collect();
    let expected: std::collections::BTreeSet<String> =
        std::fs::read_to_string(fixture.join("tensor_names.txt"))
            .unwrap()
            .lines()
            .map(String::from)
            .collect();
    assert_eq!(names, expected);

    // And the sample itself imports: its config with weights under its tensor names.
    let import = tmp.path().join("import");
    std::fs::create_dir_all(&import).unwrap();
    std::fs::copy(
        fixture.join("adapter_config.json"),
        import.join("adapter_config.json"),
    )
    .unwrap();
    std::fs::copy(
        dir.join("adapter_model.safetensors"),
        import.join("adapter_model.safetensors"),
    )
    .unwrap();
    let mut fresh = load_stories();
    let (spec, report) = peft::attach_from_folder(&mut fresh.model, &import).unwrap();
    assert_eq!(
        (spec.method, spec.rank, report.adapted_modules),
        (Some(Method::Rora), 8, 10)
    );
}

#[test]
fn sharded_export_reloads_identically_and_indexes_every_tensor_once() {
    let (loaded, spec) = adapted_stories(Method::Lora, &ALL_TARGETS);
    let tmp = tempfile::tempdir().unwrap();
    let (one, many) = (tmp.path().join("one"), tmp.path().join("many"));
    export::export(
        &loaded,
        Some(&spec),
        &export_spec(Some(&one), None, DtypeName::F32, "5GB"),
    )
    .unwrap();
    let report = export::export(
        &loaded,
        Some(&spec),
        &export_spec(Some(&many), None, DtypeName::F32, "200KB"),
    )
    .unwrap();
    let shards = report.merged.unwrap().shards;
    assert!(shards >= 4, "{shards} shards");
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(many.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let map = index["weight_map"].as_object().unwrap();
    let single =
        candle_core::safetensors::load(one.join("model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(map.len(), single.len());
    let mut seen = std::collections::BTreeMap::new();
    for i in 1..=shards {
        let f = format!("model-{i:05}-of-{shards:05}.safetensors");
        for name in candle_core::safetensors::load(many.join(&f), &Device::Cpu)
            .unwrap()
            .into_keys()
        {
            assert_eq!(map[&name], f.as_str());
            assert!(
                seen.insert(name, f.clone()).is_none(),
                "a tensor is in two shards"
            );
        }
    }
    assert_eq!(seen.len(), single.len());
    let a = model::load(&ModelSource::Folder(one), DType::F32, &Device::Cpu).unwrap();
    let b = model::load(&ModelSource::Folder(many), DType::F32, &Device::Cpu).unwrap();
    let ids = prompt_ids(&loaded);
    assert_eq!(
        max_abs_diff(
            &a.model.forward(&ids, None, None).unwrap(),
            &b.model.forward(&ids, None, None).unwrap()
        ),
        0.0
    );
}

#[test]
fn export_into_an_unusable_place_fails_cleanly() {
    let (loaded, spec) = adapted_stories(Method::Lora, &["q_proj"]);
    let tmp = tempfile::tempdir().unwrap();
    // The parent is a file, not a folder: nothing can be written below it (tests run as
    // root, so permission bits would not stop us).
    let file = tmp.path().join("not-a-dir");
    std::fs::write(&file, "x").unwrap();
    let out = file.join("merged");
    let err = export::export(
        &loaded,
        Some(&spec),
        &export_spec(Some(&out), None, DtypeName::F32, "5GB"),
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains("not-a-dir"), "{err:#}");
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left.len(), 1, "left behind: {left:?}");
}

#[test]
fn a_killed_merge_never_leaves_a_half_folder() {
    // A model big enough that writing takes a while (~17 MB in f32).
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = tmp.path().join("model");
    write_tiny_model(
        &model_dir,
        &[TinyLayer {
            heads: 8,
            kv_heads: 8,
            mlp: 1024,
        }; 24],
        3,
    );
    let mut loaded = model::load(
        &ModelSource::Folder(model_dir.clone()),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let (_, spec) = adapted_stories(Method::Lora, &["q_proj"]);
    adapters::attach(&mut loaded.model, &spec, 0).unwrap();
    let adapter = tmp.path().join("adapter");
    peft::write_adapter(&loaded.model, &spec, None, &adapter).unwrap();
    for delay_ms in [5u64, 20, 60, 150, 400] {
        let out = tmp.path().join(format!("merged-{delay_ms}"));
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_recover"))
            .args([
                "merge",
                "--model",
                model_dir.to_str().unwrap(),
                "--adapter",
                adapter.to_str().unwrap(),
            ])
            .args(["--out", out.to_str().unwrap(), "--dtype", "f32"])
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        let _ = child.kill();
        let _ = child.wait();
        // Either nothing at the destination, or a complete model that loads.
        if out.exists() {
            model::load(&ModelSource::Folder(out.clone()), DType::F32, &Device::Cpu)
                .unwrap_or_else(|e| panic!("half-written export after {delay_ms} ms: {e:#}"));
        }
    }
}
