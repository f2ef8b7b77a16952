//! Paired comparison of two evaluations of the same questions: McNemar's exact test on the
//! questions one run answered right and the other wrong. Rows that share questions are
//! far more sensitive this way than intervals for independent proportions, and the
//! verdict is stated in words so that a reader never mistakes noise for recovery. Tasks
//! are compared one by one and pooled (every question of every task once): a small
//! effect spread over tasks shows only in the pooled row.

use crate::data::Task;
use crate::eval::{Protocol, QuestionRecord};
use anyhow::{Context, Result};
use std::collections::HashMap;
use std::fmt::Write;
use std::path::Path;

/// How one question was answered: right or wrong, and (`content`) right or wrong by the
/// length-normalised score (lm-evaluation-harness's `acc_norm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub correct: bool,
    pub correct_norm: Option<bool>,
}

/// Per-question outcomes, keyed by (protocol, task, question index).
pub type Answers = HashMap<(Protocol, Task, usize), Outcome>;

/// Which correctness a comparison counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    Acc,
    /// `content` only.
    AccNorm,
}

impl Metric {
    pub fn name(self) -> &'static str {
        match self {
            Metric::Acc => "acc",
            Metric::AccNorm => "acc_norm",
        }
    }

    fn of(self, o: &Outcome) -> Option<bool> {
        match self {
            Metric::Acc => Some(o.correct),
            Metric::AccNorm => o.correct_norm,
        }
    }
}

/// The outcomes of `records`.
pub fn answers_of(records: &[QuestionRecord]) -> Answers {
    records
        .iter()
        .map(|r| {
            let outcome = Outcome {
                correct: r.correct,
                correct_norm: r.predicted_norm.as_ref().map(|p| *p == r.gold),
            };
            ((r.protocol, r.task, r.index), outcome)
        })
        .collect()
}

/// Reads `eval-<label>.jsonl`.
pub fn read_answers(path: &Path) -> Result<Answers> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut records = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let r: QuestionRecord = serde_json::from_str(line)
            .with_context(|| format!("{} line {}: not a question record", path.display(), i + 1))?;
        records.push(r);
    }
    Ok(answers_of(&records))
}

/// The outcome of a paired comparison on one task, or on all of them pooled.
#[derive(Debug, Clone, PartialEq)]
pub struct PairedResult {
    /// Questions both runs answered.
    pub n: usize,
    /// Right in the first run only, and in the second only (the discordant pairs).
    pub only_first: usize,
    pub only_second: usize,
    /// Accuracy of the second minus the first, on the shared questions.
    pub difference: f64,
    /// Two-sided exact McNemar p-value.
    pub p_value: f64,
}

impl PairedResult {
    /// The verdict in words: better or worse at p < 0.05, otherwise within noise.
    pub fn verdict(&self) -> &'static str {
        match (self.p_value < 0.05, self.difference > 0.0) {
            (true, true) => "better (p < 0.05)",
            (true, false) => "worse (p < 0.05)",
            (false, _) => "within noise",
        }
    }
}

/// Compares the shared questions of `protocol` — of `task`, or of every task when `None`
/// (pooled) — by `metric`; `None` when no question is shared.
pub fn compare(
    a: &Answers,
    b: &Answers,
    protocol: Protocol,
    task: Option<Task>,
    metric: Metric,
) -> Option<PairedResult> {
    let (mut n, mut only_first, mut only_second) = (0, 0, 0);
    let picked = a
        .iter()
        .filter(|(k, _)| k.0 == protocol && task.is_none_or(|t| k.1 == t));
    for (key, oa) in picked {
        let Some(ob) = b.get(key) else { continue };
        let (Some(ra), Some(rb)) = (metric.of(oa), metric.of(ob)) else {
            continue;
        };
        n += 1;
        match (ra, rb) {
            (true, false) => only_first += 1,
            (false, true) => only_second += 1,
            _ => {}
        }
    }
    (n > 0).then(|| PairedResult {
        n,
        only_first,
        only_second,
        difference: (only_second as f64 - only_first as f64) / n as f64,
        p_value: mcnemar_exact(only_first, only_second),
    })
}

/// Two-sided exact McNemar test: under the null the `b + c` discordant pairs split as
/// Binomial(b + c, ½); p = min(1, 2 · P[X ≤ min(b, c)]).
pub fn mcnemar_exact(b: usize, c: usize) -> f64 {
    let n = b + c;
    if n == 0 {
        return 1.0;
    }
    let k = b.min(c);
    // Σ_{i≤k} C(n, i) / 2^n, in logs so that large n does not overflow.
    let ln_half_n = n as f64 * std::f64::consts::LN_2;
    let mut ln_c = 0.0; // ln C(n, 0)
    let mut tail = 0.0;
    for i in 0..=k {
        if i > 0 {
            ln_c += ((n - i + 1) as f64).ln() - (i as f64).ln();
        }
        tail += (ln_c - ln_half_n).exp();
    }
    (2.0 * tail).min(1.0)
}

/// One labelled run's answers and the tasks it evaluated per protocol.
pub struct PairedRow<'a> {
    pub label: &'a str,
    pub answers: &'a Answers,
}

/// The Markdown table of paired tests between consecutive rows (and last against first
/// when there are more than two rows), for every protocol and task the rows share, then
/// every task of the protocol pooled; `content` by `acc` and by `acc_norm`.
pub fn to_markdown(rows: &[PairedRow], tasks: &[(Protocol, Task, String)]) -> String {
    let mut pairs: Vec<(usize, usize)> = (1..rows.len()).map(|i| (i - 1, i)).collect();
    if rows.len() > 2 {
        pairs.push((0, rows.len() - 1));
    }
    let mut protocols: Vec<Protocol> = tasks.iter().map(|t| t.0).collect();
    protocols.dedup();
    let mut s = String::new();
    let mut lines = Vec::new();
    for &(i, j) in &pairs {
        for &protocol in &protocols {
            let metrics: &[Metric] = if protocol == Protocol::Content {
                &[Metric::Acc, Metric::AccNorm]
            } else {
                &[Metric::Acc]
            };
            let of_protocol: Vec<(Option<Task>, &str)> = tasks
                .iter()
                .filter(|t| t.0 == protocol)
                .map(|(_, task, column)| (Some(*task), column.as_str()))
                .chain(std::iter::once((None, "**pooled**")))
                .collect();
            for &metric in metrics {
                for &(task, column) in &of_protocol {
                    let Some(r) = compare(rows[i].answers, rows[j].answers, protocol, task, metric)
                    else {
                        continue;
                    };
                    lines.push(format!(
                        "| {} → {} | {protocol:?} {} | {column} | {} | {:+.1} | {} / {} | {:.3} | {} |",
                        rows[i].label,
                        rows[j].label,
                        metric.name(),
                        r.n,
                        100.0 * r.difference,
                        r.only_first,
                        r.only_second,
                        r.p_value,
                        r.verdict()
                    ));
                }
            }
        }
    }
    if lines.is_empty() {
        return s;
    }
    let _ = writeln!(s, "### Paired tests (same questions)\n");
    let _ = writeln!(
        s,
        "| comparison | protocol, metric | task | questions | Δ accuracy (points) | right only before / only after | McNemar p | verdict |"
    );
    let _ = writeln!(s, "|---|---|---|---:|---:|---:|---:|---|");
    for l in lines {
        let _ = writeln!(s, "{l}");
    }
    let _ = writeln!(
        s,
        "\nMcNemar's exact test on the questions that exactly one of the two runs answered \
         right; **pooled** counts every question of every task once. \"within noise\" means \
         p ≥ 0.05: the rows do not show a difference at this number of questions.\n"
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Known values: binomial tails computed by hand / scipy.stats.binomtest.
    #[test]
    fn mcnemar_matches_binomial_tails() {
        assert_eq!(mcnemar_exact(0, 0), 1.0);
        // b=0, c=5: 2 · 0.5^5 = 0.0625
        assert!((mcnemar_exact(0, 5) - 0.0625).abs() < 1e-12);
        // b=1, c=9: 2 · (1 + 10) / 1024 = 0.021484375
        assert!((mcnemar_exact(1, 9) - 0.021484375).abs() < 1e-12);
        assert!((mcnemar_exact(9, 1) - 0.021484375).abs() < 1e-12);
        // b=c: p = 1 (capped)
        assert_eq!(mcnemar_exact(7, 7), 1.0);
        // b=10, c=30: binomtest(10, 40, 0.5).pvalue = 0.002221...
        assert!((mcnemar_exact(10, 30) - 0.0022213).abs() < 1e-6);
    }

    #[test]
    fn compare_counts_discordant_pairs_on_shared_questions() {
        let t = Task::ArcEasy;
        let p = Protocol::Content;
        let a: Answers = [(0, true), (1, true), (2, false), (3, false), (4, true)]
            .into_iter()
            .map(|(i, c)| ((p, t, i), acc(c)))
            .collect();
        // Question 4 is missing from b: not shared.
        let b: Answers = [(0, true), (1, false), (2, true), (3, true)]
            .into_iter()
            .map(|(i, c)| ((p, t, i), acc(c)))
            .collect();
        let r = compare(&a, &b, p, Some(t), Metric::Acc).expect("shared questions");
        assert_eq!((r.n, r.only_first, r.only_second), (4, 1, 2));
        assert!((r.difference - 0.25).abs() < 1e-12);
        assert!(compare(&a, &b, Protocol::Choice, Some(t), Metric::Acc).is_none());
        // No acc_norm recorded: nothing to compare by it.
        assert!(compare(&a, &b, p, Some(t), Metric::AccNorm).is_none());
    }

    fn acc(correct: bool) -> Outcome {
        Outcome {
            correct,
            correct_norm: None,
        }
    }

    /// Pooled: the discordant pairs of every task added up; a task-wise tie can hide a
    /// pooled difference and the other way round.
    #[test]
    fn pooled_comparison_adds_the_tasks_discordant_pairs() {
        let p = Protocol::Content;
        let outcome = |c: bool, n: bool| Outcome {
            correct: c,
            correct_norm: Some(n),
        };
        let mut a = Answers::new();
        let mut b = Answers::new();
        for i in 0..10 {
            // ARC-e: the second run right on 6 more by acc, the same by acc_norm.
            a.insert((p, Task::ArcEasy, i), outcome(false, true));
            b.insert((p, Task::ArcEasy, i), outcome(i < 6, true));
            // PIQA: 3 more right by acc, 1 fewer by acc_norm.
            a.insert((p, Task::Piqa, i), outcome(false, i == 0));
            b.insert((p, Task::Piqa, i), outcome(i < 3, false));
        }
        let pooled = compare(&a, &b, p, None, Metric::Acc).expect("shared");
        assert_eq!(
            (pooled.n, pooled.only_first, pooled.only_second),
            (20, 0, 9)
        );
        assert!((pooled.p_value - mcnemar_exact(0, 9)).abs() < 1e-15);
        assert_eq!(pooled.verdict(), "better (p < 0.05)");
        let norm = compare(&a, &b, p, None, Metric::AccNorm).expect("shared");
        assert_eq!((norm.only_first, norm.only_second), (1, 0));
        assert_eq!(norm.verdict(), "within noise");
        let md = to_markdown(
            &[
                PairedRow {
                    label: "pruned",
                    answers: &a,
                },
                PairedRow {
                    label: "recovered",
                    answers: &b,
                },
            ],
            &[
                (p, Task::ArcEasy, "ARC-e".into()),
                (p, Task::Piqa, "PIQA".into()),
            ],
        );
        assert!(
            md.contains("| pruned → recovered | Content acc | **pooled** | 20 | +45.0 | 0 / 9 |"),
            "{md}"
        );
        assert!(
            md.contains(
                "| pruned → recovered | Content acc_norm | **pooled** | 20 | -5.0 | 1 / 0 |"
            ),
            "{md}"
        );
    }
}
