//! Perplexity of a text: mean next-token cross-entropy over its tokens, in chunks of at
//! most `max_len` tokens (non-overlapping, as LLM-Pruner's PPL), each optionally
//! starting with BOS.

use crate::model::loss::target_log_probs;
use crate::model::{Llama, TextTokenizer};
use crate::progress;
use anyhow::{bail, Result};
use candle_core::{Tensor, D};
use serde::{Deserialize, Serialize};
use std::fmt::Write;
use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PerplexityReport {
    pub text: String,
    /// Tokens of the text (without BOS).
    pub text_tokens: usize,
    /// Tokens whose probability was scored.
    pub scored_tokens: usize,
    pub chunks: usize,
    pub max_len: usize,
    pub bos: bool,
    pub mean_nll: f64,
    pub perplexity: f64,
    pub seconds: f64,
}

impl PerplexityReport {
    pub fn to_markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "## Perplexity: {}\n", self.text);
        let _ = writeln!(
            s,
            "| tokens scored | chunks (max len) | BOS | mean NLL | perplexity |"
        );
        let _ = writeln!(s, "|---:|---:|:-:|---:|---:|");
        let _ = writeln!(
            s,
            "| {} | {} ({}) | {} | {:.4} | {:.3} |",
            self.scored_tokens,
            self.chunks,
            self.max_len,
            if self.bos { "yes" } else { "no" },
            self.mean_nll,
            self.perplexity
        );
        s
    }
}

/// Perplexity settings: what the `ppl` stage, `recover ppl` and the eval stage's `ppl`
/// task score and how. The eval stage keeps its own keys (`ppl_text`, `ppl_max_len`,
/// `ppl_max_tokens`, and its `bos` and `batch_size`) and turns them into one of these
/// with [`crate::eval::EvalSpec::ppl`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PplSpec {
    /// A UTF-8 text file, or an LLM-Adapters `.json` (its instructions are scored).
    pub text: PathBuf,
    /// Score only the first N tokens of the text.
    #[serde(default)]
    pub max_tokens: Option<usize>,
    #[serde(default = "default_max_len")]
    pub max_len: usize,
    /// BOS before every chunk; left out: what the tokenizer does by itself (see
    /// `TextTokenizer::add_bos`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos: Option<bool>,
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Suffix of the `ppl` stage's report files (`ppl-<label>.json`); default `ppl.json`.
    #[serde(default)]
    pub label: Option<String>,
}

pub fn default_max_len() -> usize {
    256
}
fn default_batch_size() -> usize {
    4
}

impl PplSpec {
    /// Every default, on `text`.
    pub fn new(text: PathBuf) -> Self {
        Self {
            text,
            max_tokens: None,
            max_len: default_max_len(),
            bos: None,
            batch_size: default_batch_size(),
            label: None,
        }
    }

    /// Checks the settings of a `ppl` stage.
    pub fn validate(&self) -> Result<()> {
        if self.max_len < 2 {
            bail!("ppl.max_len must be at least 2 (got {})", self.max_len);
        }
        if self.batch_size == 0 {
            bail!("ppl.batch_size must be at least 1");
        }
        Ok(())
    }

    /// How the text is cut and scored with `tokenizer` (which resolves a missing `bos`).
    pub fn options(&self, tokenizer: &TextTokenizer) -> PerplexityOptions {
        PerplexityOptions {
            max_len: self.max_len,
            bos: tokenizer.resolve_bos(self.bos),
            batch_size: self.batch_size,
            max_tokens: self.max_tokens,
        }
    }

    /// Reads `text` (`key` names it in errors) and scores it.
    pub fn score(
        &self,
        model: &Llama,
        tokenizer: &TextTokenizer,
        key: &str,
    ) -> Result<PerplexityReport> {
        let text = crate::data::read_scoring_text(&self.text, key)?;
        perplexity(
            model,
            tokenizer,
            &text,
            &self.text.display().to_string(),
            &self.options(tokenizer),
        )
    }
}

/// How a text is cut and scored.
#[derive(Debug, Clone, Copy)]
pub struct PerplexityOptions {
    /// Chunk length in tokens, BOS included.
    pub max_len: usize,
    pub bos: bool,
    /// Chunks per forward pass.
    pub batch_size: usize,
    /// Score only the first this many tokens of the text (all when `None`).
    pub max_tokens: Option<usize>,
}

/// Scores `text`. With `bos`, each chunk is BOS + up to `max_len - 1` text tokens and every
/// text token is scored; without, each chunk is `max_len` text tokens and the first token
/// of each chunk has no context, so it is not scored.
pub fn perplexity(
    model: &Llama,
    tokenizer: &TextTokenizer,
    text: &str,
    text_name: &str,
    opts: &PerplexityOptions,
) -> Result<PerplexityReport> {
    let PerplexityOptions {
        max_len,
        bos,
        batch_size,
        max_tokens,
    } = *opts;
    let started = std::time::Instant::now();
    if max_len < 2 {
        bail!("max_len must be at least 2");
    }
    let mut tokens = tokenizer.encode(text, false)?;
    if let Some(n) = max_tokens {
        tokens.truncate(n);
    }
    let bos_id = match (bos, tokenizer.bos_id()) {
        (true, None) => {
            bail!("the model's tokenizer has no BOS token; score without BOS (--bos false)")
        }
        (true, Some(id)) => Some(id),
        (false, _) => None,
    };
    let body = if bos { max_len - 1 } else { max_len };
    let chunks: Vec<Vec<u32>> = tokens
        .chunks(body)
        .map(|c| bos_id.into_iter().chain(c.iter().copied()).collect())
        .filter(|c: &Vec<u32>| c.len() >= 2)
        .collect();
    if chunks.is_empty() {
        bail!(
            "{text_name} has too few tokens to score ({} tokens)",
            tokens.len()
        );
    }
    let pb = progress::bar(chunks.len() as u64, "perplexity");
    let (mut nll_sum, mut scored) = (0f64, 0usize);
    for batch in chunks.chunks(batch_size.max(1)) {
        let width = batch.iter().map(Vec::len).max().unwrap_or(0);
        let (mut ids, mut mask) = (Vec::new(), Vec::new());
        for c in batch {
            ids.extend(
                c.iter()
                    .copied()
                    .chain(std::iter::repeat_n(0, width - c.len())),
            );
            mask.extend((0..width).map(|j| u32::from(j < c.len())));
        }
        let device = model.device();
        let ids = Tensor::from_vec(ids, (batch.len(), width), device)?;
        let mask = Tensor::from_vec(mask, (batch.len(), width), device)?;
        let logits = model.forward(&ids, Some(&mask), None)?;
        let inputs = logits.narrow(1, 0, width - 1)?;
        let targets = ids.narrow(1, 1, width - 1)?;
        let target_mask = mask
            .narrow(1, 1, width - 1)?
            .to_dtype(candle_core::DType::F32)?;
        let lp = (target_log_probs(&inputs, &targets)? * &target_mask)?;
        nll_sum -= lp.sum(D::Minus1)?.sum_all()?.to_scalar::<f32>()? as f64;
        scored += target_mask.sum_all()?.to_scalar::<f32>()? as usize;
        pb.inc(batch.len() as u64);
        pb.set_message(format!("ppl {:.3}", (nll_sum / scored.max(1) as f64).exp()));
    }
    pb.finish_and_clear();
    let mean_nll = nll_sum / scored as f64;
    Ok(PerplexityReport {
        text: text_name.to_string(),
        text_tokens: tokens.len(),
        scored_tokens: scored,
        chunks: chunks.len(),
        max_len,
        bos,
        mean_nll,
        perplexity: mean_nll.exp(),
        seconds: started.elapsed().as_secs_f64(),
    })
}
