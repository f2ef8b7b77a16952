//! What a finished run measured, read back from the reports in its run folder: the mean
//! accuracy of its last evaluation and the last perplexity it measured.

use crate::eval::perplexity::PerplexityReport;
use crate::eval::Protocol;
use crate::pipeline::runner::report_json;
use crate::pipeline::spec::{PipelineSpec, Stage};
use crate::report::compare::read_report;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The reports of a pipeline that the metrics come from.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sources {
    /// `eval-<label>.json` of the last `eval` stage with a commonsense task.
    pub accuracy: Option<String>,
    /// The report of the last `ppl` stage, or of an `eval` stage with the `ppl` task,
    /// whichever comes last.
    pub ppl: Option<PplReport>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum PplReport {
    /// `ppl-<label>.json`.
    Ppl(String),
    /// `eval-<label>.json` with its `perplexity`.
    Eval(String),
}

pub fn sources(spec: &PipelineSpec) -> Sources {
    let mut found = Sources::default();
    for stage in &spec.stages {
        match stage {
            Stage::Eval(e) => {
                if e.wants_ppl() {
                    found.ppl = report_json(stage).map(PplReport::Eval);
                }
                if e.tasks.len() > usize::from(e.wants_ppl()) {
                    found.accuracy = report_json(stage);
                }
            }
            Stage::Ppl(_) => found.ppl = report_json(stage).map(PplReport::Ppl),
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
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accuracy_from: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ppl: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ppl_from: Option<String>,
}

/// Reads the metrics of the run of `spec` in `run_dir`.
pub fn read(run_dir: &Path, spec: &PipelineSpec) -> Result<Metrics> {
    let sources = sources(spec);
    let mut m = Metrics::default();
    if let Some(file) = &sources.accuracy {
        let report = read_report(&run_dir.join(file), None)?.report;
        let chosen = report
            .protocol(Protocol::Content)
            .or(report.protocols.first());
        if let Some(p) = chosen.filter(|p| !p.tasks.is_empty()) {
            m.accuracy = Some(p.average);
            m.protocol = Some(p.protocol.name().to_string());
            m.tasks = p.tasks.iter().map(|t| t.column.clone()).collect();
            m.accuracy_from = Some(file.clone());
        }
    }
    let ppl = match &sources.ppl {
        Some(PplReport::Eval(file)) => read_report(&run_dir.join(file), None)?
            .report
            .perplexity
            .map(|p| (p.perplexity, file)),
        Some(PplReport::Ppl(file)) => {
            let path = run_dir.join(file);
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            let report: PerplexityReport = serde_json::from_str(&text)
                .with_context(|| format!("{} is not a perplexity report", path.display()))?;
            Some((report.perplexity, file))
        }
        None => None,
    };
    if let Some((ppl, file)) = ppl {
        m.ppl = Some(ppl);
        m.ppl_from = Some(file.clone());
    }
    Ok(m)
}
