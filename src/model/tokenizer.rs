//! The model's tokenizer, with BOS/EOS handled explicitly: callers say whether a BOS
//! token goes first, whatever post-processor the tokenizer file carries. What the
//! tokenizer itself would do (its `add_bos_token`) is kept as [`TextTokenizer::add_bos`],
//! the default of evaluation's `bos`.

use anyhow::{anyhow, Context, Result};
use std::path::Path;

#[derive(Clone)]
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<u32>,
    eos: Vec<u32>,
    /// Whether the tokenizer puts BOS first by its own configuration.
    add_bos: bool,
}

impl TextTokenizer {
    /// A tokenizer whose default is to put BOS first (rora's default before the loaders
    /// told it otherwise: see [`TextTokenizer::with_add_bos`]).
    pub fn new(inner: tokenizers::Tokenizer, bos: Option<u32>, eos: Vec<u32>) -> Self {
        Self {
            inner,
            bos,
            eos,
            add_bos: true,
        }
    }

    /// The same tokenizer with `add_bos` as its own default (what its configuration says:
    /// `add_bos_token` of a folder, `tokenizer.ggml.add_bos_token` of a GGUF).
    pub fn with_add_bos(mut self, add_bos: bool) -> Self {
        self.add_bos = add_bos;
        self
    }

    /// Whether this tokenizer puts BOS first by default: its configuration's
    /// `add_bos_token`, and never when the model has no BOS token.
    pub fn add_bos(&self) -> bool {
        self.add_bos && self.bos.is_some()
    }

    /// `requested`, or the tokenizer's own default when `None`: how the `bos` settings of
    /// evaluation and perplexity are resolved.
    pub fn resolve_bos(&self, requested: Option<bool>) -> bool {
        requested.unwrap_or_else(|| self.add_bos())
    }

    /// Whether `tokenizer.json` itself puts `bos` first: its post-processor's output for
    /// a one-letter text. `None` when the file has no post-processor (then a
    /// `transformers` tokenizer class decides, as a Llama tokenizer adding BOS does).
    pub fn post_processor_adds(&self, bos: u32) -> Result<Option<bool>> {
        if self.inner.get_post_processor().is_none() {
            return Ok(None);
        }
        let with = self
            .inner
            .encode("a", true)
            .map_err(|e| anyhow!("tokenizer failed on a test text: {e}"))?;
        Ok(Some(with.get_ids().first() == Some(&bos)))
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
