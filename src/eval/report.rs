//! Evaluation reports: per task and protocol counts, accuracy with a 95% Wilson
//! interval, the average over tasks as the papers report it, the Markdown table in the
//! papers' layout, and per-question records.

use super::spec::Protocol;
use crate::data::Task;
use crate::nn::frozen::MatmulPrecision;
use serde::{Deserialize, Serialize};
use std::fmt::Write;
use std::path::PathBuf;

/// The 95% Wilson score interval of `correct` successes out of `n`.
pub fn wilson_interval(correct: usize, n: usize) -> [f64; 2] {
    if n == 0 {
        return [0.0, 1.0];
    }
    let z = 1.959_963_984_540_054_f64;
    let n_f = n as f64;
    let p = correct as f64 / n_f;
    let z2 = z * z;
    let denom = 1.0 + z2 / n_f;
    let centre = (p + z2 / (2.0 * n_f)) / denom;
    let half = z * (p * (1.0 - p) / n_f + z2 / (4.0 * n_f * n_f)).sqrt() / denom;
    [(centre - half).max(0.0), (centre + half).min(1.0)]
}

/// One task under one protocol.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskResult {
    pub task: Task,
    /// The papers' column name (`ARC-e`...).
    pub column: String,
    /// The file the questions came from.
    pub file: PathBuf,
    pub n: usize,
    pub correct: usize,
    pub accuracy: f64,
    pub ci95: [f64; 2],
    /// `generate`: answers with no label in them (counted wrong).
    pub unparsed: usize,
    /// `content`: argmax of log-prob / continuation bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correct_norm: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acc_norm: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acc_norm_ci95: Option<[f64; 2]>,
    /// Tokens the model processed (prompts, candidates, generated tokens).
    pub tokens: usize,
    pub seconds: f64,
}

impl TaskResult {
    pub fn new(task: Task, file: PathBuf, n: usize, correct: usize) -> Self {
        Self {
            task,
            column: task.column().to_string(),
            file,
            n,
            correct,
            accuracy: correct as f64 / n.max(1) as f64,
            ci95: wilson_interval(correct, n),
            unparsed: 0,
            correct_norm: None,
            acc_norm: None,
            acc_norm_ci95: None,
            tokens: 0,
            seconds: 0.0,
        }
    }

    pub fn with_norm(mut self, correct_norm: usize) -> Self {
        self.correct_norm = Some(correct_norm);
        self.acc_norm = Some(correct_norm as f64 / self.n.max(1) as f64);
        self.acc_norm_ci95 = Some(wilson_interval(correct_norm, self.n));
        self
    }
}

/// Every task under one protocol, and the unweighted mean over the tasks (the papers'
/// "Average").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProtocolResult {
    pub protocol: Protocol,
    pub tasks: Vec<TaskResult>,
    pub average: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub average_norm: Option<f64>,
}

impl ProtocolResult {
    pub fn new(protocol: Protocol, tasks: Vec<TaskResult>) -> Self {
        let k = tasks.len().max(1) as f64;
        let average = tasks.iter().map(|t| t.accuracy).sum::<f64>() / k;
        let average_norm = if !tasks.is_empty() && tasks.iter().all(|t| t.acc_norm.is_some()) {
            Some(tasks.iter().filter_map(|t| t.acc_norm).sum::<f64>() / k)
        } else {
            None
        };
        Self {
            protocol,
            tasks,
            average,
            average_norm,
        }
    }

    pub fn task(&self, task: Task) -> Option<&TaskResult> {
        self.tasks.iter().find(|t| t.task == task)
    }
}

/// `eval-<label>.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    pub label: String,
    pub data_dir: PathBuf,
    /// Questions left out at the start of each task (`eval.skip`).
    #[serde(default, skip_serializing_if = "super::spec::is_zero")]
    pub skip: usize,
    pub limit: Option<usize>,
    pub sample: bool,
    pub seed: u64,
    pub bos: bool,
    pub num_beams: usize,
    pub max_new_tokens: usize,
    /// What the frozen products ran at (`eval.matmul_precision`, or the training's in a
    /// checkpoint evaluation).
    #[serde(default, skip_serializing_if = "MatmulPrecision::is_f32")]
    pub matmul_precision: MatmulPrecision,
    pub protocols: Vec<ProtocolResult>,
    /// The `ppl` task, when asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub perplexity: Option<crate::eval::perplexity::PerplexityReport>,
    pub seconds: f64,
    /// Read from `eval.cache` (an evaluation of the same model and settings) rather
    /// than run; `seconds` is the original run's.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cached: bool,
}

fn pct(x: f64) -> String {
    format!("{:.1}", 100.0 * x)
}

impl EvalReport {
    pub fn protocol(&self, p: Protocol) -> Option<&ProtocolResult> {
        self.protocols.iter().find(|r| r.protocol == p)
    }

    /// The papers' table (one row per protocol and metric; `–` for tasks not run), then
    /// the details per task with intervals.
    pub fn to_markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "## Commonsense evaluation: {}\n", self.label);
        let mut limit = match self.limit {
            Some(n) if self.sample => format!("a random {n} per task (seed {})", self.seed),
            Some(n) => format!("the first {n} per task"),
            None => "all".to_string(),
        };
        if self.skip > 0 {
            limit += &format!(", after the first {} of each task (`skip`)", self.skip);
        }
        let _ = writeln!(s, "Questions: {limit}. Accuracy in %.\n");
        if !self.matmul_precision.is_f32() {
            let _ = writeln!(
                s,
                "Products of the frozen weights from {} inputs (`matmul_precision`), sums in f32.\n",
                self.matmul_precision
            );
        }
        if self.cached {
            let _ = writeln!(
                s,
                "Read from `eval.cache`: an earlier evaluation of the same weights, settings \
                 and seed (its time: {:.0} s).\n",
                self.seconds
            );
        }
        let cols: Vec<&str> = Task::ALL.iter().map(|t| t.column()).collect();
        let _ = writeln!(s, "| {} | {} | Average |", self.label, cols.join(" | "));
        let _ = writeln!(s, "|---|{}---:|", "---:|".repeat(cols.len()));
        for p in &self.protocols {
            let row = |name: String, f: &dyn Fn(&TaskResult) -> Option<f64>, avg: f64| {
                let cells: Vec<String> = Task::ALL
                    .iter()
                    .map(|t| p.task(*t).and_then(f).map_or("–".to_string(), pct))
                    .collect();
                format!("| {name} | {} | {} |", cells.join(" | "), pct(avg))
            };
            let _ = writeln!(
                s,
                "{}",
                row(
                    p.protocol.name().to_string(),
                    &|t| Some(t.accuracy),
                    p.average
                )
            );
            if let Some(avg) = p.average_norm {
                let _ = writeln!(
                    s,
                    "{}",
                    row(
                        format!("{} (acc_norm)", p.protocol.name()),
                        &|t| t.acc_norm,
                        avg
                    )
                );
            }
        }
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "| protocol | task | n | correct | accuracy (95% CI) | acc_norm (95% CI) | unparsed | tokens | seconds |"
        );
        let _ = writeln!(s, "|---|---|---:|---:|---|---|---:|---:|---:|");
        for p in &self.protocols {
            for t in &p.tasks {
                let norm = match (t.acc_norm, t.acc_norm_ci95) {
                    (Some(a), Some(ci)) => format!("{} ({}–{})", pct(a), pct(ci[0]), pct(ci[1])),
                    _ => "–".into(),
                };
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {} ({}–{}) | {} | {} | {} | {:.1} |",
                    p.protocol.name(),
                    t.column,
                    t.n,
                    t.correct,
                    pct(t.accuracy),
                    pct(t.ci95[0]),
                    pct(t.ci95[1]),
                    norm,
                    t.unparsed,
                    t.tokens,
                    t.seconds
                );
            }
        }
        if let Some(p) = &self.perplexity {
            s.push('\n');
            s.push_str(&p.to_markdown());
        }
        s
    }
}

/// One line of `eval-<label>.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuestionRecord {
    pub protocol: Protocol,
    pub task: Task,
    /// Position in the task's file.
    pub index: usize,
    pub gold: String,
    /// `None` when a generation held no label.
    pub predicted: Option<String>,
    pub correct: bool,
    /// `generate`: the decoded new tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<String>,
    /// `choice`/`content`: sum of log-probs per allowed label, in label order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scores: Option<Vec<f64>>,
    /// `content`: the scores divided by the continuation's byte length.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scores_norm: Option<Vec<f64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predicted_norm: Option<String>,
}

/// What the eval stage produced: the report and one record per question and protocol.
#[derive(Debug, Clone)]
pub struct EvalRun {
    pub report: EvalReport,
    pub records: Vec<QuestionRecord>,
}

impl EvalRun {
    /// `eval-<label>.jsonl`: one record per line.
    pub fn records_jsonl(&self) -> serde_json::Result<String> {
        let mut lines = String::new();
        for r in &self.records {
            lines.push_str(&serde_json::to_string(r)?);
            lines.push('\n');
        }
        Ok(lines)
    }
}
