//! Adapter dropout that is reproducible and needs no saved state: the trainer sets a key
//! per micro-step, and each adapter derives its mask from (key, its own id). A resumed
//! run sees exactly the masks of an uninterrupted one.

use crate::model::fused::{self, dropout::DropoutMask};
use anyhow::Result;
use candle_core::{DType, Tensor};
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

    /// The mask adapter `adapter_id` uses now at rate `p`; `None` when evaluating or
    /// `p == 0`.
    pub fn mask(&self, p: f64, adapter_id: u64) -> Option<DropoutMask> {
        let key = self.current().filter(|_| p > 0.0)?;
        // Element counters of different adapters must not overlap: ids go in the top bits.
        Some(DropoutMask::new(
            key.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (adapter_id << 40),
            p,
        ))
    }

    /// `x` with inverted dropout at rate `p` (kept values scaled by 1/(1-p)), or `x` itself
    /// when evaluating or `p == 0`. `adapter_id` makes each adapter's mask different.
    pub fn apply(&self, x: &Tensor, p: f64, adapter_id: u64) -> Result<Tensor> {
        let Some(mask) = self.mask(p, adapter_id) else {
            return Ok(x.clone());
        };
        if fused::applies_to(x) {
            return Ok(fused::dropout::dropout(x, mask)?);
        }
        let mask = Tensor::from_vec(mask.values(x.elem_count()), x.shape(), x.device())?;
        Ok((x * mask.to_dtype(x.dtype())?)?)
    }
}

/// f32 view for adapter arithmetic (adapters train in f32 whatever the base dtype).
pub fn to_f32(x: &Tensor) -> Result<Tensor> {
    Ok(x.to_dtype(DType::F32)?)
}
