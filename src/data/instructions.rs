//! LLM-Adapters JSON files: an array of `{instruction, input, output, answer}` items (the
//! commonsense training sets and the tasks' test files alike).

use anyhow::{Context, Result};
use serde::Deserialize;
use std::path::Path;

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
