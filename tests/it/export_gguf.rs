//! GGUF export: rora reloads its own export (llama for uniform models, deci for per-layer
//! widths) with the merged model's logits and the source's token ids; q8_0 follows
//! llama.cpp's block layout; a GGUF source's tokenizer keys are copied; bad destinations
//! and dtypes give clear errors and leave nothing behind; `recover merge --gguf` works.

use crate::common::*;
use crate::gguf::{bytes_to_unicode, write_stories_gguf, SENTENCES};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device};
use rora::adapters::{self, peft, AttachSpec, Method};
use rora::export::{self, ExportSpec, GgufDtype};
use rora::model::{self, DtypeName, LoadedModel, ModelSource};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn gguf_spec(path: &Path, dtype: GgufDtype, verify: bool) -> ExportSpec {
    ExportSpec {
        merged: None,
        merged_uniform: None,
        gguf: Some(path.to_path_buf()),
        gguf_dtype: dtype,
        adapter: None,
        adapter_gguf: None,
        gguf_base: None,
        dtype: DtypeName::F32,
        max_shard_size: "5GB".into(),
        base_model_name_or_path: None,
        verify,
    }
}

fn lora(targets: &[&str]) -> AttachSpec {
    attach_spec(Method::Rora, 4, 8.0, 0.0, targets)
}

fn adapt(loaded: &mut LoadedModel) -> AttachSpec {
    let spec = lora(&[
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "up_proj",
        "down_proj",
    ]);
    adapters::attach(&mut loaded.model, &spec, 1).unwrap();
    randomize_adapters(&loaded.model, 2);
    spec
}

fn metadata(path: &Path) -> (HashMap<String, Value>, Content) {
    let mut f = std::fs::File::open(path).unwrap();
    let c = Content::read(&mut f).unwrap();
    (c.metadata.clone(), c)
}

fn string(md: &HashMap<String, Value>, k: &str) -> String {
    md[k].to_string().unwrap().clone()
}

/// Max |Δlogit| / max |logit| between the model and its GGUF reload, on `text`.
fn relative_logit_diff(loaded: &LoadedModel, gguf: &Path, text: &str) -> (f32, LoadedModel) {
    let ids = ids_tensor(&loaded.tokenizer.encode(text, true).unwrap());
    let want = loaded.model.forward(&ids, None, None).unwrap();
    let back = model::load(
        &ModelSource::Gguf(gguf.to_path_buf()),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    let got = back.model.forward(&ids, None, None).unwrap();
    (max_abs_diff(&got, &want) / max_abs(&want), back)
}

const TEXT: &str = "Once upon a time, there was a little girl named Lily. She liked to play";

#[test]
fn stories_round_trips_through_gguf_in_every_dtype() {
    let tmp = tempfile::tempdir().unwrap();
    let mut loaded = load_stories();
    let attach = adapt(&mut loaded);
    for dtype in GgufDtype::ALL {
        let path = tmp.path().join(format!("stories-{}.gguf", dtype.name()));
        let report = export::export(&loaded, Some(&attach), &gguf_spec(&path, dtype, true))
            .unwrap_or_else(|e| panic!("{e:#}"));
        let info = report.gguf.unwrap();
        assert_eq!(info.architecture, "llama");
        // Under q8_0 the down projections' rows (172 MLP channels) are not blocks of 32:
        // f16, as llama.cpp's converter falls back.
        let fallback: Vec<String> = (0..5).map(|i| format!("blk.{i}.ffn_down.weight")).collect();
        if dtype == GgufDtype::Q8_0 {
            assert_eq!(info.f16_fallback, fallback);
        } else {
            assert!(info.f16_fallback.is_empty(), "{:?}", info.f16_fallback);
        }
        let (rel, back) = relative_logit_diff(&loaded, &path, TEXT);
        println!(
            "stories260K GGUF {}: max |Δlogit| / max |logit| = {rel:.2e} (tolerance {:.0e})",
            dtype.name(),
            dtype.tolerance()
        );
        assert!(rel as f64 <= dtype.tolerance(), "{}: {rel}", dtype.name());
        if dtype == GgufDtype::F32 {
            assert!(rel <= 1e-5, "{rel}");
        }
        // The sentencepiece tokenizer, rebuilt from the written tokens/scores/types, gives
        // tokenizer.json's ids.
        for s in SENTENCES {
            assert_eq!(
                back.tokenizer.encode(s, true).unwrap(),
                loaded.tokenizer.encode(s, true).unwrap(),
                "{s:?}"
            );
        }
        assert_eq!(back.tokenizer.add_bos(), loaded.tokenizer.add_bos());
        let (md, content) = metadata(&path);
        assert_eq!(string(&md, "general.architecture"), "llama");
        assert_eq!(string(&md, "tokenizer.ggml.model"), "llama");
        assert_eq!(md["llama.attention.head_count"].to_u32().unwrap(), 8);
        assert_eq!(md["llama.attention.head_count_kv"].to_u32().unwrap(), 4);
        assert_eq!(md["llama.feed_forward_length"].to_u32().unwrap(), 172);
        assert_eq!(md["tokenizer.ggml.bos_token_id"].to_u32().unwrap(), 1);
        assert_eq!(md["tokenizer.ggml.eos_token_id"].to_u32().unwrap(), 2);
        let types = md["tokenizer.ggml.token_type"].to_vec().unwrap();
        assert_eq!(types[3].to_i32().unwrap(), 6, "<0x00> is a byte token");
        assert!(!content.tensor_infos.contains_key("output.weight"), "tied");
        let want = match dtype {
            GgufDtype::F32 => GgmlDType::F32,
            GgufDtype::F16 => GgmlDType::F16,
            GgufDtype::Bf16 => GgmlDType::BF16,
            GgufDtype::Q8_0 => GgmlDType::Q8_0,
        };
        let info = &content.tensor_infos["blk.0.attn_q.weight"];
        assert_eq!(info.ggml_dtype, want);
        assert_eq!(
            content.tensor_infos["blk.0.attn_norm.weight"].ggml_dtype,
            GgmlDType::F32,
            "norms stay f32"
        );
    }
}

/// q8_0 as llama.cpp's `quantize_row_q8_0_ref`, written out here: per block of 32,
/// d = max|x| / 127 stored as f16, q = round(x / d); the file's blocks hold exactly that.
#[test]
fn q8_0_blocks_are_llama_cpps() {
    let tmp = tempfile::tempdir().unwrap();
    let loaded = load_stories();
    let path = tmp.path().join("q8.gguf");
    export::export(&loaded, None, &gguf_spec(&path, GgufDtype::Q8_0, false)).unwrap();
    let mut f = std::fs::File::open(&path).unwrap();
    let content = Content::read(&mut f).unwrap();
    let name = "token_embd.weight";
    let info = &content.tensor_infos[name];
    use std::io::{Read, Seek, SeekFrom};
    f.seek(SeekFrom::Start(content.tensor_data_offset + info.offset))
        .unwrap();
    let blocks = 4;
    let mut raw = vec![0u8; blocks * 34];
    f.read_exact(&mut raw).unwrap();
    let emb = loaded.model.embed_tokens.flatten_all().unwrap();
    let x: Vec<f32> = emb.narrow(0, 0, blocks * 32).unwrap().to_vec1().unwrap();
    for b in 0..blocks {
        let xs = &x[b * 32..(b + 1) * 32];
        let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let stored = f16_to_f32(u16::from_le_bytes([raw[b * 34], raw[b * 34 + 1]]));
        // The scale is d rounded to f16 (11 significant bits).
        assert!(
            (stored - d).abs() <= d * 2f32.powi(-11),
            "block {b} scale {stored} vs {d}"
        );
        let id = 1.0 / d;
        for (j, v) in xs.iter().enumerate() {
            let q = raw[b * 34 + 2 + j] as i8;
            assert_eq!(q, (v * id).round() as i8, "block {b} value {j}");
        }
    }
}

/// IEEE half precision bits to f32 (normal numbers and zero, all a q8_0 scale can be here).
fn f16_to_f32(bits: u16) -> f32 {
    let exp = ((bits >> 10) & 0x1f) as i32;
    let mant = (bits & 0x3ff) as f32;
    if exp == 0 {
        return mant * 2f32.powi(-24);
    }
    (1.0 + mant / 1024.0) * 2f32.powi(exp - 15)
}

/// A GPT-2 byte-level BPE tokenizer.json: 256 byte symbols, `<|endoftext|>` (id 0) and
/// a few merges.
fn write_gpt2_tokenizer(dir: &Path) -> usize {
    let table = bytes_to_unicode();
    let mut tokens: Vec<String> = vec!["<|endoftext|>".into()];
    tokens.extend(table.iter().map(|c| c.to_string()));
    let merges = [
        "Ġ t", "h e", "Ġt he", "l l", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld",
    ];
    tokens.extend(merges.iter().map(|m| m.replace(' ', "")));
    let vocab: serde_json::Map<String, serde_json::Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i.into()))
        .collect();
    let byte_level = serde_json::json!({"type": "ByteLevel", "add_prefix_space": false,
        "trim_offsets": true, "use_regex": true});
    let json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [{"id": 0, "content": "<|endoftext|>", "single_word": false,
            "lstrip": false, "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null,
        "pre_tokenizer": byte_level,
        "post_processor": byte_level,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": "", "end_of_word_suffix": "", "fuse_unk": false,
            "byte_fallback": false, "ignore_merges": false, "vocab": vocab,
            "merges": merges.iter().map(|m| m.split(' ').collect::<Vec<_>>()).collect::<Vec<_>>()},
    });
    std::fs::write(dir.join("tokenizer.json"), json.to_string()).unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"add_bos_token": false, "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}"#,
    )
    .unwrap();
    tokens.len()
}

fn write_gpt2_model(dir: &Path) -> usize {
    // Vocab rows beyond the tokenizer's ids: the export pads the token list.
    write_tiny_model_with_vocab(dir, &NON_UNIFORM_LAYERS, 7, 272);
    let vocab_rows = 272;
    let tokens = write_gpt2_tokenizer(dir);
    assert!(tokens < vocab_rows);
    tokens
}

#[test]
fn non_uniform_model_with_gpt2_tokenizer_round_trips_as_deci() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    let tokens = write_gpt2_model(&dir);
    let mut loaded = model::load(&ModelSource::Folder(dir), DType::F32, &Device::Cpu).unwrap();
    let attach = adapt(&mut loaded);
    let text = "the world is the world, Hello! 123 — ünïcödé";
    for dtype in [GgufDtype::F32, GgufDtype::Q8_0] {
        let path = tmp.path().join(format!("deci-{}.gguf", dtype.name()));
        let report = export::export(&loaded, Some(&attach), &gguf_spec(&path, dtype, true))
            .unwrap_or_else(|e| panic!("{e:#}"));
        let info = report.gguf.unwrap();
        assert_eq!(info.architecture, "deci");
        let (rel, back) = relative_logit_diff(&loaded, &path, text);
        println!(
            "non-uniform deci GGUF {}: max |Δlogit| / max |logit| = {rel:.2e}; f16 fallback {:?}",
            dtype.name(),
            info.f16_fallback
        );
        assert!(rel as f64 <= dtype.tolerance(), "{rel}");
        assert_eq!(back.model.layer_shapes, loaded.model.layer_shapes);
        if dtype == GgufDtype::Q8_0 {
            // Rows not a multiple of 32 fall back to f16: layer 1's down_proj (40 MLP
            // channels) and layer 2's o_proj (6 heads × 8).
            assert_eq!(
                info.f16_fallback,
                ["blk.1.ffn_down.weight", "blk.2.attn_output.weight"].map(String::from)
            );
        } else {
            assert!(rel <= 1e-5, "{rel}");
        }
        for s in SENTENCES.iter().chain([&text]) {
            assert_eq!(
                back.tokenizer.encode(s, false).unwrap(),
                loaded.tokenizer.encode(s, false).unwrap(),
                "{s:?}"
            );
        }
        assert!(!back.tokenizer.add_bos());
        let (md, _) = metadata(&path);
        assert_eq!(string(&md, "general.architecture"), "deci");
        let per_layer = |k: &str| -> Vec<i32> {
            md[k]
                .to_vec()
                .unwrap()
                .iter()
                .map(|v| v.to_i32().unwrap())
                .collect()
        };
        assert_eq!(per_layer("deci.feed_forward_length"), vec![96, 40, 64]);
        assert_eq!(per_layer("deci.attention.head_count"), vec![8, 4, 6]);
        assert_eq!(per_layer("deci.attention.head_count_kv"), vec![4, 2, 3]);
        assert_eq!(md["deci.attention.key_length"].to_u32().unwrap(), 8);
        assert_eq!(string(&md, "tokenizer.ggml.model"), "gpt2");
        assert_eq!(string(&md, "tokenizer.ggml.pre"), "gpt2");
        assert!(string(&md, "tokenizer.chat_template").contains("messages"));
        let toks = md["tokenizer.ggml.tokens"].to_vec().unwrap();
        assert_eq!(toks.len(), 272);
        assert_eq!(toks[tokens].to_string().unwrap(), &format!("[PAD{tokens}]"));
        let merges = md["tokenizer.ggml.merges"].to_vec().unwrap();
        assert_eq!(merges[2].to_string().unwrap(), "Ġt he");
    }
}

#[test]
fn a_gguf_sources_tokenizer_keys_are_copied() {
    let tmp = tempfile::tempdir().unwrap();
    let src = write_stories_gguf(tmp.path());
    let loaded = model::load(&ModelSource::Gguf(src.clone()), DType::F32, &Device::Cpu).unwrap();
    let out = tmp.path().join("out.gguf");
    export::export(&loaded, None, &gguf_spec(&out, GgufDtype::F32, true)).unwrap();
    let (a, _) = metadata(&src);
    let (b, _) = metadata(&out);
    let tokenizer_keys = |md: &HashMap<String, Value>| {
        let mut k: Vec<String> = md
            .keys()
            .filter(|k| k.starts_with("tokenizer."))
            .cloned()
            .collect();
        k.sort();
        k
    };
    assert_eq!(tokenizer_keys(&a), tokenizer_keys(&b));
    for k in tokenizer_keys(&a) {
        assert_eq!(format!("{:?}", a[&k]), format!("{:?}", b[&k]), "{k}");
    }
}

fn leftovers(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().contains(".tmp-"))
        .collect()
}

#[test]
fn bad_destinations_and_dtypes_give_clear_errors_and_leave_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let loaded = load_stories();
    let file = tmp.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    let under_file = file.join("m.gguf");
    let err =
        export::export(&loaded, None, &gguf_spec(&under_file, GgufDtype::F16, true)).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("is a file, not a folder"), "{msg}");
    assert!(msg.contains("a-file"), "{msg}");

    let missing = tmp.path().join("no/such/m.gguf");
    let msg = format!(
        "{:#}",
        export::export(&loaded, None, &gguf_spec(&missing, GgufDtype::F16, true)).unwrap_err()
    );
    assert!(msg.contains("does not exist"), "{msg}");

    let folder = tmp.path().join("a-folder.gguf");
    std::fs::create_dir(&folder).unwrap();
    let msg = format!(
        "{:#}",
        export::export(&loaded, None, &gguf_spec(&folder, GgufDtype::F16, true)).unwrap_err()
    );
    assert!(msg.contains("it is a folder"), "{msg}");
    assert!(
        leftovers(tmp.path()).is_empty(),
        "{:?}",
        leftovers(tmp.path())
    );

    let err = serde_yaml_ng::from_str::<ExportSpec>("gguf: m.gguf\ngguf_dtype: q4_0\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("q4_0") && err.contains("q8_0"), "{err}");
    let err = "q4_k".parse::<GgufDtype>().unwrap_err().to_string();
    assert!(err.contains("use f32, f16, bf16 or q8_0"), "{err}");
}

#[test]
fn recover_merge_writes_a_gguf() {
    let tmp = tempfile::tempdir().unwrap();
    let mut loaded = load_stories();
    let attach = adapt(&mut loaded);
    let adapter = tmp.path().join("adapter");
    peft::write_adapter(&loaded.model, &attach, None, &adapter).unwrap();
    let out = tmp.path().join("merged.gguf");
    let o = recover(&[
        "merge",
        "--model",
        stories_dir().to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--gguf",
        out.to_str().unwrap(),
        "--gguf-dtype",
        "f32",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("verified: reloaded GGUF model"),
        "{}",
        stderr(&o)
    );
    let (rel, _) = relative_logit_diff(&loaded, &out, TEXT);
    assert!(rel <= 1e-5, "{rel}");
    let o = recover(&[
        "merge",
        "--model",
        stories_dir().to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--gguf FILE"), "{}", stderr(&o));
}

/// Llama-3 RoPE scaling goes out as llama.cpp's `rope_freqs.weight` divisors and comes back
/// as the same `rope_scaling`, with the same logits.
#[test]
fn llama3_rope_scaling_round_trips() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    std::fs::create_dir(&dir).unwrap();
    for f in [
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(stories_dir().join(f), dir.join(f)).unwrap();
    }
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(stories_dir().join("config.json")).unwrap())
            .unwrap();
    // An original context of 256 puts head_dim 8's four frequencies in all three branches.
    cfg["rope_theta"] = 500000.0.into();
    cfg["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0,
        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 256});
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let loaded = model::load(&ModelSource::Folder(dir), DType::F32, &Device::Cpu).unwrap();
    let out = tmp.path().join("llama3.gguf");
    export::export(&loaded, None, &gguf_spec(&out, GgufDtype::F32, true)).unwrap();
    let (_, content) = metadata(&out);
    assert!(content.tensor_infos.contains_key("rope_freqs.weight"));
    let (rel, back) = relative_logit_diff(&loaded, &out, TEXT);
    assert!(rel <= 1e-5, "{rel}");
    assert_eq!(
        serde_json::to_value(&back.model.config.rope_scaling).unwrap(),
        serde_json::to_value(&loaded.model.config.rope_scaling).unwrap()
    );
}

/// Mean next-token cross-entropy of `ids` (the first token only conditions).
fn nll(m: &LoadedModel, ids: &[u32]) -> f32 {
    use candle_core::{IndexOp, D};
    let logits = m.model.forward(&ids_tensor(ids), None, None).unwrap();
    let n = ids.len() - 1;
    let logp = candle_nn::ops::log_softmax(&logits.i((0, 0..n)).unwrap(), D::Minus1).unwrap();
    let targets = candle_core::Tensor::new(&ids[1..], &Device::Cpu)
        .unwrap()
        .unsqueeze(1)
        .unwrap();
    logp.gather(&targets, 1)
        .unwrap()
        .neg()
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// The real SmolLM2-135M GGUF (byte-level BPE, SmolLM pre-tokenizer, chat template) out
/// as q8_0 and back: its tokenizer keys are the source's, the ids the same, and the
/// perplexity of an English paragraph within 2% of the source's.
#[test]
fn smollm2_exports_as_q8_0_and_reloads() {
    let path = crate::gguf::smollm2_path();
    if !path.is_file() {
        rora::require::skip_or_fail(
            "smollm2",
            &format!(
                "{} is absent; fetch it with scripts/fetch-smollm2.sh",
                path.display()
            ),
        );
        return;
    }
    let src = model::load(&ModelSource::Gguf(path.clone()), DType::F32, &Device::Cpu).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("smollm2-q8_0.gguf");
    let report = export::export(&src, None, &gguf_spec(&out, GgufDtype::Q8_0, false)).unwrap();
    let info = report.gguf.unwrap();
    assert_eq!(info.architecture, "llama");
    assert!(info.f16_fallback.is_empty(), "{:?}", info.f16_fallback);
    let back = model::load(&ModelSource::Gguf(out.clone()), DType::F32, &Device::Cpu).unwrap();
    let (md, _) = metadata(&out);
    assert_eq!(string(&md, "tokenizer.ggml.pre"), "smollm");
    assert!(md.contains_key("tokenizer.chat_template"));
    let mut ids = vec![0u32];
    ids.extend(src.tokenizer.encode(crate::gguf::PARAGRAPH, false).unwrap());
    let mut again = vec![0u32];
    again.extend(
        back.tokenizer
            .encode(crate::gguf::PARAGRAPH, false)
            .unwrap(),
    );
    assert_eq!(again, ids);
    let (a, b) = (nll(&src, &ids).exp(), nll(&back, &ids).exp());
    println!("SmolLM2 perplexity: source Q4_1 {a:.3}, exported q8_0 {b:.3}");
    assert!((a - b).abs() <= 0.02 * a, "{a} vs {b}");
}
