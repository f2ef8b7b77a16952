//! Tokenised training examples: LLM-Adapters items formatted with the training prompt,
//! and plain text files cut into chunks for language-model recovery.

use super::instructions::InstructionItem;
use super::prompt::training_prompt;
use super::text::read_text_file;
use crate::model::TextTokenizer;
use anyhow::{bail, Result};
use std::path::Path;

/// A tokenized training sequence and which of its positions are targets.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub ids: Vec<u32>,
    /// `targets[j]`: token j is predicted (counted in the loss).
    pub targets: Vec<bool>,
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
    let text = read_text_file(path)?;
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
