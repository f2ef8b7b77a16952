//! A step's fresh buffers, residual sums and head splits, written by every thread of
//! rayon's pool.
//!
//! `vec![0.0; n]` zero-fills (and first touches the pages) on the calling thread alone, and
//! candle's `a + b` and `contiguous()` on f32 CPU tensors ran on the calling thread alone
//! too: in a 2-thread training step the other worker waited through all three (`perf`,
//! bf16, small shape, rank 128: ~3.4% of the samples in `memset`, ~1.8% in candle's add,
//! ~1.6% in its strided copies, all on one thread; docs/performance.md round 11).

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
    v.spare_capacity_mut()[..len]
        .par_chunks_mut(CHUNK)
        .for_each(|chunk| chunk.fill(MaybeUninit::new(0.0)));
    // SAFETY: the capacity is at least `len` and each of the first `len` values was
    // written just above.
    unsafe { v.set_len(len) };
    v
}

/// `a + b` for two tensors of the same shape: for f32 on the CPU outside autograd's graph
/// our loop (in parallel from [`PARALLEL_FROM`] values; the same sums as candle's, value
/// for value), candle's add otherwise.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let outside_graph = !a.track_op() && !b.track_op();
    if !outside_graph || !super::applies_to(a) || !super::applies_to(b) || a.shape() != b.shape() {
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

/// `x` (d0, d1, d2, d3) with its two middle dimensions swapped, contiguous: (d0, d2, d1,
/// d3). For f32 on the CPU outside autograd's graph our copy (in parallel from
/// [`PARALLEL_FROM`] values; the same values as candle's `transpose(1, 2)` and
/// `contiguous()`), candle's ops otherwise — and where d1 or d2 is 1 (decoding's one new
/// token), whose transpose is already contiguous and costs candle no copy. Splits the heads
/// of (b, t, heads, hd) rows and merges them back.
pub fn swap_middle_dims(x: &Tensor) -> Result<Tensor> {
    let (d0, d1, d2, d3) = x.dims4()?;
    if !super::applies_to(x) || x.track_op() || d1 == 1 || d2 == 1 {
        return x.transpose(1, 2)?.contiguous();
    }
    let out = super::with_f32(x, "swap-middle-dims", |x| {
        let len = x.len();
        // One (i0, i2) slice of the output: d1 rows of d3 values.
        let copy_slice = |(slice, dst): (usize, &mut [MaybeUninit<f32>])| {
            let (i0, i2) = (slice / d2, slice % d2);
            for (i1, row) in dst.chunks_mut(d3).enumerate() {
                let src = &x[((i0 * d1 + i1) * d2 + i2) * d3..][..d3];
                for (d, &v) in row.iter_mut().zip(src) {
                    d.write(v);
                }
            }
        };
        let block = (d1 * d3).max(1);
        let mut out = Vec::with_capacity(len);
        let dst = &mut out.spare_capacity_mut()[..len];
        if len < PARALLEL_FROM {
            dst.chunks_mut(block).enumerate().for_each(copy_slice);
        } else {
            dst.par_chunks_mut(block).enumerate().for_each(copy_slice);
        }
        // SAFETY: the capacity is at least `len`, and the d0 · d2 slices of d1 · d3
        // values cover the first `len` of it, each written above.
        unsafe { out.set_len(len) };
        Ok(out)
    })?;
    Tensor::from_vec(out, (d0, d2, d1, d3), x.device())
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
    fn swapping_the_middle_dims_matches_candles_transpose() -> Result<()> {
        // Small and large (the parallel copy), a size-1 middle dim (candle's), empty.
        for dims in [
            (2, 5, 3, 4),
            (2, 64, 8, 64),
            (1, 1, 7, 2),
            (3, 4, 1, 1),
            (2, 0, 3, 4),
        ] {
            let x = Tensor::randn(0f32, 1.0, dims, &Device::Cpu)?;
            let ours = swap_middle_dims(&x)?;
            let candle = x.transpose(1, 2)?.contiguous()?;
            assert_eq!(ours.dims(), candle.dims());
            let flat = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
            assert_eq!(flat(&ours)?, flat(&candle)?);
        }
        let var = candle_core::Var::ones((1, 2, 3, 1), candle_core::DType::F32, &Device::Cpu)?;
        assert!(swap_middle_dims(var.as_tensor())?.track_op());
        Ok(())
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
        // A tracked input keeps its gradient: candle's add.
        let var = candle_core::Var::ones(3, candle_core::DType::F32, &Device::Cpu)?;
        let sum = add(var.as_tensor(), var.as_tensor())?;
        assert!(sum.track_op());
        let grads = sum.sum_all()?.backward()?;
        let grad = grads.get(var.as_tensor()).map(|g| g.to_vec1::<f32>());
        assert_eq!(grad.transpose()?, Some(vec![2.0; 3]));
        // A broadcast or another dtype falls back to candle's add.
        let a = Tensor::ones((2, 3), candle_core::DType::F64, &Device::Cpu)?;
        assert_eq!(add(&a, &a)?.to_vec2::<f64>()?, vec![vec![2.0; 3]; 2]);
        Ok(())
    }
}
