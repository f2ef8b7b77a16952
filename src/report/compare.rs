//! Comparing evaluation reports: one row per run, columns per task (the papers' layout),
//! the difference of the last run against the first with a 95% interval, and a grouped
//! bar chart.

use super::paired::{self, read_answers, Answers, PairedRow};
use crate::eval::{EvalReport, ProtocolResult, TaskResult};
use anyhow::{anyhow, Context, Result};
use plotters::prelude::*;
use std::fmt::Write;
use std::path::Path;

/// A labelled report read from `eval-<label>.json`, with its per-question answers from
/// `eval-<label>.jsonl` when that file is beside it.
pub struct Row {
    pub label: String,
    pub report: EvalReport,
    pub answers: Option<Answers>,
}

pub fn read_report(path: &Path, label: Option<String>) -> Result<Row> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let report: EvalReport = serde_json::from_str(&text).with_context(|| {
        format!(
            "{} is not an eval report (eval-<label>.json)",
            path.display()
        )
    })?;
    let label = label.unwrap_or_else(|| {
        let run = path
            .parent()
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        if run.is_empty() {
            report.label.clone()
        } else {
            format!("{run}/{}", report.label)
        }
    });
    let jsonl = path.with_extension("jsonl");
    let answers = if jsonl.exists() {
        Some(read_answers(&jsonl)?)
    } else {
        None
    };
    Ok(Row {
        label,
        report,
        answers,
    })
}

/// Newcombe's interval (method 10) for the difference of two independent proportions,
/// from their Wilson intervals: `b − a` with its 95% bounds.
pub fn difference_interval(a: &TaskResult, b: &TaskResult) -> (f64, [f64; 2]) {
    let d = b.accuracy - a.accuracy;
    let ([la, ua], [lb, ub]) = (a.ci95, b.ci95);
    let lo = d - ((b.accuracy - lb).powi(2) + (ua - a.accuracy).powi(2)).sqrt();
    let hi = d + ((ub - b.accuracy).powi(2) + (a.accuracy - la).powi(2)).sqrt();
    (d, [lo, hi])
}

fn pct(x: f64) -> String {
    format!("{:.1}", 100.0 * x)
}

/// The Markdown table of every protocol the reports share.
pub fn to_markdown(rows: &[Row]) -> String {
    let mut s = String::new();
    let Some(first) = rows.first() else { return s };
    for proto in &first.report.protocols {
        let results: Vec<Option<&ProtocolResult>> = rows
            .iter()
            .map(|r| r.report.protocol(proto.protocol))
            .collect();
        let tasks: Vec<&TaskResult> = proto.tasks.iter().collect();
        let _ = writeln!(s, "### {:?} protocol\n", proto.protocol);
        let header: Vec<String> = tasks.iter().map(|t| t.column.clone()).collect();
        let _ = writeln!(s, "| run | {} | Average |", header.join(" | "));
        let _ = writeln!(s, "|---|{}---:|", "---:|".repeat(tasks.len()));
        for (row, res) in rows.iter().zip(&results) {
            let cells: Vec<String> = tasks
                .iter()
                .map(|t| {
                    res.and_then(|r| r.task(t.task)).map_or("–".into(), |x| {
                        format!(
                            "{} ({}–{})",
                            pct(x.accuracy),
                            pct(x.ci95[0]),
                            pct(x.ci95[1])
                        )
                    })
                })
                .collect();
            let avg = res.map_or("–".into(), |r| pct(r.average));
            let _ = writeln!(s, "| {} | {} | {avg} |", row.label, cells.join(" | "));
        }
        if let (Some(Some(a)), Some(Some(b))) = (results.first(), results.last()) {
            if rows.len() >= 2 {
                let cells: Vec<String> = tasks
                    .iter()
                    .map(|t| match (a.task(t.task), b.task(t.task)) {
                        (Some(x), Some(y)) => {
                            let (d, [lo, hi]) = difference_interval(x, y);
                            let within = if lo <= 0.0 && hi >= 0.0 { " ≈" } else { "" };
                            format!(
                                "{:+.1} ({:+.1}…{:+.1}){within}",
                                100.0 * d,
                                100.0 * lo,
                                100.0 * hi
                            )
                        }
                        _ => "–".into(),
                    })
                    .collect();
                let _ = writeln!(
                    s,
                    "| {} − {} | {} | {:+.1} |",
                    rows[rows.len() - 1].label,
                    rows[0].label,
                    cells.join(" | "),
                    100.0 * (b.average - a.average)
                );
            }
        }
        s.push('\n');
    }
    let paired_rows: Option<Vec<PairedRow>> = rows
        .iter()
        .map(|r| {
            r.answers.as_ref().map(|answers| PairedRow {
                label: &r.label,
                answers,
            })
        })
        .collect();
    if let Some(paired_rows) = paired_rows {
        let tasks: Vec<_> = first
            .report
            .protocols
            .iter()
            .flat_map(|p| {
                p.tasks
                    .iter()
                    .map(move |t| (p.protocol, t.task, t.column.clone()))
            })
            .collect();
        s.push_str(&paired::to_markdown(&paired_rows, &tasks));
    }
    if rows.iter().any(|r| r.report.perplexity.is_some()) {
        let _ = writeln!(
            s,
            "### Perplexity\n\n| run | text | tokens scored | perplexity |\n|---|---|---:|---:|"
        );
        for row in rows {
            if let Some(p) = &row.report.perplexity {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {:.3} |",
                    row.label, p.text, p.scored_tokens, p.perplexity
                );
            }
        }
        s.push('\n');
    }
    if rows.len() >= 2 {
        s.push_str(
            "Cells: accuracy % (95% Wilson interval). Difference row: last run minus first, with \
             Newcombe's 95% interval for independent proportions; `≈` marks a difference within noise.\n",
        );
    }
    s
}

/// Grouped bars: tasks on the x axis, one bar per run, for the first protocol.
pub fn bar_chart(path: &Path, rows: &[Row]) -> Result<()> {
    let Some(first) = rows.first().and_then(|r| r.report.protocols.first()) else {
        return Err(anyhow!("no results to plot"));
    };
    let tasks: Vec<(crate::data::Task, String)> = first
        .tasks
        .iter()
        .map(|t| (t.task, t.column.clone()))
        .collect();
    let colors = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
    ];
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (900, 480)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
        let n_tasks = tasks.len() as f64;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!("Accuracy by task ({:?} protocol)", first.protocol),
                ("sans-serif", 20),
            )
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(0.0..n_tasks, 0.0..100.0)
            .map_err(|e| anyhow!("{e}"))?;
        let labels: Vec<String> = tasks.iter().map(|t| t.1.clone()).collect();
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(tasks.len() * 2 + 1)
            .x_label_formatter(&|x| {
                let i = x.floor() as usize;
                if (x - x.floor() - 0.5).abs() < 0.01 {
                    labels.get(i).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .y_desc("accuracy %")
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
        let width = 0.8 / rows.len() as f64;
        for (k, row) in rows.iter().enumerate() {
            let color = colors[k % colors.len()];
            let res = row.report.protocol(first.protocol);
            let bars = tasks.iter().enumerate().filter_map(|(i, (task, _))| {
                let acc = res?.task(*task)?.accuracy * 100.0;
                let x0 = i as f64 + 0.1 + k as f64 * width;
                Some(Rectangle::new(
                    [(x0, 0.0), (x0 + width, acc)],
                    color.filled(),
                ))
            });
            chart
                .draw_series(bars)
                .map_err(|e| anyhow!("{e}"))?
                .label(row.label.clone())
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled())
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
        root.present().map_err(|e| anyhow!("{e}"))?;
    }
    crate::fsx::atomic_write(path, svg.as_bytes())
}
