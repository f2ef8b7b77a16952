//! A projection run outside candle's autograd graph: its forward pass returns the output
//! and a [`ProjectionTape`] (what its backward pass needs), and [`ProjectionTape::backward`]
//! turns the output's gradient into the input's, recording the adapter's own gradients in
//! [`Gradients`]. `model::backprop` builds a whole layer's backward pass from these.
//!
//! LoRA and RoRA (f32 on the CPU) and adapter-less projections use the fused ops'
//! hand-written backward passes directly. Every other adapter (DoRA, bottleneck, or
//! tensors the fused ops do not take) is recorded by candle for this one projection: its
//! input is a fresh [`Var`] and the backward pass differentiates `Σ y ⊙ dy`, whose gradient
//! is exactly the vector–Jacobian product wanted.

use super::dropout;
use super::frozen::{FrozenMatmulT, FrozenWeight};
use super::fused::{self, lora::LoraOp};
use super::{lora::LoraAdapter, Adapter, Linear, Mode};
use anyhow::{Context, Result};
use candle_core::{Tensor, TensorId, Var};
use std::collections::HashMap;

/// Gradients of trainable tensors, by tensor id: from candle's `backward` or filled in by
/// hand, read the same way.
#[derive(Default)]
pub struct Gradients(HashMap<TensorId, Tensor>);

impl Gradients {
    /// The gradient of `t`, if it got one.
    pub fn get(&self, t: &Tensor) -> Option<&Tensor> {
        self.0.get(&t.id())
    }

    /// Records `grad` for `var`, adding it to what `var` already has.
    pub fn add(&mut self, var: &Var, grad: Tensor) -> Result<()> {
        let id = var.as_tensor().id();
        let sum = match self.0.remove(&id) {
            Some(before) => (before + grad)?,
            None => grad,
        };
        self.0.insert(id, sum);
        Ok(())
    }

    /// The gradients candle's autograd computed for `vars` (the others are dropped).
    pub fn from_store<'a>(
        store: &candle_core::backprop::GradStore,
        vars: impl IntoIterator<Item = &'a Var>,
    ) -> Self {
        Self(
            vars.into_iter()
                .filter_map(|v| Some((v.as_tensor().id(), store.get(v.as_tensor())?.clone())))
                .collect(),
        )
    }
}

/// What one projection's backward pass needs besides its input, which the caller keeps
/// or recomputes: a layer's normed inputs and its SwiGLU product cost one element-wise
/// pass to recompute and over a third of a layer's saved activations to keep.
pub struct ProjectionTape(Saved);

enum Saved {
    /// No adapter: `dx = dy W`.
    Frozen { op: FrozenMatmulT },
    /// LoRA / RoRA through the fused op and its own backward pass.
    Lora { op: LoraOp, a: Var, b: Var },
    /// Any other adapter: its forward pass as candle recorded it from `input`.
    Recorded {
        input: Var,
        output: Tensor,
        vars: Vec<Var>,
    },
}

/// [`forward`] of several projections of the same input `x` (a layer's q, k and v, or its
/// gate and up): where all are fused LoRA whose products can share `x`'s conversion to bf16
/// ([`fused::lora::forward_shared`]), in one pass; otherwise one by one. The same values
/// either way.
pub fn forward_shared(
    linears: &[&Linear],
    x: &Tensor,
    mode: Mode,
) -> Result<Vec<(Tensor, ProjectionTape)>> {
    let x = x.contiguous()?;
    let loras: Option<Vec<_>> = linears
        .iter()
        .map(|linear| Some((linear, fused_lora(linear, &x)?)))
        .collect();
    if let Some(loras) = loras {
        let (rows, in_dim) = x.dims2()?;
        let ops = loras
            .iter()
            .map(|(linear, l)| lora_op(l, linear.frozen_weight(), (rows, in_dim), mode))
            .collect::<Result<Vec<_>>>()?;
        let args: Vec<_> = ops
            .iter()
            .zip(&loras)
            .map(|(op, (_, l))| (op, l.a.as_tensor(), l.b.as_tensor()))
            .collect();
        if let Some(ys) = fused::lora::forward_shared(&x, &args)? {
            let tapes = ops.into_iter().zip(&loras).map(|(op, (_, l))| {
                ProjectionTape(Saved::Lora {
                    op,
                    a: l.a.clone(),
                    b: l.b.clone(),
                })
            });
            return Ok(ys.into_iter().zip(tapes).collect());
        }
    }
    linears.iter().map(|l| forward(l, &x, mode)).collect()
}

/// `linear`'s adapter where it is LoRA (or RoRA) and its fused op takes `x`.
fn fused_lora<'a>(linear: &'a Linear, x: &Tensor) -> Option<&'a LoraAdapter> {
    match linear.adapter() {
        Some(Adapter::Lora(l)) if l.fuses(x, linear.frozen_weight()) => Some(l),
        _ => None,
    }
}

/// The fused op of LoRA `l` on `weight` for an input of (rows, in) in `mode`.
fn lora_op(
    l: &LoraAdapter,
    weight: &FrozenWeight,
    (rows, in_dim): (usize, usize),
    mode: Mode,
) -> Result<LoraOp> {
    let mask = dropout::mask(mode, l.dropout, l.id);
    Ok(LoraOp::new(
        rows,
        in_dim,
        weight,
        l.a.as_tensor(),
        l.b.as_tensor(),
        l.scale,
        mask,
    )?)
}

/// `x` (rows, in) through `linear` in `mode` → (rows, out) with no graph attached, and its
/// tape. The same values as [`Linear::forward`] (which the tests check); input statistics
/// for pruning are not recorded here.
pub fn forward(linear: &Linear, x: &Tensor, mode: Mode) -> Result<(Tensor, ProjectionTape)> {
    let weight = linear.frozen_weight();
    let (rows, in_dim) = x.dims2()?;
    let x = x.contiguous()?;
    match (linear.adapter(), fused_lora(linear, &x)) {
        (None, _) if fused::applies_to(&x) => {
            let op = FrozenMatmulT::new(weight)?;
            let y = x.apply_op1_no_bwd(&op)?;
            Ok((y, ProjectionTape(Saved::Frozen { op })))
        }
        (_, Some(l)) => {
            let op = lora_op(l, weight, (rows, in_dim), mode)?;
            let y = x.apply_op3_no_bwd(l.a.as_tensor(), l.b.as_tensor(), &op)?;
            let tape = ProjectionTape(Saved::Lora {
                op,
                a: l.a.clone(),
                b: l.b.clone(),
            });
            Ok((y, tape))
        }
        (adapter, None) => {
            let input = Var::from_tensor(&x)?;
            let output = linear.forward(input.as_tensor(), mode)?;
            let vars = adapter
                .map(|a| a.vars().into_iter().map(|(_, v)| v.clone()).collect())
                .unwrap_or_default();
            Ok((
                output.detach(),
                ProjectionTape(Saved::Recorded {
                    input,
                    output,
                    vars,
                }),
            ))
        }
    }
}

impl ProjectionTape {
    /// The input's gradient (rows, in) for the output's `dy` (rows, out); the adapter's
    /// gradients go into `grads`. `x` (rows, in) is the input [`forward`] was given, the
    /// same values (a recorded adapter kept its own).
    pub fn backward(&self, x: &Tensor, dy: &Tensor, grads: &mut Gradients) -> Result<Tensor> {
        match &self.0 {
            Saved::Frozen { op } => op.vjp(x, dy)?.context("frozen product: no input gradient"),
            Saved::Lora { op, a, b } => {
                let x = x.contiguous()?;
                let (dx, da, db) = op.vjp(&x, a.as_tensor(), b.as_tensor(), dy)?;
                if let Some(da) = da {
                    grads.add(a, da)?;
                }
                if let Some(db) = db {
                    grads.add(b, db)?;
                }
                dx.context("lora: no input gradient")
            }
            Saved::Recorded {
                input,
                output,
                vars,
            } => {
                let store = (output * dy.to_dtype(output.dtype())?)?
                    .sum_all()?
                    .backward()?;
                for var in vars {
                    if let Some(g) = store.get(var.as_tensor()) {
                        grads.add(var, g.clone())?;
                    }
                }
                Ok(store
                    .get(input.as_tensor())
                    .context("adapter: no input gradient")?
                    .clone())
            }
        }
    }
}
