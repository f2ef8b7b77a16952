//! The tokenizer of a GGUF file as a Hugging Face `tokenizers::Tokenizer`: the embedded
//! `tokenizer.huggingface.json` when there is one, else rebuilt from llama.cpp's
//! `tokenizer.ggml.*` metadata (byte-level BPE or sentencepiece BPE).

use super::{as_f64, as_usize, Meta};
use crate::model::{LlamaConfig, TextTokenizer};
use anyhow::{anyhow, bail, Result};
use candle_core::quantized::gguf_file::Value;
use serde_json::{json, Map, Value as Json};
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::str::FromStr;

/// llama.cpp token types (`tokenizer.ggml.token_type`).
pub const TOKEN_NORMAL: i64 = 1;
pub const TOKEN_UNKNOWN: i64 = 2;
pub const TOKEN_CONTROL: i64 = 3;
pub const TOKEN_USER_DEFINED: i64 = 4;
pub const TOKEN_UNUSED: i64 = 5;
pub const TOKEN_BYTE: i64 = 6;

/// The tokenizer of the GGUF file at `path`: its `tokenizer.huggingface.json` when it has
/// one, else rebuilt from the `tokenizer.ggml.*` metadata; BOS first by default unless
/// `tokenizer.ggml.add_bos_token` says false (SmolLM2's files do).
pub(super) fn build(
    path: &Path,
    md: &HashMap<String, Value>,
    config: &LlamaConfig,
) -> Result<TextTokenizer> {
    let meta = Meta { md, path };
    let bos = config.bos_token_id();
    let eos = config.eos_token_ids();
    // llama.cpp's own switch; files without it get rora's default (BOS first).
    let add_bos = meta
        .opt_bool("tokenizer.ggml.add_bos_token")?
        .unwrap_or(true);
    Ok(rebuild(&meta, bos, eos)?.with_add_bos(add_bos))
}

/// The tokenizer itself, from `tokenizer.huggingface.json` or the `tokenizer.ggml.*` keys.
fn rebuild(meta: &Meta, bos: Option<u32>, eos: Vec<u32>) -> Result<TextTokenizer> {
    let path = meta.path;
    if let Some(json) = meta.opt_str("tokenizer.huggingface.json")? {
        let inner = tokenizers::Tokenizer::from_str(json).map_err(|e| {
            anyhow!(
                "GGUF metadata `tokenizer.huggingface.json` in {} is not a valid tokenizer.json: {e}",
                path.display()
            )
        })?;
        return Ok(TextTokenizer::new(inner, bos, eos));
    }
    let model = meta.str("tokenizer.ggml.model")?;
    let json = match model {
        "gpt2" => gpt2_tokenizer_json(meta)?,
        "llama" => llama_tokenizer_json(meta)?,
        other => bail!(
            "GGUF file {} has a `{other}` tokenizer (tokenizer.ggml.model); rora can build \
             `gpt2` (byte-level BPE) and `llama` (sentencepiece) tokenizers",
            path.display()
        ),
    };
    let inner = tokenizers::Tokenizer::from_str(&json.to_string()).map_err(|e| {
        anyhow!(
            "cannot build the `{model}` tokenizer from the metadata of {}: {e}",
            path.display()
        )
    })?;
    Ok(TextTokenizer::new(inner, bos, eos))
}

fn token_types(meta: &Meta, n: usize) -> Result<Vec<i64>> {
    let key = "tokenizer.ggml.token_type";
    let Some(_) = meta.opt(key) else {
        return Ok(vec![TOKEN_NORMAL; n]);
    };
    let a = meta.array(key)?;
    if a.len() != n {
        bail!(
            "GGUF metadata `{key}` in {} has {} entries but `tokenizer.ggml.tokens` has {n}",
            meta.path.display(),
            a.len()
        );
    }
    a.iter()
        .map(|v| match v {
            Value::I32(x) => Ok(*x as i64),
            Value::I64(x) => Ok(*x),
            other => as_usize(other)
                .map(|x| x as i64)
                .ok_or_else(|| meta.bad(key, "integers", other)),
        })
        .collect()
}

/// Vocab (first id wins for a duplicated string) and the added-token entries.
fn vocab_and_added(tokens: &[&str], types: &[i64]) -> (Map<String, Json>, Vec<Json>) {
    let mut vocab = Map::new();
    let mut added = Vec::new();
    for (id, (tok, ty)) in tokens.iter().zip(types).enumerate() {
        if vocab.contains_key(*tok) {
            continue;
        }
        vocab.insert(tok.to_string(), json!(id));
        if matches!(*ty, TOKEN_UNKNOWN | TOKEN_CONTROL | TOKEN_USER_DEFINED) {
            added.push(json!({
                "id": id,
                "content": tok,
                "single_word": false,
                "lstrip": false,
                "rstrip": false,
                "normalized": false,
                "special": *ty != TOKEN_USER_DEFINED,
            }));
        }
    }
    (vocab, added)
}

/// Llama 3's word-splitting regex (llama.cpp `llama-bpe`).
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The `tokenizer.ggml.pre` names rora knows for byte-level BPE. The export picks the first
/// name whose pre-tokenizer is the source's, so each group's canonical name comes first.
pub const BYTE_LEVEL_PRE: [&str; 16] = [
    "gpt2",
    "default",
    "gpt-2",
    "mpt",
    "olmo",
    "jais",
    "smollm",
    "starcoder",
    "refact",
    "command-r",
    "codeshell",
    "exaone",
    "minerva-7b",
    "llama-bpe",
    "llama3",
    "llama-v3",
];
/// Llama 3's `tokenizer.ggml.pre` names (its regex split, merges ignored for whole words).
const LLAMA3_PRE: [&str; 3] = ["llama-bpe", "llama3", "llama-v3"];

/// The Hugging Face pre-tokenizer that llama.cpp's `tokenizer.ggml.pre` value stands for,
/// and whether the BPE model ignores merges (Llama 3); `None` for an unknown name.
pub fn byte_level_pre_tokenizer(pre: &str) -> Option<(Json, bool)> {
    let byte_level = |use_regex: bool| {
        json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
               "use_regex": use_regex})
    };
    Some(match pre {
        // ByteLevel's own regex is GPT-2's. llama.cpp's "default" (no `pre` key, old
        // files) differs a little; GPT-2's is what Hugging Face does for such vocabularies.
        "default" | "gpt2" | "gpt-2" | "mpt" | "olmo" | "jais" => (byte_level(true), false),
        // llama.cpp splits every number character off, then applies the GPT-2 regex;
        // Hugging Face's tokenizer.json for these (SmolLM, StarCoder) says the same with
        // Digits(individual_digits) + ByteLevel.
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => {
            (
                json!({"type": "Sequence", "pretokenizers": [
                    {"type": "Digits", "individual_digits": true},
                    byte_level(true),
                ]}),
                false,
            )
        }
        p if LLAMA3_PRE.contains(&p) => (
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": LLAMA3_REGEX}, "behavior": "Isolated",
                 "invert": false},
                byte_level(false),
            ]}),
            true,
        ),
        _ => return None,
    })
}

/// Byte-level BPE (`tokenizer.ggml.model == "gpt2"`), with the pre-tokenizer that
/// llama.cpp associates with `tokenizer.ggml.pre`.
fn gpt2_tokenizer_json(meta: &Meta) -> Result<Json> {
    let tokens = meta.strings("tokenizer.ggml.tokens")?;
    let types = token_types(meta, tokens.len())?;
    let merges: Vec<Json> = meta
        .strings("tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| json!([a, b]))
                .ok_or_else(|| {
                    anyhow!(
                        "GGUF metadata `tokenizer.ggml.merges` in {} holds `{m}`, not two \
                         tokens separated by a space",
                        meta.path.display()
                    )
                })
        })
        .collect::<Result<_>>()?;
    let (vocab, added) = vocab_and_added(&tokens, &types);
    let pre = meta.opt_str("tokenizer.ggml.pre")?.unwrap_or("default");
    let Some((pre_tokenizer, ignore_merges)) = byte_level_pre_tokenizer(pre) else {
        bail!(
            "GGUF file {} asks for the `{pre}` pre-tokenizer (tokenizer.ggml.pre), which rora \
             does not know; known: {}",
            meta.path.display(),
            BYTE_LEVEL_PRE.join(", ")
        );
    };
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false,
                           "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
                    "use_regex": true},
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": ignore_merges,
            "vocab": vocab,
            "merges": merges,
        },
    }))
}

/// Merges of a sentencepiece BPE vocabulary, as Hugging Face's `SentencePieceExtractor`
/// derives them: every split of a piece into two pieces of the vocab is a merge, ranked by
/// the merged piece's score (highest first; ties keep vocab order, and the splits of one
/// piece go shortest left half first). This is the order of the merges in the
/// `tokenizer.json` that `transformers`' LlamaConverter wrote for stories260K.
pub fn sentencepiece_merges(tokens: &[&str], scores: &[f32]) -> Vec<(String, String)> {
    let mut index: HashMap<&str, usize> = HashMap::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        index.entry(t).or_insert(i);
    }
    let mut seen = HashSet::new();
    let mut merges: Vec<(usize, usize, f32)> = Vec::new();
    for (i, piece) in tokens.iter().enumerate() {
        if !seen.insert(*piece) {
            continue;
        }
        for (at, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(at);
            if let (Some(&li), Some(&ri)) = (index.get(l), index.get(r)) {
                merges.push((li, ri, scores[i]));
            }
        }
    }
    // Stable sort, highest score first.
    merges.sort_by(|a, b| b.2.total_cmp(&a.2));
    merges
        .into_iter()
        .map(|(l, r, _)| (tokens[l].to_string(), tokens[r].to_string()))
        .collect()
}

/// Sentencepiece BPE (`tokenizer.ggml.model == "llama"`), built like Hugging Face's
/// `LlamaConverter`: BPE with byte fallback, merges from the scores, Metaspace.
fn llama_tokenizer_json(meta: &Meta) -> Result<Json> {
    let tokens = meta.strings("tokenizer.ggml.tokens")?;
    let types = token_types(meta, tokens.len())?;
    let key = "tokenizer.ggml.scores";
    let scores: Vec<f32> = meta
        .array(key)?
        .iter()
        .map(|v| {
            as_f64(v)
                .map(|x| x as f32)
                .ok_or_else(|| meta.bad(key, "numbers", v))
        })
        .collect::<Result<_>>()?;
    if scores.len() != tokens.len() {
        bail!(
            "GGUF metadata `{key}` in {} has {} entries but `tokenizer.ggml.tokens` has {}",
            meta.path.display(),
            scores.len(),
            tokens.len()
        );
    }
    let merges: Vec<Json> = sentencepiece_merges(&tokens, &scores)
        .into_iter()
        .map(|(a, b)| json!([a, b]))
        .collect();
    let (vocab, added) = vocab_and_added(&tokens, &types);
    let unk = meta
        .opt_usize("tokenizer.ggml.unknown_token_id")?
        .and_then(|id| tokens.get(id))
        .map(|t| json!(t))
        .unwrap_or(Json::Null);
    let prefix = meta
        .opt_bool("tokenizer.ggml.add_space_prefix")?
        .unwrap_or(true);
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if prefix {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Metaspace", "replacement": "\u{2581}",
                          "prepend_scheme": if prefix { "first" } else { "never" },
                          "split": false},
        "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": unk,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": true,
            "byte_fallback": true,
            "ignore_merges": false,
            "vocab": vocab,
            "merges": merges,
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_follow_scores() {
        let tokens = ["a", "b", "c", "ab", "abc", "bc"];
        let scores = [0.0, 0.0, 0.0, -1.0, -3.0, -2.0];
        let m = sentencepiece_merges(&tokens, &scores);
        let m: Vec<(&str, &str)> = m.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        assert_eq!(m, vec![("a", "b"), ("b", "c"), ("a", "bc"), ("ab", "c")]);
    }
}
