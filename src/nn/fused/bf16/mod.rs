//! Products with bf16 inputs and f32 sums, for the frozen weights of fine-tuning (and,
//! from rank 32, the adapters' A and B products) when `matmul_precision: bf16` is chosen. Two kernels read the same packed weights:
//!
//! - [`amx`]: Intel AMX tiles (`tdpbf16ps`; Sapphire Rapids and later);
//! - [`avx512`]: AVX512-BF16 (`vdpbf16ps`; AMD Zen 4 and later, Intel Cooper Lake and
//!   Sapphire Rapids), for the CPUs that have bf16 dot products but no tiles.
//!
//! The weight is packed once, in the layout both instructions read (pairs of rows of the
//! right operand interleaved: "VNNI"), and each call rounds the left operand to bf16 on the
//! way in. What the products compute is exactly the f32 product of the two operands
//! rounded to bf16 (each bf16 × bf16 product is exact in f32), summed in another order:
//! the tests compute that through the f32 gemm and hold each kernel to it.

#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "x86_64")]
mod avx512;

use super::Mat;
use multiversion::multiversion;
use rayon::prelude::*;
use std::ops::Range;
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

/// A kernel for bf16 products.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bf16Kernel {
    Amx,
    Avx512,
}

impl Bf16Kernel {
    /// The kernels this CPU runs, fastest first (checked once).
    pub fn available() -> &'static [Bf16Kernel] {
        static AVAILABLE: OnceLock<Vec<Bf16Kernel>> = OnceLock::new();
        AVAILABLE.get_or_init(detect)
    }

    /// The kernel [`product`] uses: the fastest this CPU has.
    pub fn best() -> Option<Bf16Kernel> {
        Self::available().first().copied()
    }
}

impl std::fmt::Display for Bf16Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Bf16Kernel::Amx => "AMX",
            Bf16Kernel::Avx512 => "AVX512-BF16",
        })
    }
}

#[cfg(target_arch = "x86_64")]
fn detect() -> Vec<Bf16Kernel> {
    [
        (Bf16Kernel::Amx, amx::detect()),
        (Bf16Kernel::Avx512, avx512::detect()),
    ]
    .into_iter()
    .filter_map(|(kernel, present)| present.then_some(kernel))
    .collect()
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> Vec<Bf16Kernel> {
    Vec::new()
}

/// Whether this CPU has a kernel for bf16 products.
pub fn available() -> bool {
    Bf16Kernel::best().is_some()
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

/// The lines of one packed panel from a row-major operand whose panel is 16 columns
/// wide, from `col` on: each line two rows' 16 values in bf16, interleaved (`r0[0],
/// r1[0], r0[1], …`), as u32 lanes (r0 low, r1 high) so that the loop vectorises without
/// shuffles. `lines` gets the `k / 2` full pairs; an odd last row is the caller's. What
/// makes packing an activation on every call (a weight gradient's `x` or `dy`) cheap next
/// to its product: element by element it took four times as long as the product.
#[multiversion(targets = "simd")]
fn pack_panel_pairs(data: &[f32], row_stride: usize, col: usize, k: usize, lines: &mut [Line]) {
    for (pair, line) in lines.iter_mut().take(k / 2).enumerate() {
        let r0 = &data[2 * pair * row_stride + col..][..TILE_N];
        let r1 = &data[(2 * pair + 1) * row_stride + col..][..TILE_N];
        // SAFETY: a `Line` is 64 bytes aligned to 64: 16 u32 fit it exactly.
        let words = unsafe { &mut *line.0.as_mut_ptr().cast::<[u32; TILE_N]>() };
        for j in 0..TILE_N {
            let (lo, hi) = (to_bf16(r0[j]) as u32, to_bf16(r1[j]) as u32);
            words[j] = if cfg!(target_endian = "little") {
                lo | hi << 16
            } else {
                hi | lo << 16
            };
        }
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
        assert!(rhs.data.len() >= rhs.extent(k, n), "bf16: rhs too small");
        let k_pad = k.div_ceil(TILE_K) * TILE_K;
        let n_pad = n.div_ceil(BLOCK_N) * BLOCK_N;
        let panel_lines = k_pad / 2;
        let mut panels = vec![ZERO_LINE; n_pad / TILE_N * panel_lines];
        panels
            .par_chunks_mut(panel_lines)
            .enumerate()
            .for_each(|(panel, lines)| {
                let cols = (panel * TILE_N)..n.min((panel + 1) * TILE_N);
                let full = cols.len() == TILE_N;
                let vectorised = full && (rhs.col_stride == 1 || rhs.row_stride == 1);
                if full && rhs.col_stride == 1 {
                    pack_panel_pairs(rhs.data, rhs.row_stride, cols.start, k, lines);
                } else if vectorised {
                    // A transposed operand (an adapter's Aᵀ or Bᵀ, packed on every call;
                    // a frozen weight's Wᵀ, packed once): the panel's 16 columns are 16
                    // rows of the matrix, copied side by side first so that the conversion
                    // runs vectorised (element by element the adapters' took ~2% of a bf16
                    // step at rank 128).
                    let mut panel = vec![0f32; k * TILE_N];
                    for (j, col) in cols.clone().enumerate() {
                        let column = &rhs.data[col * rhs.col_stride..][..k];
                        for (p, &v) in column.iter().enumerate() {
                            panel[p * TILE_N + j] = v;
                        }
                    }
                    pack_panel_pairs(&panel, TILE_N, 0, k, lines);
                }
                for (pair, line) in lines.iter_mut().enumerate() {
                    let p = 2 * pair;
                    if vectorised && p + 1 < k {
                        continue;
                    }
                    for p in p..k.min(p + 2) {
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

/// A frozen weight `w` (out × in) packed for its two products: `x Wᵀ` (forward, packed
/// at once) and `dY W` (the input's gradient, packed on first use). Each is half the size
/// of the f32 weight. Evaluation, decoding and a distillation teacher never take an
/// input gradient: packing it lazily spares them half the packed copies (SmolLM2: 269
/// MB) and half the packing time.
#[derive(Debug)]
pub struct PackedWeight {
    pub forward: PackedRhs,
    backward: OnceLock<PackedRhs>,
    /// (out, in)
    dims: (usize, usize),
}

impl PackedWeight {
    pub fn new(w: &[f32], out_dim: usize, in_dim: usize) -> Self {
        Self {
            forward: PackedRhs::for_product_t(w, out_dim, in_dim),
            backward: OnceLock::new(),
            dims: (out_dim, in_dim),
        }
    }

    /// The layout of `dY W`, packed from `w` — the f32 weight [`PackedWeight::new`] was
    /// given — on the first call.
    pub fn backward(&self, w: &[f32]) -> &PackedRhs {
        let (out_dim, in_dim) = self.dims;
        assert_eq!(
            w.len(),
            out_dim * in_dim,
            "PackedWeight::backward: another weight"
        );
        self.backward
            .get_or_init(|| PackedRhs::for_product(w, out_dim, in_dim))
    }

    /// Whether the input gradient's layout has been packed.
    pub fn has_backward(&self) -> bool {
        self.backward.get().is_some()
    }
}

/// `lhs (m × k, row-major) · rhs` in f32 from bf16-rounded inputs, on every thread of
/// rayon's pool, with the fastest kernel this CPU has. Needs [`available`].
pub fn product(lhs: &[f32], m: usize, rhs: &PackedRhs) -> Vec<f32> {
    product_with(best_kernel(), lhs, m, rhs)
}

/// `dst (m × n) += scale · lhs · rhs`: [`product`] added into `dst` as the kernel stores
/// its sums (no second pass over `dst`).
pub fn product_add(lhs: &[f32], m: usize, rhs: &PackedRhs, dst: &mut [f32], scale: f32) {
    product_add_with(best_kernel(), lhs, m, rhs, dst, scale)
}

fn best_kernel() -> Bf16Kernel {
    Bf16Kernel::best().expect("bf16 products called on a CPU without a bf16 kernel")
}

/// Runs `kernel`'s instruction `iters` times over (a fixed number of independent chains
/// per iteration) on operands held in registers or tiles, on the calling thread, and
/// returns the FLOP done: the time it takes is the kernel's ceiling on this CPU (`recover
/// bench products`). `kernel` must be one of [`Bf16Kernel::available`].
pub fn peak_loop(kernel: Bf16Kernel, iters: u64) -> u64 {
    assert!(
        Bf16Kernel::available().contains(&kernel),
        "bf16: {kernel} is not available on this CPU"
    );
    // SAFETY: `available` says the CPU has the kernel's instructions (and, for AMX, the
    // tile state).
    #[cfg(target_arch = "x86_64")]
    unsafe {
        match kernel {
            Bf16Kernel::Amx => {
                amx::peak_loop(iters);
                iters * amx::PEAK_FLOP_PER_ITER
            }
            Bf16Kernel::Avx512 => {
                avx512::peak_loop(iters);
                iters * avx512::PEAK_FLOP_PER_ITER
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("no bf16 kernel off x86_64")
}

/// [`product`] with a given kernel, which must be one of [`Bf16Kernel::available`].
pub fn product_with(kernel: Bf16Kernel, lhs: &[f32], m: usize, rhs: &PackedRhs) -> Vec<f32> {
    product_new(kernel, Mat::rows(lhs, rhs.k), m, rhs)
}

/// `lhs (m × k) · rhs` into a new (m × n) vector.
fn product_new(kernel: Bf16Kernel, lhs: Mat, m: usize, rhs: &PackedRhs) -> Vec<f32> {
    let mut dst = Vec::<f32>::with_capacity(m * rhs.n);
    let out = Out {
        ptr: dst.as_mut_ptr(),
        n: rhs.n,
        add_scaled: None,
    };
    run(kernel, lhs, m, rhs, out);
    // SAFETY: `run` stored every one of the m × n values.
    unsafe { dst.set_len(m * rhs.n) };
    dst
}

/// `lhs (m × k) · rhs` for each of `rhs` (all k deep), in one parallel pass
/// ([`run_shared`]): the products of a layer's q, k and v (or gate and up), which read
/// the same input. Each result equals [`product`]'s, bit for bit.
pub fn products_shared(lhs: &[f32], m: usize, rhs: &[&PackedRhs]) -> Vec<Vec<f32>> {
    products_shared_with(best_kernel(), lhs, m, rhs)
}

/// [`products_shared`] with a given kernel, which must be one of [`Bf16Kernel::available`].
pub fn products_shared_with(
    kernel: Bf16Kernel,
    lhs: &[f32],
    m: usize,
    rhs: &[&PackedRhs],
) -> Vec<Vec<f32>> {
    let Some(first) = rhs.first() else {
        return Vec::new();
    };
    let mut dsts: Vec<Vec<f32>> = rhs.iter().map(|r| Vec::with_capacity(m * r.n)).collect();
    let products: Vec<(&PackedRhs, Out)> = rhs
        .iter()
        .zip(dsts.iter_mut())
        .map(|(&r, dst)| {
            let out = Out {
                ptr: dst.as_mut_ptr(),
                n: r.n,
                add_scaled: None,
            };
            (r, out)
        })
        .collect();
    run_shared(kernel, Mat::rows(lhs, first.k), m, &products);
    for (dst, r) in dsts.iter_mut().zip(rhs) {
        // SAFETY: `run_shared` stored every one of the m × n values of each product.
        unsafe { dst.set_len(m * r.n) };
    }
    dsts
}

/// [`product_add`] with a given kernel, which must be one of [`Bf16Kernel::available`].
pub fn product_add_with(
    kernel: Bf16Kernel,
    lhs: &[f32],
    m: usize,
    rhs: &PackedRhs,
    dst: &mut [f32],
    scale: f32,
) {
    assert!(dst.len() >= m * rhs.n, "bf16: destination too small");
    let out = Out {
        ptr: dst.as_mut_ptr(),
        n: rhs.n,
        add_scaled: Some(scale),
    };
    run(kernel, Mat::rows(lhs, rhs.k), m, rhs, out);
}

/// `lhs_tᵀ · rhs` for `lhs_t` (k × m, row-major): the weight gradients' products, whose
/// left operand is an activation read down its columns (`dyᵀ d`, `xᵀ u`, summed over the
/// step's rows). The same kernels as [`product`]; only the conversion of the left operand
/// to bf16 reads it transposed.
pub fn product_t(lhs_t: &[f32], m: usize, rhs: &PackedRhs) -> Vec<f32> {
    product_t_with(best_kernel(), lhs_t, m, rhs)
}

/// [`product_t`] with a given kernel, which must be one of [`Bf16Kernel::available`].
pub fn product_t_with(kernel: Bf16Kernel, lhs_t: &[f32], m: usize, rhs: &PackedRhs) -> Vec<f32> {
    product_new(kernel, Mat::transposed(lhs_t, m), m, rhs)
}

/// Where the kernels put their sums: rows of `ptr` (row-major, `n` wide), stored as they
/// are or, with `add_scaled`, multiplied by it and added to what is there.
#[derive(Clone, Copy)]
struct Out {
    ptr: *mut f32,
    n: usize,
    add_scaled: Option<f32>,
}

// SAFETY: `run` hands each rayon task the rows of its own block, in the columns of its
// own chunk, only.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

/// Runs `kernel` over the row blocks of `lhs (m × k) · rhs`, writing every value of rows
/// 0..m of `out`, whose `ptr` must be valid for m × n values and alias neither operand.
fn run(kernel: Bf16Kernel, lhs: Mat, m: usize, rhs: &PackedRhs, out: Out) {
    run_shared(kernel, lhs, m, &[(rhs, out)]);
}

/// [`run`] for several right operands of the same left one (q, k and v of one input), in
/// one parallel pass: each product's tasks — a row block, split into column chunks where
/// the blocks are too few — are shared out together, so the threads meet once for all of
/// them instead of once each.
fn run_shared(kernel: Bf16Kernel, lhs: Mat, m: usize, products: &[(&PackedRhs, Out)]) {
    assert!(
        Bf16Kernel::available().contains(&kernel),
        "bf16 products: this CPU has no {kernel} kernel"
    );
    let Some(&(first, _)) = products.first() else {
        return;
    };
    let (k, k_pad) = (first.k, first.k_pad);
    assert!(
        products.iter().all(|(rhs, _)| rhs.k == k),
        "bf16: right operands of different depths"
    );
    assert!(lhs.data.len() >= lhs.extent(m, k), "bf16: lhs too small");
    let lines_per_row = k_pad / TILE_K;
    let row_blocks = m.div_ceil(BLOCK_M);
    let threads = rayon::current_num_threads();
    let rows_of = |block: usize| block * BLOCK_M..m.min((block + 1) * BLOCK_M);
    // (product, row block, column blocks) of every task.
    let tasks: Vec<(usize, usize, Range<usize>)> = products
        .iter()
        .enumerate()
        .flat_map(|(p, (rhs, _))| {
            let col_blocks = rhs.n.div_ceil(BLOCK_N);
            let chunks = column_chunks(row_blocks, col_blocks, threads);
            (0..row_blocks * chunks).map(move |task| {
                let (block, chunk) = (task / chunks, task % chunks);
                let cols = chunk * col_blocks / chunks..(chunk + 1) * col_blocks / chunks;
                (p, block, cols)
            })
        })
        .collect();
    // A block's rows of lhs in bf16: (32 × k_pad), zero-padded.
    let convert = |block: usize| {
        let mut a = vec![ZERO_LINE; BLOCK_M * lines_per_row];
        convert_block(lhs, k, rows_of(block), &mut a, k_pad);
        a
    };
    // A block read by several tasks (column chunks, several products) is converted once,
    // up front, on every thread (on the calling thread alone, the other waited through
    // all of it: ~3% of a bf16 training step once the forward pass shared `x` between the
    // frozen weight and the adapter); otherwise each task converts its own, which then
    // stays in its core's cache.
    let converted: Vec<Vec<Line>> = match tasks.len() > row_blocks {
        true => (0..row_blocks).into_par_iter().map(convert).collect(),
        false => Vec::new(),
    };
    tasks.into_par_iter().for_each(|(p, block, col_blocks)| {
        let (rhs, out) = products[p];
        let rows = rows_of(block);
        let own;
        let a = match converted.get(block) {
            Some(a) => a,
            None => {
                own = convert(block);
                &own
            }
        };
        let block = Block {
            a,
            lines_per_row,
            first: rows.start,
            count: rows.len(),
            col_blocks,
        };
        assert!(block.count <= BLOCK_M && block.a.len() == BLOCK_M * lines_per_row);
        // SAFETY: `kernel` is available (checked above); each task writes only the rows
        // of its own block in the columns of its own chunk of its own product's `out`,
        // every one of those values (the chunks of a block cover its n columns); the
        // kernels read `a` and `rhs` within their extents.
        unsafe {
            match kernel {
                #[cfg(target_arch = "x86_64")]
                Bf16Kernel::Amx => amx::block_rows(&block, rhs, out),
                #[cfg(target_arch = "x86_64")]
                Bf16Kernel::Avx512 => avx512::block_rows(&block, rhs, out),
                #[cfg(not(target_arch = "x86_64"))]
                _ => unreachable!("no bf16 kernel outside x86-64"),
            }
        };
    });
}

/// Into how many chunks of columns [`run_shared`] splits each row block. Row blocks alone keep
/// the threads busy in training (1,024 rows: 32 blocks), but decoding multiplies one
/// block (8 prompts) by each weight: unsplit, one thread streamed the whole model while
/// the other waited (SmolLM2's shape: 44 ms a token for 8 prompts). Enough chunks for
/// four tasks a thread, so that rayon can even out a thread slowed by others; never more
/// than there are column blocks.
fn column_chunks(row_blocks: usize, col_blocks: usize, threads: usize) -> usize {
    let tasks = 4 * threads.max(1);
    if row_blocks >= tasks {
        return 1;
    }
    tasks
        .div_ceil(row_blocks.max(1))
        .clamp(1, col_blocks.max(1))
}

/// Rows `rows` of `lhs` (… × k) in bf16 into `a`, one row every `k_pad` values from its
/// start (what is past k stays as it was: zeros).
fn convert_block(lhs: Mat, k: usize, rows: Range<usize>, a: &mut [Line], k_pad: usize) {
    // SAFETY: `Line` is 32 u16 without padding; the slice covers exactly `a`'s lines.
    let a =
        unsafe { std::slice::from_raw_parts_mut(a.as_mut_ptr().cast::<u16>(), a.len() * TILE_K) };
    if lhs.col_stride == 1 {
        for (r, i) in rows.enumerate() {
            let src = &lhs.data[i * lhs.row_stride..][..k];
            convert_row(src, &mut a[r * k_pad..][..k]);
        }
        return;
    }
    // A transposed operand (a weight gradient's `dyᵀ` or `xᵀ`): the block's rows lie side
    // by side at each k. They are converted a k at a time into a 32 × 32 tile, and the
    // tile's rows stored as whole lines: scattered straight into `a`, whose rows are
    // k_pad × 2 bytes apart (2 KB at k = 1,024 rows), 32 stores per k fell into two L1
    // sets and missed on every k (bf16 `xᵀ u` ran at half of f32 gemm's speed).
    let count = rows.len();
    let mut tile = [ZERO_LINE; BLOCK_M];
    let mut column = [0u16; BLOCK_M];
    let mut gathered = [0f32; BLOCK_M];
    for p0 in (0..k).step_by(TILE_K) {
        let width = TILE_K.min(k - p0);
        for dp in 0..width {
            let start = rows.start * lhs.row_stride + (p0 + dp) * lhs.col_stride;
            if lhs.row_stride == 1 {
                convert_row(&lhs.data[start..][..count], &mut column[..count]);
            } else {
                for (r, g) in gathered[..count].iter_mut().enumerate() {
                    *g = lhs.data[start + r * lhs.row_stride];
                }
                convert_row(&gathered[..count], &mut column[..count]);
            }
            for (line, &v) in tile[..count].iter_mut().zip(&column[..count]) {
                line.0[dp] = v;
            }
        }
        for (r, line) in tile[..count].iter().enumerate() {
            a[r * k_pad + p0..][..width].copy_from_slice(&line.0[..width]);
        }
    }
}

/// Up to [`BLOCK_M`] rows of the left operand in bf16, as the kernels read them: row `r`
/// of the block (output row `first + r`) is `lines_per_row` lines from line
/// `r · lines_per_row`; rows past `count` are zeros, up to [`BLOCK_M`] (`run` makes every
/// block so, and the kernels rely on it).
struct Block<'a> {
    a: &'a [Line],
    lines_per_row: usize,
    first: usize,
    count: usize,
    /// The column blocks ([`BLOCK_N`] columns each) of the product to compute.
    col_blocks: Range<usize>,
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

    #[test]
    fn products_of_one_input_in_one_pass_equal_the_separate_ones() {
        let kernels = Bf16Kernel::available();
        if kernels.is_empty() {
            crate::require::skip_or_fail("bf16", "no bf16 kernel on this CPU (AMX or AVX512-BF16)");
        }
        let k = 70;
        let weights: Vec<(usize, Vec<f32>)> = [45, 300, 16]
            .iter()
            .enumerate()
            .map(|(i, &n)| (n, values(n * k, 2.0 + i as f32)))
            .collect();
        let packed: Vec<PackedRhs> = weights
            .iter()
            .map(|(n, w)| PackedRhs::for_product_t(w, *n, k))
            .collect();
        let rhs: Vec<&PackedRhs> = packed.iter().collect();
        for &kernel in kernels {
            // Decoding's one row block (split by columns) and training's many (not split).
            for m in [8, 100] {
                let x = values(m * k, 1.0);
                let shared = products_shared_with(kernel, &x, m, &rhs);
                assert_eq!(shared.len(), rhs.len());
                for (got, r) in shared.iter().zip(&rhs) {
                    assert_eq!(
                        got,
                        &product_with(kernel, &x, m, r),
                        "{kernel} m {m} n {}",
                        r.n
                    );
                }
            }
        }
    }

    #[test]
    fn only_row_blocks_too_few_for_the_threads_are_split_by_columns() {
        // Training: 1,024 rows are 32 blocks, enough tasks for 2 threads.
        assert_eq!(column_chunks(32, 18, 2), 1);
        // Decoding 8 prompts: one block, four tasks a thread.
        assert_eq!(column_chunks(1, 18, 2), 8);
        assert_eq!(column_chunks(3, 18, 2), 3);
        // Never more chunks than column blocks, never none.
        assert_eq!(column_chunks(1, 2, 2), 2);
        assert_eq!(column_chunks(1, 1, 16), 1);
        assert_eq!(column_chunks(0, 0, 0), 1);
    }

    /// Each kernel this CPU has against the f32 product of the rounded operands. Both sum
    /// exact products in f32 in different orders: the difference is a few ulps of the
    /// largest partial sum, so 1e-5 relative to the largest |value| (k ≤ 100 terms here).
    /// The shapes cover partial row blocks, partial column panels, odd k and k < 32.
    #[test]
    fn every_kernel_matches_the_reference_on_edge_shapes() {
        let kernels = Bf16Kernel::available();
        if kernels.is_empty() {
            crate::require::skip_or_fail("bf16", "no bf16 kernel on this CPU (AMX or AVX512-BF16)");
        }
        if !kernels.contains(&Bf16Kernel::Amx) {
            crate::require::skip_or_fail("amx", "no AMX on this CPU: its kernel is not exercised");
        }
        for &kernel in kernels {
            for (m, n, k) in [
                (1, 1, 1),
                (37, 45, 70),
                (64, 64, 64),
                (33, 17, 100),
                (5, 40, 31),
                (9, 33, 2),
                // Decoding's shape: one row block, split into uneven column chunks.
                (8, 300, 64),
            ] {
                let x = values(m * k, 1.0);
                let w = values(n * k, 2.0); // (n × k): a weight
                let packed = PackedRhs::for_product_t(&w, n, k);
                let want_of = |x: &[f32]| reference_product(x, m, Mat::transposed(&w, k), k, n);
                let want = want_of(&x);
                assert_close(
                    &product_with(kernel, &x, m, &packed),
                    &want,
                    &format!("{kernel} {m}×{n}×{k}"),
                );
                // Added, scaled, into what `dst` holds.
                let mut dst = values(m * n, 4.0);
                let want_sum: Vec<f32> = dst.iter().zip(&want).map(|(d, w)| d - 0.5 * w).collect();
                product_add_with(kernel, &x, m, &packed, &mut dst, -0.5);
                assert_close(&dst, &want_sum, &format!("{kernel} {m}×{n}×{k}, added"));
                // A transposed left operand (a weight gradient's): x_t (k × m).
                let x_t = values(k * m, 5.0);
                let x_of_t: Vec<f32> = (0..m * k).map(|e| x_t[(e % k) * m + e / k]).collect();
                assert_close(
                    &product_t_with(kernel, &x_t, m, &packed),
                    &want_of(&x_of_t),
                    &format!("{kernel} {m}×{n}×{k}, lhs transposed"),
                );
                // The other orientation: x (m × n) · w (n × k).
                let x2 = values(m * n, 3.0);
                let packed = PackedRhs::for_product(&w, n, k);
                assert_close(
                    &product_with(kernel, &x2, m, &packed),
                    &reference_product(&x2, m, Mat::rows(&w, k), n, k),
                    &format!("{kernel} {m}×{k}×{n} (W)"),
                );
            }
        }
    }

    #[test]
    fn a_transposed_operand_packs_to_the_same_bits_as_its_explicit_transpose() {
        for (n, k) in [(16, 1), (45, 70), (33, 31), (128, 512), (5, 9)] {
            let w = values(n * k, 6.0); // (n × k); the operand is wᵀ (k × n)
            let w_t: Vec<f32> = (0..k * n).map(|e| w[(e % n) * k + e / n]).collect();
            let packed = PackedRhs::pack(Mat::transposed(&w, k), k, n);
            let explicit = PackedRhs::pack(Mat::rows(&w_t, n), k, n);
            let bits = |p: &PackedRhs| p.panels.iter().map(|l| l.0).collect::<Vec<_>>();
            assert_eq!(bits(&packed), bits(&explicit), "{k} × {n}");
        }
    }

    fn assert_close(got: &[f32], want: &[f32], label: &str) {
        let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= 1e-5 * scale, "{label} [{i}]: {g} vs {w}");
        }
    }
}
