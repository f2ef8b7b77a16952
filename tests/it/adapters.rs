//! Adapters: scaling, identity at init, gradients against finite differences, merging.

use crate::common::*;
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rora::adapters::{self, AttachSpec, Method};
use rora::model::loss::masked_mean_nll;
use rora::model::Llama;
use rora::nn::dropout;
use rora::nn::frozen::FrozenWeight;
use rora::nn::Mode;

fn spec(method: Method, rank: usize, alpha: f64) -> AttachSpec {
    serde_yaml_ng::from_str(&format!(
        "method: {}\nrank: {rank}\nalpha: {alpha}\ndropout: 0.0",
        method_name(method)
    ))
    .unwrap()
}

fn method_name(m: Method) -> &'static str {
    m.name()
}

const ALL: [Method; 4] = [Method::Lora, Method::Rora, Method::Dora, Method::RoraDora];

#[test]
fn scaling_is_alpha_over_r_for_lora_and_alpha_over_sqrt_r_for_rora() {
    for (rank, lora, rora) in [(4, 4.0, 8.0), (16, 1.0, 4.0), (64, 0.25, 2.0)] {
        assert_eq!(Method::Lora.scaling(16.0, rank), lora);
        assert_eq!(Method::Dora.scaling(16.0, rank), lora);
        assert_eq!(Method::Rora.scaling(16.0, rank), rora);
        assert_eq!(Method::RoraDora.scaling(16.0, rank), rora);
        // And the attached adapters carry exactly that γ.
        for method in ALL {
            let mut m = load_stories().model;
            adapters::attach(&mut m, &spec(method, rank, 16.0), 0).unwrap();
            let (_, _, lin) = m.projections().next().unwrap();
            assert_eq!(
                lin.adapter().unwrap().lora().unwrap().scale,
                method.scaling(16.0, rank)
            );
        }
    }
}

#[test]
fn fresh_adapters_leave_logits_unchanged() {
    let base = load_stories();
    let ids = ids_tensor(
        &base
            .tokenizer
            .encode("Once upon a time, there was a cat", true)
            .unwrap(),
    );
    let before = base.model.forward(&ids, None, None).unwrap();
    for method in ALL {
        let mut m = base.model.clone();
        let mut s = spec(method, 8, 16.0);
        s.targets = Some(adapters::MODULES.map(String::from).to_vec());
        let report = adapters::attach(&mut m, &s, 3).unwrap();
        assert_eq!(report.adapted_modules, 35);
        let after = m.forward(&ids, None, None).unwrap();
        let diff = max_abs_diff(&before, &after);
        assert!(diff < 1e-6, "{method:?}: {diff}");
    }
}

#[test]
fn attach_reports_trainable_parameters_like_peft() {
    let mut m = load_stories().model;
    let r = adapters::attach(&mut m, &spec(Method::Dora, 4, 8.0), 0).unwrap();
    // Per layer with default targets q,k,v,up,down (hidden 64, kv 32, MLP 172), rank 4:
    // A+B = 4·(64+64) + 4·(64+32)·2 + 4·(64+172)·2 = 512 + 768 + 1888 = 3168,
    // magnitudes 64 + 32 + 32 + 172 + 64 = 364; 5 layers.
    assert_eq!(r.trainable_params, 5 * (3168 + 364));
    assert_eq!(r.model_params, 260_032);
    assert!((r.trainable_percent - 100.0 * 17_660.0 / 260_032.0).abs() < 1e-9);
}

/// A tiny two-layer non-uniform model with adapters whose B (and magnitude) are random,
/// so that every gradient is non-zero.
fn adapted_tiny(method: Method) -> Llama {
    let mut model = tiny_llama(
        &[
            TinyLayer {
                heads: 8,
                kv_heads: 4,
                mlp: 96,
            },
            TinyLayer {
                heads: 4,
                kv_heads: 2,
                mlp: 64,
            },
        ],
        5,
    );
    adapters::attach(&mut model, &spec(method, 4, 8.0), 1).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
    for (name, var) in adapters::trainable_vars(&model) {
        if name.ends_with("lora_B.weight") {
            let v: Vec<f32> = (0..var.elem_count())
                .map(|_| rng.random_range(-0.2..0.2))
                .collect();
            var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
        if name.ends_with("lora_magnitude_vector") {
            var.set(&(var.as_tensor() * 1.3).unwrap()).unwrap();
        }
    }
    model
}

#[test]
fn adapter_gradients_match_finite_differences_and_base_gets_none() {
    // Through the whole model. DoRA's A and B are checked per layer below: its backward
    // treats the norm as constant, so the whole-model loss is not the function it
    // differentiates; its magnitude does not enter the norm and is checked here.
    for method in [Method::Lora, Method::Rora, Method::Dora] {
        let model = adapted_tiny(method);
        let grads = tiny_loss(&model).backward().unwrap();
        for (_, _, lin) in model.projections() {
            assert!(
                grads.get(lin.weight()).is_none(),
                "a frozen base weight got a gradient"
            );
        }
        assert!(grads.get(&model.embed_tokens).is_none());
        let suffixes: &[&str] = if method.is_dora() {
            &["lora_magnitude_vector"]
        } else {
            &["lora_A.weight", "lora_B.weight"]
        };
        let vars = adapters::trainable_vars(&model);
        for layer in ["layers.0.self_attn.v_proj", "layers.1.mlp.down_proj"] {
            for suffix in suffixes {
                let (name, var) = vars
                    .iter()
                    .find(|(n, _)| n.contains(layer) && n.ends_with(suffix))
                    .unwrap();
                let g = grads
                    .get(var.as_tensor())
                    .unwrap_or_else(|| panic!("{name}: no gradient"));
                let err = fd_relative_error(var, g, || {
                    tiny_loss(&model).to_scalar::<f32>().unwrap() as f64
                });
                println!("{method:?} {name}: relative error {err:.2e}");
                assert!(err < 1e-2, "{method:?} {name}: relative error {err}");
            }
        }
    }
}

/// The DoRA adapter of one projection of a tiny DoRA model, its weight, and the weight as the
/// adapter's forward pass takes it. The adapter is a clone sharing the model's variables.
fn dora_projection(layer: usize, path: &str) -> (rora::nn::DoraAdapter, Tensor, FrozenWeight) {
    let model = adapted_tiny(Method::Dora);
    let (_, _, lin) = model
        .projections()
        .find(|(l, p, _)| *l == layer && *p == path)
        .unwrap();
    let rora::nn::Adapter::Dora(dora) = lin.adapter().unwrap() else {
        panic!("not DoRA")
    };
    let w = lin.weight().clone();
    (dora.clone(), w.clone(), FrozenWeight::new(w))
}

#[test]
fn dora_layer_gradients_match_finite_differences_with_the_norm_held() {
    let (dora, w, frozen) = dora_projection(1, "mlp.up_proj");
    let w = &w;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
    let mut rand_t = |shape: (usize, usize)| {
        let v: Vec<f32> = (0..shape.0 * shape.1)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    };
    let x = rand_t((5, 64));
    let probe = rand_t((5, w.dim(0).unwrap()));
    let norm0 = dora.weight_norm(w).unwrap();
    let objective = |y: Tensor| (y * &probe).unwrap().sum_all().unwrap();
    let grads = objective(dora.forward(&x, &frozen, Mode::Eval).unwrap())
        .backward()
        .unwrap();
    for (name, var) in [
        ("lora_A", &dora.lora.a),
        ("lora_B", &dora.lora.b),
        ("magnitude", &dora.magnitude),
    ] {
        let g = grads.get(var.as_tensor()).unwrap();
        let err = fd_relative_error(var, g, || {
            objective(
                dora.forward_with_norm(&x, &frozen, &norm0, Mode::Eval)
                    .unwrap(),
            )
            .to_scalar::<f32>()
            .unwrap() as f64
        });
        println!("DoRA layer {name}: relative error {err:.2e}");
        assert!(err < 1e-2, "DoRA {name}: relative error {err}");
    }
}

#[test]
fn dora_evaluation_keeps_its_norm_only_while_a_and_b_are_unchanged() {
    let (dora, w, frozen) = dora_projection(0, "self_attn.q_proj");
    let w = &w;
    let x = Tensor::randn(0f32, 1.0, (3, w.dim(1).unwrap()), &Device::Cpu).unwrap();
    let fresh = || {
        let norm = dora.weight_norm(w).unwrap();
        dora.forward_with_norm(&x, &frozen, &norm, Mode::Eval)
            .unwrap()
    };
    let before = dora.forward(&x, &frozen, Mode::Eval).unwrap();
    assert_eq!(max_abs_diff(&before, &fresh()), 0.0);
    // A step's worth of change to B (as the optimizer makes it, in place): the kept norm
    // must not be used again.
    let b = dora.lora.b.as_tensor();
    dora.lora
        .b
        .set(&(b + Tensor::randn(0f32, 0.5, b.shape(), &Device::Cpu).unwrap()).unwrap())
        .unwrap();
    let after = dora.forward(&x, &frozen, Mode::Eval).unwrap();
    assert_eq!(max_abs_diff(&after, &fresh()), 0.0);
    assert!(max_abs_diff(&after, &before) > 1e-3);
}

#[test]
fn merged_weights_reproduce_the_adapted_model() {
    for method in ALL {
        let mut model = adapted_tiny(method);
        let adapted = model.forward(&ids_tensor(&IDS), None, None).unwrap();
        adapters::merge::merge_into_base(&mut model).unwrap();
        assert!(model.projections().all(|(_, _, l)| l.adapter().is_none()));
        let merged = model.forward(&ids_tensor(&IDS), None, None).unwrap();
        let diff = max_abs_diff(&adapted, &merged);
        // f32 reassociation ((xW + xΔ) vs x(W + Δ)) over logits of size ~10: ~1e-5.
        assert!(diff < 1e-4, "{method:?}: {diff}");
    }
}

#[test]
fn dropout_is_reproducible_per_key_and_off_in_eval() {
    let x = Tensor::ones((4, 64), DType::F32, &Device::Cpu).unwrap();
    let eval = dropout::apply(&x, Mode::Eval, 0.5, 3).unwrap();
    assert_eq!(max_abs_diff(&eval, &x), 0.0);
    let train = Mode::train(17);
    let a = dropout::apply(&x, train, 0.5, 3).unwrap();
    let b = dropout::apply(&x, train, 0.5, 3).unwrap();
    let c = dropout::apply(&x, train, 0.5, 4).unwrap();
    assert_eq!(max_abs_diff(&a, &b), 0.0);
    assert!(max_abs_diff(&a, &c) > 0.0);
    let vals: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
    assert!(vals.iter().all(|&v| v == 0.0 || v == 2.0));
    let kept = vals.iter().filter(|&&v| v > 0.0).count();
    assert!((80..=176).contains(&kept), "{kept} of 256 kept at p = 0.5");
}

/// The training loss applies the output head only at target positions; it must equal the
/// loss over full logits, value and adapter gradients, for a mask with gaps (f32 sums in
/// a different order: agreement to 1e-5 relative).
#[test]
fn output_head_at_targets_only_matches_the_full_head() {
    let model = adapted_tiny(Method::Rora);
    let ids = ids_tensor(&IDS);
    let n = IDS.len() - 1;
    let targets = ids_tensor(&IDS[1..]);
    let mask = Tensor::new(&[[0f32, 0., 1., 0., 1., 1., 0., 1.]], &Device::Cpu).unwrap();
    let full = {
        let logits = model.forward(&ids, None, None).unwrap();
        masked_mean_nll(&logits.narrow(1, 0, n).unwrap(), &targets, &mask).unwrap()
    };
    let sparse = {
        let hidden = model.forward_hidden(&ids, None, None, Mode::Eval).unwrap();
        rora::model::loss::masked_mean_nll_from_hidden(
            &model,
            &hidden.narrow(1, 0, n).unwrap(),
            &targets,
            &mask,
        )
        .unwrap()
    };
    assert_eq!(full.1, 4);
    assert_eq!(sparse.1, 4);
    let (a, b) = (
        full.0.to_scalar::<f32>().unwrap(),
        sparse.0.to_scalar::<f32>().unwrap(),
    );
    assert!((a - b).abs() <= 1e-5 * a.abs(), "loss {a} vs {b}");
    let (ga, gb) = (full.0.backward().unwrap(), sparse.0.backward().unwrap());
    for (name, var) in adapters::trainable_vars(&model) {
        let x = ga.get(var.as_tensor()).expect("full-head gradient");
        let y = gb.get(var.as_tensor()).expect("sparse-head gradient");
        let scale = x
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let diff = max_abs_diff(x, y);
        assert!(
            diff <= 1e-5 * scale.max(1e-6),
            "{name}: {diff} (scale {scale})"
        );
    }
    // No target at all: a zero loss that still backpropagates.
    let none = Tensor::zeros((1, n), DType::F32, &Device::Cpu).unwrap();
    let hidden = model.forward_hidden(&ids, None, None, Mode::Eval).unwrap();
    let (zero, count) = rora::model::loss::masked_mean_nll_from_hidden(
        &model,
        &hidden.narrow(1, 0, n).unwrap(),
        &targets,
        &none,
    )
    .unwrap();
    assert_eq!(count, 0);
    assert_eq!(zero.to_scalar::<f32>().unwrap(), 0.0);
    assert!(zero.backward().is_ok());
}
