//! What a finished run measured, read back from the reports in its run folder: the mean
//! accuracy of its last evaluation and the last perplexity it measured.

use crate::eval::perplexity::PerplexityReport;
use crate::eval::Protocol;
use crate::pipeline::run_dir::read_stage_records;
use crate::pipeline::spec::{PipelineSpec, Stage};
use crate::report::compare::read_report;
use anyhow::{anyhow, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The stages of a pipeline that the metrics come from, by their index in `stages:`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sources {
    /// The last `eval` stage with a commonsense task.
    pub accuracy: Option<usize>,
    /// The last `ppl` stage, or `eval` stage with the `ppl` task, whichever comes last.
    pub ppl: Option<usize>,
}

pub fn sources(spec: &PipelineSpec) -> Sources {
    let mut found = Sources::default();
    for (i, stage) in spec.stages.iter().enumerate() {
        match stage {
            Stage::Eval(e) => {
                if e.wants_ppl() {
                    found.ppl = Some(i);
                }
                if e.tasks.len() > usize::from(e.wants_ppl()) {
                    found.accuracy = Some(i);
                }
            }
            Stage::Ppl(_) => found.ppl = Some(i),
            _ => {}
        }
    }
    found
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Mean accuracy (0–1) over the tasks of the last evaluation, under `protocol`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<f64>,
    /// `content` when the evaluation ran it (lm-evaluation-harness `acc`), else its first
    /// protocol.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// The tasks averaged, by their papers' column names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tasks: Vec<String>,
    /// Each task's accuracy (0–1), in the order of `tasks`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub task_accuracy: Vec<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accuracy_from: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ppl: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ppl_from: Option<String>,
}

/// Reads the metrics of the run of `spec` in `run_dir`, from the reports its manifest
/// lists; the accuracy under `protocol` (default: content when run, else the first).
pub fn read(run_dir: &Path, spec: &PipelineSpec, protocol: Option<Protocol>) -> Result<Metrics> {
    let sources = sources(spec);
    let records = read_stage_records(run_dir)?;
    let report_of = |index: usize| {
        records
            .iter()
            .find(|r| r.index == index)
            .and_then(|r| r.report.clone())
            .ok_or_else(|| {
                anyhow!(
                    "{}: stages[{index}] has no report",
                    run_dir.join("manifest.json").display()
                )
            })
    };
    let mut m = Metrics::default();
    if let Some(index) = sources.accuracy {
        let file = report_of(index)?;
        let report = read_report(&run_dir.join(&file), None)?.report;
        let chosen = match protocol {
            Some(p) => Some(report.protocol(p).ok_or_else(|| {
                anyhow!(
                    "{}: the evaluation did not run the `{}` protocol the sweep reads",
                    run_dir.join(&file).display(),
                    p.name()
                )
            })?),
            None => report
                .protocol(Protocol::Content)
                .or(report.protocols.first()),
        };
        if let Some(p) = chosen.filter(|p| !p.tasks.is_empty()) {
            m.accuracy = Some(p.average);
            m.protocol = Some(p.protocol.name().to_string());
            m.tasks = p.tasks.iter().map(|t| t.column.clone()).collect();
            m.task_accuracy = p.tasks.iter().map(|t| t.accuracy).collect();
            m.accuracy_from = Some(file);
        }
    }
    if let Some(index) = sources.ppl {
        let file = report_of(index)?;
        let path = run_dir.join(&file);
        let ppl = if let Some(Stage::Eval(_)) = spec.stages.get(index) {
            read_report(&path, None)?
                .report
                .perplexity
                .map(|p| p.perplexity)
        } else {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            let report: PerplexityReport = serde_json::from_str(&text)
                .with_context(|| format!("{} is not a perplexity report", path.display()))?;
            Some(report.perplexity)
        };
        if let Some(ppl) = ppl {
            m.ppl = Some(ppl);
            m.ppl_from = Some(file);
        }
    }
    Ok(m)
}
