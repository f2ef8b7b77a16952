//! The `eval` stage's settings.

use super::perplexity::PplSpec;
use crate::data::Task;
use crate::model::TextTokenizer;
use crate::nn::frozen::MatmulPrecision;
use anyhow::{anyhow, bail, Result};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::path::PathBuf;

/// How a question is answered (see DESIGN.md, Evaluation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// The model writes an answer after LLM-Adapters' evaluation prompt; the first label
    /// in it counts.
    Generate,
    /// The most likely `the correct answer is <label>` after the evaluation prompt.
    Choice,
    /// lm-evaluation-harness style: the most likely option text after a plain context.
    Content,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Generate => "generate",
            Protocol::Choice => "choice",
            Protocol::Content => "content",
        }
    }
}

/// `eval` settings. In a pipeline, `data_dir` is usually
/// `${RORA_SHARED:-../shared}/data/commonsense`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSpec {
    /// Names the reports: `eval-<label>.json`, `.md`, `.jsonl`.
    pub label: String,
    /// Task names (`boolq`, `piqa`, `social_i_qa`, `hellaswag`, `winogrande`, `ARC-Easy`,
    /// `ARC-Challenge`, `openbookqa`, `ppl`).
    pub tasks: Vec<EvalTask>,
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Leave out the first N questions of each task before `limit` or `sample` picks:
    /// a confirmation set disjoint from an earlier evaluation of the first N (a recovery
    /// curve's many looks at the same questions).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub skip: usize,
    /// At most this many questions per task.
    #[serde(default)]
    pub limit: Option<usize>,
    /// With `limit`: a seeded random subset (in file order) instead of the first N.
    #[serde(default)]
    pub sample: bool,
    /// Questions per forward pass.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// One protocol or a list; each runs over every task.
    #[serde(default = "default_protocols", deserialize_with = "one_or_many")]
    pub protocol: Vec<Protocol>,
    /// `generate`: 1 is greedy, more is beam search (LLM-Adapters used 4).
    #[serde(default = "default_num_beams")]
    pub num_beams: usize,
    /// `generate`: new tokens at most.
    #[serde(default = "default_max_new_tokens")]
    pub max_new_tokens: usize,
    /// Put the tokenizer's BOS token (when it has one) before every prompt and context.
    /// Left out: what the tokenizer does by itself (`add_bos_token` of the model folder's
    /// `tokenizer_config.json`, `tokenizer.ggml.add_bos_token` of a GGUF), as
    /// lm-evaluation-harness does; the report records the value used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos: Option<bool>,
    /// The text for the `ppl` task (perplexity, language-modelling recovery).
    #[serde(default)]
    pub ppl_text: Option<PathBuf>,
    /// `ppl`: chunk length in tokens.
    #[serde(default = "super::perplexity::default_max_len")]
    pub ppl_max_len: usize,
    /// `ppl`: score only the first N tokens of `ppl_text`.
    #[serde(default)]
    pub ppl_max_tokens: Option<usize>,
    /// Inputs of the frozen weights' products: `bf16` rounds them to bf16 and sums in f32
    /// on AMX or AVX512-BF16, as lm-evaluation-harness does with `dtype=bfloat16` (several
    /// times faster here; the products' inputs lose their low 16 bits); f32 on a CPU
    /// without a bf16 kernel. The report records what ran. `finetune.checkpoint_eval`
    /// runs at the training's precision instead.
    #[serde(default, skip_serializing_if = "MatmulPrecision::is_f32")]
    pub matmul_precision: MatmulPrecision,
    /// A folder of earlier evaluations (the pipeline's `eval` stage): one of the same
    /// model (a hash of every weight, adapters included), settings, seed and rora
    /// version is read back instead of run, and its report says `cached: true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<PathBuf>,
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("../shared/data/commonsense")
}
pub(crate) fn is_zero(n: &usize) -> bool {
    *n == 0
}
fn default_batch_size() -> usize {
    8
}
fn default_protocols() -> Vec<Protocol> {
    vec![Protocol::Content]
}
fn default_num_beams() -> usize {
    1
}
fn default_max_new_tokens() -> usize {
    32
}

fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Protocol>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(Protocol),
        Many(Vec<Protocol>),
    }
    match OneOrMany::deserialize(d).map_err(|_| {
        serde::de::Error::custom(
            "`protocol` must be one of generate, choice, content, or a list of them",
        )
    })? {
        OneOrMany::One(p) => Ok(vec![p]),
        OneOrMany::Many(v) => Ok(v),
    }
}

/// The task name of perplexity on `ppl_text`.
pub const PPL_TASK: &str = "ppl";

/// One entry of `eval.tasks`: a commonsense task, or `ppl` (perplexity of `ppl_text`).
/// Written in specs as the task's name; an unknown name fails when the spec is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EvalTask {
    Commonsense(Task),
    Ppl,
}

impl EvalTask {
    /// The name used in specs (`Task::name`, or `ppl`).
    pub fn name(self) -> &'static str {
        match self {
            EvalTask::Commonsense(t) => t.name(),
            EvalTask::Ppl => PPL_TASK,
        }
    }

    /// Parses a name of `eval.tasks`; an unknown name is an error that lists the known ones.
    pub fn parse(name: &str) -> Result<EvalTask> {
        if name == PPL_TASK {
            return Ok(EvalTask::Ppl);
        }
        Task::parse(name).map(EvalTask::Commonsense).map_err(|_| {
            anyhow!(
                "unknown task `{name}`; the tasks are: {}, and {PPL_TASK} (perplexity of eval.ppl_text)",
                Task::ALL.map(Task::name).join(", ")
            )
        })
    }
}

impl From<Task> for EvalTask {
    fn from(task: Task) -> Self {
        EvalTask::Commonsense(task)
    }
}

impl Serialize for EvalTask {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for EvalTask {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        EvalTask::parse(&name).map_err(serde::de::Error::custom)
    }
}

impl EvalSpec {
    /// The `bos` setting resolved for `tok`: as given, else the tokenizer's default.
    pub fn bos_for(&self, tok: &TextTokenizer) -> bool {
        tok.resolve_bos(self.bos)
    }

    /// Whether `ppl` is among the tasks.
    pub fn wants_ppl(&self) -> bool {
        self.tasks.contains(&EvalTask::Ppl)
    }

    /// The `ppl` task's settings, when `ppl` is among the tasks: `ppl_text` scored with
    /// the stage's `bos` (resolved against the tokenizer when scored) and `batch_size`.
    pub fn ppl(&self) -> Option<PplSpec> {
        let text = self.ppl_text.clone().filter(|_| self.wants_ppl())?;
        Some(PplSpec {
            text,
            max_tokens: self.ppl_max_tokens,
            max_len: self.ppl_max_len,
            bos: self.bos,
            batch_size: self.batch_size,
            label: None,
        })
    }

    /// A spec with every default: `tasks` on `data_dir`, the `content` protocol.
    pub fn new(label: &str, tasks: impl IntoIterator<Item = impl Into<EvalTask>>) -> Self {
        Self {
            label: label.to_string(),
            tasks: tasks.into_iter().map(Into::into).collect(),
            data_dir: default_data_dir(),
            skip: 0,
            limit: None,
            sample: false,
            batch_size: default_batch_size(),
            protocol: default_protocols(),
            num_beams: default_num_beams(),
            max_new_tokens: default_max_new_tokens(),
            bos: None,
            ppl_text: None,
            ppl_max_len: super::perplexity::default_max_len(),
            ppl_max_tokens: None,
            matmul_precision: MatmulPrecision::F32,
            cache: None,
        }
    }

    /// Checks the settings and returns the commonsense tasks (without `ppl`). Duplicates
    /// are dropped, the order kept.
    pub fn validate(&self) -> Result<Vec<Task>> {
        if self.label.is_empty()
            || !self
                .label
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            bail!(
                "eval.label `{}` must be non-empty and use only letters, digits, `-`, `_` and `.` (it names files)",
                self.label
            );
        }
        if self.tasks.is_empty() {
            bail!(
                "eval.tasks is empty; the tasks are: {}",
                Task::ALL.map(Task::name).join(", ")
            );
        }
        let mut tasks = Vec::new();
        for &task in &self.tasks {
            match task {
                EvalTask::Ppl if self.ppl_text.is_none() => {
                    bail!("eval.tasks has `ppl`: give the text to score as eval.ppl_text");
                }
                EvalTask::Ppl => {}
                EvalTask::Commonsense(t) if !tasks.contains(&t) => tasks.push(t),
                EvalTask::Commonsense(_) => {}
            }
        }
        if self.limit == Some(0) {
            bail!("eval.limit must be at least 1 (leave it out for every question)");
        }
        if self.batch_size == 0 {
            bail!("eval.batch_size must be at least 1");
        }
        if self.protocol.is_empty() {
            bail!("eval.protocol is empty; use generate, choice or content");
        }
        if self.num_beams == 0 {
            bail!("eval.num_beams must be at least 1");
        }
        if self.max_new_tokens == 0 {
            bail!("eval.max_new_tokens must be at least 1");
        }
        Ok(tasks)
    }
}
