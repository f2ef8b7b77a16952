//! The training log `train-log.jsonl` (one [`LogLine`] per step, appended as the run goes,
//! so an interrupted run keeps every step it finished) and its loss-curve plot.

use crate::fsx;
use crate::report::plot::{line_chart, Series};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::Path;

/// One line of `train-log.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LogLine {
    pub step: usize,
    pub epoch: f64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens_per_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
}

/// The log's lines; none when the file does not exist.
pub fn read(path: &Path) -> Result<Vec<LogLine>> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    std::fs::read_to_string(path)?
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).with_context(|| format!("bad line in {}", path.display())))
        .collect()
}

/// Replaces the log with `lines` (atomically).
pub fn rewrite(path: &Path, lines: &[LogLine]) -> Result<()> {
    let mut text = String::new();
    for l in lines {
        text.push_str(&serde_json::to_string(l)?);
        text.push('\n');
    }
    fsx::atomic_write(path, text.as_bytes())
}

pub fn append(path: &Path, line: &LogLine) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)?;
    writeln!(f, "{}", serde_json::to_string(line)?)?;
    Ok(())
}

/// The train loss of every step, and the validation loss where there is one, as an SVG
/// line chart; nothing when the log is empty.
pub fn plot_losses(path: &Path, log: &[LogLine]) -> Result<()> {
    if log.is_empty() {
        return Ok(());
    }
    let mut series = vec![Series {
        name: "train loss".into(),
        points: log.iter().map(|l| (l.step as f64, l.loss)).collect(),
    }];
    let val: Vec<(f64, f64)> = log
        .iter()
        .filter_map(|l| Some((l.step as f64, l.val_loss?)))
        .collect();
    if !val.is_empty() {
        series.push(Series {
            name: "val loss".into(),
            points: val,
        });
    }
    line_chart(path, "Fine-tuning loss", "step", "loss", &series)
}
