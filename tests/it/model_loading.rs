//! Loading: sharded folders, non-uniform (pruned) models, the hub cache, and the
//! perplexity of stories260K on its own text.

use crate::common::*;
use candle_core::{DType, Device, IndexOp, Tensor};
use rora::model::{self, ModelSource};
use std::collections::HashMap;
use std::path::Path;

fn logits_of(src: &ModelSource, prompt: &str) -> Tensor {
    let m = model::load(src, DType::F32, &Device::Cpu).unwrap();
    let ids = m.tokenizer.encode(prompt, true).unwrap();
    m.model.forward(&ids_tensor(&ids), None, None).unwrap()
}

/// Splits stories260K's tensors over three shard files with an index, as
/// `save_pretrained(max_shard_size=...)` does.
fn write_sharded_stories(dir: &Path) {
    let tensors =
        candle_core::safetensors::load(stories_dir().join("model.safetensors"), &Device::Cpu)
            .unwrap();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut weight_map = serde_json::Map::new();
    for (shard, chunk) in names.chunks(names.len().div_ceil(3)).enumerate() {
        let file = format!("model-{:05}-of-00003.safetensors", shard + 1);
        let part: HashMap<&String, &Tensor> = chunk.iter().map(|n| (*n, &tensors[*n])).collect();
        let part: HashMap<String, Tensor> = part
            .into_iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        candle_core::safetensors::save(&part, dir.join(&file)).unwrap();
        for n in chunk {
            weight_map.insert((*n).clone(), serde_json::Value::String(file.clone()));
        }
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(stories_dir().join(f), dir.join(f)).unwrap();
    }
}

#[test]
fn sharded_folder_gives_the_same_logits() {
    let tmp = tempfile::tempdir().unwrap();
    write_sharded_stories(tmp.path());
    assert_eq!(
        std::fs::read_dir(tmp.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with("-of-00003.safetensors")
            })
            .count(),
        3
    );
    let sharded = logits_of(
        &ModelSource::Folder(tmp.path().to_path_buf()),
        "Once upon a time",
    );
    let single = logits_of(&ModelSource::Folder(stories_dir()), "Once upon a time");
    assert_eq!(max_abs_diff(&sharded, &single), 0.0);
}

#[test]
fn sharded_folder_with_a_missing_shard_names_it() {
    let tmp = tempfile::tempdir().unwrap();
    write_sharded_stories(tmp.path());
    std::fs::remove_file(tmp.path().join("model-00002-of-00003.safetensors")).unwrap();
    let err = model::load(
        &ModelSource::Folder(tmp.path().to_path_buf()),
        DType::F32,
        &Device::Cpu,
    )
    .err()
    .expect("a missing shard is an error");
    assert!(
        format!("{err:#}").contains("model-00002-of-00003.safetensors"),
        "{err:#}"
    );
}

#[test]
fn non_uniform_model_loads_and_reports_per_layer_shapes() {
    let tmp = tempfile::tempdir().unwrap();
    let layers = [
        TinyLayer {
            heads: 8,
            kv_heads: 4,
            mlp: 172,
        },
        TinyLayer {
            heads: 4,
            kv_heads: 2,
            mlp: 96,
        },
    ];
    write_tiny_model(tmp.path(), &layers, 7);
    let src = ModelSource::Folder(tmp.path().to_path_buf());
    let m = model::load(&src, DType::F32, &Device::Cpu).unwrap();
    let report = rora::inspect::ShapeReport::build(&m, None);
    assert!(!report.uniform);
    let got: Vec<(usize, usize, usize)> = report
        .layers
        .iter()
        .map(|l| (l.heads, l.kv_heads, l.mlp_width))
        .collect();
    assert_eq!(got, vec![(8, 4, 172), (4, 2, 96)]);
    assert!(report.to_markdown().contains("| 1 | 4 | 2 | 8 | 96 |"));
    let logits = logits_of(&src, "Once upon a time");
    assert_eq!(logits.dims()[2], 512);
    assert!(logits
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .all(|v| v.is_finite()));
}

#[test]
fn pruned_checkpoint_with_dense_config_loads_but_wider_layer_is_refused() {
    // LLM-Pruner keeps the dense config.json: narrower layers are fine, wider are not.
    let tmp = tempfile::tempdir().unwrap();
    let layers = [
        TinyLayer {
            heads: 8,
            kv_heads: 4,
            mlp: 172,
        },
        TinyLayer {
            heads: 4,
            kv_heads: 2,
            mlp: 96,
        },
    ];
    write_tiny_model(tmp.path(), &layers, 7);
    let cfg_path = tmp.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg.as_object_mut().unwrap().remove("layer_shapes");
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let src = ModelSource::Folder(tmp.path().to_path_buf());
    let m = model::load(&src, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(m.model.layer_shapes[1].intermediate_size, 96);

    cfg["intermediate_size"] = 128.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let err = model::load(&src, DType::F32, &Device::Cpu)
        .err()
        .expect("wider layer refused");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("model.layers.0.mlp.gate_proj.weight") && msg.contains("intermediate_size"),
        "{msg}"
    );
}

#[test]
fn stories_perplexity_on_its_own_greedy_text_is_low() {
    let m = load_stories();
    let mut ids = m.tokenizer.encode("Once upon a time", true).unwrap();
    let mut cache = rora::model::KvCache::new(m.model.num_layers());
    let mut input = ids.clone();
    for _ in 0..200 {
        let logits = m
            .model
            .forward(&ids_tensor(&input), None, Some(&mut cache))
            .unwrap();
        let next = logits
            .i((0, logits.dim(1).unwrap() - 1))
            .unwrap()
            .argmax(0)
            .unwrap()
            .to_scalar::<u32>()
            .unwrap();
        ids.push(next);
        input = vec![next];
    }
    let text = m.tokenizer.decode(&ids).unwrap();
    let report = rora::eval::perplexity::perplexity(
        &m.model,
        &m.tokenizer,
        &text,
        "greedy",
        &rora::eval::perplexity::PerplexityOptions {
            max_len: 256,
            bos: true,
            batch_size: 1,
            max_tokens: None,
        },
    )
    .unwrap();
    println!(
        "stories260K on its own greedy text: {} tokens, ppl {:.3}",
        report.scored_tokens, report.perplexity
    );
    assert!(report.scored_tokens > 150);
    assert!(report.perplexity < 2.0, "ppl {}", report.perplexity);
}
