//! A commonsense task's test questions: an LLM-Adapters file read, each item's gold label
//! checked against its `Answer format:` and its options parsed.

use super::instructions::read_instruction_file;
use super::options::{parse_instruction, ParsedQuestion};
use super::tasks::Task;
use anyhow::{anyhow, bail, Result};
use std::path::Path;

/// One test question, validated: its gold label is one its `Answer format:` allows and its
/// options parse.
#[derive(Debug, Clone)]
pub struct Question {
    pub task: Task,
    /// Position in the file (0-based).
    pub index: usize,
    pub instruction: String,
    /// The gold label (`answer2`, `true`...).
    pub gold: String,
    pub parsed: ParsedQuestion,
}

/// Reads and validates the task's test file (see `Task::test_file`).
pub fn load_task(task: Task, data_dir: &Path) -> Result<Vec<Question>> {
    let path = task.test_file(data_dir)?;
    load_task_file(task, &path)
}

/// Reads and validates one LLM-Adapters file of `task`. Errors name the file and the item.
pub fn load_task_file(task: Task, path: &Path) -> Result<Vec<Question>> {
    let items = read_instruction_file(path)?;
    let mut out = Vec::with_capacity(items.len());
    for (index, item) in items.into_iter().enumerate() {
        let at = || format!("{} item {index}", path.display());
        let Some(gold) = item.answer else {
            bail!("{}: missing field `answer`", at());
        };
        let parsed =
            parse_instruction(task, &item.instruction).map_err(|e| anyhow!("{}: {e}", at()))?;
        if !parsed.labels.contains(&gold) {
            bail!(
                "{}: answer `{gold}` is not one the question allows (Answer format: {})",
                at(),
                parsed.labels.join("/")
            );
        }
        out.push(Question {
            task,
            index,
            instruction: item.instruction,
            gold,
            parsed,
        });
    }
    Ok(out)
}
