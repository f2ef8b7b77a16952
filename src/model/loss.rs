//! Log-probabilities of target tokens: the one piece of arithmetic that training loss,
//! perplexity and log-likelihood scoring share.

use anyhow::Result;
use candle_core::{DType, Tensor, D};

/// `logits` (b, t, vocab) at positions that predict `targets` (b, t) u32 → log p(target)
/// (b, t) in f32. Differentiable.
pub fn target_log_probs(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let log_probs = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
    let index = targets.contiguous()?.unsqueeze(D::Minus1)?;
    Ok(log_probs.gather(&index, D::Minus1)?.squeeze(D::Minus1)?)
}

/// Mean negative log-likelihood over the positions where `mask` (b, t) is 1, and the
/// number of such positions. `logits` (b, t, vocab) predict `targets` (b, t).
pub fn masked_mean_nll(
    logits: &Tensor,
    targets: &Tensor,
    mask: &Tensor,
) -> Result<(Tensor, usize)> {
    let mask = mask.to_dtype(DType::F32)?;
    let count = mask.sum_all()?.to_scalar::<f32>()? as usize;
    let total = (target_log_probs(logits, targets)? * &mask)?.sum_all()?;
    Ok(((total.neg()? / count.max(1) as f64)?, count))
}
