//! `x Wᵀ` for a frozen weight, with a backward pass for `x` only, in f32 or (where the
//! CPU has AMX or AVX512-BF16) from bf16 inputs.
//!
//! candle's `matmul` backward always computes both operand gradients, so every frozen
//! projection paid for a full `dW = dYᵀ X` matmul (as large as the forward) and for a
//! zero-filled gradient buffer the size of the weight, both thrown away. Fine-tuning
//! through adapters never needs `dW`; this op gives candle a backward that returns
//! `dX = dY W` alone.

use super::fused::{self, bf16::PackedWeight};
use anyhow::{bail, Result};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Storage, Tensor};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// The inputs of the frozen weights' products (forward and input gradient; adapters,
/// attention and the optimizer stay f32). `bf16` rounds both operands to bf16 and sums
/// in f32, as PyTorch does under `torch.set_float32_matmul_precision("medium")` or bf16
/// autocast; it runs on AMX or AVX512-BF16 ([`fused::bf16`]), and where the CPU has
/// neither (or the weights are not f32 on
/// the CPU) the products stay as they were.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum MatmulPrecision {
    #[default]
    F32,
    Bf16,
}

impl MatmulPrecision {
    /// For serde's `skip_serializing_if`: f32 is what a file without the key means.
    pub fn is_f32(&self) -> bool {
        *self == MatmulPrecision::F32
    }

    /// What a stage says when its `key: bf16` cannot run on this CPU and its products stay
    /// in the weights' own dtype.
    pub fn fallback_note(key: &str) -> String {
        format!(
            "{key}: bf16 needs f32 weights on a CPU with AMX or AVX512-BF16 (Intel Sapphire \
             Rapids, AMD Zen 4 or later); the products run in the weights' own dtype"
        )
    }
}

impl std::fmt::Display for MatmulPrecision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MatmulPrecision::F32 => "f32",
            MatmulPrecision::Bf16 => "bf16",
        })
    }
}

/// A frozen weight (out, in) and, when its products run in bf16, its packed copies.
#[derive(Clone, Debug)]
pub struct FrozenWeight {
    tensor: Tensor,
    packed: Option<Arc<PackedWeight>>,
}

impl FrozenWeight {
    pub fn new(tensor: Tensor) -> Self {
        Self {
            tensor,
            packed: None,
        }
    }

    pub fn tensor(&self) -> &Tensor {
        &self.tensor
    }

    /// The bf16 copies the bf16 kernels read, when packed.
    pub fn packed(&self) -> Option<&PackedWeight> {
        self.packed.as_deref()
    }

    /// Packs (bf16) or drops (f32) the bf16 copies. Returns whether the products now run
    /// at `precision`: bf16 needs a bf16 kernel (AMX or AVX512-BF16) and an f32
    /// weight on the CPU, and stays f32 without.
    pub fn set_precision(&mut self, precision: MatmulPrecision) -> Result<bool> {
        self.packed = None;
        if precision == MatmulPrecision::F32 {
            return Ok(true);
        }
        if !fused::bf16::available() || !fused::applies_to(&self.tensor) {
            return Ok(false);
        }
        let (out_dim, in_dim) = self.tensor.dims2()?;
        let values = self.tensor.flatten_all()?.to_vec1::<f32>()?;
        self.packed = Some(Arc::new(PackedWeight::new(&values, out_dim, in_dim)));
        Ok(true)
    }
}

/// `x`: (..., in), `w`: (out, in) → (..., out). `w` gets no gradient; `x` does.
pub fn frozen_matmul_t(x: &Tensor, w: &FrozenWeight) -> Result<Tensor> {
    let (rows, in_dim) = rows_and_width(x);
    let out_dims = output_dims(x, w)?;
    if x.dtype() != w.tensor.dtype() {
        bail!(
            "matmul dtype mismatch: input {:?}, weight {:?}",
            x.dtype(),
            w.tensor.dtype()
        );
    }
    let x2 = x.reshape((rows, in_dim))?;
    // The custom op has f32 CPU kernels only; elsewhere candle's matmul is used (and
    // computes the unused dW, as before).
    let out = if x.device().is_cpu() {
        x2.apply_op1(FrozenMatmulT::new(w)?)?
    } else {
        x2.matmul(&w.tensor.t()?)?
    };
    Ok(out.reshape(out_dims)?)
}

/// `x` (..., in) as (rows, in).
fn rows_and_width(x: &Tensor) -> (usize, usize) {
    let dims = x.dims();
    let in_dim = dims[dims.len() - 1];
    (dims[..dims.len() - 1].iter().product(), in_dim)
}

/// The shape of `x Wᵀ`, (..., out), after checking that `w` (out, in) fits `x` (..., in).
fn output_dims(x: &Tensor, w: &FrozenWeight) -> Result<Vec<usize>> {
    let in_dim = rows_and_width(x).1;
    let (out_dim, w_in) = w.tensor.dims2()?;
    if w_in != in_dim {
        bail!("matmul shape mismatch: input (..., {in_dim}) against weight ({out_dim}, {w_in})");
    }
    let mut dims = x.dims().to_vec();
    *dims.last_mut().expect("x has at least one dim") = out_dim;
    Ok(dims)
}

/// [`frozen_matmul_t`] of one input with several weights in one parallel pass
/// ([`fused::bf16::products_shared`]), where that applies: every weight packed for bf16,
/// `x` f32 on the CPU and outside autograd's graph (the results carry no backward pass).
/// `None` where it does not: the caller takes the products one by one.
pub fn frozen_matmul_t_shared(x: &Tensor, ws: &[&FrozenWeight]) -> Result<Option<Vec<Tensor>>> {
    let Some(packed) = ws.iter().map(|w| w.packed()).collect::<Option<Vec<_>>>() else {
        return Ok(None);
    };
    if x.track_op() || !fused::applies_to(x) {
        return Ok(None);
    }
    let rows = rows_and_width(x).0;
    let shapes = ws
        .iter()
        .map(|w| output_dims(x, w))
        .collect::<Result<Vec<_>>>()?;
    let rhs: Vec<_> = packed.iter().map(|p| &p.forward).collect();
    let ys = fused::with_f32(x, "frozen-matmul-t", |x| {
        Ok(fused::bf16::products_shared(x, rows, &rhs))
    })?;
    let ys = ys
        .into_iter()
        .zip(shapes)
        .map(|(y, shape)| Tensor::from_vec(y, shape, x.device()))
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Some(ys))
}

/// The op of [`frozen_matmul_t`] on a 2-D input (rows, in): applied with candle's
/// `apply_op1` or `apply_op1_no_bwd` and its backward pass called by hand
/// (`model::backprop`).
pub(crate) struct FrozenMatmulT {
    w: FrozenWeight,
    /// (out, in)
    dims: (usize, usize),
}

impl FrozenMatmulT {
    pub(crate) fn new(w: &FrozenWeight) -> Result<Self> {
        Ok(Self {
            w: w.clone(),
            dims: w.tensor.dims2()?,
        })
    }
}

impl CustomOp1 for FrozenMatmulT {
    fn name(&self) -> &'static str {
        "frozen-matmul-t"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, in_dim) = x_layout.shape().dims2()?;
        let (out_dim, _) = self.dims;
        let shape = Shape::from((rows, out_dim));
        if let (CpuStorage::F32(_), Some(_)) = (x, x_layout.contiguous_offsets()) {
            let x = fused::cpu_f32(x, x_layout, self.name())?;
            let y = fused::with_f32(&self.w.tensor, self.name(), |w| {
                Ok(fused::frozen_product_t(
                    x,
                    rows,
                    w,
                    self.dims,
                    self.w.packed(),
                ))
            })?;
            return Ok((CpuStorage::F32(y), shape));
        }
        // Other dtypes (and strided inputs): candle's CPU matmul on Wᵀ as a strided view.
        let (w_storage, w_layout) = self.w.tensor.storage_and_layout();
        let Storage::Cpu(w) = &*w_storage else {
            candle_core::bail!("frozen-matmul-t: the weight is not on the CPU")
        };
        let wt_layout = w_layout.transpose(0, 1)?;
        let y = x.matmul(w, (1, rows, out_dim, in_dim), x_layout, &wt_layout)?;
        Ok((y, shape))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad_y: &Tensor) -> candle_core::Result<Option<Tensor>> {
        self.vjp(x, grad_y)
    }
}

impl FrozenMatmulT {
    /// The vector–Jacobian product: the inputs' gradients for the output's gradient `grad_y`
    /// (what candle's backward pass asks of the op; `model::backprop` calls it directly).
    pub(crate) fn vjp(&self, x: &Tensor, grad_y: &Tensor) -> candle_core::Result<Option<Tensor>> {
        if grad_y.dtype() != DType::F32 || self.w.tensor.dtype() != DType::F32 {
            // (rows, out) · (out, in) → (rows, in)
            return Ok(Some(grad_y.matmul(&self.w.tensor)?));
        }
        let rows = grad_y.dim(0)?;
        let dx = fused::with_f32(grad_y, self.name(), |dy| {
            fused::with_f32(&self.w.tensor, self.name(), |w| {
                Ok(fused::frozen_product(
                    dy,
                    rows,
                    w,
                    self.dims,
                    self.w.packed(),
                ))
            })
        })?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// `x Wᵀ` for `x` of any rank (..., in) and `w` (out, in), as one 2-D matmul.
pub fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims();
    let in_dim = dims[dims.len() - 1];
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let out = x.reshape((rows, in_dim))?.matmul(&w.t()?)?;
    let mut out_dims = dims.to_vec();
    *out_dims
        .last_mut()
        .expect("matmul_t input has at least one dim") = w.dim(0)?;
    Ok(out.reshape(out_dims)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn bf16_precision_needs_f32_weights_and_f32_always_unpacks() {
        let w = Tensor::ones((4, 3), DType::F32, &Device::Cpu).unwrap();
        // bf16-stored weights stay as they are, whatever the CPU.
        let mut half = FrozenWeight::new(w.to_dtype(DType::BF16).unwrap());
        assert!(!half.set_precision(MatmulPrecision::Bf16).unwrap());
        assert!(half.packed().is_none());
        // f32 weights pack exactly where a bf16 kernel is there, and f32 drops the copies again.
        let mut full = FrozenWeight::new(w);
        let packed = full.set_precision(MatmulPrecision::Bf16).unwrap();
        assert_eq!(packed, fused::bf16::available());
        assert_eq!(full.packed().is_some(), packed);
        assert!(full.set_precision(MatmulPrecision::F32).unwrap());
        assert!(full.packed().is_none());
    }

    /// The input gradient's layout is packed by the first backward pass, not before: a
    /// forward pass (evaluation, decoding, a teacher) leaves it out; the gradient it then
    /// gives equals f32's product of the bf16-rounded operands.
    #[test]
    fn the_input_gradient_layout_is_packed_by_the_first_backward_pass() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (48, 64), &dev).unwrap();
        let mut frozen = FrozenWeight::new(w.clone());
        if !frozen.set_precision(MatmulPrecision::Bf16).unwrap() {
            crate::require::skip_or_fail("bf16", "no bf16 kernel (AMX or AVX512-BF16) on this CPU");
            return;
        }
        let x = candle_core::Var::randn(0f32, 1.0, (5, 64), &dev).unwrap();
        let y = frozen_matmul_t(x.as_tensor(), &frozen).unwrap();
        assert!(!frozen.packed().unwrap().has_backward());
        let dy = Tensor::randn(0f32, 1.0, (5, 48), &dev).unwrap();
        let grads = (y * &dy).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(frozen.packed().unwrap().has_backward());
        let round = |t: &Tensor| {
            t.to_dtype(DType::BF16)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
        };
        let want = round(&dy).matmul(&round(&w)).unwrap();
        let got = grads.get(x.as_tensor()).unwrap();
        // Both sum the same exact bf16 × bf16 products in f32, in another order: a few ulps
        // of the largest partial sum (64 terms of size ~1).
        let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-4);
    }
}
