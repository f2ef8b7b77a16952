//! The AVX512-BF16 kernel (`vdpbf16ps`): for CPUs with bf16 dot products in the vector
//! unit but no AMX tiles (AMD Zen 4 and later; Intel Cooper Lake).
//!
//! `vdpbf16ps acc, a, b` adds to each of 16 f32 lanes `a[2i]·b[2i] + a[2i+1]·b[2i+1]`. A
//! line of a packed panel is exactly such a `b`: the (k, k+1) pairs of 16 columns. With
//! the left operand's pair (A[i][k], A[i][k+1]) broadcast to every lane, one instruction
//! adds two steps of k to 16 sums of row i: the panels serve both this kernel and the AMX
//! tiles without repacking. Per pair of k, the micro-kernel loads two panel lines (32
//! columns) and does [`ROWS`] × 2 products into as many accumulators (16 of the 32
//! registers), enough independent chains to cover the instruction's latency.

use super::{Block, Out, PackedRhs, BLOCK_N, TILE_N};
use std::arch::x86_64::*;

/// Rows of the micro-kernel: [`super::BLOCK_M`] is four of them.
const ROWS: usize = 8;

/// Whether this CPU has AVX512-BF16 (and the AVX-512 foundation it extends).
pub(super) fn detect() -> bool {
    is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16")
}

/// Computes the rows of `block` of `block.a · rhs` into `out`.
///
/// # Safety
/// [`detect`] must have returned true; `out` must be valid for reads and writes of the
/// block's rows, n values each, and no other thread may touch those in its column blocks.
#[target_feature(enable = "avx512f,avx512bf16")]
pub(super) unsafe fn block_rows(block: &Block, rhs: &PackedRhs, out: Out) {
    let (dst, n) = (out.ptr, out.n);
    let (first, count) = (block.first, block.count);
    // A row's values as (k, k+1) pairs: 16 per line.
    let pairs_per_row = block.lines_per_row * TILE_N;
    let a_pairs = block.a.as_ptr().cast::<u32>();
    // Pairs past k are zeros on both sides; stop at the last one that holds a value.
    let pairs = rhs.k.div_ceil(2);
    for col_block in block.col_blocks.clone() {
        let left = rhs.panel(2 * col_block).as_ptr().cast::<__m512bh>();
        let right = rhs.panel(2 * col_block + 1).as_ptr().cast::<__m512bh>();
        let first_col = col_block * BLOCK_N;
        let cols = BLOCK_N.min(n - first_col);
        // Masks of the columns to store in each half (all 16 but at the right edge).
        let mask_left: __mmask16 = low_bits(cols.min(TILE_N));
        let mask_right: __mmask16 = low_bits(cols.saturating_sub(TILE_N));
        for top in (0..count).step_by(ROWS) {
            let mut acc = [[_mm512_setzero_ps(); 2]; ROWS];
            let rows = a_pairs.add(top * pairs_per_row);
            for p in 0..pairs {
                let b0 = *left.add(p);
                let b1 = *right.add(p);
                for (r, sums) in acc.iter_mut().enumerate() {
                    // Rows past `count` are zero padding in `a`: read, never stored.
                    let pair = *rows.add(r * pairs_per_row + p);
                    let a: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair as i32));
                    sums[0] = _mm512_dpbf16_ps(sums[0], a, b0);
                    sums[1] = _mm512_dpbf16_ps(sums[1], a, b1);
                }
            }
            for (r, sums) in acc.iter().enumerate().take(count - top) {
                let row = dst.add((first + top + r) * n + first_col);
                // At the right edge the mask may be empty: no lane is touched.
                let halves = [(row, mask_left), (row.wrapping_add(TILE_N), mask_right)];
                for (&(ptr, mask), &sum) in halves.iter().zip(sums) {
                    let value = match out.add_scaled {
                        None => sum,
                        Some(scale) => _mm512_fmadd_ps(
                            sum,
                            _mm512_set1_ps(scale),
                            _mm512_maskz_loadu_ps(mask, ptr),
                        ),
                    };
                    _mm512_mask_storeu_ps(ptr, mask, value);
                }
            }
        }
    }
}

/// The mask of the lowest `count` (≤ 16) lanes.
fn low_bits(count: usize) -> __mmask16 {
    ((1u32 << count) - 1) as __mmask16
}

/// Accumulators of [`peak_loop`]: more independent chains than the instruction's latency
/// × throughput (about 6 cycles × 2 per cycle on Zen 5, fewer on Intel) needs.
const PEAK_CHAINS: usize = 16;

/// FLOP of one [`peak_loop`] iteration: [`PEAK_CHAINS`] `vdpbf16ps`, each 16 lanes × 2
/// products, multiply and add.
pub(super) const PEAK_FLOP_PER_ITER: u64 = PEAK_CHAINS as u64 * 16 * 2 * 2;

/// `iters` × [`PEAK_CHAINS`] independent `vdpbf16ps` on registers: no memory traffic, the
/// ceiling the kernel's products are measured against (`recover bench products`).
///
/// # Safety
/// [`detect`] must have returned true.
#[target_feature(enable = "avx512f,avx512bf16")]
pub(super) unsafe fn peak_loop(iters: u64) {
    let a: __m512bh = std::mem::transmute(_mm512_set1_epi32(0x3f80_3f80));
    let b: __m512bh = std::mem::transmute(_mm512_set1_epi32(0x3c00_3c00));
    let mut acc = [_mm512_setzero_ps(); PEAK_CHAINS];
    for _ in 0..iters {
        for sum in acc.iter_mut() {
            *sum = _mm512_dpbf16_ps(*sum, a, b);
        }
    }
    std::hint::black_box(acc);
}
