//! A sweep's runs: the union of its grids (every combination of each grid's values, each
//! cell once) times the repeat axes, and the folder name of every run.

use super::spec::{Axis, Grid};
use anyhow::{bail, Result};

/// One run of a sweep.
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    /// The grid axes' values of the run's cell, in axis order: (key, YAML text).
    pub cell: Vec<(String, String)>,
    /// The repeat axes' values.
    pub repeat: Vec<(String, String)>,
    /// Its folder inside the sweep folder: `method=lora,rank=8,seed=1`.
    pub name: String,
}

impl Run {
    /// `key=value` for `--set`, cell then repeat values.
    pub fn overrides(&self) -> Vec<String> {
        self.cell
            .iter()
            .chain(&self.repeat)
            .map(|(k, v)| format!("{k}={v}"))
            .collect()
    }
}

/// Expands grids and repeats into runs: cells in grid order (the first axis varying
/// slowest), a cell already in an earlier grid left out, and each cell's repeats
/// together.
pub fn expand(grids: &[Grid], repeat: &Grid) -> Result<Vec<Run>> {
    let mut order: Vec<&str> = Vec::new();
    for key in grids.iter().flat_map(Grid::keys) {
        if !order.contains(&key) {
            order.push(key);
        }
    }
    let mut cells: Vec<Vec<(String, String)>> = Vec::new();
    for grid in grids {
        for mut cell in combinations(&grid.axes) {
            cell.sort_by_key(|(k, _)| order.iter().position(|o| o == k));
            if !cells.contains(&cell) {
                cells.push(cell);
            }
        }
    }
    let keys: Vec<&str> = order.iter().copied().chain(repeat.keys()).collect();
    let mut runs: Vec<Run> = Vec::new();
    for cell in cells {
        for rep in combinations(&repeat.axes) {
            let name = cell
                .iter()
                .chain(&rep)
                .map(|(k, v)| format!("{}={}", short_name(k, &keys), sanitize(v)))
                .collect::<Vec<_>>()
                .join(",");
            if let Some(other) = runs.iter().find(|r| r.name == name) {
                bail!(
                    "two runs would share the folder `{name}`: {} and {}; values that differ only \
                     in characters other than letters, digits and `.-+_` need different spellings",
                    other.overrides().join(" "),
                    cell.iter()
                        .chain(&rep)
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(" ")
                );
            }
            runs.push(Run {
                cell: cell.clone(),
                repeat: rep,
                name,
            });
        }
    }
    Ok(runs)
}

/// Every combination of the axes' values, the first axis varying slowest; one empty
/// combination when there are no axes.
fn combinations(axes: &[Axis]) -> Vec<Vec<(String, String)>> {
    let mut out: Vec<Vec<(String, String)>> = vec![Vec::new()];
    for axis in axes {
        out = out
            .into_iter()
            .flat_map(|prefix| {
                axis.values.iter().map(move |v| {
                    let mut c = prefix.clone();
                    c.push((axis.key.clone(), v.clone()));
                    c
                })
            })
            .collect();
    }
    out
}

/// The key's last part (`attach.rank` → `rank`, `finetune.learning_rate` → `lr`), or the
/// whole key when another key of the sweep ends the same way.
pub fn short_name(key: &str, keys: &[&str]) -> String {
    let last = |k: &str| -> String {
        let part = k.rsplit('.').next().unwrap_or(k);
        match part {
            "learning_rate" => "lr".to_string(),
            other => other.to_string(),
        }
    };
    let short = last(key);
    if keys.iter().any(|k| *k != key && last(k) == short) {
        sanitize(key)
    } else {
        sanitize(&short)
    }
}

/// Letters, digits and `.-+_` kept; any run of other characters becomes one `_`.
fn sanitize(text: &str) -> String {
    let mut out = String::new();
    for c in text.chars() {
        if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '+' | '_') {
            out.push(c);
        } else if !out.ends_with('_') {
            out.push('_');
        }
    }
    let out = out.trim_matches('_');
    if out.is_empty() {
        "_".to_string()
    } else {
        out.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grid(axes: &[&str]) -> Grid {
        Grid {
            axes: axes.iter().map(|a| a.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn union_of_grids_with_repeats() {
        let grids = [
            grid(&[
                "attach.method=lora",
                "attach.rank=8,32",
                "finetune.learning_rate=2e-4,8e-4",
            ]),
            // Written in another order, and sharing the cell lora/8/2e-4 with the first.
            grid(&[
                "finetune.learning_rate=2e-4",
                "attach.rank=8",
                "attach.method=rora,lora",
            ]),
        ];
        let runs = expand(&grids, &grid(&["seed=1,2"])).unwrap();
        let names: Vec<&str> = runs.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "method=lora,rank=8,lr=0.0002,seed=1",
                "method=lora,rank=8,lr=0.0002,seed=2",
                "method=lora,rank=8,lr=0.0008,seed=1",
                "method=lora,rank=8,lr=0.0008,seed=2",
                "method=lora,rank=32,lr=0.0002,seed=1",
                "method=lora,rank=32,lr=0.0002,seed=2",
                "method=lora,rank=32,lr=0.0008,seed=1",
                "method=lora,rank=32,lr=0.0008,seed=2",
                "method=rora,rank=8,lr=0.0002,seed=1",
                "method=rora,rank=8,lr=0.0002,seed=2",
            ]
        );
        assert_eq!(
            runs[9].overrides(),
            [
                "attach.method=rora",
                "attach.rank=8",
                "finetune.learning_rate=0.0002",
                "seed=2"
            ]
        );
    }

    #[test]
    fn no_repeat_means_one_run_per_cell() {
        let runs = expand(&[grid(&["attach.rank=4,8"])], &Grid::default()).unwrap();
        assert_eq!(runs.len(), 2);
        assert!(runs[0].repeat.is_empty());
        assert_eq!(runs[1].name, "rank=8");
    }

    #[test]
    fn names_are_unique() {
        // Two keys ending in `label`: both are named in full.
        let runs = expand(
            &[grid(&["stages.2.label=a", "stages.5.label=b,c"])],
            &Grid::default(),
        )
        .unwrap();
        assert_eq!(runs[1].name, "stages.2.label=a,stages.5.label=c");
        // Lists are spelled with `_`.
        let runs = expand(
            &[grid(&["attach.targets=[q_proj,v_proj],[q_proj]"])],
            &Grid::default(),
        )
        .unwrap();
        assert_eq!(runs[0].name, "targets=q_proj_v_proj");
        // Values that differ only in characters the name drops are refused.
        let err = expand(&[grid(&["eval.label=a b,a/b"])], &Grid::default()).unwrap_err();
        assert!(
            err.to_string().contains("share the folder `label=a_b`"),
            "{err}"
        );
    }
}
