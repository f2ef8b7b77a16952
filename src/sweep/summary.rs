//! What a sweep writes into its folder: `sweep.json` (every run: its values, status,
//! metrics, folder), `sweep.md` (the pivot tables, every run, the command) and
//! `sweep.svg` (the metric against the columns axis, one line per row).

use super::grid::short_name;
use super::metrics::Metrics;
use super::pivot::{pivot, Pivot, PivotCell, Stats};
use super::record::{RunRecord, Status};
use super::spec::{Layout, Metric};
use crate::fsx;
use crate::report::plot::{line_chart_on, Series, XAxis};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize)]
pub struct SweepSummary {
    /// The pipeline's name.
    pub name: String,
    pub pipeline: PathBuf,
    pub out: PathBuf,
    /// The command that runs this sweep again (finished runs are skipped).
    pub command: String,
    /// Grid axes, in order.
    pub axes: Vec<String>,
    pub repeat: Vec<String>,
    pub layout: Layout,
    pub runs: Vec<RunRecord>,
    pub pivot: Pivot,
}

impl SweepSummary {
    pub fn failed(&self) -> Vec<&RunRecord> {
        self.runs
            .iter()
            .filter(|r| r.status == Status::Failed)
            .collect()
    }

    /// Writes `sweep.json`, `sweep.svg` and `sweep.md` into the sweep folder.
    pub fn write(&mut self) -> Result<()> {
        self.pivot = pivot(&self.runs, &self.layout);
        std::fs::create_dir_all(&self.out).with_context(|| {
            format!(
                "cannot create the sweep folder {}; choose another with --out",
                self.out.display()
            )
        })?;
        fsx::write_json(&self.out.join("sweep.json"), self)?;
        if self.has_points() {
            self.write_chart(&self.out.join("sweep.svg"))?;
        }
        fsx::atomic_write(&self.out.join("sweep.md"), self.to_markdown().as_bytes())
    }

    /// A short name of each axis for cell notes (`lr=0.0008`).
    fn short(&self, key: &str) -> String {
        let keys: Vec<&str> = self
            .axes
            .iter()
            .chain(&self.repeat)
            .map(String::as_str)
            .collect();
        short_name(key, &keys)
    }

    /// Whether the chart has anything to draw (else `sweep.svg` is not written).
    fn has_points(&self) -> bool {
        self.pivot
            .cells
            .iter()
            .flatten()
            .flatten()
            .any(|c| c.stats(self.layout.metric).is_some())
    }

    /// An error naming the failed runs, if any.
    pub fn ensure_all_ok(&self) -> Result<()> {
        let failed = self.failed();
        if failed.is_empty() {
            return Ok(());
        }
        bail!(
            "{} of {} runs failed ({}); see {} and each run's manifest.json",
            failed.len(),
            self.runs.len(),
            failed
                .iter()
                .map(|r| r.name.as_str())
                .collect::<Vec<_>>()
                .join("; "),
            self.out.join("sweep.md").display()
        )
    }

    pub fn to_markdown(&self) -> String {
        let mut s = String::new();
        let count = |st: Status| self.runs.iter().filter(|r| r.status == st).count();
        let _ = writeln!(s, "# Sweep: {}\n", self.name);
        let mut distinct: Vec<&BTreeMap<String, String>> = Vec::new();
        for r in &self.runs {
            if !distinct.contains(&&r.cell) {
                distinct.push(&r.cell);
            }
        }
        let cells = distinct.len();
        let repeats = self.runs.len() / cells.max(1);
        let _ = writeln!(
            s,
            "{} runs of `{}` ({cells} cells{}) in `{}`: {} finished, {} failed, {} not run.\n",
            self.runs.len(),
            self.pipeline.display(),
            if self.repeat.is_empty() {
                String::new()
            } else {
                format!(" × {repeats} repeats over {}", self.repeat.join(", "))
            },
            self.out.display(),
            count(Status::Ok),
            count(Status::Failed),
            count(Status::Pending),
        );
        s.push_str(&self.sources_note());
        s.push_str(&self.cells_note());
        for metric in [Metric::Accuracy, Metric::Ppl] {
            if self
                .runs
                .iter()
                .any(|r| value(&r.metrics, metric).is_some())
            {
                self.pivot_table(&mut s, metric);
            }
        }
        self.per_task_table(&mut s);
        if self.has_points() {
            let _ = writeln!(
                s,
                "![{} against {}](sweep.svg)\n",
                self.layout.metric.name(),
                self.layout.columns.as_deref().unwrap_or(&self.layout.rows)
            );
        }
        self.runs_table(&mut s);
        let _ = writeln!(
            s,
            "## Reproduce\n\n```sh\n{}\n```\n\nRuns already finished in `{}` are skipped; a run \
             left unfinished continues from its newest checkpoint.",
            self.command,
            self.out.display()
        );
        s
    }

    /// Where the numbers come from, from the first run that has them.
    fn sources_note(&self) -> String {
        let mut s = String::new();
        let m = |f: fn(&Metrics) -> bool| self.runs.iter().map(|r| &r.metrics).find(|m| f(m));
        if let Some(m) = m(|m| m.accuracy.is_some()) {
            let protocol = m.protocol.as_deref().unwrap_or("");
            let how = match protocol {
                "content" => {
                    "lm-evaluation-harness `acc`: the answer whose own text is most likely"
                }
                "choice" => "the most likely `the correct answer is <label>`",
                _ => "LLM-Adapters' prompt, the first label in the generated answer",
            };
            let _ = write!(
                s,
                "Accuracy: the mean over the tasks ({}) of `{}`, `{protocol}` protocol ({how}), \
                 in %. ",
                m.tasks.join(", "),
                m.accuracy_from.as_deref().unwrap_or("")
            );
        }
        if let Some(m) = m(|m| m.ppl.is_some()) {
            let _ = write!(s, "Perplexity: `{}`.", m.ppl_from.as_deref().unwrap_or(""));
        }
        s.push_str("\n\n");
        s
    }

    fn cells_note(&self) -> String {
        let mut s = String::from("Cells: ");
        if self.repeat.is_empty() {
            s.push_str(
                "one run each (no `repeat`), so there is no seed spread to judge differences by.",
            );
        } else {
            let _ = write!(
                s,
                "the mean over the repeats ({}) with their min–max in brackets.",
                self.repeat.join(", ")
            );
        }
        if !self.layout.best_of.is_empty() {
            let _ = write!(
                s,
                " {}: in each cell the value with the best mean {} is kept and named; both tables \
                 show that choice.",
                self.layout
                    .best_of
                    .iter()
                    .map(|k| format!("`{k}`"))
                    .collect::<Vec<_>>()
                    .join(", "),
                self.layout.metric.name()
            );
        }
        s.push_str("\n\n");
        s
    }

    fn pivot_table(&self, s: &mut String, metric: Metric) {
        let p = &self.pivot;
        let title = match metric {
            Metric::Accuracy => "Accuracy (%)",
            Metric::Ppl => "Perplexity",
        };
        let corner = match &p.column_axis {
            Some(c) => format!("{} \\ {c}", self.layout.rows),
            None => self.layout.rows.clone(),
        };
        let header: Vec<&str> = match &p.column_axis {
            Some(_) => p.columns.iter().map(String::as_str).collect(),
            None => vec![metric.name()],
        };
        let _ = writeln!(s, "## {title}\n");
        let _ = writeln!(s, "| {corner} | {} |", header.join(" | "));
        let _ = writeln!(s, "|---|{}", "---:|".repeat(header.len()));
        for (row, cells) in p.rows.iter().zip(&p.cells) {
            let texts: Vec<String> = cells
                .iter()
                .map(|c| {
                    c.as_ref()
                        .map_or(String::new(), |c| self.cell_text(c, metric))
                })
                .collect();
            let _ = writeln!(s, "| {row} | {} |", texts.join(" | "));
        }
        s.push('\n');
        for sentence in p.within_spread(metric, |x| format_metric(metric, x)) {
            let _ = writeln!(s, "{sentence}\n");
        }
    }

    /// Without a columns axis, one row per value of the rows axis with each task's accuracy
    /// and their mean, as the papers' tables have them (for the kept `best_of` runs).
    fn per_task_table(&self, s: &mut String) {
        let p = &self.pivot;
        let mut tasks: Vec<&str> = Vec::new();
        for t in self.runs.iter().flat_map(|r| &r.metrics.tasks) {
            if !tasks.contains(&t.as_str()) {
                tasks.push(t);
            }
        }
        if tasks.is_empty()
            || p.column_axis.is_some()
            || p.cells
                .iter()
                .flatten()
                .flatten()
                .all(|c| c.per_task.is_empty())
        {
            return;
        }
        let _ = writeln!(s, "## Accuracy per task (%)\n");
        let _ = writeln!(
            s,
            "| {} | {} | average |",
            self.layout.rows,
            tasks.join(" | ")
        );
        let _ = writeln!(s, "|---|{}---:|", "---:|".repeat(tasks.len()));
        for (row, cells) in p.rows.iter().zip(&p.cells) {
            let Some(c) = cells.first().and_then(Option::as_ref) else {
                continue;
            };
            let mut texts: Vec<String> = tasks
                .iter()
                .map(|name| {
                    c.per_task
                        .iter()
                        .find(|t| t.task == *name)
                        .map_or(String::new(), |t| format_stats(Metric::Accuracy, &t.stats))
                })
                .collect();
            texts.push(c.accuracy.as_ref().map_or(String::new(), |st| {
                format!("**{}**", format_stats(Metric::Accuracy, st))
            }));
            let _ = writeln!(s, "| {row} | {} |", texts.join(" | "));
        }
        s.push('\n');
    }

    fn cell_text(&self, c: &PivotCell, metric: Metric) -> String {
        let Some(stats) = c.stats(metric) else {
            return if c.missing > 0 {
                "no result".into()
            } else {
                "–".into()
            };
        };
        let mut t = format_stats(metric, stats);
        for (k, v) in &c.chosen {
            let _ = write!(t, " · {}={v}", self.short(k));
        }
        if c.missing > 0 {
            let _ = write!(t, " ({} of {} runs)", stats.n, stats.n + c.missing);
        }
        t
    }

    fn runs_table(&self, s: &mut String) {
        let keys: Vec<&String> = self.axes.iter().chain(&self.repeat).collect();
        let _ = writeln!(s, "## Every run\n");
        let _ = writeln!(
            s,
            "| run | {} | status | accuracy % | ppl | wall s |",
            keys.iter()
                .map(|k| k.as_str())
                .collect::<Vec<_>>()
                .join(" | ")
        );
        let _ = writeln!(s, "|---|{}---|---:|---:|---:|", "---|".repeat(keys.len()));
        for r in &self.runs {
            let values: Vec<&str> = keys
                .iter()
                .map(|k| {
                    r.cell
                        .get(*k)
                        .or_else(|| r.repeat.get(*k))
                        .map_or("(default)", String::as_str)
                })
                .collect();
            let status = match (r.status, r.reused) {
                (Status::Ok, true) => "ok (earlier)",
                (Status::Ok, false) => "ok",
                (Status::Failed, _) => "**failed**",
                (Status::Pending, _) => "not run",
            };
            let num =
                |m: Metric| value(&r.metrics, m).map_or(String::new(), |x| format_metric(m, x));
            let _ = writeln!(
                s,
                "| `{}` | {} | {status} | {} | {} | {} |",
                r.name,
                values.join(" | "),
                num(Metric::Accuracy),
                num(Metric::Ppl),
                r.wall_s.map_or(String::new(), |w| format!("{w:.1}"))
            );
        }
        s.push('\n');
        for r in self.failed() {
            let error = r
                .error
                .as_deref()
                .unwrap_or("")
                .lines()
                .next()
                .unwrap_or("");
            let _ = writeln!(s, "- `{}` failed: {error}", r.name);
        }
        if !self.failed().is_empty() {
            s.push('\n');
        }
    }

    /// The layout's metric against the columns axis, one line per row (against the rows
    /// axis, one line, without a columns axis); bars span the repeats' min–max.
    fn write_chart(&self, path: &Path) -> Result<()> {
        let metric = self.layout.metric;
        let p = &self.pivot;
        let (x_name, labels): (&str, &[String]) = match &p.column_axis {
            Some(axis) => (axis, &p.columns),
            None => (&self.layout.rows, &p.rows),
        };
        let (axis, xs) = x_axis(labels);
        // The mean, and a bar over the repeats' min–max where there are several.
        let line = |name: String, cells: &[Option<PivotCell>]| {
            let stats: Vec<Option<Stats>> = cells
                .iter()
                .map(|c| c.as_ref().and_then(|c| c.stats(metric)).copied())
                .collect();
            let k = display_scale(metric);
            Series {
                name,
                points: xs
                    .iter()
                    .zip(&stats)
                    .filter_map(|(&x, s)| Some((x, k * s.as_ref()?.mean)))
                    .collect(),
                bars: xs
                    .iter()
                    .zip(&stats)
                    .filter_map(|(&x, s)| s.filter(|s| s.n > 1).map(|s| (x, k * s.min, k * s.max)))
                    .collect(),
            }
        };
        let series: Vec<Series> = match &p.column_axis {
            Some(_) => p
                .rows
                .iter()
                .zip(&p.cells)
                .map(|(r, cells)| line(r.clone(), cells))
                .collect(),
            None => {
                let firsts: Vec<Option<PivotCell>> =
                    p.cells.iter().map(|cells| cells[0].clone()).collect();
                vec![line(metric.name().to_string(), &firsts)]
            }
        };
        let y_name = match metric {
            Metric::Accuracy => "accuracy %",
            Metric::Ppl => "perplexity",
        };
        line_chart_on(
            path,
            &format!("{}: {y_name} against {x_name}", self.name),
            x_name,
            &axis,
            y_name,
            &series,
        )
    }
}

/// Numbers on a log2 axis when they are positive and span a factor of 4 or more (ranks),
/// on a linear one otherwise; anything else as categories.
fn x_axis(labels: &[String]) -> (XAxis, Vec<f64>) {
    match labels
        .iter()
        .map(|l| l.parse::<f64>().ok())
        .collect::<Option<Vec<f64>>>()
    {
        Some(xs) => {
            let (lo, hi) = xs
                .iter()
                .fold((f64::INFINITY, 0f64), |(lo, hi), &x| (lo.min(x), hi.max(x)));
            let axis = if lo > 0.0 && hi / lo >= 4.0 {
                XAxis::Log2
            } else {
                XAxis::Linear
            };
            (axis, xs)
        }
        None => (
            XAxis::Labels(labels.to_vec()),
            (0..labels.len()).map(|i| i as f64).collect(),
        ),
    }
}

fn value(m: &Metrics, metric: Metric) -> Option<f64> {
    match metric {
        Metric::Accuracy => m.accuracy,
        Metric::Ppl => m.ppl,
    }
}

/// Accuracy is shown in %.
fn display_scale(metric: Metric) -> f64 {
    match metric {
        Metric::Accuracy => 100.0,
        Metric::Ppl => 1.0,
    }
}

fn format_metric(metric: Metric, x: f64) -> String {
    match metric {
        Metric::Accuracy => format!("{:.1}", 100.0 * x),
        Metric::Ppl => format!("{x:.3}"),
    }
}

fn format_stats(metric: Metric, s: &Stats) -> String {
    let f = |x| format_metric(metric, x);
    if s.n > 1 {
        format!("{} ({}–{})", f(s.mean), f(s.min), f(s.max))
    } else {
        f(s.mean)
    }
}
