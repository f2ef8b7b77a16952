//! Adapter training without candle's autograd graph: the decoder's forward pass written
//! out over the fused ops (run with `apply_op*_no_bwd`), keeping in a [`Tape`] what the
//! backward pass needs, and the backward pass written out in reverse, calling each op's
//! vector–Jacobian product by hand.
//!
//! Why: candle's backward pass adds every node's gradient into a freshly zero-filled
//! buffer and walks every reshape and transpose; on 2 cores that bookkeeping was ~19% of
//! a LoRA step (docs/performance.md). Here each gradient is produced once, the residual
//! stream's gradient is one add per branch, and only the adapters' tensors (and the
//! inputs on the way) get gradients. The forward values are those of [`Llama::forward`]
//! bit for bit (the same ops on the same data); the gradients agree with candle's
//! autograd to rounding (tests/it/backprop.rs).
//!
//! Applies to f32 models on the CPU without prefix tuning ([`applies_to`]); the trainer
//! uses candle's autograd otherwise. Adapters other than LoRA/RoRA run through
//! [`crate::nn::tape`]'s recorded path, projection by projection.

use super::attention::{merge_heads, split_heads};
use super::llama::DecoderLayer;
use super::Llama;
use crate::nn::fused::buffers::add;
use crate::nn::fused::{self, attention::AttentionOp, rms_norm::RmsNormOp};
use crate::nn::fused::{rope::RopeOp, swiglu::SwigluOp};
use crate::nn::tape::{self, Gradients, ProjectionTape};
use crate::nn::Mode;
use anyhow::{Context, Result};
use candle_core::Tensor;

/// Whether [`forward`] and [`backward`] cover `model`: f32 weights on the CPU, no prefix.
pub fn applies_to(model: &Llama) -> bool {
    model.prefix.is_none()
        && fused::applies_to(&model.embed_tokens)
        && model
            .projections()
            .all(|(_, _, l)| fused::applies_to(l.weight()))
        && fused::applies_to(model.norm.weight())
        && model.layers.iter().all(|l| {
            fused::applies_to(l.input_layernorm.weight())
                && fused::applies_to(l.post_attention_layernorm.weight())
        })
}

/// What the backward pass of one forward pass needs.
pub struct Tape {
    inputs: Inputs,
    mode: Mode,
    layers: Vec<Layer>,
    /// The final norm's input (b·t, hidden).
    last: Tensor,
    norm: RmsNormOp,
}

/// A layer's part of the tape: everything, or (activation checkpointing) only its input,
/// the rest recomputed by the backward pass.
enum Layer {
    Saved(Box<LayerTape>),
    Recompute(Tensor),
}

/// One decoder layer's saved activations. Hidden states are (b·t, hidden); heads
/// (b, heads, t, head_dim). The projections' inputs that one element-wise pass makes
/// again (the two normed states and the SwiGLU product) are recomputed by the backward
/// pass, not kept: at SmolLM2's shape 2,688 of 8,448 floats a token a layer (besides the
/// adapters' 7·r), 315 MiB at 8 × 128 tokens.
struct LayerTape {
    x: Tensor,
    norm1: RmsNormOp,
    q: ProjectionTape,
    k: ProjectionTape,
    v: ProjectionTape,
    rope_q: RopeOp,
    rope_k: RopeOp,
    /// After the rotary embedding.
    q_rot: Tensor,
    k_rot: Tensor,
    v_heads: Tensor,
    attention: AttentionOp,
    /// The attention's output, heads merged (b·t, heads·head_dim): `o`'s input.
    merged: Tensor,
    o: ProjectionTape,
    /// The residual stream after attention.
    x2: Tensor,
    norm2: RmsNormOp,
    gate: ProjectionTape,
    up: ProjectionTape,
    swiglu: SwigluOp,
    gate_out: Tensor,
    up_out: Tensor,
    down: ProjectionTape,
}

/// What every layer's pass shares: the rotary tables (b, 1, t, head_dim) and the
/// additive mask (b, 1, t, t).
struct Inputs {
    b: usize,
    t: usize,
    cos: Tensor,
    sin: Tensor,
    mask: Option<Tensor>,
}

/// Final hidden states (b, t, hidden) for `ids` (b, t) with `attention_mask` (b, t), as
/// [`Llama::forward_hidden`] computes them without a cache, and the tape of the pass.
///
/// With `checkpointing`, the tape keeps each layer's input only and the backward pass
/// runs the layer's forward pass again (the same ops on the same data and dropout
/// masks: the same values): memory for one layer's activations instead of all of them,
/// for a second forward pass of the layers.
pub fn forward(
    model: &Llama,
    ids: &Tensor,
    attention_mask: Option<&Tensor>,
    mode: Mode,
    checkpointing: bool,
) -> Result<(Tensor, Tape)> {
    let (b, t) = ids.dims2()?;
    let hidden = model.config.hidden_size;
    let (cos, sin, mask) = model.rotary_and_mask(b, t, 0, attention_mask, model.dtype())?;
    let inputs = Inputs {
        b,
        t,
        cos,
        sin,
        mask,
    };
    let mut x = model.embed(ids)?.reshape((b * t, hidden))?;
    let mut layers = Vec::with_capacity(model.layers.len());
    for layer in &model.layers {
        if checkpointing {
            let (next, _) = layer_forward(layer, x.clone(), &inputs, mode)?;
            layers.push(Layer::Recompute(x));
            x = next;
        } else {
            let (next, tape) = layer_forward(layer, x, &inputs, mode)?;
            layers.push(Layer::Saved(Box::new(tape)));
            x = next;
        }
    }
    let norm = RmsNormOp::new(&x, model.norm.weight(), model.norm.eps())?;
    let out = x.apply_op2_no_bwd(model.norm.weight(), &norm)?;
    let tape = Tape {
        inputs,
        mode,
        layers,
        last: x,
        norm,
    };
    Ok((out.reshape((b, t, hidden))?, tape))
}

/// The adapters' gradients for the gradient `d_hidden` (b, t, hidden) of the final hidden
/// states [`forward`] returned.
pub fn backward(model: &Llama, tape: Tape, d_hidden: &Tensor) -> Result<Gradients> {
    let (b, t) = (tape.inputs.b, tape.inputs.t);
    let mut grads = Gradients::default();
    let d_hidden = d_hidden.reshape((b * t, model.config.hidden_size))?;
    let mut dx = tape
        .norm
        .vjp(&tape.last, model.norm.weight(), &d_hidden)?
        .0
        .context("final norm: no input gradient")?;
    for (layer, part) in model.layers.iter().zip(tape.layers).rev() {
        let saved = match part {
            Layer::Saved(saved) => *saved,
            Layer::Recompute(x) => layer_forward(layer, x, &tape.inputs, tape.mode)?.1,
        };
        dx = layer_backward(layer, saved, &dx, (b, t), &mut grads)?;
    }
    Ok(grads)
}

/// `x` (b·t, hidden) → the layer's output, as [`DecoderLayer`]'s forward pass computes it.
fn layer_forward(
    layer: &DecoderLayer,
    x: Tensor,
    inputs: &Inputs,
    mode: Mode,
) -> Result<(Tensor, LayerTape)> {
    let Inputs { b, t, .. } = *inputs;
    let attn = &layer.self_attn;
    let (heads, kv_heads, hd) = (attn.num_heads, attn.num_kv_heads, attn.head_dim);

    let (norm1, h1) = rms_norm(&layer.input_layernorm, &x)?;
    let [(q, q_tape), (k, k_tape), (v, v_tape)] = outputs_of(tape::forward_shared(
        &[&attn.q_proj, &attn.k_proj, &attn.v_proj],
        &h1,
        mode,
    )?)?;
    let q = split_heads(&q, b, t, heads, hd)?;
    let k = split_heads(&k, b, t, kv_heads, hd)?;
    let v_heads = split_heads(&v, b, t, kv_heads, hd)?;
    let rope_q = RopeOp::new(&q, &inputs.cos, &inputs.sin)?;
    let rope_k = RopeOp::new(&k, &inputs.cos, &inputs.sin)?;
    let q_rot = q.apply_op1_no_bwd(&rope_q)?;
    let k_rot = k.apply_op1_no_bwd(&rope_k)?;
    let attention = AttentionOp::new(&q_rot, &k_rot, &v_heads, inputs.mask.as_ref(), attn.scale())?;
    let out = q_rot.apply_op3_no_bwd(&k_rot, &v_heads, &attention)?; // (b, heads, t, hd)
    let merged = merge_heads(&out)?
        .reshape((b * t, heads * hd))?
        .contiguous()?;
    let (o, o_tape) = tape::forward(&attn.o_proj, &merged, mode)?;
    let x2 = add(&x, &o)?;

    let mlp = &layer.mlp;
    let (norm2, h2) = rms_norm(&layer.post_attention_layernorm, &x2)?;
    let [(gate_out, gate_tape), (up_out, up_tape)] = outputs_of(tape::forward_shared(
        &[&mlp.gate_proj, &mlp.up_proj],
        &h2,
        mode,
    )?)?;
    let swiglu = SwigluOp::new(&gate_out, &up_out)?;
    let act = gate_out.apply_op2_no_bwd(&up_out, &swiglu)?;
    let (down, down_tape) = tape::forward(&mlp.down_proj, &act, mode)?;
    let x3 = add(&x2, &down)?;

    let saved = LayerTape {
        x,
        norm1,
        q: q_tape,
        k: k_tape,
        v: v_tape,
        rope_q,
        rope_k,
        q_rot,
        k_rot,
        v_heads,
        attention,
        merged,
        o: o_tape,
        x2,
        norm2,
        gate: gate_tape,
        up: up_tape,
        swiglu,
        gate_out,
        up_out,
        down: down_tape,
    };
    Ok((x3, saved))
}

/// The layer input's gradient for the output's `dx3` (b·t, hidden), in reverse order of
/// [`layer_forward`].
fn layer_backward(
    layer: &DecoderLayer,
    s: LayerTape,
    dx3: &Tensor,
    (b, t): (usize, usize),
    grads: &mut Gradients,
) -> Result<Tensor> {
    let attn = &layer.self_attn;
    let (heads, kv_heads, hd) = (attn.num_heads, attn.num_kv_heads, attn.head_dim);

    // MLP: x3 = x2 + down(silu(gate(h2)) · up(h2)), h2 = norm2(x2).
    let act = s.gate_out.apply_op2_no_bwd(&s.up_out, &s.swiglu)?;
    let d_act = s.down.backward(&act, dx3, grads)?;
    drop(act);
    let (d_gate, d_up) = s.swiglu.vjp(&s.gate_out, &s.up_out, &d_act)?;
    let weight2 = layer.post_attention_layernorm.weight();
    let h2 = s.x2.apply_op2_no_bwd(weight2, &s.norm2)?;
    let d_h2 = add(
        &s.gate
            .backward(&h2, &d_gate.context("swiglu: no gate gradient")?, grads)?,
        &s.up
            .backward(&h2, &d_up.context("swiglu: no up gradient")?, grads)?,
    )?;
    drop(h2);
    let d_x2 = s
        .norm2
        .vjp(&s.x2, weight2, &d_h2)?
        .0
        .context("norm: no gradient")?;
    let d_x2 = add(dx3, &d_x2)?;

    // Attention: x2 = x + o(attention(rope(q(h1)), rope(k(h1)), v(h1))), h1 = norm1(x).
    let d_merged = s.o.backward(&s.merged, &d_x2, grads)?;
    let d_out = split_heads(&d_merged, b, t, heads, hd)?;
    let (dq, dk, dv) = s.attention.vjp(&s.q_rot, &s.k_rot, &s.v_heads, &d_out)?;
    let missing = || anyhow::anyhow!("attention: no input gradient");
    let dq = s
        .rope_q
        .vjp(&s.q_rot, &dq.ok_or_else(missing)?)?
        .ok_or_else(missing)?;
    let dk = s
        .rope_k
        .vjp(&s.k_rot, &dk.ok_or_else(missing)?)?
        .ok_or_else(missing)?;
    let dv = dv.ok_or_else(missing)?;
    let rows =
        |d: &Tensor, n: usize| -> Result<Tensor> { Ok(merge_heads(d)?.reshape((b * t, n * hd))?) };
    let weight1 = layer.input_layernorm.weight();
    let h1 = s.x.apply_op2_no_bwd(weight1, &s.norm1)?;
    let d_h1 = add(
        &s.q.backward(&h1, &rows(&dq, heads)?, grads)?,
        &s.k.backward(&h1, &rows(&dk, kv_heads)?, grads)?,
    )?;
    let d_h1 = add(&d_h1, &s.v.backward(&h1, &rows(&dv, kv_heads)?, grads)?)?;
    drop(h1);
    let d_x = s
        .norm1
        .vjp(&s.x, weight1, &d_h1)?
        .0
        .context("norm: no gradient")?;
    Ok(add(&d_x2, &d_x)?)
}

/// The N results of a [`tape::forward_shared`] of N projections, as an array.
fn outputs_of<const N: usize>(
    outputs: Vec<(Tensor, ProjectionTape)>,
) -> Result<[(Tensor, ProjectionTape); N]> {
    outputs
        .try_into()
        .map_err(|o: Vec<_>| anyhow::anyhow!("{N} projections gave {} outputs", o.len()))
}

/// RMSNorm of `x` (rows, hidden) with no graph, and its op for the backward pass.
fn rms_norm(norm: &super::norm::RmsNorm, x: &Tensor) -> Result<(RmsNormOp, Tensor)> {
    let op = RmsNormOp::new(x, norm.weight(), norm.eps())?;
    let y = x.apply_op2_no_bwd(norm.weight(), &op)?;
    Ok((op, y))
}
