//! The eight commonsense tasks (LLM-Adapters' JSON files): names, where their test file
//! lives, their label patterns and lead-ins. Loading a task's questions is in
//! `questions.rs`.

use anyhow::{anyhow, bail, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// A commonsense task, in the paper's column order (`Task::ALL`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Task {
    #[serde(rename = "boolq")]
    BoolQ,
    #[serde(rename = "piqa")]
    Piqa,
    #[serde(rename = "social_i_qa")]
    SocialIqa,
    #[serde(rename = "hellaswag")]
    HellaSwag,
    #[serde(rename = "winogrande")]
    WinoGrande,
    #[serde(rename = "ARC-Easy")]
    ArcEasy,
    #[serde(rename = "ARC-Challenge")]
    ArcChallenge,
    #[serde(rename = "openbookqa")]
    OpenBookQa,
}

impl Task {
    /// All tasks, in the order of the papers' table.
    pub const ALL: [Task; 8] = [
        Task::BoolQ,
        Task::Piqa,
        Task::SocialIqa,
        Task::HellaSwag,
        Task::WinoGrande,
        Task::ArcEasy,
        Task::ArcChallenge,
        Task::OpenBookQa,
    ];

    /// The name used in specs and as the folder under the data directory.
    pub fn name(self) -> &'static str {
        match self {
            Task::BoolQ => "boolq",
            Task::Piqa => "piqa",
            Task::SocialIqa => "social_i_qa",
            Task::HellaSwag => "hellaswag",
            Task::WinoGrande => "winogrande",
            Task::ArcEasy => "ARC-Easy",
            Task::ArcChallenge => "ARC-Challenge",
            Task::OpenBookQa => "openbookqa",
        }
    }

    /// The column heading of the papers' table.
    pub fn column(self) -> &'static str {
        match self {
            Task::BoolQ => "BoolQ",
            Task::Piqa => "PIQA",
            Task::SocialIqa => "SIQA",
            Task::HellaSwag => "HellaSwag",
            Task::WinoGrande => "WinoGrande",
            Task::ArcEasy => "ARC-e",
            Task::ArcChallenge => "ARC-c",
            Task::OpenBookQa => "OBQA",
        }
    }

    /// Parses a task name (exactly as in `Task::name`); an unknown name is an error that
    /// lists the known ones.
    pub fn parse(name: &str) -> Result<Task> {
        Task::ALL
            .into_iter()
            .find(|t| t.name() == name)
            .ok_or_else(|| {
                anyhow!(
                    "unknown task `{name}`; the tasks are: {}",
                    Task::ALL.map(Task::name).join(", ")
                )
            })
    }

    /// The stem of the task's labels (`answer` for `answer1`...); `None` for BoolQ.
    pub fn label_stem(self) -> Option<&'static str> {
        match self {
            Task::BoolQ => None,
            Task::Piqa => Some("solution"),
            Task::HellaSwag => Some("ending"),
            Task::WinoGrande => Some("option"),
            Task::SocialIqa | Task::ArcEasy | Task::ArcChallenge | Task::OpenBookQa => {
                Some("answer")
            }
        }
    }

    /// Every label the task's answer pattern knows, in LLM-Adapters' `extract_answer`
    /// order (`answer1..answer5` for all `answer` tasks, as upstream).
    pub fn pattern_labels(self) -> Vec<String> {
        let n = match self {
            Task::BoolQ => return vec!["true".into(), "false".into()],
            Task::Piqa | Task::WinoGrande => 2,
            Task::HellaSwag => 4,
            Task::SocialIqa | Task::ArcEasy | Task::ArcChallenge | Task::OpenBookQa => 5,
        };
        let stem = self.label_stem().unwrap_or_default();
        (1..=n).map(|i| format!("{stem}{i}")).collect()
    }

    /// The fixed sentence every instruction of the task starts with.
    pub fn lead_in(self) -> &'static str {
        match self {
            Task::BoolQ => "Please answer the following question with true or false, question: ",
            Task::Piqa => "Please choose the correct solution to the question: ",
            Task::HellaSwag => "Please choose the correct ending to complete the given sentence: ",
            Task::WinoGrande => {
                "Please choose the correct answer to fill in the blank to complete the given sentence: "
            }
            Task::SocialIqa | Task::ArcEasy | Task::ArcChallenge | Task::OpenBookQa => {
                "Please choose the correct answer to the question: "
            }
        }
    }

    /// The task whose lead-in starts `instruction`. SIQA, ARC-Easy, ARC-Challenge and
    /// OpenBookQA share theirs (and their labels): nothing in such an item tells them
    /// apart, and it comes back as `SocialIqa`, the first of them in [`Task::ALL`].
    pub fn detect(instruction: &str) -> Option<Task> {
        Task::ALL
            .into_iter()
            .find(|t| instruction.starts_with(t.lead_in()))
    }

    /// `<data_dir>/<task>/test.json`; for HellaSwag, `test_preprocessed.json` when the raw
    /// `test.json` is absent (see the data's SOURCES.md).
    pub fn test_file(self, data_dir: &Path) -> Result<PathBuf> {
        let dir = data_dir.join(self.name());
        let test = dir.join(TEST_FILE_NAMES[0]);
        if test.is_file() {
            return Ok(test);
        }
        if self == Task::HellaSwag {
            let pre = dir.join(TEST_FILE_NAMES[1]);
            if pre.is_file() {
                return Ok(pre);
            }
            bail!(
                "task hellaswag: neither {} nor {} exists",
                test.display(),
                pre.display()
            );
        }
        bail!("task {}: {} does not exist", self.name(), test.display())
    }
}

/// The file names [`Task::test_file`] looks for.
const TEST_FILE_NAMES: [&str; 2] = ["test.json", "test_preprocessed.json"];

/// Whether `path` is named like a task's test file (`test.json`, `test_preprocessed.json`):
/// training data must not be one (the training sets are `train.json`, `train_l.json`...).
pub fn is_test_file(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| TEST_FILE_NAMES.contains(&n))
}
