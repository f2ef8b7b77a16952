//! Running a sweep: the pipeline once per run of the grid, in this process, each in its
//! own folder `<out>/<run name>`. Runs an earlier sweep finished are skipped, runs it
//! left unfinished continue from their checkpoints, a failed run does not stop the
//! others, and the summary is rewritten after every run.

use super::grid::{expand, Run};
use super::metrics;
use super::pivot::pivot;
use super::record::{RunRecord, Status};
use super::spec::{Axis, Metric, SweepSpec};
use super::summary::SweepSummary;
use crate::pipeline::runner::{check, run_pipeline, RunOptions};
use crate::pipeline::PipelineSpec;
use crate::progress;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// A sweep checked and expanded: every run with its overrides and resolved pipeline.
struct Prepared {
    runs: Vec<Run>,
    /// Each run's `--set` overrides: the sweep's, its values, its folder.
    run_overrides: Vec<Vec<String>>,
    specs: Vec<PipelineSpec>,
    /// Every run pending.
    summary: SweepSummary,
}

/// Runs every run of the sweep of `file` (its `sweep:` block under the command line's
/// settings `cli`) and writes the summary; failed runs are recorded in it, not returned
/// as an error.
pub fn run_sweep(file: &Path, overrides: &[String], cli: &SweepSpec) -> Result<SweepSummary> {
    let Prepared {
        runs,
        run_overrides,
        specs,
        mut summary,
    } = prepare(file, overrides, cli)?;
    summary.write()?;
    let n = runs.len();
    let protocol = summary.layout.protocol;
    let pb = progress::bar(n as u64, "cell");
    for (i, (run, spec)) in runs.iter().zip(&specs).enumerate() {
        pb.set_message(run.name.clone());
        let record = &mut summary.runs[i];
        let resume = match Previous::of(&spec.run_dir()) {
            Previous::Finished(manifest) => {
                progress::line(&format!(
                    "skipping finished cell {}/{n} {}",
                    i + 1,
                    run.name
                ));
                if !same_pipeline(&manifest, spec) {
                    progress::line(&format!(
                        "warning: {} was finished with other settings than this sweep gives it \
                         now; its results are kept (remove the folder to run it again)",
                        record.run_dir.display()
                    ));
                }
                record.reused = true;
                record.wall_s = manifest["wall_s"].as_f64();
                finish(record, spec, protocol, Ok(()));
                pb.inc(1);
                summary.write()?;
                continue;
            }
            Previous::Unfinished => true,
            Previous::None => false,
        };
        progress::line(&format!(
            "cell {}/{n} {}{}",
            i + 1,
            run.name,
            if resume { " (resuming)" } else { "" }
        ));
        let started = std::time::Instant::now();
        let options = RunOptions {
            resume,
            part_of_sweep: true,
        };
        let outcome = run_pipeline(file, &run_overrides[i], options).map(|_| ());
        record.wall_s = Some(started.elapsed().as_secs_f64());
        finish(record, spec, protocol, outcome);
        progress::line(&format!(
            "cell {}/{n} {}: {}",
            i + 1,
            run.name,
            outcome_text(record)
        ));
        pb.inc(1);
        summary.write()?;
    }
    pb.finish_and_clear();
    Ok(summary)
}

/// Checks every run of the sweep and lists them with what a sweep would do with each
/// (`--dry-run`); runs nothing and writes nothing.
pub fn plan(file: &Path, overrides: &[String], cli: &SweepSpec) -> Result<String> {
    let p = prepare(file, overrides, cli)?;
    let s = &p.summary;
    let mut md = format!(
        "\n## Sweep\n\n{} runs into `{}`, every one checked; the summary's metric is {}.\n\n\
         | run | state |\n|---|---|\n",
        p.runs.len(),
        s.out.display(),
        s.layout.metric.name()
    );
    for (run, spec) in p.runs.iter().zip(&p.specs) {
        let state = match Previous::of(&spec.run_dir()) {
            Previous::Finished(_) => "finished: skipped",
            Previous::Unfinished => "unfinished: resumed",
            Previous::None => "to run",
        };
        md.push_str(&format!("| `{}` | {state} |\n", run.name));
    }
    md.push_str(&format!("\nRun it with `{}`.\n", s.command));
    Ok(md)
}

/// What `recover --pipeline FILE --dry-run` adds to the plan for the pipeline's
/// `sweep:` block `block`: every run it would make, checked.
pub fn block_plan(block: Option<&SweepSpec>, file: &Path, overrides: &[String]) -> Result<String> {
    match block {
        None => Ok(String::new()),
        Some(sweep) if sweep.grids.is_empty() => Ok(
            "\nThe `sweep:` block has no grids; `recover sweep --grid KEY=V1,V2` gives them.\n"
                .to_string(),
        ),
        Some(_) => plan(file, overrides, &SweepSpec::default()),
    }
}

fn prepare(file: &Path, overrides: &[String], cli: &SweepSpec) -> Result<Prepared> {
    let base = PipelineSpec::from_file(file, overrides)?;
    let sweep = SweepSpec::of(&base, file)?.unwrap_or_default().overlay(cli);
    sweep.validate().context("sweep")?;
    if sweep.grids.is_empty() {
        bail!(
            "{} has no `sweep.grids` and no --grid was given; say what to vary, e.g. \
             --grid attach.rank=8,16",
            file.display()
        );
    }
    check_axes(file, overrides, &sweep)?;
    let runs = expand(&sweep.grids, &sweep.repeat)?;
    let out = sweep
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("runs").join(format!("{}-sweep", base.name)));
    let run_overrides: Vec<Vec<String>> = runs
        .iter()
        .map(|run| {
            let mut all = overrides.to_vec();
            all.extend(run.overrides());
            all.push(format!("run_dir={}", yaml_quoted(&out.join(&run.name))));
            all
        })
        .collect();
    let specs = runs
        .iter()
        .zip(&run_overrides)
        .map(|(run, o)| check(file, o).with_context(|| format!("sweep run `{}`", run.name)))
        .collect::<Result<Vec<_>>>()?;
    let metric = choose_metric(&sweep, &runs, &specs)?;
    let layout = sweep.layout(metric);
    let records: Vec<RunRecord> = runs
        .iter()
        .zip(&specs)
        .map(|(run, spec)| RunRecord {
            name: run.name.clone(),
            run_dir: spec.run_dir(),
            cell: run.cell.iter().cloned().collect(),
            repeat: run.repeat.iter().cloned().collect(),
            status: Status::Pending,
            reused: false,
            error: None,
            wall_s: None,
            metrics: Default::default(),
        })
        .collect();
    let summary = SweepSummary {
        name: base.name.clone(),
        pipeline: file.to_path_buf(),
        out,
        command: command_line(file, overrides, cli),
        axes: sweep.axis_keys(),
        repeat: sweep.repeat.keys().map(String::from).collect(),
        pivot: pivot(&records, &layout),
        layout,
        runs: records,
    };
    Ok(Prepared {
        runs,
        run_overrides,
        specs,
        summary,
    })
}

/// Each axis value on its own, so that a typo fails naming the axis.
fn check_axes(file: &Path, overrides: &[String], sweep: &SweepSpec) -> Result<()> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("cannot read pipeline file {}", file.display()))?;
    let axes = sweep
        .grids
        .iter()
        .chain([&sweep.repeat])
        .flat_map(|g| &g.axes);
    for axis in axes {
        for value in &axis.values {
            let mut all = overrides.to_vec();
            all.push(format!("{}={value}", axis.key));
            PipelineSpec::from_yaml(&text, &all).with_context(|| {
                format!(
                    "sweep axis `{}` (value {value}) does not fit pipeline {}",
                    axis.key,
                    file.display()
                )
            })?;
        }
    }
    Ok(())
}

/// The sweep's metric (default: accuracy when the pipeline evaluates tasks), which every
/// run must measure.
fn choose_metric(sweep: &SweepSpec, runs: &[Run], specs: &[PipelineSpec]) -> Result<Metric> {
    let sources: Vec<metrics::Sources> = specs.iter().map(metrics::sources).collect();
    let metric = sweep.metric.unwrap_or(match sources.first() {
        Some(s) if s.accuracy.is_none() && s.ppl.is_some() => Metric::Ppl,
        _ => Metric::Accuracy,
    });
    for (run, s) in runs.iter().zip(&sources) {
        let (has, needs) = match metric {
            Metric::Accuracy => (
                s.accuracy.is_some(),
                "an `eval` stage with a commonsense task",
            ),
            Metric::Ppl => (
                s.ppl.is_some(),
                "a `ppl` stage or an `eval` stage with the `ppl` task",
            ),
        };
        if !has {
            bail!(
                "sweep run `{}`: the metric `{}` needs {needs} in the pipeline",
                run.name,
                metric.name()
            );
        }
    }
    Ok(metric)
}

/// What an earlier sweep left in a run's folder.
enum Previous {
    None,
    /// Its manifest, which says `"status": "ok"`.
    Finished(serde_json::Value),
    /// Failed, interrupted, or a manifest that cannot be read.
    Unfinished,
}

impl Previous {
    fn of(dir: &Path) -> Previous {
        let manifest = std::fs::read_to_string(dir.join("manifest.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok());
        match manifest {
            Some(m) if m["status"] == "ok" => Previous::Finished(m),
            _ if dir.exists() => Previous::Unfinished,
            _ => Previous::None,
        }
    }
}

/// Whether a finished run's manifest describes the pipeline this sweep would run (its
/// `sweep:` block aside).
fn same_pipeline(manifest: &serde_json::Value, spec: &PipelineSpec) -> bool {
    let without_sweep = |v: &serde_json::Value| {
        let mut v = v.clone();
        if let Some(map) = v.as_object_mut() {
            map.remove("sweep");
        }
        v
    };
    serde_json::to_value(spec)
        .is_ok_and(|now| without_sweep(&manifest["pipeline"]) == without_sweep(&now))
}

/// Records how a run ended, with its metrics when it finished.
fn finish(
    record: &mut RunRecord,
    spec: &PipelineSpec,
    protocol: Option<crate::eval::Protocol>,
    outcome: Result<()>,
) {
    let read = outcome.and_then(|()| metrics::read(&record.run_dir, spec, protocol));
    match read {
        Ok(m) => {
            record.status = Status::Ok;
            record.metrics = m;
        }
        Err(e) => {
            record.status = Status::Failed;
            record.error = Some(format!("{e:#}"));
        }
    }
}

fn outcome_text(r: &RunRecord) -> String {
    let wall = r.wall_s.map_or(String::new(), |w| format!(" in {w:.1} s"));
    match r.status {
        Status::Ok => {
            let mut t = format!("ok{wall}");
            if let Some(a) = r.metrics.accuracy {
                t.push_str(&format!(", accuracy {:.1}%", 100.0 * a));
            }
            if let Some(p) = r.metrics.ppl {
                t.push_str(&format!(", ppl {p:.3}"));
            }
            t
        }
        _ => format!(
            "failed{wall}: {}",
            r.error
                .as_deref()
                .unwrap_or("")
                .lines()
                .next()
                .unwrap_or("")
        ),
    }
}

/// A path as a single-quoted YAML string, so that `--set` reads it back unchanged.
fn yaml_quoted(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', "''"))
}

/// The `recover sweep` command line that runs this sweep again.
fn command_line(file: &Path, overrides: &[String], cli: &SweepSpec) -> String {
    let mut words = vec![
        "recover".to_string(),
        "sweep".into(),
        "--pipeline".into(),
        file.display().to_string(),
    ];
    let mut flag = |name: &str, value: String| {
        words.push(format!("--{name}"));
        words.push(value);
    };
    for o in overrides {
        flag("set", o.clone());
    }
    let axis = |a: &Axis| format!("{}={}", a.key, a.values.join(","));
    for a in cli.grids.iter().flat_map(|g| &g.axes) {
        flag("grid", axis(a));
    }
    for a in &cli.repeat.axes {
        flag("repeat", axis(a));
    }
    if let Some(r) = &cli.rows {
        flag("rows", r.clone());
    }
    if let Some(c) = &cli.columns {
        flag("columns", c.clone());
    }
    if !cli.best_of.is_empty() {
        flag("best-of", cli.best_of.join(","));
    }
    if let Some(m) = cli.metric {
        flag("metric", m.name().to_string());
    }
    if let Some(p) = cli.protocol {
        flag("protocol", p.name().to_string());
    }
    if let Some(out) = &cli.out {
        flag("out", out.display().to_string());
    }
    words
        .iter()
        .map(|w| shell_word(w))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A word as a POSIX shell reads it back: quoted when it has anything but plain
/// characters.
fn shell_word(word: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "._/=,:+-@%".contains(c);
    if !word.is_empty() && word.chars().all(plain) {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}
