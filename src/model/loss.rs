//! Log-probabilities of target tokens: the one piece of arithmetic that training loss,
//! perplexity and log-likelihood scoring share.

use super::Llama;
use crate::nn::fused::{self, distill::Divergence};
use anyhow::Result;
use candle_core::{DType, Tensor, D};

/// `logits` (b, t, vocab) at positions that predict `targets` (b, t) u32 → log p(target)
/// (b, t) in f32. Differentiable.
pub fn target_log_probs(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if fused::applies_to(logits) {
        let (b, t, vocab) = logits.dims3()?;
        let ids = targets
            .flatten_all()?
            .to_dtype(DType::U32)?
            .to_vec1::<u32>()?;
        let rows = logits.reshape((b * t, vocab))?;
        return Ok(fused::cross_entropy::target_log_probs(&rows, ids)?.reshape((b, t))?);
    }
    target_log_probs_composite(logits, targets)
}

/// The same from candle's differentiable ops: any dtype and device.
pub fn target_log_probs_composite(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let log_probs = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
    let index = targets.contiguous()?.unsqueeze(D::Minus1)?;
    Ok(log_probs.gather(&index, D::Minus1)?.squeeze(D::Minus1)?)
}

/// `masked_mean_nll` from the final hidden states (b, t, hidden) instead of logits: the
/// output head (a vocab × hidden matmul, then a log-softmax over the vocabulary) runs only
/// at the positions where `mask` (b, t) is 1. With `train_on_inputs: false` those are the
/// few response tokens of each example, and with SmolLM2's 49,152-word vocabulary the head
/// at every position cost more than a quarter of a training step and most of its memory.
pub fn masked_mean_nll_from_hidden(
    model: &Llama,
    hidden: &Tensor,
    targets: &Tensor,
    mask: &Tensor,
) -> Result<(Tensor, usize)> {
    let rows = TargetRows::of(mask, hidden.device())?;
    let hidden = rows.select(hidden)?; // (n, hidden)
    let targets = targets.flatten_all()?.index_select(&rows.index, 0)?; // (n,)
    let total = if fused::applies_to(&hidden) && fused::applies_to(model.head_weight()) {
        let ids = targets.to_dtype(DType::U32)?.to_vec1::<u32>()?;
        fused::cross_entropy::head_target_log_probs(&hidden, &model.head(), ids)?.sum_all()?
    } else {
        let logits = model.lm_head(&hidden)?.unsqueeze(0)?; // (1, n, vocab)
        target_log_probs(&logits, &targets.unsqueeze(0)?)?.sum_all()?
    };
    let weight = Tensor::new(-rows.weight as f32, total.device())?;
    Ok(((total * weight)?, rows.count))
}

/// The distillation loss `T² · KL` (see [`fused::distill`]) per target position, averaged
/// over the positions where `mask` (b, t) is 1, from the student's final hidden states
/// (b, t, h_s) and the teacher's (b, t, h_t), each through its own output head; the
/// number of such positions. Only the student gets a gradient. The heads run at those
/// positions only, and on the CPU in f32 blockwise, so neither model's logits exist whole.
pub fn masked_mean_kl_from_hidden(
    student: &Llama,
    student_hidden: &Tensor,
    teacher: &Llama,
    teacher_hidden: &Tensor,
    mask: &Tensor,
    temperature: f64,
    divergence: Divergence,
) -> Result<(Tensor, usize)> {
    let rows = TargetRows::of(mask, student_hidden.device())?;
    let hs = rows.select(student_hidden)?;
    let ht = rows.select(&teacher_hidden.detach())?;
    let fused = [&hs, &ht, student.head_weight(), teacher.head_weight()]
        .into_iter()
        .all(fused::applies_to);
    let per_row = if fused {
        fused::distill::head_kl_divergence(
            &hs,
            &student.head(),
            &ht,
            &teacher.head(),
            temperature,
            divergence,
        )?
    } else {
        let zs = student.lm_head(&hs)?;
        let zt = teacher.lm_head(&ht)?.detach();
        kl_divergence_composite(&zs, &zt, temperature, divergence)?
    };
    let weight = Tensor::new(rows.weight as f32, per_row.device())?;
    Ok(((per_row.sum_all()? * weight)?, rows.count))
}

/// `T² · KL` per row of student and teacher logits (n, vocab) → (n,), from candle's
/// differentiable ops (log-softmax of both full logits): any dtype and device.
pub fn kl_divergence_composite(
    student_logits: &Tensor,
    teacher_logits: &Tensor,
    temperature: f64,
    divergence: Divergence,
) -> Result<Tensor> {
    let log_softmax = |z: &Tensor| -> Result<Tensor> {
        Ok(candle_nn::ops::log_softmax(
            &(z.to_dtype(DType::F32)? / temperature)?,
            D::Minus1,
        )?)
    };
    let (ls, lt) = (log_softmax(student_logits)?, log_softmax(teacher_logits)?);
    let (p, log_ratio) = match divergence {
        Divergence::Forward => (lt.exp()?, (&lt - &ls)?),
        Divergence::Reverse => (ls.exp()?, (&ls - &lt)?),
    };
    Ok(((p * log_ratio)?.sum(D::Minus1)? * (temperature * temperature))?)
}

/// The positions where a (b, t) mask is 1, as row indices into (b · t, ·), and the weight
/// `1 / count` of each in a mean over them.
struct TargetRows {
    index: Tensor,
    count: usize,
    weight: f64,
}

impl TargetRows {
    fn of(mask: &Tensor, device: &candle_core::Device) -> Result<Self> {
        let flags = mask.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let mut keep: Vec<u32> = (0..flags.len() as u32)
            .filter(|&i| flags[i as usize] != 0.0)
            .collect();
        let count = keep.len();
        // No target at all: position 0 with weight 0 keeps the graph (and a zero loss).
        let weight = if count == 0 {
            keep.push(0);
            0.0
        } else {
            1.0 / count as f64
        };
        let index = Tensor::from_vec(keep, count.max(1), device)?;
        Ok(Self {
            index,
            count,
            weight,
        })
    }

    /// The rows of `x` (b, t, h) at these positions → (n, h).
    fn select(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, h) = x.dims3()?;
        Ok(x.reshape((b * t, h))?.index_select(&self.index, 0)?)
    }
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
