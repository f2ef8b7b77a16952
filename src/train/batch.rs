//! What one step trains on: the seeded order of the training examples across epochs, and
//! a micro-batch collated into tensors.

use crate::data::Example;
use anyhow::Result;
use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;

/// A right-padded micro-batch: input ids (b, T), attention mask (b, T), next-token
/// targets (b, T-1) and their loss mask (b, T-1), f32.
pub struct Batch {
    pub ids: Tensor,
    pub mask: Tensor,
    pub targets: Tensor,
    pub target_mask: Tensor,
    /// Real (unpadded) tokens, for throughput.
    pub real_tokens: u64,
}

impl Batch {
    /// Collates `examples`, padded on the right to the longest (at least 2 tokens).
    pub fn collate(examples: &[&Example], device: &Device) -> Result<Self> {
        let width = examples
            .iter()
            .map(|e| e.ids.len())
            .max()
            .unwrap_or(2)
            .max(2);
        let b = examples.len();
        let (mut ids, mut mask, mut targets, mut tmask) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for e in examples {
            let n = e.ids.len();
            for j in 0..width {
                ids.push(if j < n { e.ids[j] } else { 0 });
                mask.push(u32::from(j < n));
                if j >= 1 {
                    targets.push(if j < n { e.ids[j] } else { 0 });
                    tmask.push(if j < n && e.targets[j] { 1f32 } else { 0.0 });
                }
            }
        }
        Ok(Self {
            ids: Tensor::from_vec(ids, (b, width), device)?,
            mask: Tensor::from_vec(mask, (b, width), device)?,
            targets: Tensor::from_vec(targets, (b, width - 1), device)?,
            target_mask: Tensor::from_vec(tmask, (b, width - 1), device)?,
            real_tokens: examples.iter().map(|e| e.ids.len() as u64).sum(),
        })
    }
}

/// The data stream: epoch e is a permutation seeded by (seed, e).
pub(super) struct EpochOrder {
    n: usize,
    seed: u64,
    cache: std::cell::RefCell<(usize, Vec<usize>)>,
}

impl EpochOrder {
    pub(super) fn new(n: usize, seed: u64) -> Self {
        Self {
            n,
            seed,
            cache: std::cell::RefCell::new((usize::MAX, Vec::new())),
        }
    }

    /// Index of the k-th example of the stream.
    pub(super) fn at(&self, k: usize) -> usize {
        let (epoch, pos) = (k / self.n, k % self.n);
        let mut cache = self.cache.borrow_mut();
        if cache.0 != epoch {
            let mut perm: Vec<usize> = (0..self.n).collect();
            let mut rng =
                rand_chacha::ChaCha8Rng::seed_from_u64(self.seed.wrapping_add(1 + epoch as u64));
            perm.shuffle(&mut rng);
            *cache = (epoch, perm);
        }
        cache.1[pos]
    }
}
