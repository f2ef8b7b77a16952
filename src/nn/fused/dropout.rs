//! Inverted dropout whose mask is a pure function of (seed, element index): a
//! counter-based hash (two rounds of a 32-bit mix) instead of a sequential generator, so
//! the mask is drawn in parallel and in SIMD lanes, never stored, and recomputed in the
//! backward pass (`dx = dy · mask`).

use super::math::hash32;
use super::{cpu_f32, with_f32};
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use multiversion::multiversion;
use rayon::prelude::*;

const CHUNK: usize = 16 * 1024;

/// Which elements survive and by how much they are scaled.
#[derive(Clone, Copy, Debug)]
pub struct DropoutMask {
    /// Two halves of the mixed seed: one before, one between the two hash rounds.
    seeds: (u32, u32),
    /// An element is kept when its hash is below this.
    threshold: u32,
    /// 1 / (1 − p)
    scale: f32,
}

impl DropoutMask {
    /// Drop rate `p` in [0, 1).
    pub fn new(seed: u64, p: f64) -> Self {
        let keep = 1.0 - p;
        let mixed = splitmix64(seed);
        Self {
            seeds: (mixed as u32, (mixed >> 32) as u32),
            threshold: (keep * 4_294_967_296.0).min(u32::MAX as f64) as u32,
            scale: (1.0 / keep) as f32,
        }
    }

    /// The factor for element `i`: `scale` or 0.
    #[inline(always)]
    pub fn value(&self, i: usize) -> f32 {
        let h = hash32(hash32(i as u32 ^ self.seeds.0).wrapping_add(self.seeds.1));
        if h < self.threshold {
            self.scale
        } else {
            0.0
        }
    }

    /// The mask as values, for devices without the fused kernel.
    pub fn values(&self, len: usize) -> Vec<f32> {
        (0..len).map(|i| self.value(i)).collect()
    }

    /// `src · mask`, in parallel.
    pub fn apply(&self, src: &[f32]) -> Vec<f32> {
        let mut dst = vec![0f32; src.len()];
        dst.par_chunks_mut(CHUNK)
            .zip(src.par_chunks(CHUNK))
            .enumerate()
            .for_each(|(c, (dst, src))| masked(self, c * CHUNK, src, dst, false));
        dst
    }

    /// `dst += src · mask`, in parallel.
    pub fn apply_add(&self, src: &[f32], dst: &mut [f32]) {
        dst.par_chunks_mut(CHUNK)
            .zip(src.par_chunks(CHUNK))
            .enumerate()
            .for_each(|(c, (dst, src))| masked(self, c * CHUNK, src, dst, true));
    }
}

/// `dst (+)= src · mask(offset + j)` over one chunk.
#[multiversion(targets = "simd")]
fn masked(mask: &DropoutMask, offset: usize, src: &[f32], dst: &mut [f32], accumulate: bool) {
    if accumulate {
        for (j, (d, s)) in dst.iter_mut().zip(src).enumerate() {
            *d += s * mask.value(offset + j);
        }
    } else {
        for (j, (d, s)) in dst.iter_mut().zip(src).enumerate() {
            *d = s * mask.value(offset + j);
        }
    }
}

/// SplitMix64's output function, to spread a 64-bit seed over both 32-bit halves.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `x · mask` for `x` f32 on the CPU.
pub fn dropout(x: &Tensor, mask: DropoutMask) -> Result<Tensor> {
    x.contiguous()?.apply_op1(DropoutOp(mask))
}

struct DropoutOp(DropoutMask);

impl CustomOp1 for DropoutOp {
    fn name(&self) -> &'static str {
        "fused-dropout"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = cpu_f32(storage, layout, self.name())?;
        Ok((CpuStorage::F32(self.0.apply(x)), layout.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad_y: &Tensor) -> Result<Option<Tensor>> {
        let dx = with_f32(grad_y, self.name(), |dy| Ok(self.0.apply(dy)))?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_expected_fraction_and_scales_survivors() {
        let mask = DropoutMask::new(42, 0.25);
        let n = 200_000;
        let kept = (0..n).filter(|&i| mask.value(i) != 0.0).count();
        // Binomial(200k, 0.75): sd ≈ 194, so ±1,000 is > 5 sd.
        assert!((kept as i64 - 150_000).abs() < 1_000, "kept {kept}");
        assert!((0..100).all(|i| [0.0, 1.0 / 0.75].contains(&mask.value(i))));
        assert_ne!(mask.values(64), DropoutMask::new(43, 0.25).values(64));
    }
}
