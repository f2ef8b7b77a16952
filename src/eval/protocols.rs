//! The three protocols, each answering a batch of questions: `generate`, `choice`,
//! `content` (see DESIGN.md, Evaluation, and the modules they use).

use super::answer::extract_answer;
use super::content::content_pairs;
use super::generate::generate_batch;
use super::report::QuestionRecord;
use super::scoring::{argmax, score_candidates, Candidate};
use super::spec::{EvalSpec, Protocol};
use crate::data::prompt::evaluation_prompt;
use crate::data::Question;
use crate::model::{Llama, TextTokenizer};
use anyhow::Result;

/// The records of one answered batch and the tokens the model processed for it.
pub struct BatchOutcome {
    pub records: Vec<QuestionRecord>,
    pub tokens: usize,
}

pub fn answer_batch(
    protocol: Protocol,
    model: &Llama,
    tok: &TextTokenizer,
    spec: &EvalSpec,
    batch: &[&Question],
) -> Result<BatchOutcome> {
    match protocol {
        Protocol::Generate => generate_answers(model, tok, spec, batch),
        Protocol::Choice => choice_answers(model, tok, spec.bos_for(tok), batch),
        Protocol::Content => content_answers(model, tok, spec.bos_for(tok), batch),
    }
}

fn record(protocol: Protocol, q: &Question, predicted: Option<String>) -> QuestionRecord {
    QuestionRecord {
        protocol,
        task: q.task,
        index: q.index,
        correct: predicted.as_deref() == Some(q.gold.as_str()),
        gold: q.gold.clone(),
        predicted,
        generation: None,
        scores: None,
        scores_norm: None,
        predicted_norm: None,
    }
}

/// LLM-Adapters' protocol: the evaluation prompt, up to `max_new_tokens` (greedy or
/// `num_beams` beams), the first label in the text.
pub fn generate_answers(
    model: &Llama,
    tok: &TextTokenizer,
    spec: &EvalSpec,
    batch: &[&Question],
) -> Result<BatchOutcome> {
    let prompts = batch
        .iter()
        .map(|q| tok.encode(&evaluation_prompt(&q.instruction), spec.bos_for(tok)))
        .collect::<Result<Vec<_>>>()?;
    let gens = generate_batch(
        model,
        &prompts,
        spec.max_new_tokens,
        tok.eos_ids(),
        spec.num_beams,
    )?;
    let mut tokens = 0;
    let mut records = Vec::with_capacity(batch.len());
    for ((q, p), g) in batch.iter().zip(&prompts).zip(&gens) {
        tokens += p.len() + g.len();
        let text = tok.decode(g)?;
        let mut r = record(Protocol::Generate, q, extract_answer(q.task, &text));
        r.generation = Some(text);
        records.push(r);
    }
    Ok(BatchOutcome { records, tokens })
}

/// The candidates of `choice`: `the correct answer is <label>` after the evaluation prompt.
pub fn choice_candidates(tok: &TextTokenizer, q: &Question, bos: bool) -> Result<Vec<Candidate>> {
    let prompt = evaluation_prompt(&q.instruction);
    q.parsed
        .labels
        .iter()
        .map(|l| Candidate::split(tok, &prompt, &format!("the correct answer is {l}"), bos))
        .collect()
}

pub fn choice_answers(
    model: &Llama,
    tok: &TextTokenizer,
    bos: bool,
    batch: &[&Question],
) -> Result<BatchOutcome> {
    let cands = batch
        .iter()
        .map(|q| choice_candidates(tok, q, bos))
        .collect::<Result<Vec<_>>>()?;
    let scores = score_candidates(model, &cands)?;
    let records = batch
        .iter()
        .zip(scores.logprobs)
        .map(|(q, lp)| {
            let best = q.parsed.labels[argmax(&lp)].clone();
            let mut r = record(Protocol::Choice, q, Some(best));
            r.scores = Some(lp);
            r
        })
        .collect();
    Ok(BatchOutcome {
        records,
        tokens: scores.tokens,
    })
}

pub fn content_answers(
    model: &Llama,
    tok: &TextTokenizer,
    bos: bool,
    batch: &[&Question],
) -> Result<BatchOutcome> {
    let mut cands = Vec::with_capacity(batch.len());
    let mut lens = Vec::with_capacity(batch.len());
    for q in batch {
        let pairs = content_pairs(q)?;
        lens.push(pairs.iter().map(|(_, c)| c.len()).collect::<Vec<_>>());
        cands.push(
            pairs
                .iter()
                .map(|(ctx, cont)| Candidate::split(tok, ctx, cont, bos))
                .collect::<Result<Vec<_>>>()?,
        );
    }
    let scores = score_candidates(model, &cands)?;
    let mut records = Vec::with_capacity(batch.len());
    for ((q, lp), lens) in batch.iter().zip(scores.logprobs).zip(lens) {
        let norm: Vec<f64> = lp
            .iter()
            .zip(&lens)
            .map(|(s, n)| s / (*n).max(1) as f64)
            .collect();
        let labels = &q.parsed.labels;
        let mut r = record(Protocol::Content, q, Some(labels[argmax(&lp)].clone()));
        r.predicted_norm = Some(labels[argmax(&norm)].clone());
        r.scores = Some(lp);
        r.scores_norm = Some(norm);
        records.push(r);
    }
    Ok(BatchOutcome {
        records,
        tokens: scores.tokens,
    })
}
