//! AdamW (decoupled weight decay, PyTorch's formulation) with moments we can save and
//! restore bit for bit. candle-nn's AdamW keeps its state private and defaults to weight
//! decay 0.01; ours defaults to 0.0 like PEFT recipes. Also the gradient clipping that
//! precedes every update.

use anyhow::{bail, Result};
use candle_core::{Tensor, Var};
use std::collections::HashMap;

#[derive(Debug, Clone, Copy)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

pub struct AdamW {
    cfg: AdamWConfig,
    /// (name, parameter, first moment, second moment), in a fixed order.
    params: Vec<(String, Var, Tensor, Tensor)>,
    /// Steps taken so far (bias correction uses step + 1).
    pub steps: usize,
}

impl AdamW {
    pub fn new(vars: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        let params = vars
            .into_iter()
            .map(|(n, v)| {
                let z = v.zeros_like()?;
                Ok((n, v, z.clone(), z))
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            cfg,
            params,
            steps: 0,
        })
    }

    /// One update with learning rate `lr`; `grads[i]` belongs to the i-th parameter.
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        let c = self.cfg;
        self.steps += 1;
        let t = self.steps as i32;
        let bias1 = 1.0 - c.beta1.powi(t);
        let bias2 = 1.0 - c.beta2.powi(t);
        for ((_, var, m, v), g) in self.params.iter_mut().zip(grads) {
            *m = ((&*m * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            *v = ((&*v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let m_hat = (&*m / bias1)?;
            let v_hat = (&*v / bias2)?;
            let decayed = (var.as_tensor() * (1.0 - lr * c.weight_decay))?;
            let update = (m_hat / (v_hat.sqrt()? + c.eps)?)?;
            var.set(&(decayed - (update * lr)?)?)?;
        }
        Ok(())
    }

    /// Moments as named tensors (`NAME.exp_avg`, `NAME.exp_avg_sq`) for a checkpoint.
    pub fn state_tensors(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (name, _, m, v) in &self.params {
            out.insert(format!("{name}.exp_avg"), m.clone());
            out.insert(format!("{name}.exp_avg_sq"), v.clone());
        }
        out
    }

    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, steps: usize) -> Result<()> {
        for (name, var, m, v) in &mut self.params {
            for (suffix, slot) in [("exp_avg", &mut *m), ("exp_avg_sq", &mut *v)] {
                let key = format!("{name}.{suffix}");
                let Some(t) = tensors.get(&key) else {
                    bail!("the checkpoint's optimizer state has no `{key}`; it belongs to another adapter setup");
                };
                if t.shape() != var.shape() {
                    bail!(
                        "optimizer state `{key}` has shape {:?}, the adapter has {:?}",
                        t.dims(),
                        var.dims()
                    );
                }
                *slot = t.clone();
            }
        }
        self.steps = steps;
        Ok(())
    }
}

/// PyTorch's `clip_grad_norm_`: the global L2 norm of `grads`, and the gradients scaled
/// by `max_norm / (norm + 1e-6)` when the norm exceeds `max_norm` (0 = no clipping).
pub fn clip_grad_norm(grads: Vec<Tensor>, max_norm: f64) -> Result<(Vec<Tensor>, f64)> {
    let mut total = 0f64;
    for g in &grads {
        total += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    }
    let norm = total.sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        let clipped = grads
            .iter()
            .map(|g| g * scale)
            .collect::<candle_core::Result<_>>()?;
        return Ok((clipped, norm));
    }
    Ok((grads, norm))
}
