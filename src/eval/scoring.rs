//! Log-likelihood scoring of continuations, batched, with each question's shared prefix
//! run once and every candidate continuing from its KV cache.
//!
//! Tokenization follows lm-evaluation-harness: the context and the continuation are
//! encoded *together* and the continuation is what follows the first
//! `len(encode(context))` tokens (`Candidate::split`). The whole text is what a model
//! trained on it saw, so nothing changes at the boundary when the tokens do not merge
//! across it (the usual case: the continuation starts with a space or a word).

use crate::model::loss::target_log_probs;
use crate::model::{KvCache, Llama, TextTokenizer};
use crate::nn::Mode;
use crate::runtime;
use anyhow::{bail, Result};
use candle_core::{DType, IndexOp, Tensor};

/// A token sequence and where its scored part starts: tokens `ids[n_ctx..]` are scored,
/// each given the ones before it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub ids: Vec<u32>,
    pub n_ctx: usize,
}

impl Candidate {
    /// `encode(context + continuation)` split at `len(encode(context))`, with BOS first
    /// when `bos` and the tokenizer has one.
    pub fn split(
        tok: &TextTokenizer,
        context: &str,
        continuation: &str,
        bos: bool,
    ) -> Result<Self> {
        let ids = tok.encode(&format!("{context}{continuation}"), bos)?;
        let n_ctx = tok.encode(context, bos)?.len();
        if n_ctx == 0 {
            bail!("cannot score a continuation with an empty context and no BOS token");
        }
        if n_ctx >= ids.len() {
            bail!("the continuation `{continuation}` adds no token after its context");
        }
        Ok(Self { ids, n_ctx })
    }
}

/// The sum of log-probabilities of each candidate's scored tokens, and the tokens the
/// model processed.
#[derive(Debug, Clone, PartialEq)]
pub struct Scores {
    /// `logprobs[q][k]`: candidate k of question q.
    pub logprobs: Vec<Vec<f64>>,
    /// Tokens run through the model (shared prefixes once, then each candidate's rest).
    pub tokens: usize,
}

/// Most logits (rows × positions × vocab) materialised at once for the candidates.
const MAX_LOGITS: usize = 48 << 20;

/// Scores every candidate of every question. Per question, the longest token prefix its
/// candidates share (up to the earliest scored token) is run once, all questions together
/// with left padding; the cache rows are then replicated per candidate and the candidates'
/// remaining tokens (right-padded) continue from it.
pub fn score_candidates(model: &Llama, questions: &[Vec<Candidate>]) -> Result<Scores> {
    runtime::with_workers_spinning(model.device().is_cpu(), || score(model, questions))
}

fn score(model: &Llama, questions: &[Vec<Candidate>]) -> Result<Scores> {
    let device = model.device();
    let nq = questions.len();
    if nq == 0 {
        return Ok(Scores {
            logprobs: Vec::new(),
            tokens: 0,
        });
    }
    // Shared prefix length per question.
    let mut prefix = Vec::with_capacity(nq);
    for cands in questions {
        if cands.is_empty() {
            bail!("a question with no candidate to score");
        }
        for c in cands {
            if c.n_ctx == 0 || c.n_ctx >= c.ids.len() {
                bail!("candidate with no context or no continuation to score");
            }
        }
        let first = &cands[0].ids;
        let mut l = cands.iter().map(|c| c.n_ctx).min().unwrap_or(1);
        for c in &cands[1..] {
            l = l.min(first.iter().zip(&c.ids).take_while(|(a, b)| a == b).count());
        }
        prefix.push(l.max(1));
    }
    // 1. The prefixes, left-padded, one forward; only the last position's log-probs.
    let tp = *prefix.iter().max().expect("non-empty");
    let mut ids = vec![0u32; nq * tp];
    let mut mask = vec![0u32; nq * tp];
    let mut tokens = 0;
    for (q, cands) in questions.iter().enumerate() {
        let l = prefix[q];
        let off = q * tp + tp - l;
        ids[off..off + l].copy_from_slice(&cands[0].ids[..l]);
        mask[off..off + l].fill(1);
        tokens += l;
    }
    let ids_t = Tensor::from_vec(ids, (nq, tp), device)?;
    let mask_t = Tensor::from_vec(mask.clone(), (nq, tp), device)?;
    let mut cache = KvCache::new(model.num_layers());
    let hidden = model.forward_embeds(
        &model.embed(&ids_t)?,
        Some(&mask_t),
        Some(&mut cache),
        Mode::Eval,
    )?;
    let last = hidden.i((.., tp - 1, ..))?.contiguous()?;
    let last_logits = model.lm_head(&last)?.to_dtype(DType::F32)?;
    let last_lp = candle_nn::ops::log_softmax(&last_logits, 1)?.to_vec2::<f32>()?;

    // Tokens fed after the prefix: ids[l .. len-1] (the last token predicts nothing scored).
    let feed = |q: usize, k: usize| -> &[u32] {
        let c = &questions[q][k];
        &c.ids[prefix[q]..c.ids.len() - 1]
    };
    // 2. The candidates: rows (q, k), each continuing from its question's cache row,
    // longest first so that a chunk's rows have similar lengths (right padding is work
    // the model does for nothing: unsorted, HellaSwag's candidates were 58% padding).
    let mut rows: Vec<(usize, usize)> = questions
        .iter()
        .enumerate()
        .flat_map(|(q, c)| (0..c.len()).map(move |k| (q, k)))
        .collect();
    rows.sort_by_key(|&(q, k)| std::cmp::Reverse(feed(q, k).len()));
    let mut logprobs: Vec<Vec<f64>> = questions.iter().map(|c| vec![0.0; c.len()]).collect();
    // The first scored token may be predicted by the prefix's last position.
    for &(q, k) in &rows {
        let c = &questions[q][k];
        if c.n_ctx == prefix[q] {
            logprobs[q][k] += last_lp[q][c.ids[prefix[q]] as usize] as f64;
        }
    }
    let vocab = model.config.vocab_size.max(1);
    let mut start = 0;
    while start < rows.len() {
        // Chunk the rows so the logits stay bounded and no row is padded by more than a
        // quarter of the chunk's length (rows are longest first: the first sets `ts`).
        let ts = feed(rows[start].0, rows[start].1).len();
        let mut end = start + 1;
        while end < rows.len()
            && (end - start + 1) * ts.max(1) * vocab <= MAX_LOGITS
            && 4 * feed(rows[end].0, rows[end].1).len() >= 3 * ts
        {
            end += 1;
        }
        let chunk = &rows[start..end];
        start = end;
        if ts == 0 {
            continue;
        }
        let r = chunk.len();
        let sel: Vec<u32> = chunk.iter().map(|&(q, _)| q as u32).collect();
        let mut c_cache = cache.with_rows(&Tensor::new(sel.as_slice(), device)?)?;
        let mut s_ids = vec![0u32; r * ts];
        let mut s_tgt = vec![0u32; r * ts];
        let mut s_mask = vec![0u32; r * (tp + ts)];
        for (i, &(q, k)) in chunk.iter().enumerate() {
            let f = feed(q, k);
            let c = &questions[q][k];
            s_ids[i * ts..i * ts + f.len()].copy_from_slice(f);
            s_tgt[i * ts..i * ts + f.len()].copy_from_slice(&c.ids[prefix[q] + 1..]);
            s_mask[i * (tp + ts)..i * (tp + ts) + tp].copy_from_slice(&mask[q * tp..(q + 1) * tp]);
            s_mask[i * (tp + ts) + tp..i * (tp + ts) + tp + f.len()].fill(1);
            tokens += f.len();
        }
        let s_ids = Tensor::from_vec(s_ids, (r, ts), device)?;
        let s_tgt = Tensor::from_vec(s_tgt, (r, ts), device)?;
        let s_mask = Tensor::from_vec(s_mask, (r, tp + ts), device)?;
        let logits = model.forward(&s_ids, Some(&s_mask), Some(&mut c_cache))?;
        let lp = target_log_probs(&logits, &s_tgt)?.to_vec2::<f32>()?;
        for (i, &(q, k)) in chunk.iter().enumerate() {
            let c = &questions[q][k];
            let l = prefix[q];
            // Target token j (j > l) is at suffix position j - l - 1.
            for j in c.n_ctx.max(l + 1)..c.ids.len() {
                logprobs[q][k] += lp[i][j - l - 1] as f64;
            }
        }
    }
    Ok(Scores { logprobs, tokens })
}

/// The reference path: the whole sequence through the model at once, no cache, no batch.
/// Returns the sum of log p(ids[j] | ids[..j]) for j ≥ n_ctx.
pub fn score_full_sequence(model: &Llama, c: &Candidate) -> Result<f64> {
    let t = c.ids.len();
    let ids = Tensor::new(c.ids.as_slice(), model.device())?.unsqueeze(0)?;
    let logits = model.forward(&ids, None, None)?;
    let lp = target_log_probs(&logits.narrow(1, 0, t - 1)?, &ids.narrow(1, 1, t - 1)?)?
        .squeeze(0)?
        .to_vec1::<f32>()?;
    Ok((c.n_ctx..t).map(|j| lp[j - 1] as f64).sum())
}

/// Index of the largest value (the first one on ties).
pub fn argmax(values: &[f64]) -> usize {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best
}
