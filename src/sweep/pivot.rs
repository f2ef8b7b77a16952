//! The summary table of a sweep: one row per value of the rows axis, one column per value
//! of the columns axis; each cell the mean over the repeats with their spread, after
//! reducing the `best_of` axes to the value with the best mean.

use super::record::{RunRecord, Status};
use super::spec::{Layout, Metric};
use serde::Serialize;
use std::collections::BTreeMap;

/// A metric over the repeats of one configuration.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Stats {
    pub n: usize,
    pub mean: f64,
    pub min: f64,
    pub max: f64,
    /// Sample standard deviation; none for one value.
    pub sd: Option<f64>,
}

impl Stats {
    pub fn of(values: &[f64]) -> Option<Stats> {
        let n = values.len();
        if n == 0 {
            return None;
        }
        let mean = values.iter().sum::<f64>() / n as f64;
        let sd = (n > 1).then(|| {
            (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
        });
        Some(Stats {
            n,
            mean,
            min: values.iter().copied().fold(f64::INFINITY, f64::min),
            max: values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            sd,
        })
    }

    /// Whether the min–max ranges of two metrics overlap.
    pub fn overlaps(&self, other: &Stats) -> bool {
        self.min <= other.max && other.min <= self.max
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PivotCell {
    pub accuracy: Option<Stats>,
    pub ppl: Option<Stats>,
    /// The `best_of` axes' values kept (best mean of the layout's metric).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub chosen: BTreeMap<String, String>,
    /// Runs behind the cell without a result (failed or not run yet).
    pub missing: usize,
    /// Each task's accuracy over the kept runs, by task, in the order the runs name them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub per_task: Vec<TaskStats>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TaskStats {
    /// The task's column name (`ARC-e`, `PIQA`, …).
    pub task: String,
    #[serde(flatten)]
    pub stats: Stats,
}

impl PivotCell {
    pub fn stats(&self, metric: Metric) -> Option<&Stats> {
        match metric {
            Metric::Accuracy => self.accuracy.as_ref(),
            Metric::Ppl => self.ppl.as_ref(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Pivot {
    /// Row labels: the rows axis' value, and `key=value` of axes outside the layout.
    pub rows: Vec<String>,
    /// The columns axis.
    pub column_axis: Option<String>,
    /// Column labels: the columns axis' values (one empty label without a columns axis).
    pub columns: Vec<String>,
    /// `cells[row][column]`; none where the grid has no such cell.
    pub cells: Vec<Vec<Option<PivotCell>>>,
}

/// Runs of one configuration: the same cell, every repeat.
struct Config<'a> {
    cell: &'a BTreeMap<String, String>,
    runs: Vec<&'a RunRecord>,
}

impl Config<'_> {
    fn stats(&self, metric: Metric) -> Option<Stats> {
        let values: Vec<f64> = self
            .runs
            .iter()
            .filter(|r| r.status == Status::Ok)
            .filter_map(|r| match metric {
                Metric::Accuracy => r.metrics.accuracy,
                Metric::Ppl => r.metrics.ppl,
            })
            .collect();
        Stats::of(&values)
    }

    /// Per task (matched by name, in the order the runs name them), the accuracy's
    /// statistics over the finished runs.
    fn task_stats(&self) -> Vec<TaskStats> {
        let ok: Vec<&RunRecord> = self
            .runs
            .iter()
            .copied()
            .filter(|r| r.status == Status::Ok)
            .collect();
        let mut names: Vec<&String> = Vec::new();
        for r in &ok {
            for t in &r.metrics.tasks {
                if !names.contains(&t) {
                    names.push(t);
                }
            }
        }
        names
            .into_iter()
            .filter_map(|name| {
                let values: Vec<f64> = ok
                    .iter()
                    .filter_map(|r| {
                        let i = r.metrics.tasks.iter().position(|t| t == name)?;
                        r.metrics.task_accuracy.get(i).copied()
                    })
                    .collect();
                Some(TaskStats {
                    task: name.clone(),
                    stats: Stats::of(&values)?,
                })
            })
            .collect()
    }

    fn missing(&self) -> usize {
        self.runs.iter().filter(|r| r.status != Status::Ok).count()
    }
}

const DEFAULT: &str = "(default)";

pub fn pivot(runs: &[RunRecord], layout: &Layout) -> Pivot {
    let mut configs: Vec<Config> = Vec::new();
    for run in runs {
        match configs.iter_mut().find(|c| *c.cell == run.cell) {
            Some(c) => c.runs.push(run),
            None => configs.push(Config {
                cell: &run.cell,
                runs: vec![run],
            }),
        }
    }
    let value = |c: &Config, key: &str| c.cell.get(key).map_or(DEFAULT, String::as_str).to_string();
    let row_of = |c: &Config| {
        let mut label = value(c, &layout.rows);
        for (k, v) in c.cell {
            let in_layout = *k == layout.rows
                || layout.columns.as_ref() == Some(k)
                || layout.best_of.contains(k);
            if !in_layout {
                label.push_str(&format!(", {k}={v}"));
            }
        }
        label
    };
    let column_of = |c: &Config| {
        layout
            .columns
            .as_ref()
            .map_or(String::new(), |k| value(c, k))
    };
    let mut rows: Vec<String> = Vec::new();
    let mut columns: Vec<String> = Vec::new();
    for c in &configs {
        let (r, col) = (row_of(c), column_of(c));
        if !rows.contains(&r) {
            rows.push(r);
        }
        if !columns.contains(&col) {
            columns.push(col);
        }
    }
    if let Some(numbers) = columns
        .iter()
        .map(|c| c.parse::<f64>().ok())
        .collect::<Option<Vec<f64>>>()
    {
        let mut order: Vec<usize> = (0..columns.len()).collect();
        order.sort_by(|&a, &b| numbers[a].total_cmp(&numbers[b]));
        columns = order.into_iter().map(|i| columns[i].clone()).collect();
    }
    let cells = rows
        .iter()
        .map(|r| {
            columns
                .iter()
                .map(|col| {
                    let candidates: Vec<&Config> = configs
                        .iter()
                        .filter(|c| row_of(c) == *r && column_of(c) == *col)
                        .collect();
                    reduce(&candidates, layout)
                })
                .collect()
        })
        .collect();
    Pivot {
        rows,
        column_axis: layout.columns.clone(),
        columns,
        cells,
    }
}

/// The candidate with the best mean metric (the first of equals), or, when none has a
/// result, a cell counting what is missing.
fn reduce(candidates: &[&Config], layout: &Layout) -> Option<PivotCell> {
    if candidates.is_empty() {
        return None;
    }
    let metric = layout.metric;
    let mut best: Option<(&Config, Stats)> = None;
    for c in candidates {
        if let Some(s) = c.stats(metric) {
            if best.is_none_or(|(_, b)| metric.better(s.mean, b.mean)) {
                best = Some((c, s));
            }
        }
    }
    Some(match best {
        Some((c, _)) => PivotCell {
            accuracy: c.stats(Metric::Accuracy),
            ppl: c.stats(Metric::Ppl),
            chosen: layout
                .best_of
                .iter()
                .map(|k| {
                    (
                        k.clone(),
                        c.cell.get(k).map_or(DEFAULT, String::as_str).into(),
                    )
                })
                .collect(),
            missing: c.missing(),
            per_task: c.task_stats(),
        },
        None => PivotCell {
            accuracy: None,
            ppl: None,
            chosen: BTreeMap::new(),
            missing: candidates.iter().map(|c| c.missing()).sum(),
            per_task: Vec::new(),
        },
    })
}

impl Pivot {
    /// For each column, the rows whose range across repeats overlaps the best row's: their
    /// differences are within the seed spread. One sentence per such column.
    pub fn within_spread(&self, metric: Metric, fmt: impl Fn(f64) -> String) -> Vec<String> {
        let mut sentences = Vec::new();
        for (j, column) in self.columns.iter().enumerate() {
            let spread: Vec<(&String, &Stats)> = self
                .rows
                .iter()
                .zip(&self.cells)
                .filter_map(|(r, cells)| Some((r, cells[j].as_ref()?.stats(metric)?)))
                .filter(|(_, s)| s.n > 1)
                .collect();
            let Some(&(best_row, best)) = spread.iter().reduce(|a, b| {
                if metric.better(b.1.mean, a.1.mean) {
                    b
                } else {
                    a
                }
            }) else {
                continue;
            };
            let close: Vec<String> = spread
                .iter()
                .filter(|(r, s)| *r != best_row && s.overlaps(best))
                .map(|(r, s)| format!("{r} ({}–{})", fmt(s.min), fmt(s.max)))
                .collect();
            if close.is_empty() {
                continue;
            }
            let at = match &self.column_axis {
                Some(axis) => format!("At {axis}={column}, "),
                None => String::new(),
            };
            sentences.push(format!(
                "{at}{best_row} ({}–{}) is best on mean {}, but its range across repeats overlaps \
                 {}: the difference is within the seed spread.",
                fmt(best.min),
                fmt(best.max),
                metric.name(),
                close.join(" and ")
            ));
        }
        sentences
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sweep::metrics::Metrics;

    fn record(cell: &[(&str, &str)], seed: u64, accuracy: Option<f64>, ppl: f64) -> RunRecord {
        RunRecord {
            name: format!("{cell:?}-{seed}"),
            run_dir: "x".into(),
            cell: cell
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            repeat: [("seed".to_string(), seed.to_string())].into(),
            status: if accuracy.is_some() {
                Status::Ok
            } else {
                Status::Failed
            },
            reused: false,
            error: None,
            wall_s: None,
            metrics: Metrics {
                accuracy,
                ppl: accuracy.map(|_| ppl),
                ..Default::default()
            },
        }
    }

    fn layout(best_of: &[&str], metric: Metric) -> Layout {
        Layout {
            rows: "method".into(),
            columns: Some("rank".into()),
            best_of: best_of.iter().map(|s| s.to_string()).collect(),
            metric,
            protocol: None,
        }
    }

    /// lora gets an lr axis, rora one lr; two seeds each.
    fn runs() -> Vec<RunRecord> {
        let mut v = Vec::new();
        for (lr, a1, a2, p) in [("1e-4", 0.40, 0.42, 5.0), ("1e-3", 0.50, 0.46, 4.0)] {
            for (rank, bump) in [("32", 0.1), ("8", 0.0)] {
                let cell = [("method", "lora"), ("rank", rank), ("lr", lr)];
                v.push(record(&cell, 1, Some(a1 + bump), p - bump));
                v.push(record(&cell, 2, Some(a2 + bump), p - bump));
            }
        }
        for rank in ["8", "32"] {
            let cell = [("method", "rora"), ("rank", rank), ("lr", "1e-3")];
            v.push(record(&cell, 1, Some(0.47), 4.5));
            v.push(record(
                &cell,
                2,
                if rank == "8" { Some(0.51) } else { None },
                4.5,
            ));
        }
        v
    }

    #[test]
    fn best_of_keeps_the_best_mean_and_names_it() {
        let p = pivot(&runs(), &layout(&["lr"], Metric::Accuracy));
        assert_eq!(p.rows, ["lora", "rora"]);
        // Numeric columns in numeric order, whatever order the runs came in.
        assert_eq!(p.columns, ["8", "32"]);
        let lora8 = p.cells[0][0].as_ref().unwrap();
        assert_eq!(lora8.chosen["lr"], "1e-3");
        let acc = lora8.accuracy.unwrap();
        assert!((acc.mean - 0.48).abs() < 1e-12);
        assert_eq!((acc.min, acc.max, acc.n), (0.46, 0.50, 2));
        assert!((acc.sd.unwrap() - 0.02f64.hypot(0.02)).abs() < 1e-12);
        // The perplexity shown is the chosen configuration's, not the best perplexity.
        assert_eq!(lora8.ppl.unwrap().mean, 4.0);
        // rora at rank 32: one seed failed, the other counts.
        let rora32 = p.cells[1][1].as_ref().unwrap();
        assert_eq!((rora32.accuracy.unwrap().n, rora32.missing), (1, 1));
    }

    #[test]
    fn best_means_lowest_for_perplexity() {
        let mut v = runs();
        // Make the low-accuracy lr the low-perplexity one.
        for r in v.iter_mut().filter(|r| r.cell["lr"] == "1e-4") {
            r.metrics.ppl = Some(3.0);
        }
        let p = pivot(&v, &layout(&["lr"], Metric::Ppl));
        let lora8 = p.cells[0][0].as_ref().unwrap();
        assert_eq!(lora8.chosen["lr"], "1e-4");
        assert_eq!(lora8.ppl.unwrap().mean, 3.0);
    }

    #[test]
    fn axes_outside_the_layout_make_their_own_rows() {
        let p = pivot(&runs(), &layout(&[], Metric::Accuracy));
        assert_eq!(p.rows, ["lora, lr=1e-4", "lora, lr=1e-3", "rora, lr=1e-3"]);
        assert!(p.cells[0][0].as_ref().unwrap().chosen.is_empty());
    }

    #[test]
    fn overlapping_ranges_are_called_within_the_spread() {
        let p = pivot(&runs(), &layout(&["lr"], Metric::Accuracy));
        let pct = |x: f64| format!("{:.1}", 100.0 * x);
        let s = p.within_spread(Metric::Accuracy, pct);
        // Rank 8: rora 47–51 against lora 46–50 overlap. Rank 32: rora has one seed only.
        assert_eq!(s.len(), 1, "{s:?}");
        assert!(
            s[0].starts_with("At rank=8, rora (47.0–51.0) is best"),
            "{}",
            s[0]
        );
        assert!(s[0].contains("lora (46.0–50.0)"), "{}", s[0]);
    }
}
