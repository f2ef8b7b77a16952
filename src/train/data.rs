//! Training data: LLM-Adapters JSON files formatted with the training prompt, and plain
//! text files cut into chunks for language-model recovery.

use crate::model::TextTokenizer;
use crate::prompt::training_prompt;
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// One LLM-Adapters item (`instruction`, `input`, `output`, `answer`).
#[derive(Debug, Clone, Deserialize)]
pub struct InstructionItem {
    pub instruction: String,
    #[serde(default)]
    pub input: String,
    pub output: String,
    #[serde(default)]
    pub answer: Option<String>,
}

/// A tokenized training sequence and which of its positions are targets.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub ids: Vec<u32>,
    /// `targets[j]`: token j is predicted (counted in the loss).
    pub targets: Vec<bool>,
}

/// Expands globs (sorted, so the order never depends on the file system) and checks
/// each pattern matches something.
pub fn expand_globs(patterns: &[String], key: &str) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in patterns {
        let mut matched: Vec<PathBuf> = glob::glob(p)
            .with_context(|| format!("{key}: `{p}` is not a valid glob pattern"))?
            .filter_map(|r| r.ok())
            .filter(|p| p.is_file())
            .collect();
        if matched.is_empty() {
            bail!("{key}: `{p}` matches no file");
        }
        matched.sort();
        out.extend(matched);
    }
    Ok(out)
}

pub fn read_instruction_file(path: &Path) -> Result<Vec<InstructionItem>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let values: Vec<serde_json::Value> = serde_json::from_str(&text).with_context(|| {
        format!(
            "{} is not a JSON array of LLM-Adapters items",
            path.display()
        )
    })?;
    values
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            serde_json::from_value(v).with_context(|| {
                format!(
                    "{} item {i}: needs string fields `instruction` and `output`",
                    path.display()
                )
            })
        })
        .collect()
}

/// LLM-Adapters' `generate_and_tokenize_prompt`: BOS + training prompt, truncated at
/// `cutoff_len`, EOS appended when there is room; with `train_on_inputs` false only the
/// response's tokens are targets.
pub fn instruction_example(
    tok: &TextTokenizer,
    item: &InstructionItem,
    cutoff_len: usize,
    train_on_inputs: bool,
) -> Result<Example> {
    if !item.input.is_empty() {
        bail!("items with a non-empty `input` are not supported (the commonsense data has none)");
    }
    let mut ids = tok.encode(&training_prompt(&item.instruction, &item.output), true)?;
    ids.truncate(cutoff_len);
    if let Some(&eos) = tok.eos_ids().first() {
        if ids.len() < cutoff_len && ids.last() != Some(&eos) {
            ids.push(eos);
        }
    }
    let prompt_len = if train_on_inputs {
        0
    } else {
        tok.encode(&training_prompt(&item.instruction, ""), true)?
            .len()
            .min(ids.len())
    };
    // Position 0 (BOS) is never predicted: nothing comes before it.
    let targets = (0..ids.len()).map(|j| j >= prompt_len.max(1)).collect();
    Ok(Example { ids, targets })
}

/// A text file as consecutive chunks of BOS + up to `cutoff_len - 1` tokens, all targets.
pub fn text_examples(tok: &TextTokenizer, path: &Path, cutoff_len: usize) -> Result<Vec<Example>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read text file {}", path.display()))?;
    let tokens = tok.encode(&text, false)?;
    let body = cutoff_len.saturating_sub(1).max(1);
    Ok(tokens
        .chunks(body)
        .filter(|c| c.len() >= 2)
        .map(|c| {
            let ids: Vec<u32> = tok.bos_id().into_iter().chain(c.iter().copied()).collect();
            let targets = (0..ids.len()).map(|j| j > 0).collect();
            Example { ids, targets }
        })
        .collect())
}
