//! GGUF loading: a GGUF written from stories260K the way llama.cpp's converter writes one
//! (llama.cpp names, q/k rows permuted, sentencepiece tokenizer in the metadata) must give
//! the same weights, logits and token ids as the Hugging Face folder; a GPT-2 style
//! tokenizer rebuilt from metadata round-trips text; broken files give errors that name
//! them; and the real SmolLM2-135M GGUF (fetched by scripts/fetch-smollm2.sh) has a sane
//! perplexity on English text.

use crate::common::*;
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, IndexOp, Tensor, D};
use rora::model::{self, ModelSource, TextTokenizer};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

// ---------------------------------------------------------------------------------------
// Writing GGUF files

/// llama.cpp's `convert_hf_to_gguf.py` q/k permutation, written out independently of
/// the crate: `w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2)`.
pub(crate) fn llama_cpp_permute(w: &Tensor, n_head: usize) -> Tensor {
    let (rows, cols) = w.dims2().unwrap();
    w.reshape((n_head, 2, rows / n_head / 2, cols))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape((rows, cols))
        .unwrap()
}

/// The llama.cpp name of a Hugging Face tensor name.
fn gguf_name(hf: &str) -> String {
    match hf {
        "model.embed_tokens.weight" => return "token_embd.weight".into(),
        "model.norm.weight" => return "output_norm.weight".into(),
        "lm_head.weight" => return "output.weight".into(),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.").expect(hf);
    let (layer, part) = rest.split_once('.').unwrap();
    let part = match part {
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        "input_layernorm.weight" => "attn_norm.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        other => panic!("unexpected tensor {other}"),
    };
    format!("blk.{layer}.{part}")
}

/// A GGUF file's contents before writing: metadata and f32 tensors, by name.
struct GgufSpec {
    metadata: BTreeMap<String, Value>,
    tensors: BTreeMap<String, Tensor>,
}

impl GgufSpec {
    fn write(&self, path: &Path) {
        let qtensors: Vec<(String, QTensor)> = self
            .tensors
            .iter()
            .map(|(n, t)| (n.clone(), QTensor::quantize(t, GgmlDType::F32).unwrap()))
            .collect();
        let md: Vec<(&str, &Value)> = self.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let ts: Vec<(&str, &QTensor)> = qtensors.iter().map(|(n, q)| (n.as_str(), q)).collect();
        let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
        gguf_file::write(&mut f, &md, &ts).unwrap();
    }

    fn set(&mut self, key: &str, v: Value) {
        self.metadata.insert(key.to_string(), v);
    }
}

fn strings(v: &[String]) -> Value {
    Value::Array(v.iter().map(|s| Value::String(s.clone())).collect())
}

/// llama2.c's tokenizer.bin: `max_token_length: i32`, then per token `score: f32,
/// len: i32, bytes`. Returns the scores (the sentencepiece model's own).
fn llama2c_scores(path: &Path) -> Vec<f32> {
    let b = std::fs::read(path).unwrap();
    let mut at = 4;
    let mut scores = Vec::new();
    while at < b.len() {
        let score = f32::from_le_bytes(b[at..at + 4].try_into().unwrap());
        let len = i32::from_le_bytes(b[at + 4..at + 8].try_into().unwrap()) as usize;
        scores.push(score);
        at += 8 + len;
    }
    scores
}

/// stories260K as llama.cpp's converter would write it (f32, llama.cpp names, q/k rows
/// permuted, sentencepiece tokenizer: tokens and types from tokenizer.json, scores from
/// llama2.c's tok512.bin).
fn stories_gguf_spec() -> GgufSpec {
    let dir = stories_dir();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let n_head = cfg["num_attention_heads"].as_u64().unwrap() as usize;
    let n_kv = cfg["num_key_value_heads"].as_u64().unwrap() as usize;
    let hf = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut tensors = BTreeMap::new();
    for (name, t) in hf {
        let t = if name.ends_with("q_proj.weight") {
            llama_cpp_permute(&t, n_head)
        } else if name.ends_with("k_proj.weight") {
            llama_cpp_permute(&t, n_kv)
        } else {
            t
        };
        tensors.insert(gguf_name(&name), t);
    }

    let tok: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer.json")).unwrap())
            .unwrap();
    let vocab = tok["model"]["vocab"].as_object().unwrap();
    let mut tokens = vec![String::new(); vocab.len()];
    for (t, id) in vocab {
        tokens[id.as_u64().unwrap() as usize] = t.clone();
    }
    let scores = llama2c_scores(&dir.join("llama2c/tok512.bin"));
    assert_eq!(
        scores.len(),
        tokens.len(),
        "tok512.bin and tokenizer.json disagree"
    );
    let types: Vec<Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| {
            Value::I32(match i {
                0 => 2,     // unknown
                1 | 2 => 3, // control
                _ if t.starts_with("<0x") && t.len() == 6 => 6,
                _ => 1,
            })
        })
        .collect();

    let u32v = |k: &str| Value::U32(cfg[k].as_u64().unwrap() as u32);
    let mut spec = GgufSpec {
        metadata: BTreeMap::new(),
        tensors,
    };
    spec.set("general.architecture", Value::String("llama".into()));
    spec.set("general.name", Value::String("stories260K".into()));
    spec.set("llama.embedding_length", u32v("hidden_size"));
    spec.set("llama.block_count", u32v("num_hidden_layers"));
    spec.set("llama.attention.head_count", u32v("num_attention_heads"));
    spec.set("llama.attention.head_count_kv", u32v("num_key_value_heads"));
    spec.set("llama.feed_forward_length", u32v("intermediate_size"));
    spec.set("llama.context_length", u32v("max_position_embeddings"));
    spec.set("llama.rope.dimension_count", Value::U32(8));
    spec.set("llama.rope.freq_base", Value::F32(10000.0));
    spec.set("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5));
    spec.set("tokenizer.ggml.model", Value::String("llama".into()));
    spec.set("tokenizer.ggml.tokens", strings(&tokens));
    spec.set(
        "tokenizer.ggml.scores",
        Value::Array(scores.into_iter().map(Value::F32).collect()),
    );
    spec.set("tokenizer.ggml.token_type", Value::Array(types));
    spec.set("tokenizer.ggml.bos_token_id", Value::U32(1));
    spec.set("tokenizer.ggml.eos_token_id", Value::U32(2));
    spec.set("tokenizer.ggml.unknown_token_id", Value::U32(0));
    spec
}

pub(crate) fn write_stories_gguf(dir: &Path) -> PathBuf {
    let path = dir.join("stories260K.gguf");
    stories_gguf_spec().write(&path);
    path
}

fn error_text(e: anyhow::Error) -> String {
    format!("{e:#}")
}

pub(crate) const SENTENCES: &[&str] = &[
    "Once upon a time, there was a little girl named Lily.",
    "She had 3 cats and 12 dogs; they were 100% happy!",
    "Tom said: \"Let's go to the park?\" (It was 5:30 p.m.)",
    "Ça coûte 5€ — déjà vu, naïve café 日本.",
    "  two leading spaces\nand a newline\tand a tab",
];

// ---------------------------------------------------------------------------------------
// stories260K through GGUF

#[test]
fn stories_gguf_matches_the_safetensors_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let path = write_stories_gguf(tmp.path());

    // Weights: exactly the Hugging Face tensors (f32 round trip, permutation undone).
    let (cfg, weights, _) = model::gguf::load(&path, DType::F32, &Device::Cpu).unwrap();
    let hf = candle_core::safetensors::load(stories_dir().join("model.safetensors"), &Device::Cpu)
        .unwrap();
    let mut names: Vec<&String> = weights.names().collect();
    names.sort();
    let mut hf_names: Vec<&String> = hf.keys().collect();
    hf_names.sort();
    assert_eq!(names, hf_names);
    for (name, t) in &hf {
        let g = weights.get(name).unwrap();
        assert_eq!(g.dims(), t.dims(), "{name}");
        assert_eq!(max_abs_diff(g, t), 0.0, "{name}");
    }

    // Config.
    let folder_cfg = model::safetensors_dir::read_config(&stories_dir()).unwrap();
    assert_eq!(cfg.hidden_size, folder_cfg.hidden_size);
    assert_eq!(cfg.num_hidden_layers, folder_cfg.num_hidden_layers);
    assert_eq!(cfg.num_attention_heads, folder_cfg.num_attention_heads);
    assert_eq!(cfg.num_key_value_heads(), folder_cfg.num_key_value_heads());
    assert_eq!(cfg.intermediate_size, folder_cfg.intermediate_size);
    assert_eq!(cfg.head_dim(), folder_cfg.head_dim());
    assert_eq!(cfg.vocab_size, folder_cfg.vocab_size);
    assert_eq!(cfg.rms_norm_eps, folder_cfg.rms_norm_eps);
    assert_eq!(cfg.rope_theta, folder_cfg.rope_theta);
    assert_eq!(cfg.max_position_embeddings, Some(512));
    assert_eq!(cfg.tie_word_embeddings, Some(true));
    assert_eq!(cfg.bos_token_id(), Some(1));
    assert_eq!(cfg.eos_token_ids(), vec![2]);
    assert!(cfg.layer_shapes.is_none());
    assert!(cfg.rope_scaling.is_none());
    let header_cfg = model::gguf::read_config(&path).unwrap();
    assert_eq!(
        serde_json::to_value(&header_cfg).unwrap(),
        serde_json::to_value(&cfg).unwrap()
    );
    let via_spec = model::read_config_only(path.to_str().unwrap()).unwrap();
    assert_eq!(via_spec.hidden_size, 64);

    // Logits of the whole model, through `model::load` as the pipeline calls it.
    let g = model::load(&ModelSource::Gguf(path.clone()), DType::F32, &Device::Cpu).unwrap();
    let f = model::load(
        &ModelSource::Folder(stories_dir()),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let prompt = "Once upon a time, there was a little girl named Lily. She liked to play";
    let ids = f.tokenizer.encode(prompt, true).unwrap();
    assert_eq!(g.tokenizer.encode(prompt, true).unwrap(), ids);
    let x = ids_tensor(&ids);
    let lg = g.model.forward(&x, None, None).unwrap();
    let lf = f.model.forward(&x, None, None).unwrap();
    let diff = max_abs_diff(&lg, &lf);
    println!("stories260K GGUF vs safetensors: max |logit diff| = {diff:e}");
    assert!(diff <= 1e-4, "logits differ by {diff}");

    // The tokenizer rebuilt from sentencepiece metadata gives tokenizer.json's ids.
    assert_eq!(g.tokenizer.bos_id(), Some(1));
    assert_eq!(g.tokenizer.eos_ids(), &[2]);
    assert_eq!(g.tokenizer.vocab_size(), f.tokenizer.vocab_size());
    for s in SENTENCES {
        let a = f.tokenizer.encode(s, false).unwrap();
        let b = g.tokenizer.encode(s, false).unwrap();
        assert_eq!(b, a, "ids of {s:?}");
        assert_eq!(
            g.tokenizer.decode(&b).unwrap(),
            f.tokenizer.decode(&a).unwrap()
        );
    }
    // Byte fallback was exercised: '日' is not a piece of this 512-token vocab.
    let ids = g.tokenizer.encode("日", false).unwrap();
    let pieces: Vec<String> = ids
        .iter()
        .map(|&i| g.tokenizer.inner().id_to_token(i).unwrap())
        .collect();
    assert!(pieces.contains(&"<0xE6>".to_string()), "{pieces:?}");
    assert_eq!(g.tokenizer.decode(&ids).unwrap(), "日");
}

#[test]
fn a_tokenizer_json_in_the_metadata_wins() {
    let tmp = tempfile::tempdir().unwrap();
    let mut spec = stories_gguf_spec();
    let json = std::fs::read_to_string(stories_dir().join("tokenizer.json")).unwrap();
    spec.set("tokenizer.huggingface.json", Value::String(json));
    // A model type we cannot build shows that the JSON was used instead.
    spec.set("tokenizer.ggml.model", Value::String("bert".into()));
    let path = tmp.path().join("m.gguf");
    spec.write(&path);
    let (_, _, tok) = model::gguf::load(&path, DType::F32, &Device::Cpu).unwrap();
    let want =
        TextTokenizer::from_file(&stories_dir().join("tokenizer.json"), Some(1), vec![2]).unwrap();
    for s in SENTENCES {
        assert_eq!(tok.encode(s, true).unwrap(), want.encode(s, true).unwrap());
    }
}

/// `tokenizer.ggml.add_bos_token` is the tokenizer's BOS default (absent: BOS first), and
/// evaluation without `bos` follows it: a file saying false is scored exactly as with
/// `bos: false`, and differently from `bos: true`.
#[test]
fn add_bos_token_false_means_eval_puts_no_bos() {
    use rora::eval::{run_eval, EvalSpec, Protocol};
    let tmp = tempfile::tempdir().unwrap();
    let plain = write_stories_gguf(tmp.path());
    let m = model::load(&ModelSource::Gguf(plain), DType::F32, &Device::Cpu).unwrap();
    assert!(m.tokenizer.add_bos(), "no key: BOS first");
    let mut spec = stories_gguf_spec();
    spec.set("tokenizer.ggml.add_bos_token", Value::Bool(false));
    let path = tmp.path().join("no-bos.gguf");
    spec.write(&path);
    let m = model::load(&ModelSource::Gguf(path), DType::F32, &Device::Cpu).unwrap();
    assert!(!m.tokenizer.add_bos());
    let scores = |bos: Option<bool>| {
        let mut spec = EvalSpec::new("g", [rora::data::Task::BoolQ]);
        spec.data_dir = shared_dir().join("data/commonsense");
        spec.limit = Some(3);
        spec.protocol = vec![Protocol::Content];
        spec.bos = bos;
        let run = run_eval(&spec, &m.model, &m.tokenizer, 0).unwrap();
        let s: Vec<Vec<f64>> = run
            .records
            .iter()
            .map(|r| r.scores.clone().unwrap())
            .collect();
        (s, run.report.bos)
    };
    let (by_default, recorded) = scores(None);
    assert!(!recorded);
    assert_eq!(by_default, scores(Some(false)).0);
    assert_ne!(by_default, scores(Some(true)).0);
}

#[test]
fn per_layer_head_counts_and_pruned_layers() {
    // Layer 1 pruned to 4 query heads / 2 kv heads and a narrower MLP, with per-layer
    // metadata arrays as llama.cpp writes for such models.
    let tmp = tempfile::tempdir().unwrap();
    let mut spec = stories_gguf_spec();
    // A fresh storage for each slice: QTensor::quantize reads the whole storage of a
    // view, so a narrowed tensor must be copied out first.
    let fresh = |t: Tensor| {
        let dims = t.dims().to_vec();
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
    };
    let keep = |t: &Tensor, rows: usize| fresh(t.narrow(0, 0, rows).unwrap());
    let keep_cols = |t: &Tensor, cols: usize| fresh(t.narrow(1, 0, cols).unwrap());
    let ts = &mut spec.tensors;
    let q = keep(&ts["blk.1.attn_q.weight"], 32);
    let k = keep(&ts["blk.1.attn_k.weight"], 16);
    let v = keep(&ts["blk.1.attn_v.weight"], 16);
    let o = keep_cols(&ts["blk.1.attn_output.weight"], 32);
    let gate = keep(&ts["blk.1.ffn_gate.weight"], 100);
    let up = keep(&ts["blk.1.ffn_up.weight"], 100);
    let down = keep_cols(&ts["blk.1.ffn_down.weight"], 100);
    for (n, t) in [
        ("attn_q", q),
        ("attn_k", k),
        ("attn_v", v),
        ("attn_output", o),
        ("ffn_gate", gate),
        ("ffn_up", up),
        ("ffn_down", down),
    ] {
        ts.insert(format!("blk.1.{n}.weight"), t);
    }
    let arr = |v: [u32; 5]| Value::Array(v.into_iter().map(Value::U32).collect());
    spec.set("llama.attention.head_count", arr([8, 4, 8, 8, 8]));
    spec.set("llama.attention.head_count_kv", arr([4, 2, 4, 4, 4]));
    spec.set("llama.feed_forward_length", arr([172, 100, 172, 172, 172]));
    let path = tmp.path().join("pruned.gguf");
    spec.write(&path);

    let cfg = model::gguf::read_config(&path).unwrap();
    assert_eq!(cfg.head_dim(), 8);
    let shapes = cfg.layer_shapes.clone().expect("per-layer shapes");
    assert_eq!(shapes[1].num_attention_heads, 4);
    assert_eq!(shapes[1].num_key_value_heads, 2);
    assert_eq!(shapes[1].intermediate_size, 100);
    assert_eq!(shapes[0].num_attention_heads, 8);

    let m = model::load(&ModelSource::Gguf(path), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(m.model.layer_shapes, shapes);
    // Layer 1's q rows are the first 4 heads of the original, un-permuted per head.
    let hf = candle_core::safetensors::load(stories_dir().join("model.safetensors"), &Device::Cpu)
        .unwrap();
    let want = hf["model.layers.1.self_attn.q_proj.weight"]
        .i(0..32)
        .unwrap();
    let (cfg2, w, _) =
        model::gguf::load(&tmp.path().join("pruned.gguf"), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(cfg2.num_attention_heads, 8);
    let got = w.get("model.layers.1.self_attn.q_proj.weight").unwrap();
    assert_eq!(max_abs_diff(got, &want), 0.0);
    let ids = ids_tensor(&m.tokenizer.encode("Once upon a time", true).unwrap());
    let logits = m.model.forward(&ids, None, None).unwrap();
    assert_eq!(logits.dims(), &[1, ids.dim(1).unwrap(), 512]);
}

#[test]
fn bf16_load_and_untied_head() {
    let tmp = tempfile::tempdir().unwrap();
    let mut spec = stories_gguf_spec();
    let emb = spec.tensors["token_embd.weight"].clone();
    spec.tensors.insert("output.weight".into(), emb);
    let path = tmp.path().join("untied.gguf");
    spec.write(&path);
    let (cfg, w, _) = model::gguf::load(&path, DType::BF16, &Device::Cpu).unwrap();
    assert_eq!(cfg.tie_word_embeddings, Some(false));
    assert!(w.contains("lm_head.weight"));
    assert_eq!(
        w.get("model.embed_tokens.weight").unwrap().dtype(),
        DType::BF16
    );
}

// ---------------------------------------------------------------------------------------
// Errors

#[test]
fn broken_files_give_errors_naming_them() {
    let tmp = tempfile::tempdir().unwrap();
    let path = write_stories_gguf(tmp.path());
    let bytes = std::fs::read(&path).unwrap();
    for (label, len) in [
        ("in the tensor data", bytes.len() - 1000),
        ("in the metadata", bytes.len() / 20),
        ("after the magic", 6),
        ("empty", 0),
    ] {
        let cut = tmp.path().join(format!("cut-{len}.gguf"));
        std::fs::write(&cut, &bytes[..len]).unwrap();
        for e in [
            model::gguf::load(&cut, DType::F32, &Device::Cpu).err(),
            model::gguf::read_config(&cut).err(),
        ] {
            let msg = error_text(e.unwrap_or_else(|| panic!("{label}: loaded a truncated file")));
            assert!(msg.contains(&cut.display().to_string()), "{label}: {msg}");
            assert!(
                msg.contains("not a valid GGUF file (truncated or corrupt?)"),
                "{label}: {msg}"
            );
        }
    }
    let not_gguf = tmp.path().join("config.gguf");
    std::fs::copy(stories_dir().join("config.json"), &not_gguf).unwrap();
    let msg = error_text(model::gguf::read_config(&not_gguf).unwrap_err());
    assert!(msg.contains("not a valid GGUF file"), "{msg}");
    assert!(msg.contains("config.gguf"), "{msg}");
}

#[test]
fn wrong_architecture_missing_metadata_and_unknown_tensors() {
    let tmp = tempfile::tempdir().unwrap();

    let mut spec = stories_gguf_spec();
    spec.set("general.architecture", Value::String("gemma".into()));
    let p = tmp.path().join("gemma.gguf");
    spec.write(&p);
    let msg = error_text(model::gguf::read_config(&p).unwrap_err());
    assert!(msg.contains("`gemma`") && msg.contains("llama"), "{msg}");

    let mut spec = stories_gguf_spec();
    spec.metadata.remove("llama.feed_forward_length");
    let p = tmp.path().join("no-ffn.gguf");
    spec.write(&p);
    let msg = error_text(model::gguf::read_config(&p).unwrap_err());
    assert!(msg.contains("llama.feed_forward_length"), "{msg}");
    assert!(msg.contains("no-ffn.gguf"), "{msg}");

    let mut spec = stories_gguf_spec();
    let t = spec.tensors["output_norm.weight"].clone();
    spec.tensors.insert("blk.0.attn_q_norm.weight".into(), t);
    let p = tmp.path().join("extra.gguf");
    spec.write(&p);
    let msg = error_text(
        model::gguf::load(&p, DType::F32, &Device::Cpu)
            .err()
            .unwrap(),
    );
    assert!(msg.contains("blk.0.attn_q_norm.weight"), "{msg}");
}

#[test]
fn llama3_rope_freqs_become_rope_scaling() {
    let tmp = tempfile::tempdir().unwrap();
    let mut spec = stories_gguf_spec();
    // llama.cpp's generate_extra_tensors for Llama 3.1: factor 8, low 1, high 4, 8192.
    // With head_dim 8 the four wavelengths are 6, 167, 4443 and 118k: an original context
    // of 256 puts them in all three branches (kept, blended, divided by `factor`).
    let (factor, low, high, orig) = (8.0f64, 1.0f64, 4.0f64, 256.0f64);
    let theta = 500000.0f64;
    let dim = 8;
    let divisors: Vec<f32> = (0..dim)
        .step_by(2)
        .map(|i| {
            let freq = 1.0 / theta.powf(i as f64 / dim as f64);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            let (lw, hw) = (orig / low, orig / high);
            (if wavelen < hw {
                1.0
            } else if wavelen > lw {
                factor
            } else {
                let smooth = (orig / wavelen - low) / (high - low);
                1.0 / ((1.0 - smooth) / factor + smooth)
            }) as f32
        })
        .collect();
    assert!(
        divisors.iter().any(|d| *d > 1.0 && *d < 8.0),
        "{divisors:?}"
    );
    spec.tensors.insert(
        "rope_freqs.weight".into(),
        Tensor::new(divisors.as_slice(), &Device::Cpu).unwrap(),
    );
    spec.set("llama.rope.freq_base", Value::F32(theta as f32));
    spec.set(
        "llama.rope.scaling.original_context_length",
        Value::U32(orig as u32),
    );
    let p = tmp.path().join("llama3.gguf");
    spec.write(&p);
    let cfg = model::gguf::read_config(&p).unwrap();
    let s = cfg.rope_scaling.expect("llama3 rope scaling");
    assert_eq!(s.rope_type, "llama3");
    assert_eq!(s.factor, 8.0);
    assert_eq!(s.low_freq_factor, 1.0);
    assert_eq!(s.high_freq_factor, 4.0);
    assert_eq!(s.original_max_position_embeddings, 256);
    // And the model loads (rope_freqs is not a weight).
    let (_, w, _) = model::gguf::load(&p, DType::F32, &Device::Cpu).unwrap();
    assert!(w.names().all(|n| !n.contains("rope")));
}

// ---------------------------------------------------------------------------------------
// GPT-2 style byte-level BPE from metadata

/// GPT-2's byte → printable character table.
pub(crate) fn bytes_to_unicode() -> Vec<char> {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut chars: Vec<u32> = printable.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(256 + n);
            n += 1;
        }
    }
    let mut table = vec![' '; 256];
    for (b, c) in printable.iter().zip(chars) {
        table[*b as usize] = char::from_u32(c).unwrap();
    }
    table
}

/// A 2-layer random model with a byte-level BPE tokenizer of 256 bytes + merges +
/// `<|endoftext|>`.
fn gpt2_spec(pre: Option<&str>) -> (GgufSpec, Vec<String>) {
    let table = bytes_to_unicode();
    let mut tokens: Vec<String> = vec!["<|endoftext|>".into()];
    tokens.extend(table.iter().map(|c| c.to_string()));
    let merges = [
        "Ġ t", "h e", "Ġt he", "l l", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "1 2",
    ];
    for m in merges {
        tokens.push(m.replace(' ', ""));
    }
    let mut types = vec![Value::I32(3)];
    types.extend((1..tokens.len()).map(|_| Value::I32(1)));

    let hidden = 16;
    let vocab = tokens.len();
    let r =
        |rows: usize, cols: usize| Tensor::randn(0f32, 0.2, (rows, cols), &Device::Cpu).unwrap();
    let ones = || Tensor::ones(hidden, DType::F32, &Device::Cpu).unwrap();
    let mut tensors = BTreeMap::new();
    tensors.insert("token_embd.weight".to_string(), r(vocab, hidden));
    tensors.insert("output_norm.weight".to_string(), ones());
    for i in 0..2 {
        let p = format!("blk.{i}");
        tensors.insert(format!("{p}.attn_q.weight"), r(16, hidden));
        tensors.insert(format!("{p}.attn_k.weight"), r(8, hidden));
        tensors.insert(format!("{p}.attn_v.weight"), r(8, hidden));
        tensors.insert(format!("{p}.attn_output.weight"), r(hidden, 16));
        tensors.insert(format!("{p}.ffn_gate.weight"), r(24, hidden));
        tensors.insert(format!("{p}.ffn_up.weight"), r(24, hidden));
        tensors.insert(format!("{p}.ffn_down.weight"), r(hidden, 24));
        tensors.insert(format!("{p}.attn_norm.weight"), ones());
        tensors.insert(format!("{p}.ffn_norm.weight"), ones());
    }
    let mut spec = GgufSpec {
        metadata: BTreeMap::new(),
        tensors,
    };
    spec.set("general.architecture", Value::String("llama".into()));
    spec.set("llama.embedding_length", Value::U32(hidden as u32));
    spec.set("llama.block_count", Value::U32(2));
    spec.set("llama.attention.head_count", Value::U32(2));
    spec.set("llama.attention.head_count_kv", Value::U32(1));
    spec.set("llama.feed_forward_length", Value::U32(24));
    spec.set("llama.context_length", Value::U32(128));
    spec.set("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5));
    spec.set("tokenizer.ggml.model", Value::String("gpt2".into()));
    if let Some(pre) = pre {
        spec.set("tokenizer.ggml.pre", Value::String(pre.into()));
    }
    spec.set("tokenizer.ggml.tokens", strings(&tokens));
    spec.set("tokenizer.ggml.token_type", Value::Array(types));
    spec.set("tokenizer.ggml.merges", strings(&merges.map(String::from)));
    spec.set("tokenizer.ggml.bos_token_id", Value::U32(0));
    spec.set("tokenizer.ggml.eos_token_id", Value::U32(0));
    (spec, tokens)
}

#[test]
fn gpt2_tokenizer_from_metadata_round_trips() {
    let tmp = tempfile::tempdir().unwrap();
    for pre in [None, Some("smollm"), Some("llama-bpe")] {
        let (spec, tokens) = gpt2_spec(pre);
        let id = |t: &str| tokens.iter().position(|x| x == t).unwrap() as u32;
        let path = tmp
            .path()
            .join(format!("gpt2-{}.gguf", pre.unwrap_or("default")));
        spec.write(&path);
        let m = model::load(&ModelSource::Gguf(path), DType::F32, &Device::Cpu).unwrap();
        let tok = &m.tokenizer;
        assert_eq!(tok.bos_id(), Some(0));
        assert_eq!(tok.eos_ids(), &[0]);

        let ids = tok.encode("the world", false).unwrap();
        assert_eq!(ids, vec![id("t"), id("he"), id("Ġworld")]);
        let ids = tok.encode(" the", false).unwrap();
        assert_eq!(ids, vec![id("Ġthe")]);
        // Special tokens are matched whole.
        let ids = tok.encode("hello<|endoftext|>", false).unwrap();
        assert_eq!(*ids.last().unwrap(), 0);
        assert_eq!(ids[..ids.len() - 1], [id("he"), id("ll"), id("o")]);

        // Digits: SmolLM's pre-tokenizer splits every digit off, so the merge "1 2" never
        // applies; GPT-2's and Llama 3's keep runs of digits together.
        let ids = tok.encode("123", false).unwrap();
        if pre == Some("smollm") {
            assert_eq!(ids, vec![id("1"), id("2"), id("3")]);
        } else {
            assert_eq!(ids, vec![id("12"), id("3")], "pre {pre:?}");
        }
        let text = "Hello, world! 123 — ünïcödé\n\ttabs  and  spaces ";
        let ids = tok.encode(text, false).unwrap();
        assert_eq!(tok.decode(&ids).unwrap(), text, "pre {pre:?}");
        let ids = m.tokenizer.encode("x", true).unwrap();
        assert_eq!(ids, vec![0, id("x")]);
    }
    let (spec, _) = gpt2_spec(Some("no-such-pre"));
    let path = tmp.path().join("bad-pre.gguf");
    spec.write(&path);
    let msg = error_text(
        model::gguf::load(&path, DType::F32, &Device::Cpu)
            .err()
            .unwrap(),
    );
    assert!(msg.contains("no-such-pre"), "{msg}");
}

// ---------------------------------------------------------------------------------------
// SmolLM2-135M-Instruct, a real llama.cpp GGUF (Q4_1 / Q8_0)

/// `$RORA_SMOLLM2_GGUF`, default `${RORA_CACHE:-$HOME/.cache/rora}/models/...`, where
/// scripts/fetch-smollm2.sh puts it.
pub(crate) fn smollm2_path() -> PathBuf {
    if let Some(p) = std::env::var_os("RORA_SMOLLM2_GGUF") {
        return PathBuf::from(p);
    }
    let cache = std::env::var_os("RORA_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/rora")
        });
    cache.join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
}

pub(crate) const PARAGRAPH: &str =
    "The town library opened early on Saturday morning. A few people were \
already waiting outside, holding bags of books they wanted to return. Inside, the librarian \
turned on the lights and started the coffee machine in the small reading room. Children \
gathered near the big window, where a volunteer read stories about animals and faraway \
places. Later in the day, students came to study for their exams, and an old man sat in his \
favourite chair with the newspaper. When the library closed in the evening, the librarian \
locked the door, walked home through the park, and thought about the books she would read \
next week.";

#[test]
fn smollm2_gguf_perplexity() {
    let path = smollm2_path();
    if !path.is_file() {
        rora::require::skip_or_fail(
            "smollm2",
            &format!(
                "{} is absent; fetch it with scripts/fetch-smollm2.sh (or point \
                 RORA_SMOLLM2_GGUF at it)",
                path.display()
            ),
        );
        return;
    }
    let t0 = std::time::Instant::now();
    let m = model::load(&ModelSource::Gguf(path.clone()), DType::F32, &Device::Cpu).unwrap();
    let load_s = t0.elapsed().as_secs_f32();
    let c = &m.model.config;
    assert_eq!(
        (c.hidden_size, c.num_hidden_layers, c.num_attention_heads),
        (576, 30, 9)
    );
    assert_eq!(c.num_key_value_heads(), 3);
    assert_eq!(c.intermediate_size, Some(1536));
    assert_eq!(c.vocab_size, 49152);
    assert_eq!(c.tie_word_embeddings, Some(true));
    assert_eq!(c.rope_theta, 100000.0);
    assert_eq!(c.rms_norm_eps, 1e-5);
    assert!(m.model.lm_head.is_none());

    // Tokenizer: byte-level BPE with SmolLM's digit splitting.
    let tok = &m.tokenizer;
    let text = "Hello, world! 123";
    let ids = tok.encode(text, false).unwrap();
    let pieces: Vec<String> = ids
        .iter()
        .map(|&i| tok.inner().id_to_token(i).unwrap())
        .collect();
    println!("SmolLM2 {text:?} -> {ids:?} {pieces:?}");
    assert_eq!(
        pieces,
        ["Hello", ",", "Ġworld", "!", "Ġ", "1", "2", "3"].map(String::from)
    );
    assert_eq!(tok.decode(&ids).unwrap(), text);
    assert_eq!(
        tok.encode("<|im_start|>user", false).unwrap()[0],
        1,
        "special tokens are matched whole"
    );
    // Its `tokenizer.ggml.add_bos_token` is false: SmolLM2 adds no BOS.
    assert!(!tok.add_bos());

    // Perplexity: mean next-token cross-entropy over the paragraph, the first token
    // predicted from <|endoftext|> (SmolLM2's document separator, id 0).
    let mut ids = vec![0u32];
    ids.extend(tok.encode(PARAGRAPH, false).unwrap());
    let t1 = std::time::Instant::now();
    let logits = m.model.forward(&ids_tensor(&ids), None, None).unwrap();
    let n = ids.len() - 1;
    let logp = candle_nn::ops::log_softmax(&logits.i((0, 0..n)).unwrap(), D::Minus1).unwrap();
    let targets = Tensor::new(&ids[1..], &Device::Cpu)
        .unwrap()
        .unsqueeze(1)
        .unwrap();
    let nll = logp
        .gather(&targets, 1)
        .unwrap()
        .neg()
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let ppl = nll.exp();
    println!(
        "SmolLM2-135M-Instruct Q4_1: perplexity {ppl:.2} (mean cross-entropy {nll:.3}) over {n} \
         tokens; load {load_s:.1}s, forward {:.1}s",
        t1.elapsed().as_secs_f32()
    );
    assert!(ppl < 60.0, "perplexity {ppl}");
}
