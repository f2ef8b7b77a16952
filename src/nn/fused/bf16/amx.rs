//! The AMX kernel (`tdpbf16ps`, Intel Sapphire Rapids and later): 2 × 2 tiles of 16 × 16
//! f32 sums at a time, fed by 16-row A tiles and the packed panels as B tiles.
//!
//! There are no stable intrinsics for AMX in Rust yet, so the kernel is a few lines of
//! inline assembly; it runs only where [`detect`] says the CPU has AMX and the kernel
//! has granted this process the tile state.

use super::{Block, Out, PackedRhs, BLOCK_M, BLOCK_N, TILE_K, TILE_M, TILE_N};
use std::arch::asm;

/// Whether this CPU has AMX with bf16 and Linux lets this process use the tiles.
#[cfg(target_os = "linux")]
pub(super) fn detect() -> bool {
    // CPUID leaf 7: EDX bit 22 is AMX-BF16, bit 24 AMX-TILE.
    let edx = std::arch::x86_64::__cpuid_count(7, 0).edx;
    if edx & (1 << 22) == 0 || edx & (1 << 24) == 0 {
        return false;
    }
    // Linux hands out the 8 KiB tile state only on request (arch_prctl, once per process).
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: a plain system call with integer arguments.
    unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        ) == 0
    }
}

#[cfg(not(target_os = "linux"))]
pub(super) fn detect() -> bool {
    false
}

/// The tile shapes: palette 1, tiles 0–7 all 16 rows × 64 bytes (0–3 hold C, 4–5 A,
/// 6–7 B).
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    fn new() -> Self {
        let mut bytes = [0u8; 64];
        bytes[0] = 1;
        for tile in 0..8 {
            bytes[16 + 2 * tile] = 64; // bytes per row (u16, little-endian)
            bytes[48 + tile] = TILE_M as u8; // rows
        }
        Self(bytes)
    }
}

/// Computes the rows of `block` of `block.a · rhs` into `out`.
///
/// # Safety
/// [`detect`] must have returned true; `out` must be valid for reads and writes of the
/// block's rows, n values each, and no other thread may touch those in its column blocks.
pub(super) unsafe fn block_rows(block: &Block, rhs: &PackedRhs, out: Out) {
    let (dst, n) = (out.ptr, out.n);
    let (first, count, lines_per_row) = (block.first, block.count, block.lines_per_row);
    let a = block.a;
    let config = TileConfig::new();
    asm!("ldtilecfg [{}]", in(reg) config.0.as_ptr(), options(nostack, readonly));
    let a_top = a.as_ptr();
    let a_bottom = a[TILE_M * lines_per_row..].as_ptr();
    let a_stride = lines_per_row * 64;
    let k_steps = rhs.k_pad / TILE_K;
    let mut spill = [0f32; BLOCK_M * BLOCK_N];
    for col_block in block.col_blocks.clone() {
        let left = rhs.panel(2 * col_block).as_ptr();
        let right = rhs.panel(2 * col_block + 1).as_ptr();
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            options(nostack, nomem)
        );
        // One A tile's rows or fewer (decoding 8 prompts): the bottom tile holds zeros,
        // and skipping its two products made the output head's (8 × 49,152) product
        // ~25% faster (`recover bench products --rows 8`: 250–311 → 357–377 GFLOP/s,
        // about the memory's speed for the weight it streams).
        if count <= TILE_M {
            for step in 0..k_steps {
                asm!(
                    "tileloadd tmm4, [{a0} + {sa}*1]",
                    "tileloadd tmm6, [{b0} + {sb}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tileloadd tmm7, [{b1} + {sb}*1]",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    a0 = in(reg) a_top.add(step),
                    b0 = in(reg) left.add(step * LINES_PER_K_STEP),
                    b1 = in(reg) right.add(step * LINES_PER_K_STEP),
                    sa = in(reg) a_stride,
                    sb = in(reg) 64usize,
                    options(nostack, readonly)
                );
            }
        } else {
            for step in 0..k_steps {
                // A tile: 16 rows × 32 k-values (one line of each row); B tile: the next
                // 16 lines of a panel (32 k-values × 16 columns). Loads interleaved with
                // the products measured faster than all four loads first.
                asm!(
                    "tileloadd tmm4, [{a0} + {sa}*1]",
                    "tileloadd tmm6, [{b0} + {sb}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tileloadd tmm7, [{b1} + {sb}*1]",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tileloadd tmm5, [{a1} + {sa}*1]",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    a0 = in(reg) a_top.add(step),
                    a1 = in(reg) a_bottom.add(step),
                    b0 = in(reg) left.add(step * LINES_PER_K_STEP),
                    b1 = in(reg) right.add(step * LINES_PER_K_STEP),
                    sa = in(reg) a_stride,
                    sb = in(reg) 64usize,
                    options(nostack, readonly)
                );
            }
        }
        let cols = BLOCK_N.min(n - col_block * BLOCK_N);
        let first_col = col_block * BLOCK_N;
        // Full blocks that are stored go straight to `dst`; edge blocks and sums to add
        // go through `spill`.
        let direct = count == BLOCK_M && cols == BLOCK_N && out.add_scaled.is_none();
        let (base, stride) = if direct {
            (dst.add(first * n + first_col), n * 4)
        } else {
            (spill.as_mut_ptr(), BLOCK_N * 4)
        };
        let row_step = stride / 4 * TILE_M;
        asm!(
            "tilestored [{c0} + {sc}*1], tmm0",
            "tilestored [{c1} + {sc}*1], tmm1",
            "tilestored [{c2} + {sc}*1], tmm2",
            "tilestored [{c3} + {sc}*1], tmm3",
            c0 = in(reg) base,
            c1 = in(reg) base.add(TILE_N),
            c2 = in(reg) base.add(row_step),
            c3 = in(reg) base.add(row_step + TILE_N),
            sc = in(reg) stride,
            options(nostack)
        );
        if !direct {
            for r in 0..count {
                let sums = &spill[r * BLOCK_N..r * BLOCK_N + cols];
                let row =
                    std::slice::from_raw_parts_mut(dst.add((first + r) * n + first_col), cols);
                match out.add_scaled {
                    None => row.copy_from_slice(sums),
                    Some(scale) => row.iter_mut().zip(sums).for_each(|(d, s)| *d += scale * s),
                }
            }
        }
    }
    asm!("tilerelease", options(nostack, nomem));
}

/// Lines of a panel per k-step: 32 k-values are 16 lines of pairs.
const LINES_PER_K_STEP: usize = TILE_K / 2;

/// Multiply-adds (× 2 for FLOP) of one [`peak_loop`] iteration: four 16 × 16 × 32 tile
/// products.
pub(super) const PEAK_FLOP_PER_ITER: u64 = 4 * (TILE_M * TILE_N * TILE_K) as u64 * 2;

/// `iters` × four independent `tdpbf16ps` on tiles that stay in place: no loads, no
/// stores, so the time is the tile unit's throughput alone — the ceiling the kernel's
/// products are measured against (`recover bench products`).
///
/// # Safety
/// [`detect`] must have returned true.
pub(super) unsafe fn peak_loop(iters: u64) {
    let config = TileConfig::new();
    asm!("ldtilecfg [{}]", in(reg) config.0.as_ptr(), options(nostack, readonly));
    asm!(
        "tilezero tmm0",
        "tilezero tmm1",
        "tilezero tmm2",
        "tilezero tmm3",
        "tilezero tmm4",
        "tilezero tmm5",
        "tilezero tmm6",
        "tilezero tmm7",
        options(nostack, nomem)
    );
    for _ in 0..iters {
        asm!(
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            options(nostack, nomem)
        );
    }
    asm!("tilerelease", options(nostack, nomem));
}
