//! Each fused CPU kernel against the composite of candle ops it replaces (the path every
//! other device and dtype still takes): the same forward values and the same gradient
//! for every input, through `backward()` of a random projection of the output.
//!
//! Tolerances: f32; the kernels sum in a different order than candle (gemm blocking, row
//! sums), so agreement is to a few ulps (1.2e-7 each) of the largest partial sum, measured
//! relative to the largest output or gradient: 2e-6 on outputs, 2e-5 on gradients (which
//! go through one more product).

use crate::common::max_abs_diff;
use candle_core::{DType, Device, Tensor, Var};
use rora::model::attention::{scaled_dot_product, scaled_dot_product_composite};
use rora::model::kv_cache::LayerKv;
use rora::model::loss::{target_log_probs, target_log_probs_composite};
use rora::model::mlp::{silu_mul, silu_mul_composite};
use rora::model::norm::RmsNorm;
use rora::model::rope::{apply_rotary, apply_rotary_composite};
use rora::nn::frozen::{frozen_matmul_t, frozen_matmul_t_shared, FrozenWeight, MatmulPrecision};
use rora::nn::fused::bf16::Bf16Kernel;
use rora::nn::fused::cross_entropy::head_target_log_probs;
use rora::nn::fused::dropout::{dropout, DropoutMask};
use rora::nn::fused::lora::BF16_GRAD_MIN_RANK;
use rora::nn::{Adapter, Linear, LoraAdapter, Mode};

fn randn(shape: &[usize], seed: u64) -> Tensor {
    // candle's CPU randn takes no seed; a fixed pattern keeps the tests deterministic.
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| {
            ((i as f64 * 0.7548776662 + seed as f64 * 0.5698402910).fract() as f32 - 0.5) * 3.4
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn var(shape: &[usize], seed: u64) -> Var {
    Var::from_tensor(&randn(shape, seed)).unwrap()
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .max(1e-6)
}

/// The output difference relative to the largest output, then the largest gradient
/// difference over `inputs` relative to the largest gradient, for `(out · R).sum()` with a
/// fixed random `R`.
fn compare(fused: &Tensor, composite: &Tensor, inputs: &[&Var]) -> (f32, f32) {
    let out_diff = relative(fused, composite);
    let r = randn(fused.dims(), 99);
    let g_fused = (fused * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let g_comp = (composite * &r)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let mut worst = 0f32;
    for v in inputs {
        let a = g_fused.get(v).expect("fused kernel gives a gradient");
        let b = g_comp.get(v).expect("composite gives a gradient");
        worst = worst.max(relative(a, b));
    }
    (out_diff, worst)
}

fn assert_close(name: &str, (out, grad): (f32, f32)) {
    println!("{name}: max |Δ| / max |value|: output {out:.2e}, gradients {grad:.2e}");
    assert!(out < 2e-6, "{name}: outputs differ by {out} (relative)");
    assert!(grad < 2e-5, "{name}: gradients differ by {grad} (relative)");
}

#[test]
fn rms_norm_matches_composite() {
    // 150 rows: more than one task of the weight-gradient sum.
    let x = var(&[3, 50, 64], 1);
    let w = Var::from_tensor(&(randn(&[64], 2) * 0.3).unwrap().affine(1.0, 1.0).unwrap()).unwrap();
    let norm = RmsNorm::new(w.as_tensor().clone(), 1e-5);
    let fused = norm.forward(&x).unwrap();
    let composite = norm.forward_composite(&x).unwrap();
    assert_close("rms_norm", compare(&fused, &composite, &[&x, &w]));
}

#[test]
fn rope_matches_composite() {
    let x = var(&[2, 3, 7, 16], 3);
    let cos = randn(&[2, 1, 7, 16], 4).cos().unwrap();
    let sin = randn(&[2, 1, 7, 16], 4).sin().unwrap();
    let fused = apply_rotary(&x, &cos, &sin).unwrap();
    let composite = apply_rotary_composite(&x, &cos, &sin).unwrap();
    assert_close("rope", compare(&fused, &composite, &[&x]));
}

#[test]
fn swiglu_matches_composite() {
    let gate = var(&[4, 9, 33], 5);
    let up = var(&[4, 9, 33], 6);
    let fused = silu_mul(&gate, &up).unwrap();
    let composite = silu_mul_composite(&gate, &up).unwrap();
    assert_close("swiglu", compare(&fused, &composite, &[&gate, &up]));
}

#[test]
fn dropout_matches_mask_multiply() {
    let x = var(&[5, 4000], 7);
    let mask = DropoutMask::new(1234, 0.1);
    let fused = dropout(&x, mask).unwrap();
    let values = Tensor::from_vec(mask.values(x.elem_count()), x.shape(), &Device::Cpu).unwrap();
    let composite = (x.as_tensor() * values).unwrap();
    assert_close("dropout", compare(&fused, &composite, &[&x]));
}

/// Additive mask (b, 1, t, T) of a causal attention over `past` cached positions, with
/// `pad[b]` left-padding positions in row b (the model's layout; −1e30 as in the model).
fn causal_mask(b: usize, t: usize, past: usize, pad: &[usize]) -> Tensor {
    let total = past + t;
    let mut m = vec![0f32; b * t * total];
    for r in 0..b {
        for i in 0..t {
            for j in 0..total {
                if j > past + i || j < pad[r] {
                    m[(r * t + i) * total + j] = -1e30;
                }
            }
        }
    }
    Tensor::from_vec(m, (b, 1, t, total), &Device::Cpu).unwrap()
}

#[test]
fn attention_matches_composite_with_grouped_heads_padding_and_cache() {
    // (query heads, kv heads, new positions, cached positions, mask?)
    for (heads, kv_heads, t, past, masked) in [
        (4, 2, 6, 0, true),
        (3, 3, 5, 0, true),
        (6, 2, 2, 5, true),
        (4, 1, 4, 0, false),
    ] {
        let (b, hd) = (2, 8);
        let q = var(&[b, heads, t, hd], 8);
        let k = var(&[b, kv_heads, past + t, hd], 9);
        let v = var(&[b, kv_heads, past + t, hd], 10);
        // Row 0 has two padding positions; with no cache, its first query row is fully
        // masked (a uniform softmax in both paths).
        let mask = masked.then(|| causal_mask(b, t, past, &[2, 0]));
        let scale = 1.0 / (hd as f64).sqrt();
        let fused = scaled_dot_product(&q, &k, &v, mask.as_ref(), scale).unwrap();
        let composite = scaled_dot_product_composite(&q, &k, &v, mask.as_ref(), scale).unwrap();
        let name = format!("attention h{heads}/kv{kv_heads} t{t} past{past} mask {masked}");
        assert_close(&name, compare(&fused, &composite, &[&q, &k, &v]));
    }
}

/// What a KV cache hands the attention — views of larger buffers, heads a capacity apart —
/// is read in place and gives exactly what its contiguous copy gives (same kernel, same
/// order of sums: equal bit for bit), and what the composite gives (the file's tolerance).
#[test]
fn attention_reads_a_kv_caches_views_in_place() {
    let (b, heads, kv_heads, hd) = (2, 4, 2, 8);
    let scale = 1.0 / (hd as f64).sqrt();
    let mut layer = LayerKv::default();
    // A prompt of 5, then single tokens: the buffers grow to 10 positions at the second.
    for (step, t) in [5, 1, 1, 1].into_iter().enumerate() {
        let seed = 20 + 3 * step as u64;
        let k = randn(&[b, kv_heads, t, hd], seed);
        let v = randn(&[b, kv_heads, t, hd], seed + 1);
        let past = layer.len();
        let (k_all, v_all) = layer.append(&k, &v).unwrap();
        assert_eq!(k_all.is_contiguous(), step == 0, "step {step}");
        let q = randn(&[b, heads, t, hd], seed + 2);
        let mask = causal_mask(b, t, past, &[2, 0]);
        let in_place = scaled_dot_product(&q, &k_all, &v_all, Some(&mask), scale).unwrap();
        let copied = scaled_dot_product(
            &q,
            &k_all.contiguous().unwrap(),
            &v_all.contiguous().unwrap(),
            Some(&mask),
            scale,
        )
        .unwrap();
        assert_eq!(max_abs_diff(&in_place, &copied), 0.0, "step {step}");
        // The composite path (other dtypes and devices) takes the views too.
        let composite =
            scaled_dot_product_composite(&q, &k_all, &v_all, Some(&mask), scale).unwrap();
        let diff = max_abs_diff(&in_place, &composite);
        assert!(diff <= 2e-6 * max_abs(&composite), "step {step}: {diff}");
    }
}

#[test]
fn lora_linear_matches_composite_with_and_without_dropout() {
    for dropout in [0.0, 0.2] {
        let (in_dim, out_dim, rank) = (24, 40, 4);
        let x = var(&[3, 7, in_dim], 11);
        let weight = FrozenWeight::new((randn(&[out_dim, in_dim], 12) * 0.2).unwrap());
        let mode = Mode::train(77);
        let adapter = LoraAdapter {
            a: var(&[rank, in_dim], 13),
            b: var(&[out_dim, rank], 14),
            scale: 2.5,
            dropout,
            id: 3,
        };
        let fused = adapter.forward(&x, &weight, mode).unwrap();
        let composite = adapter.forward_composite(&x, &weight, mode).unwrap();
        let name = format!("lora dropout {dropout}");
        assert_close(
            &name,
            compare(&fused, &composite, &[&x, &adapter.a, &adapter.b]),
        );
    }
}

#[test]
fn target_log_probs_match_composite() {
    let logits = var(&[2, 5, 300], 16);
    let ids: Vec<u32> = (0..10).map(|i| (i * 37 + 5) % 300).collect();
    let targets = Tensor::from_vec(ids, (2, 5), &Device::Cpu).unwrap();
    let fused = target_log_probs(&logits, &targets).unwrap();
    let composite = target_log_probs_composite(&logits, &targets).unwrap();
    assert_close("target log-probs", compare(&fused, &composite, &[&logits]));
}

#[test]
fn output_head_log_probs_match_logits_then_log_softmax() {
    // 150 rows: more than one block of the fused head.
    let (rows, hidden_dim, vocab) = (150, 16, 300);
    let hidden = var(&[rows, hidden_dim], 17);
    let weight = (randn(&[vocab, hidden_dim], 18) * 0.5).unwrap();
    let ids: Vec<u32> = (0..rows as u32)
        .map(|i| (i * 53 + 11) % vocab as u32)
        .collect();
    let fused =
        head_target_log_probs(&hidden, &FrozenWeight::new(weight.clone()), ids.clone()).unwrap();
    let logits = hidden
        .matmul(&weight.t().unwrap())
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let targets = Tensor::from_vec(ids, (1, rows), &Device::Cpu).unwrap();
    let composite = target_log_probs_composite(&logits, &targets)
        .unwrap()
        .squeeze(0)
        .unwrap();
    assert_close("output head", compare(&fused, &composite, &[&hidden]));
}

#[test]
fn kernels_fall_back_for_other_dtypes() {
    // bf16 takes the composite path and still works.
    let x = randn(&[2, 3, 16], 15).to_dtype(DType::BF16).unwrap();
    let norm = RmsNorm::new(Tensor::ones(16, DType::BF16, &Device::Cpu).unwrap(), 1e-5);
    let y = norm.forward(&x).unwrap();
    let want = norm.forward_composite(&x).unwrap();
    assert_eq!(max_abs_diff(&y, &want), 0.0);
}

/// `w` packed for bf16 products; `None` (and a note) on a CPU without a bf16 kernel, where the
/// weight must stay f32 and unpacked.
fn packed_bf16(w: &Tensor) -> Option<FrozenWeight> {
    let mut weight = FrozenWeight::new(w.clone());
    if weight.set_precision(MatmulPrecision::Bf16).unwrap() {
        return Some(weight);
    }
    assert!(weight.packed().is_none());
    rora::require::skip_or_fail(
        "bf16",
        "no bf16 kernel (AMX or AVX512-BF16) on this CPU: bf16 products are not exercised",
    );
    None
}

/// Projections of one input share a parallel pass where they can — plain, bf16-packed, an
/// input outside autograd's graph — each output equal, bit for bit, to its own forward's;
/// with an input that needs its gradient, or an adapter on one of them, each runs its own
/// forward (the gradient reaches the input; the adapter's update is in its output).
#[test]
fn projections_of_one_input_share_a_pass_with_their_own_values() {
    let in_dim = 40;
    let mut projections: Vec<Linear> = [56, 24, 24]
        .iter()
        .zip(30..)
        .map(|(&out_dim, seed)| Linear::new((randn(&[out_dim, in_dim], seed) * 0.2).unwrap()))
        .collect();
    for p in &mut projections {
        if !p.set_matmul_precision(MatmulPrecision::Bf16).unwrap() {
            rora::require::skip_or_fail("bf16", "no bf16 kernel: shared products not exercised");
            return;
        }
    }
    let each_own = |projections: &[&Linear], x: &Tensor| {
        let ys = Linear::forward_each(projections, x, Mode::Eval).unwrap();
        assert_eq!(ys.len(), projections.len());
        for (y, p) in ys.iter().zip(projections) {
            let own = p.forward(x, Mode::Eval).unwrap();
            assert_eq!(y.dims(), own.dims());
            assert_eq!(max_abs_diff(y, &own), 0.0);
        }
        ys
    };
    let refs: Vec<&Linear> = projections.iter().collect();
    let weights: Vec<&FrozenWeight> = projections.iter().map(Linear::frozen_weight).collect();
    let plain = randn(&[2, 9, in_dim], 33);
    assert!(frozen_matmul_t_shared(&plain, &weights).unwrap().is_some());
    each_own(&refs, &plain);
    let x = var(&[2, 9, in_dim], 34);
    assert!(frozen_matmul_t_shared(&x, &weights).unwrap().is_none());
    let ys = each_own(&refs, &x);
    let total = ys
        .iter()
        .map(|y| y.sum_all().unwrap())
        .reduce(|a, b| (a + b).unwrap());
    let grads = total.unwrap().backward().unwrap();
    assert!(grads.get(&x).is_some(), "no gradient reached the input");
    projections[1].set_adapter(Some(Adapter::Lora(LoraAdapter {
        a: var(&[4, in_dim], 35),
        b: var(&[24, 4], 36),
        scale: 2.0,
        dropout: 0.0,
        id: 1,
    })));
    let refs: Vec<&Linear> = projections.iter().collect();
    each_own(&refs, &randn(&[2, 9, in_dim], 37));
}

/// `max |a − b| / max |b|`.
fn relative(a: &Tensor, b: &Tensor) -> f32 {
    max_abs_diff(a, b) / max_abs(b)
}

/// `t` rounded to bf16 (candle's conversion: round to nearest even), as f32.
fn bf16_rounded(t: &Tensor) -> Tensor {
    t.to_dtype(DType::BF16)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
}

/// With packed bf16 weights, the frozen products are exactly f32 products of bf16-rounded
/// operands: forward `round(x) round(W)ᵀ`, input gradient `round(dy) round(W)`. The
/// objective `Σ y ⊙ probe` makes `dy = probe`, so both sides are known without the kernel.
/// The adapter's products with A or B on the right are bf16 too (as under PyTorch's
/// autocast; from rank 32), intermediates included: `d = round(x) round(A)ᵀ` and
/// `u = γ round(dy) round(B)` are rounded again where they enter the next product; dA and
/// dB are f32 below `BF16_GRAD_MIN_RANK` and on AMX from it `round(u)ᵀ x`, `γ dyᵀ round(d)`. Tolerances as for the f32 kernels (the same exact products summed in
/// another order). For the adapter, x, A, B and dy lie on a grid of sixteenths: every
/// product and partial sum of `d` and `u` is then exact in f32, so both sides round the
/// same intermediate values (from f32 sums that merely agreed to ~1e-7, a sum within that
/// of a bf16 rounding midpoint would round apart), and those values still carry more bits
/// than bf16 keeps, so the rounding is exercised.
#[test]
fn bf16_products_are_f32_products_of_rounded_operands() {
    let (in_dim, out_dim) = (40, 56);
    let x = var(&[2, 9, in_dim], 21);
    let w = (randn(&[out_dim, in_dim], 22) * 0.2).unwrap();
    let Some(weight) = packed_bf16(&w) else {
        return;
    };
    let probe = randn(&[2, 9, out_dim], 23);
    let (x_r, w_r, probe_r) = (bf16_rounded(&x), bf16_rounded(&w), bf16_rounded(&probe));
    let want_dx = probe_r.broadcast_matmul(&w_r).unwrap();

    // The frozen projection alone.
    let y = frozen_matmul_t(&x, &weight).unwrap();
    let want_y = x_r.broadcast_matmul(&w_r.t().unwrap()).unwrap();
    let dx = (&y * &probe)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let (out, grad) = (
        relative(&y, &want_y),
        relative(dx.get(&x).unwrap(), &want_dx),
    );
    assert_close("frozen projection, bf16", (out, grad));

    // With a LoRA update (no dropout), γ = 2, on grid inputs: at rank 32 (dA, dB in f32)
    // and at BF16_GRAD_MIN_RANK (dA, dB in bf16 too where the kernel is AMX).
    let grid = |t: &Tensor| ((t * 8.0).unwrap().round().unwrap() / 16.0).unwrap();
    let x = Var::from_tensor(&grid(x.as_tensor())).unwrap();
    let probe = grid(&probe);
    for (rank, seed) in [(32, 24), (BF16_GRAD_MIN_RANK, 26)] {
        let (x_r, probe_r) = (x.as_tensor().clone(), probe.clone());
        let adapter = LoraAdapter {
            a: Var::from_tensor(&grid(&randn(&[rank, in_dim], seed))).unwrap(),
            b: Var::from_tensor(&grid(&randn(&[out_dim, rank], seed + 1))).unwrap(),
            scale: 2.0,
            dropout: 0.0,
            id: 1,
        };
        let want_y = x_r.broadcast_matmul(&w_r.t().unwrap()).unwrap();
        let want_dx = probe_r.broadcast_matmul(&w_r).unwrap();
        let y = adapter.forward(&x, &weight, Mode::Eval).unwrap();
        let grads = (&y * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let (a_r, b_r) = (
            bf16_rounded(adapter.a.as_tensor()),
            bf16_rounded(adapter.b.as_tensor()),
        );
        let rows = |t: &Tensor| t.flatten_to(1).unwrap();
        // y = round(x) round(W)ᵀ + γ round(d) round(B)ᵀ, d = round(x) round(A)ᵀ
        let d = x_r.broadcast_matmul(&a_r.t().unwrap()).unwrap();
        assert!(
            max_abs_diff(&bf16_rounded(&d), &d) > 0.0,
            "the grid inputs must leave d with more bits than bf16 keeps"
        );
        let want_y = (&want_y
            + (bf16_rounded(&d)
                .broadcast_matmul(&b_r.t().unwrap())
                .unwrap()
                * 2.0)
                .unwrap())
        .unwrap();
        // u = γ round(dy) round(B); dx = round(dy) round(W) + round(u) round(A)
        let u = (probe_r.broadcast_matmul(&b_r).unwrap() * 2.0).unwrap();
        assert!(
            max_abs_diff(&bf16_rounded(&u), &u) > 0.0,
            "the grid inputs must leave u with more bits than bf16 keeps"
        );
        let want_dx = (&want_dx + bf16_rounded(&u).broadcast_matmul(&a_r).unwrap()).unwrap();
        // dA = uᵀ x, dB = γ dyᵀ d: in f32, or from bf16-rounded u and d (x and dy are on
        // the grid, exact in bf16) where they run in bf16.
        let grads_in_bf16 =
            rank >= BF16_GRAD_MIN_RANK && Bf16Kernel::best() == Some(Bf16Kernel::Amx);
        let (u_w, d_w) = match grads_in_bf16 {
            true => (bf16_rounded(&u), bf16_rounded(&d)),
            false => (u.clone(), d.clone()),
        };
        let want_da = rows(&u_w)
            .t()
            .unwrap()
            .matmul(&rows(x.as_tensor()))
            .unwrap();
        let want_db = (rows(&probe).t().unwrap().matmul(&rows(&d_w)).unwrap() * 2.0).unwrap();
        let worst = [
            relative(grads.get(&x).unwrap(), &want_dx),
            relative(grads.get(&adapter.a).unwrap(), &want_da),
            relative(grads.get(&adapter.b).unwrap(), &want_db),
        ]
        .into_iter()
        .fold(0f32, f32::max);
        let label = format!("lora rank {rank}, bf16 products (dA, dB bf16: {grads_in_bf16})");
        assert_close(&label, (relative(&y, &want_y), worst));
    }
}

/// The output head with packed bf16 weights: log-probs of `round(h) round(W)ᵀ`, and the
/// gradient rows `round(onehot − softmax) round(W)` scaled by each row's upstream gradient
/// (the two products the op runs on AMX), from candle's f32 ops on rounded operands.
#[test]
fn output_head_with_bf16_products_matches_rounded_operands() {
    let (rows, hidden_dim, vocab) = (150, 48, 300);
    let hidden = var(&[rows, hidden_dim], 31);
    let w = (randn(&[vocab, hidden_dim], 32) * 0.5).unwrap();
    let Some(weight) = packed_bf16(&w) else {
        return;
    };
    let ids: Vec<u32> = (0..rows as u32)
        .map(|i| (i * 53 + 11) % vocab as u32)
        .collect();
    let out = head_target_log_probs(&hidden, &weight, ids.clone()).unwrap();
    let probe = randn(&[rows], 33);
    let grads = (&out * &probe)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();

    let w_r = bf16_rounded(&w);
    let logits = bf16_rounded(&hidden).matmul(&w_r.t().unwrap()).unwrap();
    let targets = Tensor::from_vec(ids.clone(), (1, rows), &Device::Cpu).unwrap();
    let want = target_log_probs_composite(&logits.unsqueeze(0).unwrap(), &targets)
        .unwrap()
        .squeeze(0)
        .unwrap();
    let mut onehot = vec![0f32; rows * vocab];
    for (i, &t) in ids.iter().enumerate() {
        onehot[i * vocab + t as usize] = 1.0;
    }
    let onehot = Tensor::from_vec(onehot, (rows, vocab), &Device::Cpu).unwrap();
    let softmax = candle_nn::ops::softmax_last_dim(&logits).unwrap();
    let rows_grad = bf16_rounded(&(onehot - softmax).unwrap())
        .matmul(&w_r)
        .unwrap();
    let want_grad = rows_grad
        .broadcast_mul(&probe.unsqueeze(1).unwrap())
        .unwrap();
    let got_grad = grads.get(&hidden).unwrap();
    assert_close(
        "output head, bf16",
        (relative(&out, &want), relative(got_grad, &want_grad)),
    );
}
