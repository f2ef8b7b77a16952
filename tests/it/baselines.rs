//! The paper's other baselines: series and parallel bottleneck adapters (LLM-Adapters) and
//! prefix tuning (PEFT). Identity at init, the placements' formulas against a hand
//! computation, prefix positions against the KV cache of a real context, gradients
//! against finite differences, folders that load back, and Table I's parameter shares.

use crate::common::*;
use candle_core::{DType, Device, Tensor, Var};
use rora::adapters::{self, peft, AttachSpec, Method};
use rora::eval::generate::{greedy_batch, greedy_no_cache};
use rora::model::{KvCache, Llama};
use rora::nn::{
    BottleneckAdapter, Linear, Mode, NonLinearity, Placement, PrefixParams, PrefixTuning,
};

fn spec(yaml: &str) -> AttachSpec {
    serde_yaml_ng::from_str(yaml).unwrap()
}

/// Two layers with the same key/value heads (prefix tuning needs that), different query
/// heads and MLP widths.
fn tiny_uniform_kv() -> Llama {
    tiny_llama(
        &[
            TinyLayer {
                heads: 8,
                kv_heads: 4,
                mlp: 96,
            },
            TinyLayer {
                heads: 4,
                kv_heads: 4,
                mlp: 64,
            },
        ],
        7,
    )
}

fn story_ids(loaded: &rora::model::LoadedModel, text: &str, bos: bool) -> Vec<u32> {
    loaded.tokenizer.encode(text, bos).unwrap()
}

#[test]
fn fresh_bottleneck_adapters_leave_logits_unchanged() {
    let base = load_stories();
    let ids = ids_tensor(&story_ids(&base, "Once upon a time, there was a cat", true));
    let before = base.model.forward(&ids, None, None).unwrap();
    for yaml in [
        "method: series",
        "method: parallel",
        "method: series\ntargets: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]",
        "method: parallel\ntargets: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]\nnon_linearity: gelu",
    ] {
        let mut m = base.model.clone();
        let s = spec(yaml);
        let report = adapters::attach(&mut m, &s, 3).unwrap();
        assert_eq!(report.adapted_modules, 5 * s.targets().len(), "{yaml}");
        let diff = max_abs_diff(&before, &m.forward(&ids, None, None).unwrap());
        assert!(diff < 1e-6, "{yaml}: {diff}");
    }
}

#[test]
fn llm_adapters_default_targets_and_placements() {
    assert_eq!(
        Method::Series.default_targets(),
        ["gate_proj", "up_proj", "down_proj"]
    );
    assert_eq!(
        Method::Parallel.default_targets(),
        ["q_proj", "k_proj", "v_proj"]
    );
    let mut m = load_stories().model;
    adapters::attach(&mut m, &spec("method: series\nbottleneck_size: 16"), 0).unwrap();
    let mlp = &m.layers[0].mlp;
    let adapter = |l: &Linear| match l.adapter() {
        Some(rora::nn::Adapter::Bottleneck(b)) => b.clone(),
        other => panic!("expected a bottleneck adapter, got {other:?}"),
    };
    // stories260K: hidden 64, MLP 172. gate/up: on the input (64 → 16 → 64); down: on the
    // output (64 → 16 → 64); LLM-Adapters' mh_adapter and output_adapter.
    for (l, placement, d) in [
        (&mlp.gate_proj, Placement::Before, 64),
        (&mlp.up_proj, Placement::Before, 64),
        (&mlp.down_proj, Placement::After, 64),
    ] {
        let a = adapter(l);
        assert_eq!(a.placement, placement);
        assert_eq!(a.down.dims(), [16, d]);
        assert_eq!(a.up.dims(), [d, 16]);
    }
    let mut m = load_stories().model;
    adapters::attach(
        &mut m,
        &spec("method: parallel\nbottleneck_size: 16\ntargets: [up_proj]"),
        0,
    )
    .unwrap();
    let a = adapter(&m.layers[0].mlp.up_proj);
    assert_eq!(a.placement, Placement::Parallel);
    assert_eq!(
        (a.down.dims(), a.up.dims()),
        (&[16, 64][..], &[172, 16][..])
    );
}

/// The three placements against the formulas written out in f64 loops.
#[test]
fn bottleneck_placements_compute_llm_adapters_formulas() {
    let w = [[0.5f64, -1.0], [0.25, 2.0], [-0.75, 0.1]]; // (out 3, in 2)
    let x = [0.3f64, -0.7];
    let s = 0.8;
    let matvec = |m: &[Vec<f64>], v: &[f64]| -> Vec<f64> {
        m.iter()
            .map(|row| row.iter().zip(v).map(|(a, b)| a * b).sum())
            .collect()
    };
    let to_t = |m: &[Vec<f64>]| {
        let flat: Vec<f32> = m.iter().flatten().map(|&v| v as f32).collect();
        Tensor::from_vec(flat, (m.len(), m[0].len()), &Device::Cpu).unwrap()
    };
    let wv: Vec<Vec<f64>> = w.iter().map(|r| r.to_vec()).collect();
    let branch = |down: &[Vec<f64>], up: &[Vec<f64>], z: &[f64]| -> Vec<f64> {
        let h: Vec<f64> = matvec(down, z).iter().map(|v| v.tanh()).collect();
        matvec(up, &h).iter().map(|v| s * v).collect()
    };
    let down_in = vec![vec![0.9, -0.4], vec![0.2, 0.6]]; // (2, in)
    let up_in = vec![vec![0.3, -0.5], vec![-0.2, 0.7]]; // (in, 2)
    let down_out = vec![vec![0.1, -0.3, 0.8], vec![0.5, 0.4, -0.6]]; // (2, out)
    let up_out = vec![vec![0.2, 0.1], vec![-0.9, 0.3], vec![0.4, -0.2]]; // (out, 2)
    let add = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(p, q)| p + q).collect::<Vec<_>>();
    let cases = [
        (Placement::Before, &down_in, &up_in, {
            matvec(&wv, &add(&x, &branch(&down_in, &up_in, &x)))
        }),
        (Placement::After, &down_out, &up_out, {
            let z = matvec(&wv, &x);
            add(&z, &branch(&down_out, &up_out, &z))
        }),
        (Placement::Parallel, &down_in, &up_out, {
            add(&matvec(&wv, &x), &branch(&down_in, &up_out, &x))
        }),
    ];
    for (placement, down, up, want) in cases {
        let mut linear = Linear::new(to_t(&wv));
        linear.set_adapter(Some(rora::nn::Adapter::Bottleneck(BottleneckAdapter {
            down: Var::from_tensor(&to_t(down)).unwrap(),
            up: Var::from_tensor(&to_t(up)).unwrap(),
            placement,
            non_linearity: NonLinearity::Tanh,
            scaling: s,
            dropout: 0.0,
            id: 0,
        })));
        let xs = Tensor::from_vec(x.map(|v| v as f32).to_vec(), (1, 2), &Device::Cpu).unwrap();
        let got: Vec<f32> = linear
            .forward(&xs, Mode::Eval)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for (g, w) in got.iter().zip(&want) {
            // f32 arithmetic on values of order 1: a few ulps.
            assert!(
                (*g as f64 - w).abs() < 1e-6,
                "{placement:?}: {got:?} vs {want:?}"
            );
        }
    }
}

/// A direct prefix whose rows are `rows` (n, layers · 2 · kv_dim).
fn direct_prefix(model: &Llama, rows: Tensor) -> PrefixTuning {
    let kv_heads = model.layers[0].self_attn.num_kv_heads;
    PrefixTuning {
        num_virtual_tokens: rows.dim(0).unwrap(),
        params: PrefixParams::Direct {
            embedding: Var::from_tensor(&rows).unwrap(),
        },
        num_layers: model.num_layers(),
        kv_heads,
        head_dim: model.config.head_dim(),
    }
}

#[test]
fn zero_length_prefix_equals_the_base_model() {
    let base = load_stories();
    let ids = ids_tensor(&story_ids(&base, "Once upon a time, there was a cat", true));
    let before = base.model.forward(&ids, None, None).unwrap();
    let mut m = base.model.clone();
    let width = m.num_layers() * 2 * m.layers[0].self_attn.num_kv_heads * m.config.head_dim();
    m.prefix = Some(direct_prefix(
        &m,
        Tensor::zeros((0, width), DType::F32, &Device::Cpu).unwrap(),
    ));
    let diff = max_abs_diff(&before, &m.forward(&ids, None, None).unwrap());
    assert!(diff < 1e-6, "{diff}");
}

/// PEFT's rows for a prefix equal to the cache of a real context: for each token, the
/// keys and values of every layer in PEFT's order (layer 0 keys, layer 0 values, …).
fn rows_from_cache(model: &Llama, cache: &KvCache) -> Tensor {
    let mut blocks = Vec::new();
    for i in 0..model.num_layers() {
        let (k, v) = cache.layer(i).unwrap().unwrap();
        for t in [k, v] {
            // (1, kvh, n, hd) → (n, kvh · hd)
            let (_, kvh, n, hd) = t.dims4().unwrap();
            blocks.push(
                t.squeeze(0)
                    .unwrap()
                    .transpose(0, 1)
                    .unwrap()
                    .reshape((n, kvh * hd))
                    .unwrap(),
            );
        }
    }
    Tensor::cat(&blocks, 1).unwrap()
}

/// The strongest check of the prefix's positions and masks: a prefix whose keys and values
/// are a real context's cached ones must make the model on `x` compute exactly what the
/// base model computes for `x` after that context (real tokens at positions n, n+1, …,
/// prefix keys not rotated again) — batched and left-padded too.
#[test]
fn a_prefix_equal_to_a_cached_context_continues_that_context() {
    let loaded = load_stories();
    let base = &loaded.model;
    let ctx = story_ids(&loaded, "Once upon a time, there was a little", true);
    let mut cache = KvCache::new(base.num_layers());
    base.forward(&ids_tensor(&ctx), None, Some(&mut cache))
        .unwrap();
    let mut with_prefix = base.clone();
    with_prefix.prefix = Some(direct_prefix(base, rows_from_cache(base, &cache)));
    let xs = [
        story_ids(&loaded, " dog. He liked to play in the park", false),
        story_ids(&loaded, " girl named Lily", false),
    ];
    for x in &xs {
        let whole: Vec<u32> = ctx.iter().chain(x).copied().collect();
        let want = base
            .forward(&ids_tensor(&whole), None, None)
            .unwrap()
            .narrow(1, ctx.len(), x.len())
            .unwrap();
        let got = with_prefix.forward(&ids_tensor(x), None, None).unwrap();
        let diff = max_abs_diff(&want, &got);
        // Same products over the same keys, summed in another order: f32 rounding only.
        assert!(diff < 1e-4 * max_abs(&want).max(1.0), "{diff}");
    }
    // Batched, the shorter row left-padded.
    let longest = xs.iter().map(Vec::len).max().unwrap();
    let mut ids = Vec::new();
    let mut mask = Vec::new();
    for x in &xs {
        let pad = longest - x.len();
        ids.extend(std::iter::repeat_n(0u32, pad).chain(x.iter().copied()));
        mask.extend((0..longest).map(|j| if j < pad { 0f32 } else { 1.0 }));
    }
    let ids = Tensor::from_vec(ids, (2, longest), &Device::Cpu).unwrap();
    let mask = Tensor::from_vec(mask, (2, longest), &Device::Cpu).unwrap();
    let batched = with_prefix.forward(&ids, Some(&mask), None).unwrap();
    for (r, x) in xs.iter().enumerate() {
        let alone = with_prefix.forward(&ids_tensor(x), None, None).unwrap();
        let row = batched
            .get(r)
            .unwrap()
            .narrow(0, longest - x.len(), x.len())
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let diff = max_abs_diff(&alone, &row);
        assert!(diff < 1e-4 * max_abs(&alone).max(1.0), "row {r}: {diff}");
    }
}

#[test]
fn batched_generation_with_a_prefix_equals_unbatched_and_uncached() {
    let loaded = load_stories();
    let mut m = loaded.model.clone();
    adapters::attach(&mut m, &spec("method: prefix\nnum_virtual_tokens: 5"), 4).unwrap();
    // PEFT's N(0, 1) init is large next to stories260K's keys; scale it down so that the
    // prefix steers the text without drowning it.
    let PrefixParams::Direct { embedding } = &m.prefix.as_ref().unwrap().params else {
        panic!("expected a direct prefix");
    };
    embedding
        .set(&(embedding.as_tensor() * 0.3).unwrap())
        .unwrap();
    let prompts = [
        story_ids(&loaded, "Once upon a time", true),
        story_ids(&loaded, "The little dog wanted to", true),
        story_ids(&loaded, "Lily", true),
    ];
    let batched = greedy_batch(&m, &prompts, 12, &[]).unwrap();
    let base_out = greedy_batch(&loaded.model, &prompts, 12, &[]).unwrap();
    assert_ne!(batched, base_out, "the prefix changed nothing");
    for (p, out) in prompts.iter().zip(&batched) {
        assert_eq!(
            &greedy_batch(&m, std::slice::from_ref(p), 12, &[]).unwrap()[0],
            out
        );
        assert_eq!(&greedy_no_cache(&m, p, 12, &[]).unwrap(), out);
    }
}

#[test]
fn new_adapter_gradients_match_finite_differences() {
    let cases: [(&str, &[&str]); 4] = [
        (
            "method: series\nbottleneck_size: 8\ntargets: [q_proj, o_proj, up_proj, down_proj]",
            &[
                "layers.0.self_attn.q_proj.adapter_down.weight",
                "layers.0.self_attn.o_proj.adapter_up.weight",
                "layers.1.mlp.down_proj.adapter_down.weight",
            ],
        ),
        (
            "method: parallel\nbottleneck_size: 8\ntargets: [k_proj, gate_proj]\nnon_linearity: silu",
            &[
                "layers.0.self_attn.k_proj.adapter_down.weight",
                "layers.1.mlp.gate_proj.adapter_up.weight",
            ],
        ),
        (
            "method: prefix\nnum_virtual_tokens: 3",
            &["prompt_encoder.default.embedding.weight"],
        ),
        (
            "method: prefix\nnum_virtual_tokens: 3\nprefix_projection: true\nencoder_hidden_size: 6",
            &[
                "prompt_encoder.default.embedding.weight",
                "prompt_encoder.default.transform.0.weight",
                "prompt_encoder.default.transform.2.bias",
            ],
        ),
    ];
    for (yaml, names) in cases {
        let mut model = tiny_uniform_kv();
        adapters::attach(&mut model, &spec(yaml), 1).unwrap();
        randomize_adapters(&model, 2);
        let grads = tiny_loss(&model).backward().unwrap();
        for (_, _, lin) in model.projections() {
            assert!(
                grads.get(lin.weight()).is_none(),
                "{yaml}: a base weight got a gradient"
            );
        }
        let vars = adapters::trainable_vars(&model);
        for want in names {
            let (name, var) = vars
                .iter()
                .find(|(n, _)| n.ends_with(want))
                .unwrap_or_else(|| panic!("{yaml}: no tensor {want}"));
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient"));
            let err = fd_relative_error(var, g, || {
                tiny_loss(&model).to_scalar::<f32>().unwrap() as f64
            });
            println!("{name}: relative error {err:.2e}");
            assert!(err < 1e-2, "{yaml} {name}: relative error {err}");
        }
    }
}

#[test]
fn saved_adapters_load_back_to_identical_logits() {
    let loaded = load_stories();
    let ids = ids_tensor(&story_ids(
        &loaded,
        "Once upon a time, there was a cat",
        true,
    ));
    for (yaml, peft_type) in [
        ("method: series\nbottleneck_size: 16", "BOTTLENECK"),
        (
            "method: parallel\nbottleneck_size: 16\ntargets: [up_proj, down_proj]\nscaling: 2.0\nnon_linearity: relu",
            "BOTTLENECK",
        ),
        ("method: prefix\nnum_virtual_tokens: 4", "PREFIX_TUNING"),
        (
            "method: prefix\nnum_virtual_tokens: 4\nprefix_projection: true\nencoder_hidden_size: 16",
            "PREFIX_TUNING",
        ),
    ] {
        let s = spec(yaml);
        let mut m = loaded.model.clone();
        adapters::attach(&mut m, &s, 5).unwrap();
        randomize_adapters(&m, 6);
        let want = m.forward(&ids, None, None).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        peft::write_adapter(&m, &s, Some("stories260K".into()), tmp.path()).unwrap();
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(tmp.path().join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(cfg["peft_type"], peft_type);
        let mut fresh = loaded.model.clone();
        let (read, _) = peft::attach_from_folder(&mut fresh, tmp.path()).unwrap();
        let got = fresh.forward(&ids, None, None).unwrap();
        assert_eq!(max_abs_diff(&want, &got), 0.0, "{yaml}");
        if peft_type == "PREFIX_TUNING" {
            // PEFT's fields for a grouped-query model: stories260K has 4 kv heads of 8.
            assert_eq!(cfg["num_attention_heads"], 4);
            assert_eq!(cfg["token_dim"], 32);
            assert_eq!(cfg["num_layers"], 5);
            assert_eq!(cfg["num_virtual_tokens"], 4);
            let t = candle_core::safetensors::load(
                tmp.path().join("adapter_model.safetensors"),
                &Device::Cpu,
            )
            .unwrap();
            assert_eq!(t["prompt_embeddings"].dims(), [4, 5 * 2 * 32]);
        } else {
            assert_eq!(read.method, s.method);
            assert_eq!(read.targets(), s.targets());
            assert_eq!(read.scaling, s.scaling);
            assert_eq!(read.non_linearity, s.non_linearity);
            assert_eq!(cfg["use_parallel_adapter"], s.method == Some(Method::Parallel));
        }
    }
}

#[test]
fn merged_exports_are_refused_for_prefix_and_bottleneck_adapters() {
    for (yaml, needle) in [
        ("method: series", "nonlinear"),
        ("method: prefix\nnum_virtual_tokens: 2", "prefix tuning"),
    ] {
        let mut loaded = load_stories();
        let s = spec(yaml);
        adapters::attach(&mut loaded.model, &s, 0).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        for key in ["merged", "gguf", "merged_uniform"] {
            let dest = tmp.path().join("out");
            let export: rora::export::ExportSpec =
                serde_yaml_ng::from_str(&format!("{key}: {}", dest.display())).unwrap();
            let err = rora::export::export(&loaded, Some(&s), &export)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(&format!("export.{key}")) && err.contains(needle),
                "{err}"
            );
            assert!(
                !dest.exists(),
                "{key}: a refused export wrote {}",
                dest.display()
            );
        }
        let err = rora::adapters::merge::merge_into_base(&mut loaded.model.clone())
            .unwrap_err()
            .to_string();
        assert!(err.contains(needle), "{err}");
        let err =
            rora::export::gguf_adapter::write_adapter_gguf(&loaded, &tmp.path().join("a.gguf"))
                .unwrap_err()
                .to_string();
        assert!(err.contains("adapter: DIR"), "{err}");
    }
    // And the pipeline validator says so before any work.
    let tmp = tempfile::tempdir().unwrap();
    let (out, run) = run_yaml(
        tmp.path(),
        &format!(
            "name: t\nstages:\n  - load:\n      model: {}\n  - attach:\n      method: parallel\n  - export:\n      merged: merged\n",
            stories_dir().display()
        ),
        &[],
    );
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(
        err.contains("export.merged") && err.contains("parallel"),
        "{err}"
    );
    assert!(!run.exists());
}

#[test]
fn prefix_tuning_is_refused_on_layers_with_different_key_value_heads() {
    let mut m = tiny_llama(&NON_UNIFORM_LAYERS, 1);
    let err = adapters::attach(&mut m, &spec("method: prefix"), 0)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("key/value heads") && err.contains("layer"),
        "{err}"
    );
    for (yaml, needle) in [
        ("method: prefix\ntargets: [q_proj]", "targets"),
        ("method: prefix\ndropout: 0.1", "dropout"),
        (
            "method: prefix\nnum_virtual_tokens: 0",
            "num_virtual_tokens",
        ),
        ("method: series\nbottleneck_size: 0", "bottleneck_size"),
        ("method: series\nrank_pattern: {q_proj: 4}", "rank_pattern"),
        ("method: series\nnon_linearity: swish", "non_linearity"),
    ] {
        let err = match serde_yaml_ng::from_str::<AttachSpec>(yaml) {
            Ok(s) => s.validate(None).unwrap_err().to_string(),
            Err(e) => e.to_string(),
        };
        assert!(err.contains(needle), "{yaml}: {err}");
    }
}

/// The dry run's count (from the shapes) equals what `attach` makes, for every method, on a
/// model whose layers differ.
#[test]
fn trainable_counts_from_shapes_equal_the_attached_tensors() {
    for (yaml, layers) in [
        ("method: series\nbottleneck_size: 8\ntargets: [q_proj, o_proj, up_proj, down_proj]", &NON_UNIFORM_LAYERS[..]),
        ("method: parallel\nbottleneck_size: 8\ntargets: [v_proj, gate_proj, down_proj]", &NON_UNIFORM_LAYERS[..]),
        ("method: dora\nrank: 4\nrank_pattern: {v_proj: 2}", &NON_UNIFORM_LAYERS[..]),
        ("method: prefix\nnum_virtual_tokens: 3", &[TinyLayer { heads: 8, kv_heads: 4, mlp: 96 }, TinyLayer { heads: 4, kv_heads: 4, mlp: 64 }][..]),
        ("method: prefix\nnum_virtual_tokens: 3\nprefix_projection: true\nencoder_hidden_size: 5", &[TinyLayer { heads: 8, kv_heads: 4, mlp: 96 }][..]),
    ] {
        let mut m = tiny_llama(layers, 3);
        let s = spec(yaml);
        let report = adapters::attach(&mut m, &s, 0).unwrap();
        let counted: usize = adapters::trainable_vars(&m)
            .iter()
            .map(|(_, v)| v.elem_count())
            .sum();
        assert_eq!(report.trainable_params, counted as u64, "{yaml}");
        let from_shapes = s.trainable_params(m.config.hidden_size, m.config.head_dim(), &m.layer_shapes);
        assert_eq!(from_shapes, counted as u64, "{yaml}");
    }
}

/// Table I's "# Params (%)" on LLaMA-7B from `--dry-run`, with LLM-Adapters' settings
/// (its `math_running_commands`; DoRA's commonsense recipe for LoRA/DoRA) and PEFT's
/// convention, trainable / (base + trainable).
#[test]
fn table_one_parameter_shares_on_llama_7b() {
    let rows = [
        ("prefix", "attach.method=prefix", "0.12"),
        (
            "series",
            "attach.method=series attach.targets=[down_proj]",
            "0.99",
        ),
        (
            "parallel",
            "attach.method=parallel attach.targets=[up_proj,down_proj]",
            "3.54",
        ),
        ("lora", "attach.method=lora", "0.83"),
        ("dora", "attach.method=dora", "0.84"),
    ];
    for (what, sets, want) in rows {
        let mut args = vec!["--pipeline", "pipelines/llama7b-table1.yaml", "--dry-run"];
        for s in sets.split(' ') {
            args.extend(["--set", s]);
        }
        let out = recover(&args);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(out.status.success(), "{what}: {}", stderr(&out));
        let share = text
            .split("Trainable: ")
            .nth(1)
            .and_then(|t| t.split('(').nth(1))
            .and_then(|t| t.split('%').next())
            .unwrap_or_else(|| panic!("{what}: no Trainable line in\n{text}"));
        let share: f64 = share.parse().unwrap();
        assert_eq!(format!("{share:.2}"), want, "{what}: {text}");
    }
}

/// Each new method through a whole pipeline — (prune →) attach → finetune (lm, or
/// distillation from the model before pruning) → eval (choice and generate, with the KV
/// cache) → the adapter alone — and that adapter, read back by `attach.from` onto the same
/// (pruned) model, answers every question exactly as the trained model did.
#[test]
fn each_new_method_trains_evaluates_exports_and_loads_back() {
    let prune = format!(
        "  - prune:\n      calibration: {}/data/stories260K-train.txt\n      n_samples: 4\n      seq_len: 32\n      mlp_ratio: 0.5\n      layers: [1, 3]\n",
        env!("CARGO_MANIFEST_DIR")
    );
    for (attach, pruned, objective) in [
        ("method: series\n      bottleneck_size: 16", false, "lm"),
        (
            "method: parallel\n      bottleneck_size: 16\n      targets: [up_proj, down_proj]",
            true,
            "kd+lm",
        ),
        (
            "method: prefix\n      num_virtual_tokens: 4\n      prefix_projection: true\n      encoder_hidden_size: 16",
            true,
            "kd",
        ),
    ] {
        let prune = if pruned { prune.as_str() } else { "" };
        let tmp = tempfile::tempdir().unwrap();
        let eval = format!(
            "  - eval:\n      label: after\n      tasks: [ARC-Easy]\n      data_dir: {}/data/commonsense\n      protocol: [choice, generate]\n      limit: 4\n      max_new_tokens: 8\n",
            shared_dir().display()
        );
        let train = format!(
            "name: t\nseed: 3\nstages:\n  - load:\n      model: {stories}\n{prune}  - attach:\n      {attach}\n  - finetune:\n      objective: {objective}\n      text: [data/stories260K-train.txt]\n      cutoff_len: 64\n      val_set_size: 0\n      batch_size: 4\n      micro_batch_size: 4\n      learning_rate: 1.0e-3\n      max_steps: 3\n      save_every: 3\n{eval}  - export:\n      adapter: adapter\n",
            stories = stories_dir().display()
        );
        let file = tmp.path().join("train.yaml");
        std::fs::write(&file, train).unwrap();
        let run = tmp.path().join("run");
        let out = recover(&[
            "--pipeline",
            file.to_str().unwrap(),
            "--set",
            &format!("run_dir={}", run.display()),
        ]);
        assert!(out.status.success(), "{attach}: {}", stderr(&out));
        let log = std::fs::read_to_string(run.join("train-log.jsonl")).unwrap();
        assert_eq!(log.lines().count(), 3, "{attach}");
        let reload = format!(
            "name: t\nseed: 3\nstages:\n  - load:\n      model: {}\n{prune}  - attach:\n      from: {}\n{eval}",
            stories_dir().display(),
            run.join("adapter").display()
        );
        let file = tmp.path().join("reload.yaml");
        std::fs::write(&file, reload).unwrap();
        let run2 = tmp.path().join("run2");
        let out = recover(&[
            "--pipeline",
            file.to_str().unwrap(),
            "--set",
            &format!("run_dir={}", run2.display()),
        ]);
        assert!(out.status.success(), "{attach} (reload): {}", stderr(&out));
        let records = |dir: &std::path::Path| std::fs::read_to_string(dir.join("eval-after.jsonl")).unwrap();
        let (trained, reloaded) = (records(&run), records(&run2));
        assert_eq!(trained.lines().count(), 8, "{attach}: 4 questions × 2 protocols");
        assert_eq!(trained, reloaded, "{attach}");
    }
}

/// A run of a series adapter with dropout and of a projected prefix, stopped and resumed,
/// ends bitwise where an uninterrupted run does.
#[test]
fn resumed_runs_of_new_methods_are_bitwise_equal() {
    for attach in [
        "method: series\n      bottleneck_size: 8\n      dropout: 0.1",
        "method: prefix\n      num_virtual_tokens: 3\n      prefix_projection: true\n      encoder_hidden_size: 8",
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("resume.yaml");
        let text = format!(
            "name: resume\nseed: 3\nstages:\n  - load:\n      model: {}\n  - attach:\n      {attach}\n  - finetune:\n      text: [{}/data/stories260K-train.txt]\n      cutoff_len: 32\n      batch_size: 4\n      micro_batch_size: 2\n      learning_rate: 2.0e-3\n      warmup_steps: 2\n      max_steps: 8\n      save_every: 4\n      val_set_size: 0\n",
            stories_dir().display(),
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::write(&file, text).unwrap();
        assert_resume_is_bitwise(tmp.path(), &file, 4, 8);
    }
}

/// A folder of another PEFT method is refused naming its `peft_type`; `adapter_gguf` of a
/// bottleneck adapter is refused by the validator, also when the method comes from an
/// adapter folder.
#[test]
fn other_peft_types_and_adapter_gguf_are_refused_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let ia3 = tmp.path().join("ia3");
    std::fs::create_dir_all(&ia3).unwrap();
    std::fs::write(
        ia3.join("adapter_config.json"),
        r#"{"peft_type": "IA3", "target_modules": ["k_proj"]}"#,
    )
    .unwrap();
    let err = match peft::read_adapter_config(&ia3) {
        Ok(_) => panic!("an IA3 folder was read"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("peft_type `IA3`"), "{err}");

    let mut loaded = load_stories();
    let s = spec("method: series\nbottleneck_size: 8");
    adapters::attach(&mut loaded.model, &s, 0).unwrap();
    let folder = tmp.path().join("series");
    peft::write_adapter(&loaded.model, &s, None, &folder).unwrap();
    for attach in [
        "method: series".to_string(),
        format!("from: {}", folder.display()),
    ] {
        let file = tmp.path().join("p.yaml");
        std::fs::write(
            &file,
            format!(
                "name: t\nstages:\n  - load:\n      model: {}\n  - attach:\n      {attach}\n  - export:\n      adapter_gguf: a.gguf\n",
                stories_dir().display()
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
        let err = stderr(&out);
        assert!(!out.status.success(), "{attach}");
        assert!(
            err.contains("export.adapter_gguf") && err.contains("series"),
            "{attach}: {err}"
        );
        assert!(!run.exists());
    }
}
