//! Tokenised training examples: LLM-Adapters items in a [`DataFormat`] (the training
//! prompt, or the answer written out), and plain text files cut into chunks for
//! language-model recovery; and the same sources whole, as documents for packing.

use super::answers::answer_text;
use super::instructions::InstructionItem;
use super::prompt::training_prompt;
use super::text::read_text_file;
use crate::model::TextTokenizer;
use anyhow::{anyhow, bail, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// A tokenized training sequence and which of its positions are targets.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub ids: Vec<u32>,
    /// `targets[j]`: token j is predicted (counted in the loss).
    pub targets: Vec<bool>,
}

/// How `finetune.data` items become training text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataFormat {
    /// LLM-Adapters' training prompt around the instruction and `the correct answer is
    /// <label>`: the papers' recipe. BOS first (LLM-Adapters' LLaMA tokenizer adds one).
    #[default]
    Instructions,
    /// The question with its correct answer written out (`answers.rs`), BOS first only
    /// when the tokenizer adds one by default (as evaluation now does).
    Answers,
}

impl DataFormat {
    pub fn name(self) -> &'static str {
        match self {
            DataFormat::Instructions => "instructions",
            DataFormat::Answers => "answers",
        }
    }

    /// The item's training text.
    fn text(self, item: &InstructionItem) -> Result<String> {
        if !item.input.is_empty() {
            bail!(
                "items with a non-empty `input` are not supported (the commonsense data has none)"
            );
        }
        match self {
            DataFormat::Instructions => Ok(training_prompt(&item.instruction, &item.output)),
            DataFormat::Answers => answer_text(item).map_err(|e| anyhow!("{e}")),
        }
    }

    /// Whether the format's sequences start with BOS.
    fn bos(self, tok: &TextTokenizer) -> bool {
        match self {
            DataFormat::Instructions => true,
            DataFormat::Answers => tok.add_bos(),
        }
    }
}

/// `ids` cut at `cutoff_len`, EOS appended when there is room (and it is not there yet).
fn cut(tok: &TextTokenizer, mut ids: Vec<u32>, cutoff_len: usize) -> Vec<u32> {
    ids.truncate(cutoff_len);
    if let Some(&eos) = tok.eos_ids().first() {
        if ids.len() < cutoff_len && ids.last() != Some(&eos) {
            ids.push(eos);
        }
    }
    ids
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
    let ids = cut(
        tok,
        item_document(tok, item, DataFormat::Instructions)?,
        cutoff_len,
    );
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

/// One item as a training example in `format`: [`instruction_example`], or the answer
/// text (every token a target; `train_on_inputs` has no prompt to mask there) cut at
/// `cutoff_len` with EOS when there is room.
pub fn item_example(
    tok: &TextTokenizer,
    item: &InstructionItem,
    format: DataFormat,
    cutoff_len: usize,
    train_on_inputs: bool,
) -> Result<Example> {
    match format {
        DataFormat::Instructions => instruction_example(tok, item, cutoff_len, train_on_inputs),
        DataFormat::Answers => {
            let ids = cut(tok, item_document(tok, item, format)?, cutoff_len);
            let targets = (0..ids.len()).map(|j| j >= 1).collect();
            Ok(Example { ids, targets })
        }
    }
}

/// The tokens of one item in `format`, whole: BOS (as the format says) and its text,
/// no cutoff and no EOS. What packing concatenates.
pub fn item_document(
    tok: &TextTokenizer,
    item: &InstructionItem,
    format: DataFormat,
) -> Result<Vec<u32>> {
    tok.encode(&format.text(item)?, format.bos(tok))
}

/// A text file whole, as one document for packing: BOS (when the model has one, as its
/// unpacked chunks have) and all its tokens.
pub fn text_document(tok: &TextTokenizer, path: &Path) -> Result<Vec<u32>> {
    tok.encode(&read_text_file(path)?, true)
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
