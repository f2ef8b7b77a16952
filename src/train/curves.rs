//! Several runs' recovery curves side by side (`recover curves RUN_DIR...`): the
//! `checkpoint_eval` points of each run's `train-log.jsonl` as one markdown table and one
//! chart of pooled accuracy against training tokens, so recipes can be compared the way
//! the README does.

use super::checkpoint_eval::EvalPoint;
use super::log;
use crate::report::plot::{line_chart, Series};
use anyhow::{bail, Result};
use std::fmt::Write;
use std::path::{Path, PathBuf};

/// One run's curve: its label and `(step, training tokens, training seconds, point)`.
pub struct Curve {
    pub label: String,
    pub points: Vec<(usize, u64, f64, EvalPoint)>,
}

/// Reads the evaluation points of `run_dir/train-log.jsonl`; `label` defaults to the
/// folder's name. A run without any point is an error naming the file.
pub fn read_curve(run_dir: &Path, label: Option<String>) -> Result<Curve> {
    let path = run_dir.join("train-log.jsonl");
    if !path.exists() {
        bail!(
            "{} does not exist: give the run folder of a finetune stage with `checkpoint_eval`",
            path.display()
        );
    }
    let points: Vec<_> = log::read(&path)?
        .into_iter()
        .filter_map(|l| Some((l.step, l.tokens, l.train_seconds, l.eval?)))
        .collect();
    if points.is_empty() {
        bail!(
            "{} has no evaluation points: the run needs `finetune.checkpoint_eval` (and \
             `eval_every`) to draw a recovery curve",
            path.display()
        );
    }
    let label = label.unwrap_or_else(|| {
        run_dir.file_name().map_or_else(
            || run_dir.display().to_string(),
            |n| n.to_string_lossy().into(),
        )
    });
    Ok(Curve { label, points })
}

/// One row per point of every run: tokens, training time, pooled accuracy with its
/// interval, the paired test against the run's step 0, perplexity.
pub fn to_markdown(curves: &[Curve]) -> String {
    let mut md = String::from(
        "| run | step | training tokens | training time | pooled acc (95% CI) | Δ vs step 0 \
         | only then / only now | McNemar p | perplexity |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for c in curves {
        let start = c.points.iter().find(|p| p.0 == 0).map(|p| p.3.accuracy);
        for (step, tokens, seconds, p) in &c.points {
            let delta = start.map_or("–".into(), |s| {
                format!("{:+.2}", 100.0 * (p.accuracy - s))
            });
            let (pair, pv) = p.vs_start.as_ref().map_or(("–".into(), "–".into()), |v| {
                (
                    format!("{} / {}", v.only_start, v.only_now),
                    format!("{:.3}", v.p_value),
                )
            });
            let ppl = p.perplexity.map_or("–".into(), |v| format!("{v:.2}"));
            let _ = writeln!(
                md,
                "| {} | {step} | {tokens} | {:.0} min | {:.2}% ({:.1}–{:.1}) | {delta} | {pair} | {pv} | {ppl} |",
                c.label,
                seconds / 60.0,
                100.0 * p.accuracy,
                100.0 * p.ci95[0],
                100.0 * p.ci95[1],
            );
        }
    }
    md
}

/// `svg` (pooled accuracy against training tokens, a series with Wilson bars per run)
/// and, when the runs measured perplexity, `<stem>-perplexity.svg` beside it; the files
/// written.
pub fn plot(svg: &Path, curves: &[Curve]) -> Result<Vec<PathBuf>> {
    let pct = |x: f64| 100.0 * x;
    let accuracy: Vec<Series> = curves
        .iter()
        .map(|c| Series {
            bars: c
                .points
                .iter()
                .map(|p| (p.1 as f64, pct(p.3.ci95[0]), pct(p.3.ci95[1])))
                .collect(),
            ..series(c, |p| Some(pct(p.accuracy)))
        })
        .collect();
    let questions = curves.first().map_or(0, |c| c.points[0].3.questions);
    line_chart(
        svg,
        &format!("Recovery curves: pooled accuracy on {questions} fixed questions"),
        "training tokens",
        "accuracy (%)",
        &accuracy,
    )?;
    let mut wrote = vec![svg.to_path_buf()];
    let perplexity: Vec<Series> = curves
        .iter()
        .map(|c| series(c, |p| p.perplexity))
        .filter(|s| !s.points.is_empty())
        .collect();
    if !perplexity.is_empty() {
        let stem = svg
            .file_stem()
            .map_or("curves".into(), |s| s.to_string_lossy());
        let path = svg.with_file_name(format!("{stem}-perplexity.svg"));
        line_chart(
            &path,
            "Recovery curves: held-out perplexity",
            "training tokens",
            "perplexity",
            &perplexity,
        )?;
        wrote.push(path);
    }
    Ok(wrote)
}

/// A run's `value` at every point that has one, against training tokens.
fn series(curve: &Curve, value: impl Fn(&EvalPoint) -> Option<f64>) -> Series {
    Series {
        name: curve.label.clone(),
        points: curve
            .points
            .iter()
            .filter_map(|p| Some((p.1 as f64, value(&p.3)?)))
            .collect(),
        ..Series::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::checkpoint_eval::VsStart;
    use crate::train::LogLine;

    fn point(accuracy: f64, vs: Option<(usize, usize, f64)>, ppl: f64) -> EvalPoint {
        EvalPoint {
            protocol: crate::eval::Protocol::Content,
            questions: 1500,
            accuracy,
            ci95: [accuracy - 0.02, accuracy + 0.02],
            acc_norm: None,
            acc_norm_ci95: None,
            tasks: Default::default(),
            perplexity: Some(ppl),
            vs_start: vs.map(|(only_start, only_now, p_value)| VsStart {
                only_start,
                only_now,
                p_value,
                acc_norm_p_value: None,
            }),
            seconds: 1.0,
        }
    }

    fn write_run(dir: &Path, evals: &[(usize, EvalPoint)]) {
        std::fs::create_dir_all(dir).unwrap();
        let lines: Vec<LogLine> = evals
            .iter()
            .map(|(step, e)| LogLine {
                step: *step,
                tokens: *step as u64 * 1024,
                train_seconds: *step as f64 * 6.0,
                train: None,
                val_loss: None,
                eval: Some(e.clone()),
            })
            .collect();
        log::rewrite(&dir.join("train-log.jsonl"), &lines).unwrap();
    }

    #[test]
    fn tables_and_charts_every_run() {
        let tmp = tempfile::tempdir().unwrap();
        let (kd, lm) = (tmp.path().join("kd"), tmp.path().join("lm"));
        write_run(
            &kd,
            &[
                (0, point(0.44, None, 16.3)),
                (400, point(0.4593, Some((57, 85, 0.023)), 12.1)),
            ],
        );
        write_run(
            &lm,
            &[
                (0, point(0.44, None, 16.3)),
                (400, point(0.4493, Some((108, 121, 0.43)), 16.2)),
            ],
        );
        let curves = vec![
            read_curve(&kd, None).unwrap(),
            read_curve(&lm, Some("lm, answers".into())).unwrap(),
        ];
        let md = to_markdown(&curves);
        assert!(md.contains("| kd | 400 | 409600 | 40 min | 45.93% (43.9–47.9) | +1.93 | 57 / 85 | 0.023 | 12.10 |"), "{md}");
        assert!(
            md.contains(
                "| lm, answers | 0 | 0 | 0 min | 44.00% (42.0–46.0) | +0.00 | – | – | 16.30 |"
            ),
            "{md}"
        );
        let svg = tmp.path().join("curves.svg");
        let wrote = plot(&svg, &curves).unwrap();
        assert_eq!(
            wrote,
            vec![svg.clone(), tmp.path().join("curves-perplexity.svg")]
        );
        let text = std::fs::read_to_string(&svg).unwrap();
        assert!(text.contains("kd") && text.contains("lm, answers"));
    }

    #[test]
    fn a_run_without_points_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        let err = read_curve(tmp.path(), None).err().unwrap().to_string();
        assert!(err.contains("train-log.jsonl does not exist"), "{err}");
        let run = tmp.path().join("plain");
        std::fs::create_dir_all(&run).unwrap();
        log::rewrite(&run.join("train-log.jsonl"), &[]).unwrap();
        let err = read_curve(&run, None).err().unwrap().to_string();
        assert!(
            err.contains("has no evaluation points") && err.contains("checkpoint_eval"),
            "{err}"
        );
    }
}
