//! `log softmax(logits)[target]` per row, without materialising the log-softmax.
//! Backward: `dlogits = g · (onehot(target) − softmax(logits))`, with the row's
//! log-sum-exp recomputed.

use super::math::{exp, max, sum_map};
use super::{cpu_f32, frozen_product, frozen_product_t, scale_grad_rows, with_f32};
use crate::nn::frozen::FrozenWeight;
use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use multiversion::multiversion;
use rayon::prelude::*;
use std::sync::Mutex;

/// `logits`: (rows, vocab) f32 on the CPU, `targets`: one id per row → (rows,).
pub fn target_log_probs(logits: &Tensor, targets: Vec<u32>) -> Result<Tensor> {
    let (rows, vocab) = logits.dims2()?;
    if targets.len() != rows {
        bail!("cross entropy: {} targets for {rows} rows", targets.len());
    }
    if let Some(bad) = targets.iter().find(|&&t| t as usize >= vocab) {
        bail!("cross entropy: target id {bad} outside the vocabulary of {vocab}");
    }
    logits.contiguous()?.apply_op1(TargetLogProbs { targets })
}

struct TargetLogProbs {
    targets: Vec<u32>,
}

/// log Σ exp(row).
#[multiversion(targets = "simd")]
pub(super) fn log_sum_exp(row: &[f32]) -> f32 {
    let top = max(row);
    top + sum_map(row, |v| exp(v - top)).ln()
}

/// `row ← g · (onehot(target) − softmax(row))`, the gradient of `g · log p(target)` with
/// respect to the logits, from the row's log-sum-exp.
#[multiversion(targets = "simd")]
fn log_prob_grad_in_place(row: &mut [f32], lse: f32, target: usize, g: f32) {
    for v in row.iter_mut() {
        *v = -g * exp(*v - lse);
    }
    row[target] += g;
}

impl CustomOp1 for TargetLogProbs {
    fn name(&self) -> &'static str {
        "fused-target-log-probs"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let logits = cpu_f32(storage, layout, self.name())?;
        let vocab = layout.shape().dims2()?.1;
        let out: Vec<f32> = logits
            .par_chunks(vocab)
            .zip(self.targets.par_iter())
            .map(|(row, &t)| row[t as usize] - log_sum_exp(row))
            .collect();
        Ok((CpuStorage::F32(out), Shape::from(self.targets.len())))
    }

    fn bwd(&self, logits: &Tensor, _out: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let vocab = logits.dims2()?.1;
        let d = with_f32(logits, self.name(), |x| {
            with_f32(grad, self.name(), |g| {
                let mut d = x.to_vec();
                d.par_chunks_mut(vocab)
                    .zip(g.par_iter().zip(self.targets.par_iter()))
                    .for_each(|(row, (&g, &t))| {
                        let lse = log_sum_exp(row);
                        log_prob_grad_in_place(row, lse, t as usize, g);
                    });
                Ok(d)
            })
        })?;
        Ok(Some(Tensor::from_vec(d, logits.shape(), logits.device())?))
    }
}

/// Rows of logits computed at a time by [`head_target_log_probs`]: with a 49,152-word
/// vocabulary a block is 24 MiB, under the allocator's mmap threshold (see `runtime`).
const HEAD_BLOCK_ROWS: usize = 128;

/// `log softmax(hidden Wᵀ)[target]` per row, for `hidden` (n, h) and a frozen output head
/// `weight` (vocab, h), f32 on the CPU → (n,), without the (n, vocab) logits ever existing
/// whole: rows go through in blocks. The gradient is linear in the upstream gradient of
/// each row, so when `hidden` needs one the forward pass also computes
/// `D = (onehot(target) − softmax) W` (n, h) from the block it has at hand, and the
/// backward pass only scales D's rows; no logits are kept or recomputed.
pub fn head_target_log_probs(
    hidden: &Tensor,
    weight: &FrozenWeight,
    targets: Vec<u32>,
) -> Result<Tensor> {
    let (rows, h) = hidden.dims2()?;
    let (vocab, wh) = weight.tensor().dims2()?;
    if wh != h || targets.len() != rows {
        bail!(
            "output head: hidden {:?}, head {:?} and {} targets do not fit together",
            hidden.dims(),
            weight.tensor().dims(),
            targets.len()
        );
    }
    if let Some(bad) = targets.iter().find(|&&t| t as usize >= vocab) {
        bail!("output head: target id {bad} outside the vocabulary of {vocab}");
    }
    hidden.contiguous()?.apply_op1(HeadTargetLogProbs {
        weight: weight.clone(),
        targets,
        with_grad: hidden.track_op(),
        grad_rows: Mutex::new(None),
    })
}

struct HeadTargetLogProbs {
    /// (vocab, h), frozen.
    weight: FrozenWeight,
    targets: Vec<u32>,
    /// Whether to compute D in the forward pass.
    with_grad: bool,
    /// D (n, h), filled by the forward pass.
    grad_rows: Mutex<Option<Vec<f32>>>,
}

impl HeadTargetLogProbs {
    fn grad_rows(&self) -> Result<std::sync::MutexGuard<'_, Option<Vec<f32>>>> {
        self.grad_rows
            .lock()
            .map_err(|_| candle_core::Error::Msg("output head: poisoned lock".into()))
    }
}

impl CustomOp1 for HeadTargetLogProbs {
    fn name(&self) -> &'static str {
        "fused-head-target-log-probs"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let hidden = cpu_f32(storage, layout, self.name())?;
        let (rows, h) = layout.shape().dims2()?;
        let mut out = vec![0f32; rows];
        let mut grad_rows = if self.with_grad {
            vec![0f32; rows * h]
        } else {
            Vec::new()
        };
        let packed = self.weight.packed();
        with_f32(self.weight.tensor(), self.name(), |w| {
            let vocab = w.len() / h;
            for start in (0..rows).step_by(HEAD_BLOCK_ROWS) {
                let n = HEAD_BLOCK_ROWS.min(rows - start);
                let block = &hidden[start * h..(start + n) * h];
                let mut logits = frozen_product_t(block, n, w, (vocab, h), packed);
                let targets = &self.targets[start..start + n];
                logits
                    .par_chunks_mut(vocab)
                    .zip(out[start..start + n].par_iter_mut().zip(targets.par_iter()))
                    .for_each(|(row, (out, &t))| {
                        let lse = log_sum_exp(row);
                        *out = row[t as usize] - lse;
                        if self.with_grad {
                            // The row becomes d out / d logits.
                            log_prob_grad_in_place(row, lse, t as usize, 1.0);
                        }
                    });
                if self.with_grad {
                    let d = frozen_product(&logits, n, w, (vocab, h), packed);
                    grad_rows[start * h..(start + n) * h].copy_from_slice(&d);
                }
            }
            Ok(())
        })?;
        if self.with_grad {
            *self.grad_rows()? = Some(grad_rows);
        }
        Ok((CpuStorage::F32(out), Shape::from(rows)))
    }

    fn bwd(&self, hidden: &Tensor, _out: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let rows = self.grad_rows()?.take();
        Ok(Some(scale_grad_rows(rows, hidden, grad, "output head")?))
    }
}
