//! A step's fresh buffers and residual sums, written by every thread of rayon's pool.
//!
//! `vec![0.0; n]` zero-fills (and first touches the pages) on the calling thread alone,
//! and candle's `a + b` on f32 CPU tensors ran on the calling thread alone too: in a
//! 2-thread training step the other worker waited through both (`perf`, bf16, small shape,
//! rank 128: ~3.4% of the samples in `memset`, ~1.8% in candle's add, all on one thread;
//! docs/performance.md round 11).

use candle_core::{Result, Tensor};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Below this many values one thread fills the buffer: splitting costs more than it saves.
const PARALLEL_FROM: usize = 1 << 16;
/// Values per task.
const CHUNK: usize = 1 << 14;

/// `len` zeros, written in parallel for large buffers.
pub(crate) fn zeros(len: usize) -> Vec<f32> {
    if len < PARALLEL_FROM {
        return vec![0.0; len];
    }
    let mut v = Vec::with_capacity(len);
    v.spare_capacity_mut()
        .par_chunks_mut(CHUNK)
        .for_each(|chunk| chunk.fill(MaybeUninit::new(0.0)));
    // SAFETY: the capacity is `len` and every one of its values was written just above.
    unsafe { v.set_len(len) };
    v
}

/// `a + b` for two tensors of the same shape: in parallel for f32 on the CPU (the same sums
/// as candle's, value for value), candle's add otherwise.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if !super::applies_to(a) || !super::applies_to(b) || a.shape() != b.shape() {
        return a + b;
    }
    let sum = super::with_f32(a, "add", |a| {
        super::with_f32(b, "add", |b| {
            let sum = if a.len() < PARALLEL_FROM {
                a.iter().zip(b).map(|(x, y)| x + y).collect()
            } else {
                a.par_iter().zip(b).map(|(x, y)| x + y).collect()
            };
            Ok(sum)
        })
    })?;
    Tensor::from_vec(sum, a.shape(), a.device())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn zeros_are_zeros_at_every_size() {
        for len in [
            0,
            1,
            PARALLEL_FROM - 1,
            PARALLEL_FROM,
            3 * CHUNK + PARALLEL_FROM + 7,
        ] {
            let v = zeros(len);
            assert_eq!(v.len(), len);
            assert!(v.iter().all(|&x| x == 0.0));
        }
    }

    #[test]
    fn add_matches_candles_add_exactly() -> Result<()> {
        for len in [5, PARALLEL_FROM + 3] {
            let a = Tensor::randn(0f32, 1.0, (len,), &Device::Cpu)?;
            let b = Tensor::randn(0f32, 1.0, (len,), &Device::Cpu)?;
            let ours = add(&a, &b)?.to_vec1::<f32>()?;
            let candle = (&a + &b)?.to_vec1::<f32>()?;
            assert_eq!(ours, candle);
        }
        // A broadcast or another dtype falls back to candle's add.
        let a = Tensor::ones((2, 3), candle_core::DType::F64, &Device::Cpu)?;
        assert_eq!(add(&a, &a)?.to_vec2::<f64>()?, vec![vec![2.0; 3]; 2]);
        Ok(())
    }
}
