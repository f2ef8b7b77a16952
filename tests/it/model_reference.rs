//! Our forward pass against an independent implementation: candle-transformers' llama,
//! on the real stories260K weights.

use crate::common::*;
use candle_core::{DType, Device, IndexOp, Tensor};
use candle_transformers::models::llama as reference;

fn reference_model() -> (reference::Llama, reference::Config) {
    let dir = stories_dir();
    let cfg: reference::LlamaConfig =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let cfg = cfg.into_config(false);
    let vb = unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(
            &[dir.join("model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )
        .unwrap()
    };
    (reference::Llama::load(vb, &cfg).unwrap(), cfg)
}

#[test]
fn last_position_logits_match_candle_transformers() {
    let ours = load_stories();
    let (theirs, cfg) = reference_model();
    let ids = ours
        .tokenizer
        .encode("Once upon a time, there was a little dog", true)
        .unwrap();
    let input = ids_tensor(&ids);
    let our_logits = ours.model.forward(&input, None, None).unwrap();
    let t = ids.len();
    let our_last = our_logits.i((0, t - 1)).unwrap();
    let mut cache = reference::Cache::new(false, DType::F32, &cfg, &Device::Cpu).unwrap();
    let their_last = theirs.forward(&input, 0, &mut cache).unwrap().i(0).unwrap();
    let diff = max_abs_diff(&our_last, &their_last);
    // Same f32 arithmetic up to summation order: differences are rounding-level (~1e-6).
    assert!(diff < 1e-4, "max abs diff {diff}");
}

#[test]
fn greedy_decoding_matches_candle_transformers() {
    let ours = load_stories();
    let (theirs, cfg) = reference_model();
    let prompt = ours.tokenizer.encode("Once upon a time", true).unwrap();

    // Reference: candle-transformers with its KV cache.
    let mut cache = reference::Cache::new(true, DType::F32, &cfg, &Device::Cpu).unwrap();
    let mut their_tokens = prompt.clone();
    let mut pos = 0;
    for _ in 0..20 {
        let ctx = &their_tokens[pos..];
        let logits = theirs.forward(&ids_tensor(ctx), pos, &mut cache).unwrap();
        pos = their_tokens.len();
        their_tokens.push(
            logits
                .i(0)
                .unwrap()
                .argmax(0)
                .unwrap()
                .to_scalar::<u32>()
                .unwrap(),
        );
    }

    // Ours: with our KV cache.
    let mut cache = rora::model::KvCache::new(ours.model.num_layers());
    let mut our_tokens = prompt.clone();
    let mut next_input = prompt.clone();
    for _ in 0..20 {
        let logits = ours
            .model
            .forward(&ids_tensor(&next_input), None, Some(&mut cache))
            .unwrap();
        let last = logits.i((0, logits.dim(1).unwrap() - 1)).unwrap();
        let next = last.argmax(0).unwrap().to_scalar::<u32>().unwrap();
        our_tokens.push(next);
        next_input = vec![next];
    }
    assert_eq!(our_tokens, their_tokens);
    let text = ours.tokenizer.decode(&our_tokens).unwrap();
    assert!(
        text.starts_with("Once upon a time, there was a little girl named Lily"),
        "{text}"
    );
}

#[test]
fn padded_batch_matches_unpadded_rows() {
    // Left padding (generation) and right padding (training) must not change real tokens' logits.
    let ours = load_stories();
    let a = ours.tokenizer.encode("Once upon a time", true).unwrap();
    let b = ours
        .tokenizer
        .encode("The cat sat on the big red mat", true)
        .unwrap();
    let width = b.len();
    let pad = 0u32;
    for left in [true, false] {
        let mut row_a = a.clone();
        let mut mask_a = vec![1u32; a.len()];
        let fill = width - a.len();
        if left {
            row_a.splice(0..0, std::iter::repeat_n(pad, fill));
            mask_a.splice(0..0, std::iter::repeat_n(0, fill));
        } else {
            row_a.extend(std::iter::repeat_n(pad, fill));
            mask_a.extend(std::iter::repeat_n(0, fill));
        }
        let ids = Tensor::new(vec![row_a, b.clone()], &Device::Cpu).unwrap();
        let mask = Tensor::new(vec![mask_a, vec![1u32; width]], &Device::Cpu).unwrap();
        let batched = ours.model.forward(&ids, Some(&mask), None).unwrap();
        let alone_a = ours.model.forward(&ids_tensor(&a), None, None).unwrap();
        let alone_b = ours.model.forward(&ids_tensor(&b), None, None).unwrap();
        let off = if left { fill } else { 0 };
        let got_a = batched.i((0, off..off + a.len())).unwrap();
        assert!(
            max_abs_diff(&got_a, &alone_a.i(0).unwrap()) < 1e-4,
            "left={left}"
        );
        assert!(max_abs_diff(&batched.i(1).unwrap(), &alone_b.i(0).unwrap()) < 1e-4);
    }
}

#[test]
fn llama3_rope_scaling_matches_candle_transformers() {
    // stories260K with Llama-3.1 rope scaling switched on: a small original context so
    // that head_dim 8's four frequencies fall in all three bands (kept, blended, divided).
    let tmp = tempfile::tempdir().unwrap();
    for f in ["model.safetensors", "tokenizer.json"] {
        std::fs::copy(stories_dir().join(f), tmp.path().join(f)).unwrap();
    }
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(stories_dir().join("config.json")).unwrap())
            .unwrap();
    cfg["rope_scaling"] = serde_json::json!({
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64
    });
    std::fs::write(tmp.path().join("config.json"), cfg.to_string()).unwrap();

    let ours = rora::model::load(
        &rora::model::ModelSource::Folder(tmp.path().to_path_buf()),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let ref_cfg: reference::LlamaConfig = serde_json::from_value(cfg).unwrap();
    let ref_cfg = ref_cfg.into_config(false);
    let vb = unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(
            &[tmp.path().join("model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )
        .unwrap()
    };
    let theirs = reference::Llama::load(vb, &ref_cfg).unwrap();
    let ids = ours.tokenizer.encode("Once upon a time, there was a little dog who liked to run in the park with his friends", true).unwrap();
    let input = ids_tensor(&ids);
    let our_last = ours
        .model
        .forward(&input, None, None)
        .unwrap()
        .i((0, ids.len() - 1))
        .unwrap();
    let mut cache = reference::Cache::new(false, DType::F32, &ref_cfg, &Device::Cpu).unwrap();
    let their_last = theirs.forward(&input, 0, &mut cache).unwrap().i(0).unwrap();
    let plain = load_stories()
        .model
        .forward(&input, None, None)
        .unwrap()
        .i((0, ids.len() - 1))
        .unwrap();
    assert!(max_abs_diff(&our_last, &their_last) < 1e-4);
    // And the scaling did change something.
    assert!(max_abs_diff(&our_last, &plain) > 1e-3);
}
