//! The tokenizer as llama.cpp's `tokenizer.*` GGUF metadata, in the form the source had: a
//! GGUF source's own keys, copied; for a Hugging Face `tokenizer.json`, sentencepiece BPE
//! (byte fallback, `llama`: tokens, scores, token types) or byte-level BPE (`gpt2`: tokens,
//! token types, merges and the `pre` name of its pre-tokenizer). The rebuild in
//! `model::gguf::tokenizer` is the inverse of this, so a round trip gives the same ids.

use crate::model::gguf::tokenizer::{
    TOKEN_BYTE, TOKEN_CONTROL, TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_UNUSED, TOKEN_USER_DEFINED,
};
use crate::model::gguf::{self, byte_level_pre_tokenizer, BYTE_LEVEL_PRE};
use crate::model::{LoadedModel, ModelSource};
use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file::Value;
use serde_json::Value as Json;
use std::collections::BTreeMap;

/// The `tokenizer.*` keys for a model whose embeddings have `vocab_rows` rows.
pub fn tokenizer_metadata(loaded: &LoadedModel, vocab_rows: usize) -> Result<Vec<(String, Value)>> {
    if let ModelSource::Gguf(path) = &loaded.source {
        let md = gguf::read_metadata(path)?;
        let mut keys: Vec<(String, Value)> = md
            .into_iter()
            .filter(|(k, _)| k.starts_with("tokenizer."))
            .collect();
        keys.sort_by(|a, b| a.0.cmp(&b.0));
        return Ok(keys);
    }
    let text = loaded
        .tokenizer
        .inner()
        .to_string(false)
        .map_err(|e| anyhow!("cannot serialise the tokenizer: {e}"))?;
    let json: Json = serde_json::from_str(&text).context("the tokenizer's JSON")?;
    let tok = TokenizerJson::parse(&json, vocab_rows)?;
    let unk = tok.unk;
    let mut md = match tok.model_kind(&json)? {
        Kind::SentencePiece { add_space_prefix } => tok.sentencepiece(add_space_prefix)?,
        Kind::ByteLevel { pre } => tok.byte_level(pre)?,
    };
    let mut id = |key: &str, id: u32| md.push((format!("tokenizer.ggml.{key}"), Value::U32(id)));
    if let Some(bos) = loaded.tokenizer.bos_id() {
        id("bos_token_id", bos);
    }
    if let Some(&eos) = loaded.tokenizer.eos_ids().first() {
        id("eos_token_id", eos);
    }
    if let Some(unk) = unk {
        id("unknown_token_id", unk);
    }
    let config = loaded
        .folder
        .as_ref()
        .map(|f| f.join("tokenizer_config.json"))
        .filter(|p| p.is_file());
    if let Some(path) = config {
        let cfg: Json = serde_json::from_str(&std::fs::read_to_string(&path)?)
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
        let pad = match cfg.get("pad_token") {
            Some(Json::String(s)) => Some(s.as_str()),
            Some(Json::Object(o)) => o.get("content").and_then(Json::as_str),
            _ => None,
        };
        if let Some(pad) = pad.and_then(|p| loaded.tokenizer.inner().token_to_id(p)) {
            id("padding_token_id", pad);
        }
        if let Some(Json::String(t)) = cfg.get("chat_template") {
            md.push(("tokenizer.chat_template".into(), Value::String(t.clone())));
        }
    }
    md.push((
        "tokenizer.ggml.add_bos_token".into(),
        Value::Bool(loaded.tokenizer.add_bos()),
    ));
    Ok(md)
}

enum Kind {
    SentencePiece { add_space_prefix: bool },
    ByteLevel { pre: &'static str },
}

/// The parts of a `tokenizer.json` BPE model the metadata needs.
struct TokenizerJson {
    /// Token strings by id, `[PAD{id}]` for ids the tokenizer does not use (llama.cpp needs
    /// one token per embedding row, as its converter pads).
    tokens: Vec<String>,
    types: Vec<i64>,
    merges: Vec<(String, String)>,
    unk: Option<u32>,
}

impl TokenizerJson {
    fn parse(json: &Json, vocab_rows: usize) -> Result<Self> {
        let model = &json["model"];
        if model["type"] != "BPE" {
            bail!(
                "the tokenizer is a `{}` model; the GGUF export writes BPE tokenizers \
                 (sentencepiece with byte fallback, or byte-level)",
                model["type"]
            );
        }
        let vocab = model["vocab"]
            .as_object()
            .context("tokenizer.json has no model.vocab")?;
        let mut by_id: BTreeMap<usize, (String, i64)> = BTreeMap::new();
        for (tok, id) in vocab {
            let id = id.as_u64().context("a vocab id is not a number")? as usize;
            by_id.insert(id, (tok.clone(), TOKEN_NORMAL));
        }
        let unk_token = model["unk_token"].as_str();
        for added in json["added_tokens"].as_array().into_iter().flatten() {
            let id = added["id"].as_u64().context("an added token has no id")? as usize;
            let content = added["content"].as_str().unwrap_or_default().to_string();
            let ty = if Some(content.as_str()) == unk_token {
                TOKEN_UNKNOWN
            } else if added["special"].as_bool().unwrap_or(false) {
                TOKEN_CONTROL
            } else {
                TOKEN_USER_DEFINED
            };
            by_id.insert(id, (content, ty));
        }
        let n = by_id
            .keys()
            .next_back()
            .map_or(0, |&m| m + 1)
            .max(vocab_rows);
        if n > vocab_rows {
            bail!(
                "the tokenizer has ids up to {} but the model has only {vocab_rows} embedding rows",
                n - 1
            );
        }
        let (tokens, types) = (0..n)
            .map(|id| {
                by_id
                    .remove(&id)
                    .unwrap_or_else(|| (format!("[PAD{id}]"), TOKEN_UNUSED))
            })
            .unzip();
        let merges = model["merges"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|m| match m {
                Json::Array(pair) => match (pair.first(), pair.get(1)) {
                    (Some(Json::String(a)), Some(Json::String(b))) => Some((a.clone(), b.clone())),
                    _ => None,
                },
                Json::String(s) => s.split_once(' ').map(|(a, b)| (a.into(), b.into())),
                _ => None,
            })
            .map(|m| m.context("tokenizer.json has a merge that is not two tokens"))
            .collect::<Result<_>>()?;
        let unk = unk_token.and_then(|u| vocab.get(u)).and_then(Json::as_u64);
        Ok(Self {
            tokens,
            types,
            merges,
            unk: unk.map(|u| u as u32),
        })
    }

    /// Sentencepiece (byte fallback with Metaspace, or the older normalizer that prepends
    /// `▁`) or byte-level BPE (a pre-tokenizer llama.cpp names).
    fn model_kind(&self, json: &Json) -> Result<Kind> {
        let pre = &json["pre_tokenizer"];
        if json["model"]["byte_fallback"] == true {
            let add_space_prefix = if pre["type"] == "Metaspace" {
                pre["prepend_scheme"] != "never" && pre["add_prefix_space"] != false
            } else {
                // Llama 2's tokenizer.json: Prepend("▁") + Replace(" ", "▁") normalizer.
                json["normalizer"].to_string().contains("Prepend")
            };
            return Ok(Kind::SentencePiece { add_space_prefix });
        }
        for name in BYTE_LEVEL_PRE {
            let (want, _) = byte_level_pre_tokenizer(name).expect("a known name");
            if json_agrees(&want, pre) {
                return Ok(Kind::ByteLevel { pre: name });
            }
        }
        bail!(
            "the tokenizer's pre-tokenizer {} is none that llama.cpp names \
             (tokenizer.ggml.pre: GPT-2's byte level, SmolLM's digits + byte level, Llama 3's \
             regex); the GGUF export cannot describe it",
            pre.to_string().chars().take(200).collect::<String>()
        )
    }

    fn common(&self, model: &str) -> Vec<(String, Value)> {
        let strings = self
            .tokens
            .iter()
            .map(|t| Value::String(t.clone()))
            .collect();
        vec![
            ("tokenizer.ggml.model".into(), Value::String(model.into())),
            ("tokenizer.ggml.tokens".into(), Value::Array(strings)),
            (
                "tokenizer.ggml.token_type".into(),
                Value::Array(self.types.iter().map(|&t| Value::I32(t as i32)).collect()),
            ),
        ]
    }

    /// `llama` (sentencepiece BPE). tokenizer.json keeps merges, not sentencepiece's
    /// scores: a merged piece scores minus the rank of its first merge, every other piece
    /// below all of them, which orders llama.cpp's score-greedy merging (and rora's rebuild
    /// of the merges from the scores) as the merge list does.
    fn sentencepiece(mut self, add_space_prefix: bool) -> Result<Vec<(String, Value)>> {
        let mut rank: BTreeMap<String, usize> = BTreeMap::new();
        for (i, (a, b)) in self.merges.iter().enumerate() {
            rank.entry(format!("{a}{b}")).or_insert(i);
        }
        let below = self.merges.len() as f32 + 1.0;
        let scores = self
            .tokens
            .iter()
            .enumerate()
            .map(|(id, t)| match rank.get(t) {
                Some(&r) => Value::F32(-(r as f32)),
                None => Value::F32(-(below + id as f32)),
            })
            .collect();
        for (t, ty) in self.tokens.iter().zip(self.types.iter_mut()) {
            let is_byte = t.len() == 6
                && t.starts_with("<0x")
                && t.ends_with('>')
                && u8::from_str_radix(&t[3..5], 16).is_ok();
            if is_byte && *ty == TOKEN_NORMAL {
                *ty = TOKEN_BYTE;
            }
        }
        let mut md = self.common("llama");
        md.push(("tokenizer.ggml.scores".into(), Value::Array(scores)));
        md.push((
            "tokenizer.ggml.add_space_prefix".into(),
            Value::Bool(add_space_prefix),
        ));
        Ok(md)
    }

    /// `gpt2` (byte-level BPE) with its merges and pre-tokenizer name.
    fn byte_level(self, pre: &str) -> Result<Vec<(String, Value)>> {
        let merges = self
            .merges
            .iter()
            .map(|(a, b)| Value::String(format!("{a} {b}")))
            .collect();
        let mut md = self.common("gpt2");
        md.push(("tokenizer.ggml.merges".into(), Value::Array(merges)));
        md.push(("tokenizer.ggml.pre".into(), Value::String(pre.into())));
        Ok(md)
    }
}

/// Whether `source` is the pre-tokenizer `want`: the same types throughout, and equal
/// values for every key both have (files differ in which optional keys they spell out).
fn json_agrees(want: &Json, source: &Json) -> bool {
    match (want, source) {
        (Json::Object(w), Json::Object(s)) => {
            w.get("type") == s.get("type")
                && w.iter()
                    .all(|(k, v)| s.get(k).is_none_or(|sv| json_agrees(v, sv)))
        }
        (Json::Array(w), Json::Array(s)) => {
            w.len() == s.len() && w.iter().zip(s).all(|(a, b)| json_agrees(a, b))
        }
        _ => want == source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn pre_tokenizers_are_recognised_with_optional_keys_left_out() {
        let (smollm, _) = byte_level_pre_tokenizer("smollm").unwrap();
        let (gpt2, _) = byte_level_pre_tokenizer("gpt2").unwrap();
        assert!(json_agrees(&smollm, &smollm));
        assert!(!json_agrees(&gpt2, &smollm));
        let terse = json!({"type": "ByteLevel", "add_prefix_space": false});
        assert!(json_agrees(&gpt2, &terse));
        let other = json!({"type": "ByteLevel", "add_prefix_space": true});
        assert!(!json_agrees(&gpt2, &other));
    }
}
