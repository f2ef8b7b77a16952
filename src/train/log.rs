//! The training log `train-log.jsonl` (one [`LogLine`] per step, appended as the run goes,
//! so an interrupted run keeps every step it finished) and its loss-curve plot.

use super::checkpoint_eval::EvalPoint;
use crate::fsx;
use crate::report::plot::{line_chart, Series};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::Path;

/// One line of `train-log.jsonl`: a training step, or (step 0, with `checkpoint_eval`)
/// the evaluation before the first step.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LogLine {
    pub step: usize,
    /// Training tokens so far (counted over resumes).
    #[serde(default)]
    pub tokens: u64,
    /// Wall seconds of training steps so far (counted over resumes; checkpoint
    /// evaluations and validation not included).
    #[serde(default)]
    pub train_seconds: f64,
    /// The step's numbers; none on the line of the evaluation before training.
    #[serde(flatten)]
    pub train: Option<StepNumbers>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
    /// `checkpoint_eval`'s evaluation after this step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval: Option<EvalPoint>,
}

/// What one training step measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepNumbers {
    pub epoch: f64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens_per_s: f64,
}

impl LogLine {
    /// The step's training loss (none on the line before training).
    pub fn loss(&self) -> Option<f64> {
        self.train.as_ref().map(|t| t.loss)
    }
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
/// line chart; nothing when the log has no step.
pub fn plot_losses(path: &Path, log: &[LogLine]) -> Result<()> {
    if log.iter().all(|l| l.train.is_none()) {
        return Ok(());
    }
    let mut series = vec![Series {
        name: "train loss".into(),
        points: log
            .iter()
            .filter_map(|l| Some((l.step as f64, l.loss()?)))
            .collect(),
        ..Series::default()
    }];
    let val: Vec<(f64, f64)> = log
        .iter()
        .filter_map(|l| Some((l.step as f64, l.val_loss?)))
        .collect();
    if !val.is_empty() {
        series.push(Series {
            name: "val loss".into(),
            points: val,
            ..Series::default()
        });
    }
    line_chart(path, "Fine-tuning loss", "step", "loss", &series)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The line before training has no step numbers, and reads back without them; a
    /// step line of an older log (no `tokens`) reads with zeros.
    #[test]
    fn lines_with_and_without_step_numbers_round_trip() {
        let start = LogLine {
            step: 0,
            tokens: 0,
            train_seconds: 0.0,
            train: None,
            val_loss: None,
            eval: None,
        };
        let text = serde_json::to_string(&start).unwrap();
        assert_eq!(text, r#"{"step":0,"tokens":0,"train_seconds":0.0}"#);
        assert!(serde_json::from_str::<LogLine>(&text)
            .unwrap()
            .train
            .is_none());
        let old =
            r#"{"step":3,"epoch":0.5,"loss":2.5,"lr":0.001,"grad_norm":1.0,"tokens_per_s":9.0}"#;
        let line: LogLine = serde_json::from_str(old).unwrap();
        assert_eq!((line.tokens, line.loss()), (0, Some(2.5)));
        let again: LogLine = serde_json::from_str(&serde_json::to_string(&line).unwrap()).unwrap();
        assert_eq!(again.loss(), Some(2.5));
    }
}
