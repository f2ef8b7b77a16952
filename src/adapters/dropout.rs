//! Adapter dropout that is reproducible and needs no saved state: the trainer sets a key
//! per micro-step, and each adapter derives its mask from (key, its own id). A resumed
//! run sees exactly the masks of an uninterrupted one.

use anyhow::Result;
use candle_core::{DType, Tensor};
use rand::{Rng, SeedableRng};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

const EVAL: u64 = u64::MAX;

/// Shared by every adapter of a model. `EVAL` (the default) turns dropout off.
#[derive(Clone, Debug)]
pub struct DropoutKey(Arc<AtomicU64>);

impl Default for DropoutKey {
    fn default() -> Self {
        Self(Arc::new(AtomicU64::new(EVAL)))
    }
}

impl DropoutKey {
    /// Training: masks derive from `key` (e.g. seed and micro-step).
    pub fn set_train(&self, key: u64) {
        self.0.store(key & !(1 << 63), Ordering::SeqCst);
    }

    /// Evaluation: no dropout.
    pub fn set_eval(&self) {
        self.0.store(EVAL, Ordering::SeqCst);
    }

    fn current(&self) -> Option<u64> {
        Some(self.0.load(Ordering::SeqCst)).filter(|&k| k != EVAL)
    }

    /// `x` with inverted dropout at rate `p` (kept values scaled by 1/(1-p)), or `x` itself
    /// when evaluating or `p == 0`. `adapter_id` makes each adapter's mask different.
    pub fn apply(&self, x: &Tensor, p: f64, adapter_id: u64) -> Result<Tensor> {
        let Some(key) = self.current().filter(|_| p > 0.0) else {
            return Ok(x.clone());
        };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(
            key.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ adapter_id,
        );
        let keep = 1.0 - p;
        let scale = (1.0 / keep) as f32;
        let mask: Vec<f32> = (0..x.elem_count())
            .map(|_| {
                if rng.random::<f64>() < keep {
                    scale
                } else {
                    0.0
                }
            })
            .collect();
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
        Ok((x * mask)?)
    }
}

/// f32 view for adapter arithmetic (adapters train in f32 whatever the base dtype).
pub fn to_f32(x: &Tensor) -> Result<Tensor> {
    Ok(x.to_dtype(DType::F32)?)
}
