//! The `sweep:` block of a pipeline, which `recover sweep`'s flags fill or replace: the
//! grids of `--set` overrides to run the pipeline with, the repeats averaged over, and the
//! layout of the summary.

use crate::eval::Protocol;
use crate::pipeline::PipelineSpec;
use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_yaml_ng::{Mapping, Value};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SweepSpec {
    /// The sweep folder; default `runs/<name>-sweep`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub out: Option<PathBuf>,
    /// The cells: the union of these grids, each every combination of its axes' values.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub grids: Vec<Grid>,
    /// Axes every cell is run over and averaged across (seeds).
    #[serde(default, skip_serializing_if = "Grid::is_empty")]
    pub repeat: Grid,
    /// The axis of the summary's table rows; default the first axis.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows: Option<String>,
    /// The axis of its columns; default the next one. `tasks`: no columns axis, one column
    /// per evaluated task (the papers' one-row-per-method tables).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub columns: Option<String>,
    /// Axes reduced by keeping the value with the best mean `metric`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub best_of: Vec<String>,
    /// What best means; default `accuracy` when the pipeline evaluates tasks, else `ppl`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric: Option<Metric>,
    /// The evaluation protocol the accuracy is read from; default `content` when the
    /// evaluation ran it, else its first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
}

/// `columns: tasks`: a column per task instead of a columns axis.
pub const TASK_COLUMNS: &str = "tasks";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Metric {
    /// Mean accuracy over the tasks of the last `eval` stage: higher is better.
    Accuracy,
    /// The last perplexity the pipeline measures: lower is better.
    Ppl,
}

impl Metric {
    pub fn name(self) -> &'static str {
        match self {
            Metric::Accuracy => "accuracy",
            Metric::Ppl => "ppl",
        }
    }

    /// Whether `a` is a better value of this metric than `b`.
    pub fn better(self, a: f64, b: f64) -> bool {
        match self {
            Metric::Accuracy => a > b,
            Metric::Ppl => a < b,
        }
    }
}

/// How `sweep.md` pivots the runs: the rows axis, the columns axis, the axes reduced to
/// their best mean, and the metric.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Layout {
    pub rows: String,
    pub columns: Option<String>,
    pub best_of: Vec<String>,
    pub metric: Metric,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
}

/// One grid: its axes in the order written.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "Mapping", into = "Mapping")]
pub struct Grid {
    pub axes: Vec<Axis>,
}

/// A `--set` key and the values a sweep gives it.
#[derive(Debug, Clone, PartialEq)]
pub struct Axis {
    /// `attach.rank`, `seed`, `stages.3.label`...
    pub key: String,
    /// Each value as YAML flow text, ready for `key=value`.
    pub values: Vec<String>,
}

impl Grid {
    pub fn is_empty(&self) -> bool {
        self.axes.is_empty()
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.axes.iter().map(|a| a.key.as_str())
    }
}

impl TryFrom<Mapping> for Grid {
    type Error = String;

    /// `{attach.rank: [8, 32], attach.method: lora}`: a list, or one value.
    fn try_from(map: Mapping) -> std::result::Result<Self, String> {
        let mut axes = Vec::new();
        for (key, values) in map {
            let Value::String(key) = key else {
                return Err(format!(
                    "an axis is written `KEY: [values]` with a --set key, not `{}`",
                    flow(&key)
                ));
            };
            let values: Vec<String> = match values {
                Value::Sequence(items) => items.iter().map(flow).collect(),
                one => vec![flow(&one)],
            };
            if values.is_empty() {
                return Err(format!("axis `{key}` has no values"));
            }
            axes.push(Axis { key, values });
        }
        Ok(Grid { axes })
    }
}

impl From<Grid> for Mapping {
    fn from(grid: Grid) -> Mapping {
        grid.axes
            .into_iter()
            .map(|a| {
                let values = a.values.iter().map(|v| yaml_value(v)).collect();
                (Value::String(a.key), Value::Sequence(values))
            })
            .collect()
    }
}

/// `KEY=V1,V2,...` from the command line. Commas inside `[...]` or `{...}` belong to the
/// value (`attach.targets=[q_proj,v_proj],[q_proj,k_proj,v_proj]`).
impl std::str::FromStr for Axis {
    type Err = String;

    fn from_str(arg: &str) -> std::result::Result<Self, String> {
        let (key, list) = arg
            .split_once('=')
            .ok_or_else(|| format!("`{arg}` must look like KEY=V1,V2 (e.g. attach.rank=8,16)"))?;
        let raw: Vec<&str> = split_top_level(list).into_iter().map(str::trim).collect();
        if key.is_empty() || raw.iter().any(|v| v.is_empty()) {
            return Err(format!(
                "`{arg}` must look like KEY=V1,V2 with no empty key or value"
            ));
        }
        Ok(Axis {
            key: key.to_string(),
            values: raw.into_iter().map(|v| flow(&yaml_value(v))).collect(),
        })
    }
}

fn split_top_level(list: &str) -> Vec<&str> {
    let (mut parts, mut depth, mut start) = (Vec::new(), 0i32, 0);
    for (i, c) in list.char_indices() {
        match c {
            '[' | '{' => depth += 1,
            ']' | '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&list[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&list[start..]);
    parts
}

/// A `--set` value read as YAML, as `apply_override` reads it.
fn yaml_value(text: &str) -> Value {
    serde_yaml_ng::from_str(text).unwrap_or_else(|_| Value::String(text.to_string()))
}

/// A value as one line of YAML: `8`, `0.0002`, `lora`, `[q_proj, v_proj]`.
pub fn flow(value: &Value) -> String {
    let join = |items: Vec<String>| items.join(", ");
    match value {
        Value::Sequence(items) => format!("[{}]", join(items.iter().map(flow).collect())),
        Value::Mapping(map) => format!(
            "{{{}}}",
            join(
                map.iter()
                    .map(|(k, v)| format!("{}: {}", flow(k), flow(v)))
                    .collect()
            )
        ),
        scalar => serde_yaml_ng::to_string(scalar)
            .map(|s| s.trim_end().to_string())
            .unwrap_or_default(),
    }
}

/// Keys the sweep sets itself.
const RESERVED: &[(&str, &str)] = &[
    (
        "run_dir",
        "each run's folder is <out>/<run name>; set `sweep.out` or --out",
    ),
    ("sweep", "a sweep does not nest"),
];

impl SweepSpec {
    /// The `sweep:` block of the pipeline `spec` read from `file`, checked; `None` when
    /// it has none. The pipeline keeps the block as written; it is read here, by the
    /// sweep.
    pub fn of(spec: &PipelineSpec, file: &Path) -> Result<Option<SweepSpec>> {
        let Some(block) = &spec.sweep else {
            return Ok(None);
        };
        let sweep: SweepSpec = serde_yaml_ng::from_value(block.clone())
            .map_err(|e| {
                // A value tree has no line numbers: the file itself gives an error that
                // has them, unless merge keys or overrides make it differ.
                #[derive(Deserialize)]
                struct Block {
                    #[allow(dead_code)]
                    sweep: Option<SweepSpec>,
                }
                let text = std::fs::read_to_string(file).unwrap_or_default();
                match serde_yaml_ng::from_str::<Block>(&text) {
                    Err(with_line) if !with_line.to_string().contains("`<<`") => {
                        anyhow!("{with_line}")
                    }
                    _ => anyhow!("sweep: {e}"),
                }
            })
            .with_context(|| format!("invalid pipeline {}", file.display()))?;
        sweep
            .validate()
            .context("sweep")
            .with_context(|| format!("invalid pipeline {}", file.display()))?;
        Ok(Some(sweep))
    }

    /// The command line's settings over the pipeline's: each one given replaces the
    /// pipeline's. Grids from the command line come with their own layout: the
    /// pipeline's `rows`, `columns` and `best_of` name the axes of its own grids.
    pub fn overlay(&self, cli: &SweepSpec) -> SweepSpec {
        let layout_from = if cli.grids.is_empty() { self } else { cli };
        SweepSpec {
            out: cli.out.clone().or_else(|| self.out.clone()),
            grids: if cli.grids.is_empty() {
                self.grids.clone()
            } else {
                cli.grids.clone()
            },
            repeat: if cli.repeat.is_empty() {
                self.repeat.clone()
            } else {
                cli.repeat.clone()
            },
            rows: cli.rows.clone().or_else(|| layout_from.rows.clone()),
            columns: cli.columns.clone().or_else(|| layout_from.columns.clone()),
            best_of: if cli.best_of.is_empty() {
                layout_from.best_of.clone()
            } else {
                cli.best_of.clone()
            },
            metric: cli.metric.or(self.metric),
            protocol: cli.protocol.or(self.protocol),
        }
    }

    /// Every grid axis, in the order of first appearance.
    pub fn axis_keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = Vec::new();
        for key in self.grids.iter().flat_map(Grid::keys) {
            if !keys.iter().any(|k| k == key) {
                keys.push(key.to_string());
            }
        }
        keys
    }

    /// Checks the block on its own. The layout keys are checked against the axes only
    /// when there are grids: `recover sweep --grid` may supply them.
    pub fn validate(&self) -> Result<()> {
        for (i, grid) in self.grids.iter().enumerate() {
            if grid.is_empty() {
                bail!("grids[{i}] has no axes; write `{{KEY: [values], ...}}`");
            }
            check_keys(grid, &format!("grids[{i}]"))?;
        }
        check_keys(&self.repeat, "repeat")?;
        let axes = self.axis_keys();
        if let Some(k) = self.repeat.keys().find(|k| axes.iter().any(|a| a == k)) {
            bail!("`{k}` is both a grid axis and a `repeat` axis; keep it in one of them");
        }
        if axes.is_empty() {
            return Ok(());
        }
        let layout = self
            .rows
            .iter()
            .map(|k| ("rows", k))
            .chain(
                self.columns
                    .iter()
                    .filter(|k| *k != TASK_COLUMNS)
                    .map(|k| ("columns", k)),
            )
            .chain(self.best_of.iter().map(|k| ("best_of", k)));
        let mut used: Vec<&str> = Vec::new();
        for (what, key) in layout {
            if !axes.contains(key) {
                bail!(
                    "{what}: `{key}` is not an axis of the grid (axes: {})",
                    axes.join(", ")
                );
            }
            if used.contains(&key.as_str()) {
                bail!("{what}: `{key}` is already laid out by `rows`, `columns` or `best_of`");
            }
            used.push(key);
        }
        if axes.iter().all(|a| self.best_of.contains(a)) {
            bail!("best_of: every axis is reduced, none is left for the rows of the summary");
        }
        Ok(())
    }

    /// The summary's layout, with the defaults filled in: rows the first axis and
    /// columns the next (leaving out `best_of` axes).
    pub fn layout(&self, metric: Metric) -> Layout {
        let free: Vec<String> = self
            .axis_keys()
            .into_iter()
            .filter(|k| !self.best_of.contains(k))
            .collect();
        let rows = self
            .rows
            .clone()
            .or_else(|| {
                free.iter()
                    .find(|k| Some(*k) != self.columns.as_ref())
                    .cloned()
            })
            .unwrap_or_default();
        let columns = match self.columns.as_deref() {
            Some(TASK_COLUMNS) => None,
            Some(c) => Some(c.to_string()),
            None => free.iter().find(|k| **k != rows).cloned(),
        };
        Layout {
            rows,
            columns,
            best_of: self.best_of.clone(),
            metric,
            protocol: self.protocol,
        }
    }
}

fn check_keys(grid: &Grid, what: &str) -> Result<()> {
    for (i, axis) in grid.axes.iter().enumerate() {
        if axis.key.split('.').any(str::is_empty) {
            bail!("{what}: the axis key `{}` has an empty part", axis.key);
        }
        if let Some((_, why)) = RESERVED.iter().find(|(k, _)| *k == axis.key) {
            bail!("{what}: `{}` cannot be an axis: {why}", axis.key);
        }
        if grid.axes[..i].iter().any(|a| a.key == axis.key) {
            bail!("{what}: the axis `{}` is given twice", axis.key);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_axes_keep_lists_whole() {
        let a: Axis = "attach.targets=[q_proj,v_proj],[q_proj]".parse().unwrap();
        assert_eq!(a.key, "attach.targets");
        assert_eq!(a.values, ["[q_proj, v_proj]", "[q_proj]"]);
        let lr: Axis = "finetune.learning_rate=2e-4,1.0e-3".parse().unwrap();
        assert_eq!(lr.values, ["0.0002", "0.001"]);
        assert!("attach.rank".parse::<Axis>().is_err());
        assert!("attach.rank=8,".parse::<Axis>().is_err());
    }

    #[test]
    fn yaml_block_reads_lists_and_single_values() {
        let spec: SweepSpec = serde_yaml_ng::from_str(
            "grids:\n  - {attach.method: [lora, rora], attach.rank: 8}\nrepeat: {seed: [1, 2]}\n\
             best_of: [attach.rank]\nmetric: ppl\n",
        )
        .unwrap();
        assert_eq!(spec.grids[0].axes[0].values, ["lora", "rora"]);
        assert_eq!(spec.grids[0].axes[1].values, ["8"]);
        assert_eq!(spec.repeat.axes[0].values, ["1", "2"]);
        spec.validate().unwrap();
        let layout = spec.layout(Metric::Ppl);
        assert_eq!(layout.rows, "attach.method");
        assert_eq!(layout.columns, None);
        // Round trip through the manifest's serialization.
        let back: SweepSpec =
            serde_yaml_ng::from_str(&serde_yaml_ng::to_string(&spec).unwrap()).unwrap();
        assert_eq!(back, spec);
    }

    #[test]
    fn command_line_grids_bring_their_own_layout() {
        let yaml: SweepSpec = serde_yaml_ng::from_str(
            "grids: [{attach.method: [lora, rora], finetune.learning_rate: [1, 2]}]\n\
             repeat: {seed: [1, 2]}\nrows: attach.method\nbest_of: [finetune.learning_rate]\n",
        )
        .unwrap();
        let cli = SweepSpec {
            grids: vec![Grid {
                axes: vec!["attach.rank=4,8".parse().unwrap()],
            }],
            ..Default::default()
        };
        let both = yaml.overlay(&cli);
        assert_eq!((both.rows, both.best_of.len()), (None, 0));
        assert_eq!(both.repeat, yaml.repeat);
        // Without --grid the pipeline's layout stays, under the flags given.
        let cli = SweepSpec {
            rows: Some("finetune.learning_rate".into()),
            best_of: vec!["attach.method".into()],
            ..Default::default()
        };
        let both = yaml.overlay(&cli);
        assert_eq!(both.grids, yaml.grids);
        both.validate().unwrap();
        assert_eq!(both.layout(Metric::Ppl).rows, "finetune.learning_rate");
    }

    #[test]
    fn columns_tasks_means_no_columns_axis() {
        let spec = SweepSpec {
            grids: vec![Grid {
                axes: vec![
                    "attach.method=lora,rora".parse().unwrap(),
                    "attach.rank=8,16".parse().unwrap(),
                ],
            }],
            rows: Some("attach.method".into()),
            columns: Some(TASK_COLUMNS.into()),
            ..Default::default()
        };
        spec.validate().unwrap();
        let layout = spec.layout(Metric::Accuracy);
        assert_eq!(
            (layout.rows.as_str(), layout.columns),
            ("attach.method", None)
        );
    }

    #[test]
    fn layout_keys_must_be_axes() {
        let mut spec = SweepSpec {
            grids: vec![Grid {
                axes: vec!["attach.rank=8,16".parse().unwrap()],
            }],
            rows: Some("attach.method".into()),
            ..Default::default()
        };
        let err = spec.validate().unwrap_err().to_string();
        assert!(err.contains("`attach.method` is not an axis"), "{err}");
        spec.rows = None;
        spec.repeat = Grid {
            axes: vec!["attach.rank=1".parse().unwrap()],
        };
        assert!(spec.validate().is_err());
        spec.repeat = Grid {
            axes: vec!["run_dir=x".parse().unwrap()],
        };
        let err = spec.validate().unwrap_err().to_string();
        assert!(err.contains("`run_dir` cannot be an axis"), "{err}");
    }
}
