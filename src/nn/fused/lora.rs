//! A frozen projection with a LoRA update as one op:
//! `y = x Wᵀ + γ · drop(x) Aᵀ Bᵀ` for `x` (rows, in), `W` (out, in), `A` (r, in), `B` (out, r).
//!
//! As separate candle ops this was five nodes (dropout, two matmuls, a scale, an add),
//! each with a full-size result and a full-size gradient pass. Here the update is
//! accumulated straight into the base product, and the backward pass is four products
//! and one masked add: with `d = drop(x) Aᵀ` and `u = γ · dy B`,
//! `dB = γ · dyᵀ d`, `dA = uᵀ drop(x)`, `dx = dy W + mask ⊙ (u A)`.
//! `W` gets no gradient.
//!
//! When the frozen weight's products run in bf16 (`matmul_precision: bf16`), so do, from
//! rank 32, the adapter's products whose right operand is A or B (`d`, `γ d Bᵀ`, `u`, `u A`), as
//! PyTorch's bf16 autocast runs them: A and B change every step, so their bf16 copies are
//! packed per call (r × in and out × r values, small next to the products). The two
//! weight gradients (dA, dB) are bf16 on AMX from rank 64 only: their right operand is an
//! activation (rows × in or out) packed on every call, which costs more than the bf16
//! product saves at lower ranks and on AVX512-BF16 (measured: docs/performance.md, rounds
//! 5 and 7). `drop(x) Aᵀ` is kept from the forward pass for the backward's dB.

use super::bf16::{self, Bf16Kernel, PackedRhs};
use super::dropout::DropoutMask;
use super::{
    cpu_f32, frozen_product, frozen_product_t, gemm_par, gemm_par_new, product_tn, scale_in_place,
    with_f32, Mat,
};
use crate::nn::frozen::FrozenWeight;
use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use std::borrow::Cow;
use std::sync::Mutex;

/// The smallest rank whose A and B products run in bf16 (in bf16 mode). The kernels work
/// in blocks of 32 columns, so `drop(x) Aᵀ` and `dy B` (r columns) at rank 8 compute 4×
/// what they keep; measured (bf16, dropout 0, 3 alternating rounds against f32 adapter
/// products): rank 8 0.95× on both shapes, rank 128 1.05× (default) and 1.06× (SmolLM2).
const BF16_MIN_RANK: usize = 32;

/// The smallest rank whose weight gradients (dA, dB) run in bf16 (in bf16 mode, on AMX
/// only). Their right operand is an activation (rows × in or out) packed on every call,
/// work that does not shrink with the rank while the product does. Measured (`recover
/// bench products --only dA`, 1,024 rows, GFLOP/s AMX against f32 gemm, packing included):
/// rank 32 146 / 158 (SmolLM2's shape) and 119 / 164 (default), rank 64 201 / 168 and
/// 177 / 160, rank 128 307 / 194 and 298 / 196. AVX512-BF16 is slower than f32 gemm here
/// at every rank (69–132), so without tiles they stay f32.
pub const BF16_GRAD_MIN_RANK: usize = 64;

/// `x`: (..., in), `weight`: (out, in), `a`: (r, in), `b`: (out, r), all f32 on the CPU →
/// (..., out). `dropout`: the mask on the update's input, if any.
pub fn lora_linear(
    x: &Tensor,
    weight: &FrozenWeight,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    dropout: Option<DropoutMask>,
) -> Result<Tensor> {
    let dims = x.dims();
    let in_dim = x.dim(candle_core::D::Minus1)?;
    let rows = x.elem_count() / in_dim.max(1);
    let op = LoraOp::new(rows, in_dim, weight, a, b, scale, dropout)?;
    let out_dim = op.shape.2;
    let y = x.reshape((rows, in_dim))?.contiguous()?.apply_op3(
        &a.contiguous()?,
        &b.contiguous()?,
        op,
    )?;
    let mut out_dims = dims.to_vec();
    if let Some(last) = out_dims.last_mut() {
        *last = out_dim;
    }
    y.reshape(out_dims)
}

/// The forward passes of several ops on one input `x` (rows, in), each with its `(A,
/// B)`, outside autograd's graph: the outputs (rows, out) of `x` through each op, as
/// `apply_op3_no_bwd` gives them, value for value. Where every op runs its products in
/// bf16 without dropout, all of them — `x Wᵀ` and `x Aᵀ` of a layer's q, k and v, or of
/// its gate and up — run in one parallel pass over one conversion of `x` (at rank 128,
/// six products of `x` converted it six times). `None` where they do not.
pub(crate) fn forward_shared(
    x: &Tensor,
    ops: &[(&LoraOp, &Tensor, &Tensor)],
) -> Result<Option<Vec<Tensor>>> {
    let mut rhs = Vec::with_capacity(2 * ops.len());
    let mut a_packed = Vec::with_capacity(ops.len());
    for (op, a, _) in ops {
        let (rows, in_dim, _, _) = op.shape;
        if x.dims() != [rows, in_dim] || !super::applies_to(x) {
            return Ok(None);
        }
        let Some((w_t, a_t)) = with_f32(a, op.name(), |a| Ok(op.shared_operands(a)))? else {
            return Ok(None);
        };
        rhs.push(w_t);
        a_packed.push(a_t);
    }
    let rows = x.dims()[0];
    let rhs: Vec<&PackedRhs> = rhs
        .into_iter()
        .zip(&a_packed)
        .flat_map(|(w, a)| [w, a])
        .collect();
    let mut products = with_f32(x, "fused-lora-linear", |x| {
        Ok(bf16::products_shared(x, rows, &rhs))
    })?
    .into_iter();
    let mut outputs = Vec::with_capacity(ops.len());
    for (op, _, b) in ops {
        let (Some(y), Some(down)) = (products.next(), products.next()) else {
            bail!("lora: a shared forward pass returned too few products");
        };
        let y = with_f32(b, op.name(), |b| Ok(op.finish_forward(y, down, b)))?;
        outputs.push(Tensor::from_vec(y, (rows, op.shape.2), x.device())?);
    }
    Ok(Some(outputs))
}

/// The op of [`lora_linear`] on a 2-D input (rows, in): applied with candle's
/// `apply_op3` (recorded for autograd) or `apply_op3_no_bwd` and its backward pass
/// called by hand (`model::backprop`).
pub(crate) struct LoraOp {
    /// (out, in), frozen.
    weight: FrozenWeight,
    /// (rows, in, out, r)
    shape: (usize, usize, usize, usize),
    scale: f32,
    dropout: Option<DropoutMask>,
    /// `drop(x) Aᵀ` from the forward pass, for the backward pass's `dB` (taken there; a
    /// backward pass without it computes it again).
    saved_down: Mutex<Option<Vec<f32>>>,
}

impl LoraOp {
    /// The op for an input of `rows` × `in_dim`, `weight` (out, in), `a` (r, in), `b`
    /// (out, r).
    pub(crate) fn new(
        rows: usize,
        in_dim: usize,
        weight: &FrozenWeight,
        a: &Tensor,
        b: &Tensor,
        scale: f64,
        dropout: Option<DropoutMask>,
    ) -> Result<Self> {
        let (out_dim, w_in) = weight.tensor().dims2()?;
        let (rank, a_in) = a.dims2()?;
        if w_in != in_dim || a_in != in_dim || b.dims() != [out_dim, rank] {
            bail!(
                "lora: input (..., {in_dim}), weight {:?}, A {:?}, B {:?} do not fit together",
                weight.tensor().dims(),
                a.dims(),
                b.dims()
            );
        }
        Ok(Self {
            weight: weight.clone(),
            shape: (rows, in_dim, out_dim, rank),
            scale: scale as f32,
            dropout,
            saved_down: Mutex::new(None),
        })
    }

    /// The update's input: `x` itself, or `x` with the dropout mask applied.
    fn dropped<'a>(&self, x: &'a [f32]) -> Cow<'a, [f32]> {
        match &self.dropout {
            Some(mask) => Cow::Owned(mask.apply(x)),
            None => Cow::Borrowed(x),
        }
    }

    /// Whether the adapter's products from A and B run in bf16: with the frozen weight's,
    /// from rank [`BF16_MIN_RANK`].
    fn bf16(&self) -> bool {
        self.weight.packed().is_some() && self.shape.3 >= BF16_MIN_RANK
    }

    /// `drop(x) Aᵀ`, (rows, r).
    fn down(&self, xd: &[f32], a: &[f32]) -> Vec<f32> {
        let (_, in_dim, _, rank) = self.shape;
        self.product(xd, in_dim, Mat::transposed(a, in_dim), rank, 1.0)
    }

    /// The forward pass's two products of `x`: `x Wᵀ` (rows, out) and `drop(x) Aᵀ` (rows,
    /// r). Where both run in bf16 from the same input (rank ≥ [`BF16_MIN_RANK`], no
    /// dropout: [`LoraOp::shared_operands`]), in one parallel pass
    /// over one conversion of `x` ([`bf16::products_shared`]; the same values as one by
    /// one): the conversion reads the whole activation from memory, and at rank 128 it and
    /// packing were ~16% of a bf16 step, a second pass over `x` half of it.
    fn forward_products(&self, x: &[f32], w: &[f32], a: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let (rows, in_dim, out_dim, _) = self.shape;
        if let Some((w_t, a_t)) = self.shared_operands(a) {
            let [y, down] = two(bf16::products_shared(x, rows, &[w_t, &a_t]));
            return (y, down);
        }
        let down = self.down(&self.dropped(x), a);
        let y = frozen_product_t(x, rows, w, (out_dim, in_dim), self.weight.packed());
        (y, down)
    }

    /// The right operands of the forward products, `Wᵀ` (packed once) and `Aᵀ` (packed
    /// now), where they run as one bf16 pass over the input — which [`forward_shared`] can
    /// share with other ops of the same input: rank ≥ [`BF16_MIN_RANK`] and no dropout.
    fn shared_operands(&self, a: &[f32]) -> Option<(&PackedRhs, PackedRhs)> {
        let packed = self.weight.packed().filter(|_| self.bf16())?;
        if self.dropout.is_some() {
            return None;
        }
        let (_, in_dim, _, rank) = self.shape;
        let a_t = PackedRhs::pack(Mat::transposed(a, in_dim), in_dim, rank);
        Some((&packed.forward, a_t))
    }

    /// `y = x Wᵀ + γ · down Bᵀ` from the forward products (`y` holding `x Wᵀ`); keeps
    /// `down` for the backward pass's dB.
    fn finish_forward(&self, mut y: Vec<f32>, down: Vec<f32>, b: &[f32]) -> Vec<f32> {
        let (_, _, out_dim, rank) = self.shape;
        self.add_product(
            &down,
            rank,
            Mat::transposed(b, rank),
            out_dim,
            &mut y,
            self.scale,
        );
        if let Ok(mut saved) = self.saved_down.lock() {
            *saved = Some(down);
        }
        y
    }

    /// The backward pass's two products of `dy`: `dy W` (rows, in) and `u = γ · dy B`
    /// (rows, r); in bf16, in one pass over one conversion of `dy`, as in
    /// [`LoraOp::forward_products`].
    fn backward_products(&self, dy: &[f32], w: &[f32], b: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let (rows, in_dim, out_dim, rank) = self.shape;
        if let (Some(packed), true) = (self.weight.packed(), self.bf16()) {
            let b_rows = PackedRhs::pack(Mat::rows(b, rank), out_dim, rank);
            let [dx, mut u] = two(bf16::products_shared(
                dy,
                rows,
                &[packed.backward(w), &b_rows],
            ));
            scale_in_place(&mut u, self.scale);
            return (dx, u);
        }
        let u = self.product(dy, out_dim, Mat::rows(b, rank), rank, self.scale);
        let dx = frozen_product(dy, rows, w, (out_dim, in_dim), self.weight.packed());
        (dx, u)
    }

    /// The adapter's weight gradients `(dA, dB)`: `dA = uᵀ drop(x)` (r, in) and
    /// `dB = γ · dyᵀ down` (out, r), both summed over the rows. In bf16 on AMX from rank
    /// [`BF16_GRAD_MIN_RANK`], dB as `(γ · downᵀ dy)ᵀ`, so that in both the (rows × r)
    /// operand is the left one (converted as it is read, transposed) and the activation
    /// (rows × in or out) the right one, packed on the call.
    fn weight_gradients(
        &self,
        dy: &[f32],
        xd: &[f32],
        down: &[f32],
        u: &[f32],
    ) -> (Vec<f32>, Vec<f32>) {
        let (_, in_dim, out_dim, rank) = self.shape;
        let kernel = match self.weight.packed() {
            Some(_) if rank >= BF16_GRAD_MIN_RANK => {
                Bf16Kernel::best().filter(|k| *k == Bf16Kernel::Amx)
            }
            _ => None,
        };
        let da = product_tn(u, rank, xd, in_dim, 1.0, kernel);
        let db = match kernel {
            // As (γ · downᵀ dy)ᵀ: the activation is the operand packed, in vector code.
            Some(_) => transpose(
                &product_tn(down, rank, dy, out_dim, self.scale, kernel),
                rank,
                out_dim,
            ),
            None => product_tn(dy, out_dim, down, rank, self.scale, None),
        };
        (da, db)
    }

    /// `scale · lhs (rows × k) · rhs (k × n)`, new: the products with A or B on the right.
    fn product(&self, lhs: &[f32], k: usize, rhs: Mat, n: usize, scale: f32) -> Vec<f32> {
        let rows = self.shape.0;
        if !self.bf16() {
            return gemm_par_new((rows, n, k), Mat::rows(lhs, k), rhs, scale);
        }
        let mut y = bf16::product(lhs, rows, &PackedRhs::pack(rhs, k, n));
        scale_in_place(&mut y, scale);
        y
    }

    /// `dst (rows × n) += scale · lhs (rows × k) · rhs (k × n)`: the products that add the
    /// update into an output (`γ d Bᵀ` into y, `u A` into dx).
    fn add_product(&self, lhs: &[f32], k: usize, rhs: Mat, n: usize, dst: &mut [f32], scale: f32) {
        let rows = self.shape.0;
        if self.bf16() {
            bf16::product_add(lhs, rows, &PackedRhs::pack(rhs, k, n), dst, scale);
        } else {
            gemm_par((rows, n, k), dst, true, Mat::rows(lhs, k), rhs, scale);
        }
    }
}

impl CustomOp3 for LoraOp {
    fn name(&self) -> &'static str {
        "fused-lora-linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        a: &CpuStorage,
        a_layout: &Layout,
        b: &CpuStorage,
        b_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, _, out_dim, _) = self.shape;
        let x = cpu_f32(x, x_layout, self.name())?;
        let a = cpu_f32(a, a_layout, self.name())?;
        let b = cpu_f32(b, b_layout, self.name())?;
        let (y, down) = with_f32(self.weight.tensor(), self.name(), |w| {
            Ok(self.forward_products(x, w, a))
        })?;
        let y = self.finish_forward(y, down, b);
        Ok((CpuStorage::F32(y), Shape::from((rows, out_dim))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        grad_y: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        self.vjp(x, a, b, grad_y)
    }
}

impl LoraOp {
    /// The vector–Jacobian product: the inputs' gradients for the output's gradient `grad_y`
    /// (what candle's backward pass asks of the op; `model::backprop` calls it directly).
    pub(crate) fn vjp(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        grad_y: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (_, in_dim, _, rank) = self.shape;
        let n = self.name();
        let (dx, da, db) = with_f32(x, n, |x| {
            with_f32(a, n, |a| {
                with_f32(b, n, |b| {
                    with_f32(grad_y, n, |dy| {
                        with_f32(self.weight.tensor(), n, |w| {
                            let xd = self.dropped(x);
                            let down = self.saved_down.lock().ok().and_then(|mut d| d.take());
                            let down = down.unwrap_or_else(|| self.down(&xd, a));
                            // dx = dy W (+ mask ⊙ (u A) below), u = γ · dy B  (rows, r)
                            let (mut dx, u) = self.backward_products(dy, w, b);
                            let (da, db) = self.weight_gradients(dy, &xd, &down, &u);
                            match &self.dropout {
                                None => self.add_product(
                                    &u,
                                    rank,
                                    Mat::rows(a, in_dim),
                                    in_dim,
                                    &mut dx,
                                    1.0,
                                ),
                                Some(mask) => {
                                    let ua =
                                        self.product(&u, rank, Mat::rows(a, in_dim), in_dim, 1.0);
                                    mask.apply_add(&ua, &mut dx);
                                }
                            }
                            Ok((dx, da, db))
                        })
                    })
                })
            })
        })?;
        let device = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), device)?),
            Some(Tensor::from_vec(da, a.shape(), device)?),
            Some(Tensor::from_vec(db, b.shape(), device)?),
        ))
    }
}

/// The two results of a two-product [`bf16::products_shared`].
fn two(products: Vec<Vec<f32>>) -> [Vec<f32>; 2] {
    products
        .try_into()
        .unwrap_or_else(|p: Vec<_>| panic!("two products asked, {} returned", p.len()))
}

/// `m` (rows × cols, row-major) transposed.
fn transpose(m: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; rows * cols];
    for (i, row) in m.chunks_exact(cols).enumerate() {
        for (j, &v) in row.iter().enumerate() {
            t[j * rows + i] = v;
        }
    }
    t
}
