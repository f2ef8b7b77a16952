//! The forward pass is differentiable where training needs it: gradients from candle's
//! backward pass against central finite differences, on a tiny non-uniform model.

use crate::common::*;
use candle_core::{DType, Device, Tensor, Var};
use rora::model::loss::masked_mean_nll;
use rora::model::{safetensors_dir, Llama, LlamaConfig, Weights};
use rora::nn::Mode;
use std::path::Path;

/// Layer 0: 8 heads / 4 kv heads / MLP 172; layer 1: 4 heads / 2 kv heads / MLP 96.
fn tiny_non_uniform(dir: &Path) -> (LlamaConfig, Weights) {
    write_tiny_model(
        dir,
        &[
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
        ],
        11,
    );
    let cfg = safetensors_dir::read_config(dir).unwrap();
    let w = safetensors_dir::read_weights(dir, DType::F32, &Device::Cpu).unwrap();
    (cfg, w)
}

const IDS: [u32; 10] = [1, 45, 300, 7, 99, 12, 401, 3, 250, 18];

/// Next-token loss over IDS given input embeddings (1, t, hidden).
fn loss_from_embeds(model: &Llama, embeds: &Tensor) -> Tensor {
    let hidden = model
        .forward_embeds(embeds, None, None, Mode::Eval)
        .unwrap();
    let logits = model.lm_head(&hidden).unwrap();
    let t = IDS.len();
    let inputs = logits.narrow(1, 0, t - 1).unwrap();
    let targets = ids_tensor(&IDS[1..]);
    let mask = Tensor::ones((1, t - 1), DType::F32, &Device::Cpu).unwrap();
    masked_mean_nll(&inputs, &targets, &mask).unwrap().0
}

fn scalar(t: &Tensor) -> f64 {
    t.to_scalar::<f32>().unwrap() as f64
}

/// Compares the analytic gradient `grad` of `f` at `x0` with central differences on the
/// `k` coordinates of largest gradient. Returns ‖g − fd‖ / ‖fd‖ over them.
fn finite_difference_error(x0: &[f32], grad: &[f32], k: usize, f: impl Fn(&[f32]) -> f64) -> f64 {
    // eps 1e-2: in f32 the loss (~6) has rounding error ~1e-6, so the difference quotient's
    // rounding error is ~1e-4 relative while the truncation error (eps²) is ~1e-4 too.
    let eps = 1e-2f32;
    let mut order: Vec<usize> = (0..grad.len()).collect();
    order.sort_by(|&a, &b| grad[b].abs().total_cmp(&grad[a].abs()));
    let (mut num, mut den) = (0f64, 0f64);
    for &i in order.iter().take(k) {
        let mut plus = x0.to_vec();
        plus[i] += eps;
        let mut minus = x0.to_vec();
        minus[i] -= eps;
        let fd = (f(&plus) - f(&minus)) / (2.0 * eps as f64);
        num += (grad[i] as f64 - fd).powi(2);
        den += fd.powi(2);
    }
    (num / den).sqrt()
}

#[test]
fn gradient_wrt_input_embeddings_matches_finite_differences() {
    let tmp = tempfile::tempdir().unwrap();
    let (cfg, w) = tiny_non_uniform(tmp.path());
    let model = Llama::from_weights(cfg, &w).unwrap();
    let embeds = model.embed(&ids_tensor(&IDS)).unwrap();
    let var = Var::from_tensor(&embeds).unwrap();
    let grads = loss_from_embeds(&model, var.as_tensor())
        .backward()
        .unwrap();
    let g = grads
        .get(var.as_tensor())
        .expect("embeddings get a gradient");
    let shape = embeds.shape().clone();
    let x0 = embeds.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let err = finite_difference_error(
        &x0,
        &g.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        12,
        |x| {
            let e = Tensor::from_vec(x.to_vec(), shape.clone(), &Device::Cpu).unwrap();
            scalar(&loss_from_embeds(&model, &e))
        },
    );
    println!("input embeddings: relative error {err:.2e}");
    assert!(err < 1e-2, "relative error {err}");
}

#[test]
fn gradient_wrt_rmsnorm_weights_matches_finite_differences() {
    let tmp = tempfile::tempdir().unwrap();
    let (cfg, w) = tiny_non_uniform(tmp.path());
    // One norm inside each layer (the narrow layer too) and the final norm.
    for name in [
        "model.layers.0.input_layernorm.weight",
        "model.layers.1.post_attention_layernorm.weight",
        "model.norm.weight",
    ] {
        let base = w.get(name).unwrap().clone();
        let with = |norm: Tensor| -> Llama {
            let mut map = w_map(&w);
            map.insert(name.to_string(), norm);
            Llama::from_weights(cfg.clone(), &Weights::new(map, "test")).unwrap()
        };
        let var = Var::from_tensor(&base).unwrap();
        let model = with(var.as_tensor().clone());
        let embeds = model.embed(&ids_tensor(&IDS)).unwrap();
        let grads = loss_from_embeds(&model, &embeds).backward().unwrap();
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name} gets no gradient"));
        let x0 = base.to_vec1::<f32>().unwrap();
        let err = finite_difference_error(&x0, &g.to_vec1::<f32>().unwrap(), 8, |x| {
            let m = with(Tensor::new(x, &Device::Cpu).unwrap());
            scalar(&loss_from_embeds(&m, &m.embed(&ids_tensor(&IDS)).unwrap()))
        });
        println!("{name}: relative error {err:.2e}");
        assert!(err < 1e-2, "{name}: relative error {err}");
    }
}

fn w_map(w: &Weights) -> std::collections::BTreeMap<String, Tensor> {
    w.names()
        .map(|n| (n.clone(), w.get(n).unwrap().clone()))
        .collect()
}
