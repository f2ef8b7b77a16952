//! `log softmax(logits)[target]` per row, without materialising the log-softmax.
//! Backward: `dlogits = g · (onehot(target) − softmax(logits))`, with the row's
//! log-sum-exp recomputed.

use super::math::{exp, max, sum_map};
use super::{cpu_f32, with_f32};
use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use multiversion::multiversion;
use rayon::prelude::*;

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
fn log_sum_exp(row: &[f32]) -> f32 {
    let top = max(row);
    top + sum_map(row, |v| exp(v - top)).ln()
}

/// `d = −g · softmax(row)`, from the row's log-sum-exp.
#[multiversion(targets = "simd")]
fn scaled_softmax(row: &[f32], lse: f32, g: f32, d: &mut [f32]) {
    for (d, v) in d.iter_mut().zip(row) {
        *d = -g * exp(v - lse);
    }
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
                let mut d = vec![0f32; x.len()];
                d.par_chunks_mut(vocab)
                    .zip(x.par_chunks(vocab))
                    .zip(g.par_iter().zip(self.targets.par_iter()))
                    .for_each(|((d, row), (&g, &t))| {
                        scaled_softmax(row, log_sum_exp(row), g, d);
                        d[t as usize] += g;
                    });
                Ok(d)
            })
        })?;
        Ok(Some(Tensor::from_vec(d, logits.shape(), logits.device())?))
    }
}
