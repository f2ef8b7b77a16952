//! Adapter dropout that is reproducible and needs no saved state: a training forward pass
//! carries a key ([`Mode::Train`]), and each adapter derives its mask from (key, its own
//! id). A resumed run sees exactly the masks of an uninterrupted one.

use super::fused::{self, dropout::DropoutMask};
use super::mode::Mode;
use anyhow::Result;
use candle_core::{DType, Tensor};

/// The mask adapter `adapter_id` uses in `mode` at rate `p`; `None` when evaluating or
/// `p == 0`.
pub fn mask(mode: Mode, p: f64, adapter_id: u64) -> Option<DropoutMask> {
    let key = mode.dropout_key().filter(|_| p > 0.0)?;
    // Element counters of different adapters must not overlap: ids go in the top bits.
    Some(DropoutMask::new(
        key.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (adapter_id << 40),
        p,
    ))
}

/// `x` with inverted dropout at rate `p` (kept values scaled by 1/(1-p)), or `x` itself
/// when evaluating or `p == 0`. `adapter_id` makes each adapter's mask different.
pub fn apply(x: &Tensor, mode: Mode, p: f64, adapter_id: u64) -> Result<Tensor> {
    let Some(mask) = mask(mode, p, adapter_id) else {
        return Ok(x.clone());
    };
    if fused::applies_to(x) {
        return Ok(fused::dropout::dropout(x, mask)?);
    }
    let mask = Tensor::from_vec(mask.values(x.elem_count()), x.shape(), x.device())?;
    Ok((x * mask.to_dtype(x.dtype())?)?)
}

/// f32 view for adapter arithmetic (adapters train in f32 whatever the base dtype).
pub fn to_f32(x: &Tensor) -> Result<Tensor> {
    Ok(x.to_dtype(DType::F32)?)
}
