//! The model's tokenizer, with BOS/EOS handled explicitly: callers say whether a BOS
//! token goes first, whatever post-processor the tokenizer file carries.

use anyhow::{anyhow, Context, Result};
use std::path::Path;

#[derive(Clone)]
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<u32>,
    eos: Vec<u32>,
}

impl TextTokenizer {
    pub fn new(inner: tokenizers::Tokenizer, bos: Option<u32>, eos: Vec<u32>) -> Self {
        Self { inner, bos, eos }
    }

    pub fn from_file(path: &Path, bos: Option<u32>, eos: Vec<u32>) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| {
            anyhow!(
                "cannot read tokenizer {}: {e}; it must be a Hugging Face tokenizer.json",
                path.display()
            )
        })?;
        Ok(Self::new(inner, bos, eos))
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos_ids(&self) -> &[u32] {
        &self.eos
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Token ids of `text`, with the BOS token first when `add_bos` (and the model has one).
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| anyhow!("tokenizer failed on the text: {e}"))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if add_bos {
            ids.extend(self.bos);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// How this tokenizer's vocabulary differs from `other`'s (size, or the first id
    /// whose token string differs), or `None` when both map every id to the same token.
    pub fn vocabulary_difference(&self, other: &TextTokenizer) -> Option<String> {
        let (a, b) = (self.vocab_size(), other.vocab_size());
        if a != b {
            return Some(format!("{a} tokens against {b}"));
        }
        (0..a as u32).find_map(|id| {
            let (x, y) = (self.inner.id_to_token(id), other.inner.id_to_token(id));
            (x != y).then(|| {
                let show = |t: Option<String>| t.map_or("no token".into(), |t| format!("`{t}`"));
                format!("token {id} is {} against {}", show(x), show(y))
            })
        })
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| anyhow!("tokenizer failed to decode: {e}"))
            .context("decoding generated tokens")
    }
}
