//! Reading data: LLM-Adapters JSON files, plain text, the prompt templates that format
//! them, the same items as natural text (`answers`), tokenised training examples and
//! their packing into full rows, and the eight commonsense tasks with their questions. `eval`, `train` and `prune` read their data through here; this module
//! stands only on `model` (the tokenizer).
//!
//! Inside, the files form a chain: `tasks` (what a task is) ← `options` (reading a
//! question's parts, given its task) ← `questions` (a task's validated test file), and
//! `instructions` (LLM-Adapters JSON) ← `text`, `examples`, `questions`; `answers` stands
//! on `options` and feeds `examples`, whose documents `packing` concatenates.

pub mod answers;
pub mod examples;
pub mod instructions;
pub mod options;
pub mod packing;
pub mod prompt;
pub mod questions;
pub mod tasks;
pub mod text;

pub use answers::answer_text;
pub use examples::{
    instruction_example, item_document, item_example, text_document, text_examples, DataFormat,
    Example,
};
pub use instructions::{read_instruction_file, InstructionItem};
pub use packing::{pack, Packed};
pub use questions::{load_task, load_task_file, Question};
pub use tasks::{is_test_file, Task};
pub use text::read_scoring_text;

use anyhow::{bail, Context, Result};
use std::path::PathBuf;

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
