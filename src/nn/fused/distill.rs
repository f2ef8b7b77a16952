//! The distillation loss per row, `T² · KL` between the temperature-softened output
//! distributions of a student and a teacher, from both models' final hidden states and
//! output heads, without either model's (rows × vocab) logits ever existing whole.
//!
//! Rows go through in blocks: per block both logit blocks, both log-softmaxes, the KL of
//! each row, and (when the student's hidden states need a gradient) `dL/dh = dL/dz · W`
//! from the block at hand, so that the backward pass only scales those stored rows by
//! the incoming gradient, as [`super::cross_entropy::head_target_log_probs`] does.
//!
//! With `a = z / T` (z the logits), `log p = a − lse(a)` and `L = T² · KL` per row:
//! - forward, `KL(teacher ‖ student) = Σ p_t (log p_t − log p_s)`:
//!   `dL/dz_s = T · (p_s − p_t)`;
//! - reverse, `KL(student ‖ teacher) = Σ p_s (log p_s − log p_t)`:
//!   `dKL/da_j = Σ_i p_i (δ_ij − p_j) f_i + Σ_i p_i (δ_ij − p_j) = p_j (f_j − KL)` with
//!   `f = log p_s − log p_t` (the second sum vanishes as Σ p = 1), so
//!   `dL/dz_s = T · p_s ⊙ (f − KL)`.

use super::cross_entropy::log_sum_exp;
use super::{cpu_f32, frozen_product, frozen_product_t, scale_grad_rows, with_f32};
use crate::nn::frozen::FrozenWeight;
use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::sync::Mutex;

/// Which way the KL divergence runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Divergence {
    /// `KL(teacher ‖ student)`: the student covers every token the teacher likes
    /// (torchtune's `ForwardKLLoss`, Hinton et al.).
    #[default]
    Forward,
    /// `KL(student ‖ teacher)`: the student concentrates on the teacher's modes.
    Reverse,
}

impl std::fmt::Display for Divergence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Divergence::Forward => "forward",
            Divergence::Reverse => "reverse",
        })
    }
}

/// Rows of both models' logits computed at a time: with a 49,152-word vocabulary the two
/// blocks are 12 MiB each, under the allocator's mmap threshold (see `runtime`).
const BLOCK_ROWS: usize = 64;

/// `T² · KL` per row → (n,), for the student's hidden states `student_hidden` (n, h_s)
/// with its frozen head (vocab, h_s) and the teacher's `teacher_hidden` (n, h_t) with
/// its head (vocab, h_t); f32 on the CPU. Only the student's hidden states get a
/// gradient (the teacher's are read as constants).
pub fn head_kl_divergence(
    student_hidden: &Tensor,
    student_head: &FrozenWeight,
    teacher_hidden: &Tensor,
    teacher_head: &FrozenWeight,
    temperature: f64,
    divergence: Divergence,
) -> Result<Tensor> {
    let (rows, hs) = student_hidden.dims2()?;
    let (teacher_rows, ht) = teacher_hidden.dims2()?;
    let (vocab_s, wh_s) = student_head.tensor().dims2()?;
    let (vocab_t, wh_t) = teacher_head.tensor().dims2()?;
    if rows != teacher_rows || wh_s != hs || wh_t != ht || vocab_s != vocab_t {
        bail!(
            "distillation: student hidden {:?} with head {:?} and teacher hidden {:?} with \
             head {:?} do not fit together",
            student_hidden.dims(),
            student_head.tensor().dims(),
            teacher_hidden.dims(),
            teacher_head.tensor().dims()
        );
    }
    if !(temperature.is_finite() && temperature > 0.0) {
        bail!("distillation: the temperature must be positive, not {temperature}");
    }
    student_hidden.contiguous()?.apply_op1(HeadKlDivergence {
        student_head: student_head.clone(),
        teacher_hidden: teacher_hidden.detach().contiguous()?,
        teacher_head: teacher_head.clone(),
        temperature: temperature as f32,
        divergence,
        with_grad: student_hidden.track_op(),
        grad_rows: Mutex::new(None),
    })
}

struct HeadKlDivergence {
    student_head: FrozenWeight,
    teacher_hidden: Tensor,
    teacher_head: FrozenWeight,
    temperature: f32,
    divergence: Divergence,
    /// Whether to compute `dL/dh_s` in the forward pass.
    with_grad: bool,
    /// `dL/dh_s` (n, h_s), filled by the forward pass.
    grad_rows: Mutex<Option<Vec<f32>>>,
}

impl HeadKlDivergence {
    fn grad_rows(&self) -> Result<std::sync::MutexGuard<'_, Option<Vec<f32>>>> {
        self.grad_rows
            .lock()
            .map_err(|_| candle_core::Error::Msg("distillation: poisoned lock".into()))
    }
}

/// `row ← row / T − lse(row / T)`: the row's log-softmax at temperature T.
fn log_softmax_in_place(row: &mut [f32], inv_t: f32) {
    row.iter_mut().for_each(|v| *v *= inv_t);
    // The target log-prob op's vectorised log-sum-exp (the project's polynomial exp).
    let lse = log_sum_exp(row);
    row.iter_mut().for_each(|v| *v -= lse);
}

/// The KL of one row from both log-softmaxes; with `grad`, `student` becomes
/// `dL/dz_s` of `L = T² · KL` (see the module notes).
fn row_kl(student: &mut [f32], teacher: &[f32], t: f32, divergence: Divergence, grad: bool) -> f32 {
    let kl: f64 = match divergence {
        Divergence::Forward => student
            .iter()
            .zip(teacher)
            .map(|(&ls, &lt)| (lt.exp() * (lt - ls)) as f64)
            .sum(),
        Divergence::Reverse => student
            .iter()
            .zip(teacher)
            .map(|(&ls, &lt)| (ls.exp() * (ls - lt)) as f64)
            .sum(),
    };
    if grad {
        match divergence {
            Divergence::Forward => student
                .iter_mut()
                .zip(teacher)
                .for_each(|(ls, &lt)| *ls = t * (ls.exp() - lt.exp())),
            Divergence::Reverse => {
                let kl = kl as f32;
                student
                    .iter_mut()
                    .zip(teacher)
                    .for_each(|(ls, &lt)| *ls = t * ls.exp() * (*ls - lt - kl))
            }
        }
    }
    kl as f32
}

impl CustomOp1 for HeadKlDivergence {
    fn name(&self) -> &'static str {
        "fused-head-kl-divergence"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let student = cpu_f32(storage, layout, self.name())?;
        let (rows, hs) = layout.shape().dims2()?;
        let ht = self.teacher_hidden.dim(1)?;
        let (t, inv_t) = (self.temperature, 1.0 / self.temperature);
        let mut out = vec![0f32; rows];
        let mut grad_rows = if self.with_grad {
            vec![0f32; rows * hs]
        } else {
            Vec::new()
        };
        let (packed_s, packed_t) = (self.student_head.packed(), self.teacher_head.packed());
        with_f32(&self.teacher_hidden, self.name(), |teacher| {
            with_f32(self.student_head.tensor(), self.name(), |ws| {
                with_f32(self.teacher_head.tensor(), self.name(), |wt| {
                    let vocab = ws.len() / hs;
                    for start in (0..rows).step_by(BLOCK_ROWS) {
                        let n = BLOCK_ROWS.min(rows - start);
                        let block_s = &student[start * hs..(start + n) * hs];
                        let block_t = &teacher[start * ht..(start + n) * ht];
                        let mut zs = frozen_product_t(block_s, n, ws, (vocab, hs), packed_s);
                        let mut zt = frozen_product_t(block_t, n, wt, (vocab, ht), packed_t);
                        zs.par_chunks_mut(vocab)
                            .zip(zt.par_chunks_mut(vocab))
                            .zip(out[start..start + n].par_iter_mut())
                            .for_each(|((s, tr), out)| {
                                log_softmax_in_place(s, inv_t);
                                log_softmax_in_place(tr, inv_t);
                                let kl = row_kl(s, tr, t, self.divergence, self.with_grad);
                                *out = t * t * kl;
                            });
                        if self.with_grad {
                            let d = frozen_product(&zs, n, ws, (vocab, hs), packed_s);
                            grad_rows[start * hs..(start + n) * hs].copy_from_slice(&d);
                        }
                    }
                    Ok(())
                })
            })
        })?;
        if self.with_grad {
            *self.grad_rows()? = Some(grad_rows);
        }
        Ok((CpuStorage::F32(out), Shape::from(rows)))
    }

    fn bwd(&self, hidden: &Tensor, _out: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let rows = self.grad_rows()?.take();
        Ok(Some(scale_grad_rows(rows, hidden, grad, "distillation")?))
    }
}
