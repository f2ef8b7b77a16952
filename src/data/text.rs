//! Plain text files: training text for language-model recovery, the text perplexity
//! scores and pruning's calibration text.

use super::instructions::read_instruction_file;
use anyhow::{bail, Context, Result};
use std::path::Path;

/// A plain text file, whole (training text: `finetune.text`).
pub fn read_text_file(path: &Path) -> Result<String> {
    std::fs::read_to_string(path)
        .with_context(|| format!("cannot read text file {}", path.display()))
}

/// The text to score from `path` (`key` names it in errors): a plain text file as it is,
/// or, for a `.json` file of LLM-Adapters items (a task's `test.json`), the items'
/// instructions joined by blank lines — held-out in-domain text for a model fine-tuned
/// on the training sets.
pub fn read_scoring_text(path: &Path, key: &str) -> Result<String> {
    if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"))
    {
        let items =
            read_instruction_file(path).with_context(|| format!("{key} {}", path.display()))?;
        if items.is_empty() {
            bail!("{key} {} has no items", path.display());
        }
        let instructions: Vec<&str> = items.iter().map(|i| i.instruction.as_str()).collect();
        return Ok(instructions.join("\n\n"));
    }
    std::fs::read_to_string(path).with_context(|| format!("cannot read {key} {}", path.display()))
}
