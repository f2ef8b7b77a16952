//! Text generation with the KV cache: greedy, or sampling at a temperature.

use crate::model::{KvCache, Llama};
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
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(sampling.seed);
    let mut cache = KvCache::new(model.num_layers());
    let mut input = prompt.to_vec();
    let mut out = Vec::new();
    for _ in 0..max_new {
        let ids = Tensor::new(input.as_slice(), model.device())?.unsqueeze(0)?;
        let hidden = model.forward_embeds(&model.embed(&ids)?, None, Some(&mut cache))?;
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
