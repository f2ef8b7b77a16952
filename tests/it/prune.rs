//! Structured pruning: the shapes asked for, the right rows and columns removed (checked
//! against zeroing them in the dense model), and the pruned model exports and reloads.

use crate::common::*;
use candle_core::{DType, Device, IndexOp, Tensor};
use rora::model::{self, Llama, ModelSource};
use rora::prune::{self, PruneSpec};
use std::collections::BTreeSet;

fn spec(mlp: f64, heads: f64) -> PruneSpec {
    serde_yaml_ng::from_str(&format!(
        "calibration: {}/data/stories260K-train.txt\nn_samples: 8\nseq_len: 64\nmlp_ratio: {mlp}\nhead_ratio: {heads}\nlayers: [0, 4]\n",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

/// Rows of `dense` (out, in) that appear in `pruned`, by exact equality.
fn kept_rows(dense: &Tensor, pruned: &Tensor) -> BTreeSet<usize> {
    let d: Vec<Vec<f32>> = dense.to_vec2().unwrap();
    let p: Vec<Vec<f32>> = pruned.to_vec2().unwrap();
    p.iter()
        .map(|row| {
            d.iter()
                .position(|r| r == row)
                .expect("pruned row comes from the dense weight")
        })
        .collect()
}

/// Zeroes the columns of `w` not in `keep`.
fn zero_columns(w: &Tensor, keep: &BTreeSet<usize>) -> Tensor {
    let cols = w.dim(1).unwrap();
    let mask: Vec<f32> = (0..cols)
        .map(|j| if keep.contains(&j) { 1.0 } else { 0.0 })
        .collect();
    w.broadcast_mul(&Tensor::from_vec(mask, (1, cols), &Device::Cpu).unwrap())
        .unwrap()
}

#[test]
fn pruning_removes_the_asked_share_and_equals_zeroing_in_the_dense_model() {
    let loaded = load_stories();
    let dense = loaded.model.clone();
    let mut pruned = loaded.model.clone();
    let report = prune::prune(&mut pruned, &loaded.tokenizer, &spec(0.5, 0.25)).unwrap();
    for (i, s) in pruned.layer_shapes.iter().enumerate() {
        // 172 channels − round(86) = 86; 4 kv groups − 1 = 3, with 2 query heads each.
        assert_eq!(
            (
                s.intermediate_size,
                s.num_key_value_heads,
                s.num_attention_heads
            ),
            (86, 3, 6),
            "layer {i}"
        );
        assert_eq!(pruned.layers[i].self_attn.q_proj.weight().dims(), [48, 64]);
    }
    assert!(
        report.pruned_ratio > 0.3 && report.pruned_ratio < 0.5,
        "{}",
        report.pruned_ratio
    );

    // Reference: the dense model with the removed channels' and heads' contributions
    // zeroed (down_proj and o_proj columns).
    let mut reference = dense.clone();
    for i in 0..dense.num_layers() {
        let keep_mlp = kept_rows(
            dense.layers[i].mlp.gate_proj.weight(),
            pruned.layers[i].mlp.gate_proj.weight(),
        );
        let keep_q = kept_rows(
            dense.layers[i].self_attn.q_proj.weight(),
            pruned.layers[i].self_attn.q_proj.weight(),
        );
        let keep_k = kept_rows(
            dense.layers[i].self_attn.k_proj.weight(),
            pruned.layers[i].self_attn.k_proj.weight(),
        );
        // Whole kv groups: each kept k row's group keeps its two query heads.
        let groups: BTreeSet<usize> = keep_k.iter().map(|r| r / 8).collect();
        let q_from_groups: BTreeSet<usize> =
            groups.iter().flat_map(|g| g * 16..(g + 1) * 16).collect();
        assert_eq!(
            keep_q, q_from_groups,
            "layer {i}: query heads follow their kv group"
        );
        let l = &mut reference.layers[i];
        l.mlp
            .down_proj
            .set_weight(zero_columns(l.mlp.down_proj.weight(), &keep_mlp));
        l.self_attn
            .o_proj
            .set_weight(zero_columns(l.self_attn.o_proj.weight(), &keep_q));
    }
    let ids = ids_tensor(
        &loaded
            .tokenizer
            .encode("Once upon a time, there was a little girl named Lily", true)
            .unwrap(),
    );
    let a = pruned.forward(&ids, None, None).unwrap();
    let b = reference.forward(&ids, None, None).unwrap();
    let diff = max_abs_diff(&a, &b);
    // The same arithmetic minus exact zeros: only summation order differs.
    assert!(diff < 1e-5, "max |Δlogit| {diff}");
    assert!(
        max_abs_diff(&a, &dense.forward(&ids, None, None).unwrap()) > 1e-2,
        "pruning changed nothing"
    );
    let _ = a.i(0).unwrap();
}

#[test]
fn pruned_model_exports_and_reloads_identically() {
    let mut loaded = load_stories();
    let mut s = spec(0.5, 0.25);
    s.layers = Some([1, 3]); // non-uniform: layers 0 and 4 stay whole
    prune::prune(&mut loaded.model, &loaded.tokenizer, &s).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("pruned");
    let spec: rora::export::ExportSpec =
        serde_yaml_ng::from_str(&format!("merged: {}\ndtype: f32", out.display())).unwrap();
    let report = rora::export::export(&loaded, None, &spec).unwrap();
    assert!(report
        .warnings
        .iter()
        .any(|w| w.contains("stock transformers cannot")));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["layer_shapes"][2]["intermediate_size"], 86);
    assert_eq!(cfg["layer_shapes"][0]["intermediate_size"], 172);
    let reloaded = model::load(&ModelSource::Folder(out), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(reloaded.model.layer_shapes, loaded.model.layer_shapes);
    let ids = ids_tensor(&loaded.tokenizer.encode("Once upon a time", true).unwrap());
    let diff = max_abs_diff(
        &loaded.model.forward(&ids, None, None).unwrap(),
        &reloaded.model.forward(&ids, None, None).unwrap(),
    );
    assert_eq!(diff, 0.0);
    let _: Option<Llama> = None;
}

#[test]
fn prune_pipeline_reports_shapes_against_the_dense_model() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("p.yaml");
    std::fs::write(
        &file,
        format!(
            "name: p\nstages:\n  - load:\n      model: {}\n  - prune:\n      calibration: {}/data/stories260K-train.txt\n      \
             n_samples: 4\n      seq_len: 64\n      mlp_ratio: 0.5\n  - inspect:\n",
            stories_dir().display(),
            env!("CARGO_MANIFEST_DIR")
        ),
    )
    .unwrap();
    let run = tmp.path().join("run");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_recover"))
        .args([
            "--pipeline",
            file.to_str().unwrap(),
            "--set",
            &format!("run_dir={}", run.display()),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let inspect: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("inspect.json")).unwrap()).unwrap();
    // Default range [3, n-2] = [3, 3] for 5 layers: only layer 3 is pruned.
    let widths: Vec<u64> = inspect["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["mlp_width"].as_u64().unwrap())
        .collect();
    assert_eq!(widths, vec![172, 172, 172, 86, 172]);
    assert!(inspect["layers"][3]["pruned_ratio"].as_f64().unwrap() > 0.3);
    assert_eq!(inspect["layers"][0]["pruned_ratio"].as_f64().unwrap(), 0.0);
    assert!(run.join("prune.json").is_file());
}

/// `multiple_of: 32` rounds 172 × (1 − 0.5) = 86 kept channels up to 96, and the 96 are
/// exactly the ones the ranking keeps when asked for 96 directly (ratio 76/172).
#[test]
fn multiple_of_rounds_widths_up_and_keeps_the_most_important_channels() {
    let loaded = load_stories();
    let mut rounded = loaded.model.clone();
    let mut s = spec(0.5, 0.0);
    s.multiple_of = 32;
    prune::prune(&mut rounded, &loaded.tokenizer, &s).unwrap();
    let mut direct = loaded.model.clone();
    prune::prune(&mut direct, &loaded.tokenizer, &spec(76.0 / 172.0, 0.0)).unwrap();
    let mut plain = loaded.model.clone();
    prune::prune(&mut plain, &loaded.tokenizer, &spec(0.5, 0.0)).unwrap();
    for i in 0..loaded.model.num_layers() {
        assert_eq!(rounded.layer_shapes[i].intermediate_size, 96, "layer {i}");
        assert_eq!(plain.layer_shapes[i].intermediate_size, 86, "layer {i}");
        let dense_gate = loaded.model.layers[i].mlp.gate_proj.weight();
        let kept =
            |m: &rora::model::Llama| kept_rows(dense_gate, m.layers[i].mlp.gate_proj.weight());
        assert_eq!(kept(&rounded), kept(&direct), "layer {i}");
        assert!(kept(&plain).is_subset(&kept(&rounded)), "layer {i}");
    }
    let mut bad = spec(0.5, 0.0);
    bad.multiple_of = 0;
    let msg = prune::prune(&mut plain, &loaded.tokenizer, &bad)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("multiple_of"), "{msg}");
}
