//! Products with bf16 inputs and f32 sums on Intel AMX (`tdpbf16ps`), for the frozen
//! weights of fine-tuning when `matmul_precision: bf16` is chosen.
//!
//! The weight is packed once, in the layout the instruction reads (pairs of rows of the
//! right operand interleaved: "VNNI"), and each call rounds the left operand to bf16 on the
//! way into the tiles. What the products compute is exactly the f32 product of the two
//! operands rounded to bf16 (each bf16 × bf16 product is exact in f32), summed in another
//! order: the tests compute that through the f32 gemm and hold the kernel to it.
//!
//! There are no stable intrinsics for AMX in Rust yet, so the kernel is a few lines of
//! inline assembly; it runs only where [`available`] says the CPU has AMX and the kernel
//! has granted this process the tile state.

use super::Mat;
use multiversion::multiversion;
use rayon::prelude::*;
use std::sync::OnceLock;

/// Rows of a C or A tile.
const TILE_M: usize = 16;
/// f32 columns of a C tile (a B tile holds 16 columns × 32 k-values as 16 rows of pairs).
const TILE_N: usize = 16;
/// bf16 values along k in one row of an A tile (64 bytes).
const TILE_K: usize = 32;
/// The kernel computes 2 × 2 C tiles at a time: two A tiles and two B tiles feed four
/// products, the most the 8 tile registers allow.
const BLOCK_M: usize = 2 * TILE_M;
const BLOCK_N: usize = 2 * TILE_N;

/// 64 bytes: one row of a tile, aligned as the loads want it (unaligned tile rows
/// measured 30% slower).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u16; TILE_K]);

const ZERO_LINE: Line = Line([0; TILE_K]);

/// Whether this CPU has AMX with bf16 and the kernel lets this process use it (checked
/// once).
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(detect)
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn detect() -> bool {
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

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn detect() -> bool {
    false
}

/// f32 → bf16 bits, rounding to nearest even (the rounding of `vcvtneps2bf16` and of
/// PyTorch's casts); NaN stays a quiet NaN.
#[inline(always)]
pub fn to_bf16(v: f32) -> u16 {
    let bits = v.to_bits();
    let rounded = ((bits + 0x7fff + ((bits >> 16) & 1)) >> 16) as u16;
    if v.is_nan() {
        ((bits >> 16) as u16) | 0x40
    } else {
        rounded
    }
}

/// `v` rounded to bf16, as f32.
pub fn round_to_bf16(v: f32) -> f32 {
    f32::from_bits((to_bf16(v) as u32) << 16)
}

#[multiversion(targets = "simd")]
fn convert_row(src: &[f32], dst: &mut [u16]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = to_bf16(s);
    }
}

/// The right operand (k × n) of a product, rounded to bf16 and packed for the tiles:
/// panels of 16 columns, each `k/2` rows of 16 (k, k+1) pairs, k padded to 32 and n to
/// 32 with zeros.
pub struct PackedRhs {
    k: usize,
    n: usize,
    /// k rounded up to [`TILE_K`].
    k_pad: usize,
    /// `n_pad / 16` panels of `k_pad / 2` lines each.
    panels: Vec<Line>,
}

impl std::fmt::Debug for PackedRhs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedRhs(bf16, {} × {})", self.k, self.n)
    }
}

impl PackedRhs {
    /// Packs `rhs` (k × n).
    pub(super) fn pack(rhs: Mat, k: usize, n: usize) -> Self {
        assert!(rhs.data.len() >= rhs.extent(k, n), "amx: rhs too small");
        let k_pad = k.div_ceil(TILE_K) * TILE_K;
        let n_pad = n.div_ceil(BLOCK_N) * BLOCK_N;
        let panel_lines = k_pad / 2;
        let mut panels = vec![ZERO_LINE; n_pad / TILE_N * panel_lines];
        panels
            .par_chunks_mut(panel_lines)
            .enumerate()
            .for_each(|(panel, lines)| {
                let cols = (panel * TILE_N)..n.min((panel + 1) * TILE_N);
                for (pair, line) in lines.iter_mut().enumerate() {
                    for p in (2 * pair)..k.min(2 * pair + 2) {
                        for (j, col) in cols.clone().enumerate() {
                            let v = rhs.data[p * rhs.row_stride + col * rhs.col_stride];
                            line.0[2 * j + p % 2] = to_bf16(v);
                        }
                    }
                }
            });
        Self {
            k,
            n,
            k_pad,
            panels,
        }
    }

    /// The right operand of `x Wᵀ` for a weight `w` (n × k, row-major).
    pub fn for_product_t(w: &[f32], n: usize, k: usize) -> Self {
        Self::pack(Mat::transposed(w, k), k, n)
    }

    /// The right operand of `x W` for a weight `w` (k × n, row-major).
    pub fn for_product(w: &[f32], k: usize, n: usize) -> Self {
        Self::pack(Mat::rows(w, n), k, n)
    }

    fn panel(&self, index: usize) -> &[Line] {
        let len = self.k_pad / 2;
        &self.panels[index * len..(index + 1) * len]
    }
}

/// A frozen weight `w` (out × in) packed for both of its products: `x Wᵀ` (forward)
/// and `dY W` (the input's gradient). Together the size of the f32 weight.
#[derive(Debug)]
pub struct PackedWeight {
    pub forward: PackedRhs,
    pub backward: PackedRhs,
}

impl PackedWeight {
    pub fn new(w: &[f32], out_dim: usize, in_dim: usize) -> Self {
        Self {
            forward: PackedRhs::for_product_t(w, out_dim, in_dim),
            backward: PackedRhs::for_product(w, out_dim, in_dim),
        }
    }
}

/// `lhs (m × k, row-major) · rhs` in f32 from bf16-rounded inputs, on every thread of
/// rayon's pool. Needs [`available`].
pub fn product(lhs: &[f32], m: usize, rhs: &PackedRhs) -> Vec<f32> {
    assert!(available(), "amx::product called on a CPU without AMX");
    let (k, n) = (rhs.k, rhs.n);
    assert!(lhs.len() >= m * k, "amx: lhs too small");
    let mut dst = Vec::<f32>::with_capacity(m * n);
    let dst_addr = dst.as_mut_ptr() as usize;
    let lines_per_row = rhs.k_pad / TILE_K;
    (0..m.div_ceil(BLOCK_M)).into_par_iter().for_each(|block| {
        let rows = block * BLOCK_M..m.min((block + 1) * BLOCK_M);
        // This block's rows of lhs in bf16: (32 × k_pad), zero-padded.
        let mut a = vec![ZERO_LINE; BLOCK_M * lines_per_row];
        for (r, i) in rows.clone().enumerate() {
            let line = &mut a[r * lines_per_row..(r + 1) * lines_per_row];
            // SAFETY: `Line` is 32 u16 without padding; the slice covers exactly its lines.
            let dst_row = unsafe {
                std::slice::from_raw_parts_mut(line.as_mut_ptr().cast::<u16>(), rhs.k_pad)
            };
            convert_row(&lhs[i * k..(i + 1) * k], &mut dst_row[..k]);
        }
        // SAFETY: each task writes only the rows of its own block, every one of their n
        // values; the tiles read `a` and `rhs`, whose extents the kernel respects.
        unsafe {
            kernel::block_rows(
                &a,
                lines_per_row,
                rhs,
                (rows.start, rows.len()),
                (dst_addr as *mut f32, n),
            )
        };
    });
    // SAFETY: the blocks above cover rows 0..m, and each writes all n columns of its rows.
    unsafe { dst.set_len(m * n) };
    dst
}

#[cfg(target_arch = "x86_64")]
mod kernel {
    use super::{Line, PackedRhs, BLOCK_M, BLOCK_N, TILE_K, TILE_M, TILE_N};
    use std::arch::asm;

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

    /// Computes rows `first..first + count` (count ≤ 32) of `a · rhs` into `dst`
    /// (row-major, `n` wide). `a` holds those rows in bf16, `lines_per_row` lines each,
    /// padded to 32 rows.
    ///
    /// # Safety
    /// AMX must be [`available`](super::available); `dst` must be valid for writes of rows
    /// `first..first + count`, n values each, and no other thread may write them.
    pub(super) unsafe fn block_rows(
        a: &[Line],
        lines_per_row: usize,
        rhs: &PackedRhs,
        (first, count): (usize, usize),
        (dst, n): (*mut f32, usize),
    ) {
        assert!(count <= BLOCK_M && a.len() >= BLOCK_M * lines_per_row);
        let config = TileConfig::new();
        asm!("ldtilecfg [{}]", in(reg) config.0.as_ptr(), options(nostack, readonly));
        let a_top = a.as_ptr();
        let a_bottom = a[TILE_M * lines_per_row..].as_ptr();
        let a_stride = lines_per_row * 64;
        let k_steps = rhs.k_pad / TILE_K;
        let mut spill = [0f32; BLOCK_M * BLOCK_N];
        for col_block in 0..rhs.n.div_ceil(BLOCK_N) {
            let left = rhs.panel(2 * col_block).as_ptr();
            let right = rhs.panel(2 * col_block + 1).as_ptr();
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack, nomem)
            );
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
            let cols = BLOCK_N.min(n - col_block * BLOCK_N);
            let first_col = col_block * BLOCK_N;
            let full = count == BLOCK_M && cols == BLOCK_N;
            // Full blocks go straight to `dst`; edge blocks through `spill`.
            let (base, stride) = if full {
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
            if !full {
                for r in 0..count {
                    std::ptr::copy_nonoverlapping(
                        spill.as_ptr().add(r * BLOCK_N),
                        dst.add((first + r) * n + first_col),
                        cols,
                    );
                }
            }
        }
        asm!("tilerelease", options(nostack, nomem));
    }

    /// Lines of a panel per k-step: 32 k-values are 16 lines of pairs.
    const LINES_PER_K_STEP: usize = TILE_K / 2;
}

#[cfg(not(target_arch = "x86_64"))]
mod kernel {
    use super::{Line, PackedRhs};

    pub(super) unsafe fn block_rows(
        _: &[Line],
        _: usize,
        _: &PackedRhs,
        _: (usize, usize),
        _: (*mut f32, usize),
    ) {
        unreachable!("AMX is x86-64 only, and `available` says so")
    }
}

#[cfg(test)]
mod tests {
    use super::super::gemm_par_new;
    use super::*;

    /// The f32 product of `lhs` (m × k) and `rhs` (k × n) rounded to bf16: what [`product`]
    /// computes, summed in gemm's order.
    fn reference_product(lhs: &[f32], m: usize, rhs_kn: Mat, k: usize, n: usize) -> Vec<f32> {
        let a: Vec<f32> = lhs[..m * k].iter().map(|&v| round_to_bf16(v)).collect();
        let mut b = vec![0f32; k * n];
        for p in 0..k {
            for j in 0..n {
                b[p * n + j] =
                    round_to_bf16(rhs_kn.data[p * rhs_kn.row_stride + j * rhs_kn.col_stride]);
            }
        }
        gemm_par_new((m, n, k), Mat::rows(&a, k), Mat::rows(&b, n), 1.0)
    }

    fn values(len: usize, seed: f32) -> Vec<f32> {
        (0..len)
            .map(|i| ((i as f32 + seed) * 0.37).sin() * 3.0)
            .collect()
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        // 1 + 2^-8 is halfway between bf16 1.0 and 1 + 2^-7: ties go to the even 1.0.
        assert_eq!(round_to_bf16(1.0 + 2f32.powi(-8)), 1.0);
        assert_eq!(
            round_to_bf16(1.0 + 3.0 * 2f32.powi(-8)),
            1.0 + 2f32.powi(-6)
        );
        assert_eq!(round_to_bf16(-2.5), -2.5);
        assert!(round_to_bf16(f32::NAN).is_nan());
        assert_eq!(round_to_bf16(f32::INFINITY), f32::INFINITY);
        // The largest finite f32 rounds up to infinity, as in PyTorch.
        assert_eq!(round_to_bf16(f32::MAX), f32::INFINITY);
    }

    /// The kernel against the f32 product of the rounded operands. Both sum exact
    /// products in f32 in different orders: the difference is a few ulps of the largest
    /// partial sum, so 1e-5 relative to the largest |value| (k ≤ 100 terms here).
    #[test]
    fn amx_product_matches_the_reference_on_edge_shapes() {
        if !available() {
            crate::require::skip_or_fail("amx", "no AMX on this CPU: the kernel is not exercised");
            return;
        }
        for (m, n, k) in [
            (1, 1, 1),
            (37, 45, 70),
            (64, 64, 64),
            (33, 17, 100),
            (5, 40, 31),
        ] {
            let x = values(m * k, 1.0);
            let w = values(n * k, 2.0); // (n × k): a weight
            let packed = PackedRhs::for_product_t(&w, n, k);
            assert_close(
                &product(&x, m, &packed),
                &reference_product(&x, m, Mat::transposed(&w, k), k, n),
                &format!("{m}×{n}×{k}"),
            );
            // The other orientation: x (m × n) · w (n × k).
            let x2 = values(m * n, 3.0);
            let packed = PackedRhs::for_product(&w, n, k);
            assert_close(
                &product(&x2, m, &packed),
                &reference_product(&x2, m, Mat::rows(&w, k), n, k),
                &format!("{m}×{k}×{n} (W)"),
            );
        }
    }

    fn assert_close(got: &[f32], want: &[f32], label: &str) {
        let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= 1e-5 * scale, "{label} [{i}]: {g} vs {w}");
        }
    }
}
