//! `x Wᵀ` for a few rows (decoding: one new token per prompt) as dot products over the
//! weight's contiguous rows, instead of gemm, which packs the weight — read through a
//! column stride — on every call.
//!
//! Decoding is bound by reading the weights: SmolLM2-135M's are 537 MB in f32, read once per
//! step for all the rows of a batch. The AVX-512 kernel takes two weight rows and up to 8
//! input rows at a time, so each weight chunk is loaded once per step and each input chunk
//! once per pair of weight rows; elsewhere a portable loop takes one weight row at a time.

use multiversion::multiversion;
use rayon::prelude::*;

/// Up to this many rows, [`super::frozen_product_t`] takes dot products instead of gemm: decoding
/// multiplies one new token per prompt (8 rows at the eval's batch size), and there gemm
/// packs the weight — read through a column stride — on every call, which costs several
/// times the product (8 × 512 × 512: 335 µs against 44 µs for the same product from a
/// contiguous Wᵀ; `perf` of `bench generate`: 60% of decoding in gemm's packing).
pub(super) const FEW_ROWS: usize = 16;

/// `x Wᵀ` for a few rows: every output is the dot product of an input row and a weight row,
/// both contiguous; the weight is read once, the rows stay in cache. Parallel over blocks
/// of weight rows.
pub(super) fn product_t(
    x: &[f32],
    rows: usize,
    w: &[f32],
    (out_dim, in_dim): (usize, usize),
) -> Vec<f32> {
    const BLOCK: usize = 64;
    // Transposed while computed, (out, rows): each task owns whole weight rows.
    let mut y_t = vec![0f32; out_dim * rows];
    y_t.par_chunks_mut(BLOCK * rows)
        .zip(w.par_chunks(BLOCK * in_dim))
        .for_each(|(y_block, w_block)| dot_rows(x, rows, w_block, in_dim, y_block));
    let mut y = vec![0f32; rows * out_dim];
    for (o, values) in y_t.chunks_exact(rows).enumerate() {
        for (i, &v) in values.iter().enumerate() {
            y[i * out_dim + o] = v;
        }
    }
    y
}

/// `y_t[o·rows + i] = x_i · w_o` for the weight rows `w_o` of `w_block`: the AVX-512
/// kernel where the CPU has it, else the portable loop.
fn dot_rows(x: &[f32], rows: usize, w_block: &[f32], in_dim: usize, y_t: &mut [f32]) {
    assert!(x.len() >= rows * in_dim && y_t.len() * in_dim >= w_block.len() * rows);
    #[cfg(target_arch = "x86_64")]
    if avx512::detect() {
        // SAFETY: the CPU has AVX-512F; the assert above bounds every read and write.
        unsafe { avx512::dot_rows(x, rows, w_block, in_dim, y_t) };
        return;
    }
    dot_rows_portable(x, rows, w_block, in_dim, y_t)
}

/// The portable form: up to 8 input rows at a time share each 16-value chunk of a weight
/// row (8 independent sums in flight, the chunk loaded once), then each sum is reduced
/// across its 16 lanes.
#[multiversion(targets = "simd")]
fn dot_rows_portable(x: &[f32], rows: usize, w_block: &[f32], in_dim: usize, y_t: &mut [f32]) {
    const GROUP: usize = 8;
    const LANES: usize = 16;
    let chunks = in_dim / LANES;
    for (w_row, outs) in w_block.chunks_exact(in_dim).zip(y_t.chunks_exact_mut(rows)) {
        for first in (0..rows).step_by(GROUP) {
            let group = GROUP.min(rows - first);
            let mut acc = [[0f32; LANES]; GROUP];
            for c in 0..chunks {
                let w = &w_row[c * LANES..(c + 1) * LANES];
                for (r, sums) in acc.iter_mut().enumerate().take(group) {
                    let xs = &x[(first + r) * in_dim + c * LANES..][..LANES];
                    for ((s, &a), &b) in sums.iter_mut().zip(xs).zip(w) {
                        *s += a * b;
                    }
                }
            }
            for (r, sums) in acc.iter().enumerate().take(group) {
                let row = &x[(first + r) * in_dim..(first + r + 1) * in_dim];
                let tail: f32 = (chunks * LANES..in_dim).map(|p| row[p] * w_row[p]).sum();
                outs[first + r] = sums.iter().sum::<f32>() + tail;
            }
        }
    }
}

/// Two weight rows and up to 8 input rows at a time: per 16-value chunk, 2 weight loads and
/// 8 input loads feed 16 FMAs into 16 accumulators (of the 32 registers). The portable
/// loop's one weight row at a time is 9 loads per 8 FMAs, and its sums, indexed by a
/// runtime row count, live on the stack (`perf annotate`: a store per FMA).
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    pub(super) fn detect() -> bool {
        is_x86_feature_detected!("avx512f")
    }

    /// # Safety
    /// [`detect`] must have returned true; `x` holds `rows × in_dim` values, `w_block`
    /// whole rows of `in_dim`, `y_t` `rows` values per weight row.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn dot_rows(
        x: &[f32],
        rows: usize,
        w_block: &[f32],
        in_dim: usize,
        y_t: &mut [f32],
    ) {
        let n_out = w_block.len() / in_dim;
        for o in (0..n_out).step_by(2) {
            // The last pass may hold one weight row: it then stands in for the second.
            let pair = 2.min(n_out - o);
            let w0 = w_block[o * in_dim..].as_ptr();
            let w1 = w_block[(o + pair - 1) * in_dim..].as_ptr();
            let mut first = 0;
            while first < rows {
                // A constant group size per call keeps the sums in registers.
                let xg = x[first * in_dim..].as_ptr();
                let mut dots = [[0f32; 8]; 2];
                let group = match rows - first {
                    8.. => pair_dots::<8>(xg, in_dim, w0, w1, &mut dots),
                    4..=7 => pair_dots::<4>(xg, in_dim, w0, w1, &mut dots),
                    2..=3 => pair_dots::<2>(xg, in_dim, w0, w1, &mut dots),
                    _ => pair_dots::<1>(xg, in_dim, w0, w1, &mut dots),
                };
                for (p, row_dots) in dots.iter().enumerate().take(pair) {
                    let outs = &mut y_t[(o + p) * rows + first..][..group];
                    outs.copy_from_slice(&row_dots[..group]);
                }
                first += group;
            }
        }
    }

    /// The dot products of `G` input rows from `x` (stride `in_dim`) with the weight rows
    /// at `w0` and `w1` into `dots[weight row][input row]`; returns `G`. The `in_dim % 16`
    /// tail is one masked load of each.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn pair_dots<const G: usize>(
        x: *const f32,
        in_dim: usize,
        w0: *const f32,
        w1: *const f32,
        dots: &mut [[f32; 8]; 2],
    ) -> usize {
        let mut acc0 = [_mm512_setzero_ps(); G];
        let mut acc1 = [_mm512_setzero_ps(); G];
        let mut add_chunk = |offset: usize, mask: __mmask16| {
            let a = _mm512_maskz_loadu_ps(mask, w0.add(offset));
            let b = _mm512_maskz_loadu_ps(mask, w1.add(offset));
            for r in 0..G {
                let v = _mm512_maskz_loadu_ps(mask, x.add(r * in_dim + offset));
                acc0[r] = _mm512_fmadd_ps(v, a, acc0[r]);
                acc1[r] = _mm512_fmadd_ps(v, b, acc1[r]);
            }
        };
        let chunks = in_dim / 16;
        for c in 0..chunks {
            add_chunk(c * 16, !0);
        }
        let tail = in_dim % 16;
        if tail > 0 {
            add_chunk(chunks * 16, ((1u32 << tail) - 1) as __mmask16);
        }
        for r in 0..G {
            dots[0][r] = _mm512_reduce_add_ps(acc0[r]);
            dots[1][r] = _mm512_reduce_add_ps(acc1[r]);
        }
        G
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The dispatched kernel (AVX-512 where the CPU has it) against the portable loop:
    /// the same products, the AVX-512 one fused (FMA) and reduced in another order, so
    /// 1e-5 relative to the largest |value|; every group size and both tails.
    #[test]
    fn dispatched_kernel_matches_portable_loop() {
        for (rows, out_dim, in_dim) in [(8, 7, 48), (15, 5, 37), (3, 1, 5), (16, 4, 576)] {
            let x: Vec<f32> = (0..rows * in_dim)
                .map(|i| (i as f32 * 0.37).sin())
                .collect();
            let w: Vec<f32> = (0..out_dim * in_dim)
                .map(|i| (i as f32 * 0.11).cos())
                .collect();
            let mut got = vec![0f32; out_dim * rows];
            let mut want = vec![0f32; out_dim * rows];
            dot_rows(&x, rows, &w, in_dim, &mut got);
            dot_rows_portable(&x, rows, &w, in_dim, &mut want);
            let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
            for (i, (g, v)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - v).abs() <= 1e-5 * scale,
                    "{rows}×{out_dim}×{in_dim} [{i}]: {g} vs {v}"
                );
            }
        }
    }
}
