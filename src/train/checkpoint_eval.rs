//! `checkpoint_eval`: the eval stage's settings run on the model being trained — before
//! the first step, every `eval_every` steps and at the end — so that a run draws its own
//! recovery curve: pooled accuracy (with its interval, and a paired test against the
//! model as training found it) and perplexity against training tokens. The products run at
//! the training's `matmul_precision` (the packed bf16 weights are the training's), and each
//! report records it.
//!
//! Each evaluation's per-question records go to `checkpoint-evals/step-NNNNNN.jsonl`
//! (the paired test of a resumed run reads step 0's back); its summary is the `eval`
//! field of that step's `train-log.jsonl` line.

use super::log::LogLine;
use crate::eval::report::wilson_interval;
use crate::eval::{run_eval, EvalSpec, Protocol};
use crate::fsx;
use crate::model::{Llama, TextTokenizer};
use crate::progress;
use crate::report::paired::{self, answers_of, read_answers, Answers, Metric};
use crate::report::plot::{line_chart, Series};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Where the per-question records of every checkpoint evaluation go.
pub const DIR: &str = "checkpoint-evals";

/// One evaluation of the model being trained, as `train-log.jsonl` keeps it. Accuracies
/// pool every question of every task of the first protocol (each question counts once).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalPoint {
    pub protocol: Protocol,
    pub questions: usize,
    pub accuracy: f64,
    pub ci95: [f64; 2],
    /// `content`: by the length-normalised score.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acc_norm: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acc_norm_ci95: Option<[f64; 2]>,
    /// Accuracy per task (the papers' column names).
    pub tasks: BTreeMap<String, f64>,
    /// The `ppl` task, when asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub perplexity: Option<f64>,
    /// Paired against the evaluation before the first step (none for that one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vs_start: Option<VsStart>,
    pub seconds: f64,
}

/// The pooled McNemar test of one evaluation against the one before training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VsStart {
    /// Right before training only / now only, and the exact p-value; by `acc`.
    pub only_start: usize,
    pub only_now: usize,
    pub p_value: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acc_norm_p_value: Option<f64>,
}

/// Runs `spec` at checkpoints and remembers the first evaluation's answers.
pub struct CheckpointEval {
    spec: EvalSpec,
    seed: u64,
    dir: PathBuf,
    start: Option<Answers>,
}

impl CheckpointEval {
    /// Reads back the step-0 records a resumed run left in `run_dir`.
    pub fn new(spec: &EvalSpec, seed: u64, run_dir: &Path) -> Result<Self> {
        let dir = run_dir.join(DIR);
        let first = records_file(&dir, 0);
        let start = if first.exists() {
            Some(read_answers(&first)?)
        } else {
            None
        };
        Ok(Self {
            spec: spec.clone(),
            seed,
            dir,
            start,
        })
    }

    /// Whether the evaluation before the first step is still to do.
    pub fn needs_start(&self) -> bool {
        self.start.is_none()
    }

    /// Evaluates `model` after `step` steps (0: before training).
    pub fn evaluate(
        &mut self,
        model: &Llama,
        tok: &TextTokenizer,
        step: usize,
    ) -> Result<EvalPoint> {
        let mut spec = self.spec.clone();
        spec.label = format!("step-{step}");
        let run = run_eval(&spec, model, tok, self.seed)
            .with_context(|| format!("finetune.checkpoint_eval at step {step}"))?;
        std::fs::create_dir_all(&self.dir)?;
        fsx::atomic_write(
            &records_file(&self.dir, step),
            run.records_jsonl()?.as_bytes(),
        )?;
        let answers = answers_of(&run.records);
        let report = &run.report;
        let first = report
            .protocols
            .first()
            .context("finetune.checkpoint_eval: no commonsense task to pool")?;
        let questions: usize = first.tasks.iter().map(|t| t.n).sum();
        let correct: usize = first.tasks.iter().map(|t| t.correct).sum();
        let correct_norm: Option<usize> = first.tasks.iter().map(|t| t.correct_norm).sum();
        let vs_start = self.start.as_ref().and_then(|start| {
            let acc = paired::compare(start, &answers, first.protocol, None, Metric::Acc)?;
            let norm = paired::compare(start, &answers, first.protocol, None, Metric::AccNorm);
            Some(VsStart {
                only_start: acc.only_first,
                only_now: acc.only_second,
                p_value: acc.p_value,
                acc_norm_p_value: norm.map(|n| n.p_value),
            })
        });
        if step == 0 {
            self.start = Some(answers);
        }
        let point = EvalPoint {
            protocol: first.protocol,
            questions,
            accuracy: correct as f64 / questions.max(1) as f64,
            ci95: wilson_interval(correct, questions),
            acc_norm: correct_norm.map(|c| c as f64 / questions.max(1) as f64),
            acc_norm_ci95: correct_norm.map(|c| wilson_interval(c, questions)),
            tasks: first
                .tasks
                .iter()
                .map(|t| (t.column.clone(), t.accuracy))
                .collect(),
            perplexity: report.perplexity.as_ref().map(|p| p.perplexity),
            vs_start,
            seconds: report.seconds,
        };
        progress::line(&format!(
            "checkpoint eval, step {step}: pooled accuracy {:.2}% ({:.2}–{:.2}) on {questions} \
             questions{}{}{}",
            100.0 * point.accuracy,
            100.0 * point.ci95[0],
            100.0 * point.ci95[1],
            point
                .acc_norm
                .map_or(String::new(), |a| format!(", acc_norm {:.2}%", 100.0 * a)),
            point
                .perplexity
                .map_or(String::new(), |p| format!(", perplexity {p:.3}")),
            point.vs_start.as_ref().map_or(String::new(), |v| format!(
                ", vs step 0: {} / {} right only then / now, McNemar p = {:.3}",
                v.only_start, v.only_now, v.p_value
            )),
        ));
        Ok(point)
    }
}

fn records_file(dir: &Path, step: usize) -> PathBuf {
    dir.join(format!("step-{step:06}.jsonl"))
}

/// `recovery-curve.svg` (pooled accuracy against training tokens) and, when the log has
/// perplexities, `recovery-perplexity.svg`; the files written.
pub fn plot_recovery(run_dir: &Path, log: &[LogLine]) -> Result<Vec<PathBuf>> {
    let points: Vec<(f64, &EvalPoint)> = log
        .iter()
        .filter_map(|l| Some((l.tokens as f64, l.eval.as_ref()?)))
        .collect();
    if points.is_empty() {
        return Ok(Vec::new());
    }
    let mut wrote = Vec::new();
    let pct = |x: f64| 100.0 * x;
    let mut series = vec![Series {
        name: "accuracy (pooled), 95% Wilson interval".into(),
        points: points.iter().map(|(t, p)| (*t, pct(p.accuracy))).collect(),
        bars: points
            .iter()
            .map(|(t, p)| (*t, pct(p.ci95[0]), pct(p.ci95[1])))
            .collect(),
    }];
    let norm: Vec<(f64, f64)> = points
        .iter()
        .filter_map(|(t, p)| Some((*t, pct(p.acc_norm?))))
        .collect();
    if !norm.is_empty() {
        series.push(Series {
            name: "acc_norm (pooled)".into(),
            points: norm,
            ..Series::default()
        });
    }
    let questions = points[0].1.questions;
    let curve = run_dir.join("recovery-curve.svg");
    line_chart(
        &curve,
        &format!("Recovery: pooled accuracy on {questions} fixed questions"),
        "training tokens",
        "accuracy (%)",
        &series,
    )?;
    wrote.push(curve);
    let ppl: Vec<(f64, f64)> = points
        .iter()
        .filter_map(|(t, p)| Some((*t, p.perplexity?)))
        .collect();
    if !ppl.is_empty() {
        let path = run_dir.join("recovery-perplexity.svg");
        let series = [Series {
            name: "held-out perplexity".into(),
            points: ppl,
            ..Series::default()
        }];
        line_chart(
            &path,
            "Recovery: perplexity",
            "training tokens",
            "perplexity",
            &series,
        )?;
        wrote.push(path);
    }
    Ok(wrote)
}
