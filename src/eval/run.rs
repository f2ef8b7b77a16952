//! `run_eval`: the eval stage's work: load and check the tasks, answer every selected
//! question under every protocol. The pipeline runner writes what it returns
//! (`eval-<label>.json`, `.md` and `.jsonl`).

use super::protocols::answer_batch;
use super::report::{EvalReport, EvalRun, ProtocolResult, QuestionRecord, TaskResult};
use super::spec::{EvalSpec, Protocol};
use crate::data::{load_task, Question, Task};
use crate::model::{Llama, TextTokenizer};
use crate::progress;
use anyhow::{bail, Context, Result};
use rand::SeedableRng;
use std::path::PathBuf;
use std::time::Instant;

/// Which questions of a task with `len` questions are evaluated: those after the first
/// `skip` (a confirmation set disjoint from an evaluation of the first `skip`), then all of
/// them, the first `limit`, or (`sample`) `limit` drawn at random with a generator seeded
/// by `seed` and the task; returned in file order.
pub fn select_questions(
    len: usize,
    skip: usize,
    limit: Option<usize>,
    sample: bool,
    seed: u64,
    task: Task,
) -> Vec<usize> {
    let len = len.saturating_sub(skip);
    let picked: Vec<usize> = match limit {
        Some(n) if n < len => {
            if sample {
                let task_no = Task::ALL.iter().position(|t| *t == task).unwrap_or(0) as u64;
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(
                    seed ^ (task_no + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
                );
                let mut v = rand::seq::index::sample(&mut rng, len, n).into_vec();
                v.sort_unstable();
                v
            } else {
                (0..n).collect()
            }
        }
        _ => (0..len).collect(),
    };
    picked.into_iter().map(|i| i + skip).collect()
}

/// Answers `questions` of one task under `protocol` in batches of `spec.batch_size`,
/// with a progress bar. Returns the task's result and the per-question records.
pub fn evaluate_task(
    protocol: Protocol,
    model: &Llama,
    tok: &TextTokenizer,
    spec: &EvalSpec,
    task: Task,
    file: PathBuf,
    questions: &[&Question],
) -> Result<(TaskResult, Vec<QuestionRecord>)> {
    let started = Instant::now();
    let pb = progress::bar(
        questions.len() as u64,
        &format!("{} {}", protocol.name(), task.column()),
    );
    // Batches of questions of similar length (by their instruction, a proxy for every
    // protocol's prompt): the left padding of a batch's prompts is work for nothing.
    // The records go back to `questions`' order below.
    let mut by_length: Vec<&Question> = questions.to_vec();
    by_length.sort_by_key(|q| q.instruction.len());
    let mut records = Vec::with_capacity(questions.len());
    let mut tokens = 0;
    let mut correct = 0;
    for batch in by_length.chunks(spec.batch_size.max(1)) {
        let out = answer_batch(protocol, model, tok, spec, batch)
            .with_context(|| format!("{} on task {}", protocol.name(), task.name()))?;
        tokens += out.tokens;
        correct += out.records.iter().filter(|r| r.correct).count();
        records.extend(out.records);
        pb.inc(batch.len() as u64);
        let done = records.len();
        pb.set_message(format!(
            "acc {:.3}, {:.2} q/s",
            correct as f64 / done as f64,
            done as f64 / started.elapsed().as_secs_f64().max(1e-9)
        ));
    }
    pb.finish_and_clear();
    let position: std::collections::HashMap<usize, usize> = questions
        .iter()
        .enumerate()
        .map(|(i, q)| (q.index, i))
        .collect();
    records.sort_by_key(|r| position[&r.index]);
    let mut result = TaskResult::new(task, file, records.len(), correct);
    if protocol == Protocol::Generate {
        result.unparsed = records.iter().filter(|r| r.predicted.is_none()).count();
    }
    if protocol == Protocol::Content {
        let norm = records
            .iter()
            .filter(|r| r.predicted_norm.as_deref() == Some(r.gold.as_str()))
            .count();
        result = result.with_norm(norm);
    }
    result.tokens = tokens;
    result.seconds = started.elapsed().as_secs_f64();
    Ok((result, records))
}

/// Runs the eval stage: every task of `spec` under every protocol, and the `ppl` task, with
/// the products at the model's current precision (the eval stage sets
/// `spec.matmul_precision` first). All task files are read and checked before the model runs.
pub fn run_eval(spec: &EvalSpec, model: &Llama, tok: &TextTokenizer, seed: u64) -> Result<EvalRun> {
    let started = Instant::now();
    let tasks = spec.validate()?;
    let mut loaded = Vec::with_capacity(tasks.len());
    for &task in &tasks {
        let file = task.test_file(&spec.data_dir)?;
        let questions = load_task(task, &spec.data_dir)?;
        if questions.len() <= spec.skip {
            bail!(
                "eval.skip = {} leaves no question of {} ({} in {}): lower it",
                spec.skip,
                task.name(),
                questions.len(),
                file.display()
            );
        }
        loaded.push((task, file, questions));
    }
    let perplexity = match spec.ppl() {
        Some(ppl) => Some(ppl.score(model, tok, "eval.ppl_text")?),
        None => None,
    };
    let mut protocols = Vec::new();
    let mut records = Vec::new();
    for &protocol in &spec.protocol {
        let mut results = Vec::new();
        for (task, file, questions) in &loaded {
            let picked: Vec<&Question> = select_questions(
                questions.len(),
                spec.skip,
                spec.limit,
                spec.sample,
                seed,
                *task,
            )
            .into_iter()
            .map(|i| &questions[i])
            .collect();
            let (result, recs) =
                evaluate_task(protocol, model, tok, spec, *task, file.clone(), &picked)?;
            results.push(result);
            records.extend(recs);
        }
        protocols.push(ProtocolResult::new(protocol, results));
    }
    let report = EvalReport {
        label: spec.label.clone(),
        data_dir: spec.data_dir.clone(),
        skip: spec.skip,
        limit: spec.limit,
        sample: spec.sample,
        seed,
        bos: spec.bos_for(tok),
        num_beams: spec.num_beams,
        max_new_tokens: spec.max_new_tokens,
        matmul_precision: model.matmul_precision(),
        protocols,
        perplexity,
        seconds: started.elapsed().as_secs_f64(),
        cached: false,
    };
    Ok(EvalRun { report, records })
}
