//! Fused CPU kernels with hand-written backward passes for the element-wise parts of a
//! layer (RMSNorm, RoPE, SwiGLU, adapter dropout), for attention, and for the losses
//! through the output head (cross entropy, distillation).
//!
//! Built from candle's composite ops, each of these records a chain of broadcasts and
//! reductions whose backward pass allocates a full-size tensor per step; on a 2-core CPU
//! they cost more than every matmul of the layer together. Each kernel here is one pass
//! forward and one pass backward over the data. They run for f32 tensors on the CPU; the
//! composite forms stay (next to each caller) for other dtypes and devices, and the tests
//! check each kernel against them.

pub mod attention;
pub mod bf16;
pub mod buffers;
pub mod cross_entropy;
pub mod distill;
pub mod dropout;
mod few_rows;
pub mod lora;
mod math;
pub mod rms_norm;
pub mod rope;
pub mod swiglu;

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, DType, Layout, Result, Storage, Tensor};
use rayon::prelude::*;

/// Whether the fused kernels apply to `t`: f32 on the CPU.
pub fn applies_to(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32
}

/// The f32 values of a contiguous CPU storage.
pub(crate) fn cpu_f32<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(values) = storage else {
        bail!("{op}: expected f32 data, got {:?}", storage.dtype())
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("{op}: the input is not contiguous")
    };
    Ok(&values[start..end])
}

/// Runs `f` on the f32 values of `t` (made contiguous): backward passes receive tensors,
/// not storages.
pub(crate) fn with_f32<R>(t: &Tensor, op: &str, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        bail!("{op}: the tensor is not on the CPU")
    };
    f(cpu_f32(cpu, layout, op)?)
}

/// The backward pass of a per-row op on `hidden` (n × h) whose forward pass already formed
/// each output's gradient row d out_i / d hidden_i (the output-head ops): every stored row
/// times the incoming gradient of its output. `rows` is `None` when the forward pass did
/// not track its input.
pub(crate) fn scale_grad_rows(
    rows: Option<Vec<f32>>,
    hidden: &Tensor,
    grad: &Tensor,
    op: &str,
) -> Result<Tensor> {
    let (_, h) = hidden.dims2()?;
    let Some(mut d) = rows else {
        bail!("{op}: backward pass without the gradient rows of a forward pass that tracked its input")
    };
    with_f32(grad, op, |g| {
        d.par_chunks_mut(h)
            .zip(g.par_iter())
            .for_each(|(row, &g)| row.iter_mut().for_each(|v| *v *= g));
        Ok(())
    })?;
    Tensor::from_vec(d, hidden.shape(), hidden.device())
}

/// `x Wᵀ` for `x` (rows × in) and a frozen weight `w` (out × in): from bf16
/// inputs (AMX or AVX512-BF16) when `packed` holds its bf16 copies, otherwise in f32.
pub(crate) fn frozen_product_t(
    x: &[f32],
    rows: usize,
    w: &[f32],
    (out_dim, in_dim): (usize, usize),
    packed: Option<&bf16::PackedWeight>,
) -> Vec<f32> {
    match packed {
        Some(p) => bf16::product(x, rows, &p.forward),
        None if rows <= few_rows::FEW_ROWS => few_rows::product_t(x, rows, w, (out_dim, in_dim)),
        None => gemm_par_new(
            (rows, out_dim, in_dim),
            Mat::rows(x, in_dim),
            Mat::transposed(w, in_dim),
            1.0,
        ),
    }
}

/// `scale · lhs_tᵀ · rhs` for `lhs_t` (k × m) and `rhs` (k × n), both row-major: a
/// product summed over a step's k rows, as a weight gradient is. On `kernel` (bf16
/// inputs, `rhs` packed on the call, `lhs_t` converted as it is read) or, with `None`,
/// in f32.
pub(crate) fn product_tn(
    lhs_t: &[f32],
    m: usize,
    rhs: &[f32],
    n: usize,
    scale: f32,
    kernel: Option<bf16::Bf16Kernel>,
) -> Vec<f32> {
    let k = lhs_t.len() / m.max(1);
    match kernel {
        Some(kernel) => {
            let packed = bf16::PackedRhs::pack(Mat::rows(rhs, n), k, n);
            let mut y = bf16::product_t_with(kernel, lhs_t, m, &packed);
            scale_in_place(&mut y, scale);
            y
        }
        None => gemm_par_new(
            (m, n, k),
            Mat::transposed(lhs_t, m),
            Mat::rows(rhs, n),
            scale,
        ),
    }
}

/// `values *= scale`, skipped for 1.
pub(crate) fn scale_in_place(values: &mut [f32], scale: f32) {
    if scale != 1.0 {
        values.iter_mut().for_each(|v| *v *= scale);
    }
}

/// `dy W` for `dy` (rows × out): the input gradient of [`frozen_product_t`].
pub(crate) fn frozen_product(
    dy: &[f32],
    rows: usize,
    w: &[f32],
    (out_dim, in_dim): (usize, usize),
    packed: Option<&bf16::PackedWeight>,
) -> Vec<f32> {
    match packed {
        Some(p) => bf16::product(dy, rows, p.backward(w)),
        None => gemm_par_new(
            (rows, in_dim, out_dim),
            Mat::rows(dy, out_dim),
            Mat::rows(w, in_dim),
            1.0,
        ),
    }
}

/// A matrix operand for [`gemm`]: its values and the strides of a row and of a column.
#[derive(Clone, Copy)]
struct Mat<'a> {
    data: &'a [f32],
    row_stride: usize,
    col_stride: usize,
}

impl<'a> Mat<'a> {
    /// Row-major, `cols` wide.
    fn rows(data: &'a [f32], cols: usize) -> Self {
        Self {
            data,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transpose of a row-major matrix `cols` wide.
    fn transposed(data: &'a [f32], cols: usize) -> Self {
        Self {
            data,
            row_stride: 1,
            col_stride: cols,
        }
    }

    /// The largest index an (rows × cols) view touches, plus one.
    fn extent(&self, rows: usize, cols: usize) -> usize {
        if rows == 0 || cols == 0 {
            return 0;
        }
        (rows - 1) * self.row_stride + (cols - 1) * self.col_stride + 1
    }
}

/// `dst (m × n, row-major) = [dst +] scale · lhs (m × k) · rhs (k × n)` on the calling
/// thread (for kernels that parallelise over heads themselves).
fn gemm(
    dims: (usize, usize, usize),
    dst: &mut [f32],
    accumulate: bool,
    lhs: Mat,
    rhs: Mat,
    scale: f32,
) {
    gemm_with(
        dims,
        dst,
        accumulate,
        lhs,
        rhs,
        scale,
        gemm::Parallelism::None,
    )
}

/// [`gemm`] on every thread of rayon's pool, for products large enough to share.
fn gemm_par(
    dims: (usize, usize, usize),
    dst: &mut [f32],
    accumulate: bool,
    lhs: Mat,
    rhs: Mat,
    scale: f32,
) {
    gemm_with(dims, dst, accumulate, lhs, rhs, scale, rayon_parallelism())
}

fn gemm_with(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    accumulate: bool,
    lhs: Mat,
    rhs: Mat,
    scale: f32,
    parallelism: gemm::Parallelism,
) {
    assert!(dst.len() >= m * n, "gemm: destination too small");
    // SAFETY: `dst` holds m × n values and, borrowed mutably, aliases neither operand.
    unsafe {
        gemm_raw(
            (m, n, k),
            dst.as_mut_ptr(),
            accumulate,
            lhs,
            rhs,
            scale,
            parallelism,
        )
    }
}

/// `scale · lhs (m × k) · rhs (k × n)` into a new buffer on every thread of rayon's pool.
/// The buffer is not zeroed first (for outputs of a training step, that pass cost as
/// much as the element-wise kernels): gemm writes every element when not accumulating.
fn gemm_par_new(dims: (usize, usize, usize), lhs: Mat, rhs: Mat, scale: f32) -> Vec<f32> {
    let (m, n, k) = dims;
    if k == 0 {
        return vec![0f32; m * n];
    }
    let mut dst = Vec::<f32>::with_capacity(m * n);
    // SAFETY: the capacity is m × n and the new vector aliases neither operand; with
    // k > 0 and no accumulation, gemm writes every one of the m × n values before
    // `set_len` exposes them.
    unsafe {
        gemm_raw(
            dims,
            dst.as_mut_ptr(),
            false,
            lhs,
            rhs,
            scale,
            rayon_parallelism(),
        );
        dst.set_len(m * n);
    }
    dst
}

fn rayon_parallelism() -> gemm::Parallelism {
    match rayon::current_num_threads() {
        0 | 1 => gemm::Parallelism::None,
        threads => gemm::Parallelism::Rayon(threads),
    }
}

/// # Safety
/// `dst` must be valid for writes (and, when accumulating, reads) of m × n values and
/// must not overlap either operand.
unsafe fn gemm_raw(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    accumulate: bool,
    lhs: Mat,
    rhs: Mat,
    scale: f32,
    parallelism: gemm::Parallelism,
) {
    assert!(lhs.data.len() >= lhs.extent(m, k), "gemm: lhs too small");
    assert!(rhs.data.len() >= rhs.extent(k, n), "gemm: rhs too small");
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        n as isize,
        accumulate,
        lhs.data.as_ptr(),
        lhs.col_stride as isize,
        lhs.row_stride as isize,
        rhs.data.as_ptr(),
        rhs.col_stride as isize,
        rhs.row_stride as isize,
        1.0,
        scale,
        false,
        false,
        false,
        parallelism,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemm_matches_naive_products_with_transposes() {
        let (m, n, k) = (3, 4, 5);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let bt: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.11).cos()).collect(); // (n × k)
        let mut dst = vec![1.0f32; m * n];
        gemm(
            (m, n, k),
            &mut dst,
            true,
            Mat::rows(&a, k),
            Mat::transposed(&bt, k),
            0.5,
        );
        for i in 0..m {
            for j in 0..n {
                let dot: f32 = (0..k).map(|p| a[i * k + p] * bt[j * k + p]).sum();
                let want = 1.0 + 0.5 * dot;
                assert!((dst[i * n + j] - want).abs() < 1e-5, "({i},{j})");
            }
        }
    }

    /// The few-rows path of `frozen_product_t` against gemm, on both sides of the
    /// threshold, in every group size of the kernel (8, 4, 2, 1 rows), with a partial block
    /// of weight rows (out 151 = 2 × 64 + 23: the last pair holds one row) and a tail past the
    /// 16-lane chunks (k = 70 = 4 × 16 + 6). The same products summed in another order:
    /// 1e-5 relative to the largest |value|.
    #[test]
    fn few_rows_products_match_gemm() {
        let (out_dim, in_dim) = (151, 70);
        let w: Vec<f32> = (0..out_dim * in_dim)
            .map(|i| (i as f32 * 0.11).cos())
            .collect();
        for rows in [1, 5, 8, 11, few_rows::FEW_ROWS, few_rows::FEW_ROWS + 1] {
            let x: Vec<f32> = (0..rows * in_dim)
                .map(|i| (i as f32 * 0.37).sin())
                .collect();
            let got = frozen_product_t(&x, rows, &w, (out_dim, in_dim), None);
            let want = gemm_par_new(
                (rows, out_dim, in_dim),
                Mat::rows(&x, in_dim),
                Mat::transposed(&w, in_dim),
                1.0,
            );
            let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-5 * scale,
                    "{rows} rows [{i}]: {g} vs {w}"
                );
            }
        }
    }
}
