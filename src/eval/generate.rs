//! Text generation with the KV cache: greedy or sampling for one prompt (`generate`), and
//! batched greedy and beam search with left padding for the `generate` protocol.

use crate::model::{KvCache, Llama};
use crate::nn::Mode;
use crate::runtime;
use anyhow::Result;
use candle_core::{DType, IndexOp, Tensor};
use rand::{Rng, SeedableRng};

#[derive(Debug, Clone, Copy)]
pub struct Sampling {
    /// 0 = greedy.
    pub temperature: f64,
    pub seed: u64,
}

/// Continues `prompt` by up to `max_new` tokens, stopping at any of `eos`. Returns the
/// new tokens only.
pub fn generate(
    model: &Llama,
    prompt: &[u32],
    max_new: usize,
    eos: &[u32],
    sampling: Sampling,
) -> Result<Vec<u32>> {
    runtime::with_workers_spinning(model.device().is_cpu(), || {
        continue_prompt(model, prompt, max_new, eos, sampling)
    })
}

fn continue_prompt(
    model: &Llama,
    prompt: &[u32],
    max_new: usize,
    eos: &[u32],
    sampling: Sampling,
) -> Result<Vec<u32>> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(sampling.seed);
    let mut cache = KvCache::new(model.num_layers());
    let mut input = prompt.to_vec();
    let mut out = Vec::new();
    for _ in 0..max_new {
        let ids = Tensor::new(input.as_slice(), model.device())?.unsqueeze(0)?;
        let hidden =
            model.forward_embeds(&model.embed(&ids)?, None, Some(&mut cache), Mode::Eval)?;
        let last = hidden.i((0, input.len() - 1))?.unsqueeze(0)?;
        let logits = model.lm_head(&last)?.squeeze(0)?.to_dtype(DType::F32)?;
        let next = if sampling.temperature <= 0.0 {
            logits.argmax(0)?.to_scalar::<u32>()?
        } else {
            let probs = candle_nn::ops::softmax_last_dim(&(logits / sampling.temperature)?)?
                .to_vec1::<f32>()?;
            let r: f32 = rng.random();
            let mut acc = 0f32;
            probs
                .iter()
                .position(|&p| {
                    acc += p;
                    acc >= r
                })
                .unwrap_or(probs.len() - 1) as u32
        };
        if eos.contains(&next) {
            break;
        }
        out.push(next);
        input = vec![next];
    }
    Ok(out)
}

/// The last position's logits, (b, vocab) f32.
fn last_logits(model: &Llama, hidden: &Tensor) -> Result<Tensor> {
    let t = hidden.dim(1)?;
    let last = hidden.i((.., t - 1, ..))?.contiguous()?;
    Ok(model.lm_head(&last)?.to_dtype(DType::F32)?)
}

/// Logits (b, vocab) → log-probabilities, one row per batch row: what beam search ranks.
fn log_probs(logits: &Tensor) -> Result<Vec<Vec<f32>>> {
    Ok(candle_nn::ops::log_softmax(logits, 1)?.to_vec2::<f32>()?)
}

/// Each row's greedy token: the argmax of its logits. The log-softmax subtracts one
/// constant from a row, so this is the log-probabilities' argmax (unless two logits round
/// to one log-probability) without computing them (3% of a SmolLM2 decoding step).
fn argmax_rows(logits: &Tensor) -> Result<Vec<u32>> {
    Ok(logits
        .to_vec2::<f32>()?
        .iter()
        .map(|row| argmax_f32(row))
        .collect())
}

fn argmax_f32(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// A prefilled batch: the cache, the attention mask rows, the last logits (b, vocab).
type Prefilled = (KvCache, Vec<Vec<u32>>, Tensor);

/// Runs `prompts` left-padded through the model into a fresh cache. Returns the cache,
/// the attention mask rows (1 real, 0 padding) and the last position's logits.
fn prefill(model: &Llama, prompts: &[Vec<u32>]) -> Result<Prefilled> {
    let b = prompts.len();
    let t = prompts.iter().map(Vec::len).max().unwrap_or(0);
    if prompts.iter().any(Vec::is_empty) {
        anyhow::bail!("cannot generate from an empty prompt");
    }
    let mut ids = vec![0u32; b * t];
    let mut mask = vec![vec![0u32; t]; b];
    for (r, p) in prompts.iter().enumerate() {
        ids[r * t + t - p.len()..(r + 1) * t].copy_from_slice(p);
        mask[r][t - p.len()..].fill(1);
    }
    let device = model.device();
    let ids = Tensor::from_vec(ids, (b, t), device)?;
    let mask_t = Tensor::new(mask.clone(), device)?;
    let mut cache = KvCache::new(model.num_layers());
    let hidden = model.forward_embeds(
        &model.embed(&ids)?,
        Some(&mask_t),
        Some(&mut cache),
        Mode::Eval,
    )?;
    Ok((cache, mask, last_logits(model, &hidden)?))
}

/// One decoding step: `next` (one token per row) appended to every row, the cache and
/// the mask grown by one position. Returns the new last logits (b, vocab).
fn step(model: &Llama, cache: &mut KvCache, mask: &mut [Vec<u32>], next: &[u32]) -> Result<Tensor> {
    let device = model.device();
    for row in mask.iter_mut() {
        row.push(1);
    }
    let ids = Tensor::from_vec(next.to_vec(), (next.len(), 1), device)?;
    let mask_t = Tensor::new(mask.to_vec(), device)?;
    let hidden =
        model.forward_embeds(&model.embed(&ids)?, Some(&mask_t), Some(cache), Mode::Eval)?;
    last_logits(model, &hidden)
}

/// Greedy decoding of several prompts at once (left padding, KV cache): up to `max_new`
/// new tokens each, a row stopping at its first token in `eos` (not included).
pub fn greedy_batch(
    model: &Llama,
    prompts: &[Vec<u32>],
    max_new: usize,
    eos: &[u32],
) -> Result<Vec<Vec<u32>>> {
    let b = prompts.len();
    let mut out = vec![Vec::new(); b];
    if b == 0 || max_new == 0 {
        return Ok(out);
    }
    let (mut cache, mut mask, mut logits) = prefill(model, prompts)?;
    let mut done = vec![false; b];
    for n in 0..max_new {
        let next = argmax_rows(&logits)?;
        for r in 0..b {
            if done[r] {
                continue;
            }
            if eos.contains(&next[r]) {
                done[r] = true;
            } else {
                out[r].push(next[r]);
            }
        }
        if n + 1 == max_new || done.iter().all(|d| *d) {
            break;
        }
        logits = step(model, &mut cache, &mut mask, &next)?;
    }
    Ok(out)
}

/// Greedy decoding of one prompt recomputing the whole sequence at every step (no cache):
/// the reference `greedy_batch` is tested against.
pub fn greedy_no_cache(
    model: &Llama,
    prompt: &[u32],
    max_new: usize,
    eos: &[u32],
) -> Result<Vec<u32>> {
    let mut seq = prompt.to_vec();
    let mut out = Vec::new();
    for _ in 0..max_new {
        let ids = Tensor::new(seq.as_slice(), model.device())?.unsqueeze(0)?;
        let hidden = model.forward_embeds(&model.embed(&ids)?, None, None, Mode::Eval)?;
        let next = argmax_rows(&last_logits(model, &hidden)?)?[0];
        if eos.contains(&next) {
            break;
        }
        out.push(next);
        seq.push(next);
    }
    Ok(out)
}

/// A finished beam hypothesis.
struct Hyp {
    score: f64,
    tokens: Vec<u32>,
}

/// Beam search as Hugging Face's `generate(num_beams=n)` does it (length penalty 1,
/// `early_stopping=False`): per question `n` beams, the `2n` best expansions each step, a
/// beam that emits EOS among the first `n` of them becomes a hypothesis scored
/// sum-log-prob / generated length; a question stops when it holds `n` hypotheses and no
/// running beam can beat the worst. At `max_new`, the running beams join the hypotheses.
/// Returns each prompt's best hypothesis, EOS excluded. Prompts are batched with left
/// padding and a KV cache (rows reordered with `KvCache::select_rows`).
pub fn beam_search_batch(
    model: &Llama,
    prompts: &[Vec<u32>],
    max_new: usize,
    eos: &[u32],
    num_beams: usize,
) -> Result<Vec<Vec<u32>>> {
    let nb = num_beams.max(1);
    let b = prompts.len();
    if b == 0 || max_new == 0 {
        return Ok(vec![Vec::new(); b]);
    }
    let (mut cache, mask0, logits0) = prefill(model, prompts)?;
    let lp0 = log_probs(&logits0)?;
    // Replicate each prompt's row into its beams.
    let rep: Vec<u32> = (0..b * nb).map(|r| (r / nb) as u32).collect();
    cache.select_rows(&Tensor::new(rep.as_slice(), model.device())?)?;
    let mut mask: Vec<Vec<u32>> = (0..b * nb).map(|r| mask0[r / nb].clone()).collect();
    let mut lp: Vec<Vec<f32>> = (0..b * nb).map(|r| lp0[r / nb].clone()).collect();
    // Beam 0 starts alone (the others are copies of it).
    let mut beam_scores: Vec<f64> = (0..b * nb)
        .map(|r| if r % nb == 0 { 0.0 } else { f64::NEG_INFINITY })
        .collect();
    let mut beam_tokens: Vec<Vec<u32>> = vec![Vec::new(); b * nb];
    let mut hyps: Vec<Vec<Hyp>> = (0..b).map(|_| Vec::new()).collect();
    let mut done = vec![false; b];
    let add_hyp = |list: &mut Vec<Hyp>, h: Hyp| {
        list.push(h);
        list.sort_by(|a, b| b.score.total_cmp(&a.score));
        list.truncate(nb);
    };
    for n in 0..max_new {
        let mut next_rows: Vec<u32> = (0..(b * nb) as u32).collect();
        let mut next_tok = vec![0u32; b * nb];
        let mut next_scores = vec![f64::NEG_INFINITY; b * nb];
        let mut next_tokens: Vec<Vec<u32>> = vec![Vec::new(); b * nb];
        for q in 0..b {
            if done[q] {
                // Keep the rows alive; their output is already decided.
                for j in 0..nb {
                    let r = q * nb + j;
                    next_rows[r] = r as u32;
                    next_tok[r] = eos.first().copied().unwrap_or(0);
                    next_scores[r] = beam_scores[r];
                }
                continue;
            }
            // The 2n best (score, beam, token) over all beams of q.
            let mut cands: Vec<(f64, usize, u32)> = Vec::with_capacity(2 * nb * nb);
            for j in 0..nb {
                let r = q * nb + j;
                if beam_scores[r] == f64::NEG_INFINITY {
                    continue;
                }
                let row = &lp[r];
                let mut idx: Vec<u32> = (0..row.len() as u32).collect();
                let k = (2 * nb).min(idx.len());
                idx.select_nth_unstable_by(k - 1, |a, b| {
                    row[*b as usize].total_cmp(&row[*a as usize])
                });
                for &t in &idx[..k] {
                    cands.push((beam_scores[r] + row[t as usize] as f64, j, t));
                }
            }
            cands.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
            cands.truncate(2 * nb);
            let mut filled = 0;
            for (rank, &(score, j, t)) in cands.iter().enumerate() {
                let r = q * nb + j;
                if eos.contains(&t) {
                    if rank < nb {
                        let len = beam_tokens[r].len().max(1) as f64;
                        add_hyp(
                            &mut hyps[q],
                            Hyp {
                                score: score / len,
                                tokens: beam_tokens[r].clone(),
                            },
                        );
                    }
                    continue;
                }
                let dst = q * nb + filled;
                next_rows[dst] = r as u32;
                next_tok[dst] = t;
                next_scores[dst] = score;
                let mut toks = beam_tokens[r].clone();
                toks.push(t);
                next_tokens[dst] = toks;
                filled += 1;
                if filled == nb {
                    break;
                }
            }
            // Done when n hypotheses exist and the best running beam cannot beat the worst.
            let cur_len = (n + 1) as f64;
            let best_running = next_scores[q * nb..(q + 1) * nb]
                .iter()
                .cloned()
                .fold(f64::NEG_INFINITY, f64::max);
            if hyps[q].len() == nb && hyps[q].last().expect("full").score >= best_running / cur_len
            {
                done[q] = true;
            }
        }
        for (q, finished) in done.iter().enumerate() {
            for j in 0..nb {
                let r = q * nb + j;
                if !finished || !next_tokens[r].is_empty() {
                    beam_tokens[r] = std::mem::take(&mut next_tokens[r]);
                }
            }
        }
        beam_scores = next_scores;
        if n + 1 == max_new || done.iter().all(|d| *d) {
            break;
        }
        cache.select_rows(&Tensor::new(next_rows.as_slice(), model.device())?)?;
        mask = next_rows
            .iter()
            .map(|&r| mask[r as usize].clone())
            .collect();
        lp = log_probs(&step(model, &mut cache, &mut mask, &next_tok)?)?;
    }
    let mut out = Vec::with_capacity(b);
    for q in 0..b {
        if !done[q] {
            for j in 0..nb {
                let r = q * nb + j;
                if beam_scores[r] > f64::NEG_INFINITY {
                    let len = beam_tokens[r].len().max(1) as f64;
                    add_hyp(
                        &mut hyps[q],
                        Hyp {
                            score: beam_scores[r] / len,
                            tokens: beam_tokens[r].clone(),
                        },
                    );
                }
            }
        }
        out.push(
            hyps[q]
                .first()
                .map(|h| h.tokens.clone())
                .unwrap_or_default(),
        );
    }
    Ok(out)
}

/// `greedy_batch` for one beam, `beam_search_batch` for more.
pub fn generate_batch(
    model: &Llama,
    prompts: &[Vec<u32>],
    max_new: usize,
    eos: &[u32],
    num_beams: usize,
) -> Result<Vec<Vec<u32>>> {
    runtime::with_workers_spinning(model.device().is_cpu(), || {
        if num_beams <= 1 {
            greedy_batch(model, prompts, max_new, eos)
        } else {
            beam_search_batch(model, prompts, max_new, eos, num_beams)
        }
    })
}
