//! A pruned model zero-padded back to one width for every layer, so that a plain
//! config.json (no `layer_shapes`) describes it and stock `LlamaForCausalLM` loads it.
//!
//! The padding computes exactly the same function:
//! - MLP channels: zero rows appended to gate and up, zero columns to down. A padded
//!   channel's activation is SiLU(0)·0 = 0, and its zero column of down adds nothing.
//! - Key/value groups: zero rows appended to k and v, with their query heads' zero rows in
//!   q, and zero columns in o. A padded head's scores are all 0 (softmax: uniform), its
//!   values are 0, so its output is 0, and o's zero columns drop it anyway.
//!
//! Padding goes at the end, so the kept heads keep their positions. Grouped-query
//! attention maps query head h to key/value group h / (heads / kv_heads); that stays right
//! only if every layer has the widest layer's heads per group, which pruning whole groups
//! with their query heads keeps — a model where it differs is refused.

use crate::model::schema::Projection;
use crate::model::LayerShape;
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use std::collections::BTreeMap;

/// The widest width of each kind over the layers.
pub fn widest(shapes: &[LayerShape]) -> LayerShape {
    let max = |f: fn(&LayerShape) -> usize| shapes.iter().map(f).max().unwrap_or(0);
    LayerShape {
        num_attention_heads: max(|s| s.num_attention_heads),
        num_key_value_heads: max(|s| s.num_key_value_heads),
        intermediate_size: max(|s| s.intermediate_size),
    }
}

/// The merged tensors (Hugging Face names) with every layer padded to [`widest`].
pub fn pad_to_widest(
    mut tensors: BTreeMap<String, Tensor>,
    shapes: &[LayerShape],
    head_dim: usize,
) -> Result<BTreeMap<String, Tensor>> {
    let wide = widest(shapes);
    let group = heads_per_group(&wide, usize::MAX)?;
    for (i, s) in shapes.iter().enumerate() {
        if heads_per_group(s, i)? != group {
            bail!(
                "layer {i} has {} query heads for {} key/value heads, the widest layers {} for \
                 {}: zero-padding would pair query heads with the wrong key/value heads, so \
                 this model has no padded form",
                s.num_attention_heads,
                s.num_key_value_heads,
                wide.num_attention_heads,
                wide.num_key_value_heads
            );
        }
    }
    for i in 0..shapes.len() {
        let q = wide.num_attention_heads * head_dim;
        let kv = wide.num_key_value_heads * head_dim;
        let mlp = wide.intermediate_size;
        // (projection, axis to pad, padded length): rows are axis 0, columns axis 1.
        let plan = [
            (Projection::Q, 0, q),
            (Projection::K, 0, kv),
            (Projection::V, 0, kv),
            (Projection::O, 1, q),
            (Projection::Gate, 0, mlp),
            (Projection::Up, 0, mlp),
            (Projection::Down, 1, mlp),
        ];
        for (proj, axis, len) in plan {
            let name = proj.hf_name(i);
            let t = tensors
                .remove(&name)
                .with_context(|| format!("the merged model has no {name}"))?;
            tensors.insert(name, zero_pad(&t, axis, len)?);
        }
    }
    Ok(tensors)
}

/// Query heads per key/value head of a layer (`layer` names it in the error).
fn heads_per_group(s: &LayerShape, layer: usize) -> Result<usize> {
    if s.num_key_value_heads == 0 || !s.num_attention_heads.is_multiple_of(s.num_key_value_heads) {
        let which = if layer == usize::MAX {
            "the widest layer".to_string()
        } else {
            format!("layer {layer}")
        };
        bail!(
            "{which} has {} query heads for {} key/value heads, not a whole number per group",
            s.num_attention_heads,
            s.num_key_value_heads
        );
    }
    Ok(s.num_attention_heads / s.num_key_value_heads)
}

/// `t` with zeros appended along `axis` up to `len`.
fn zero_pad(t: &Tensor, axis: usize, len: usize) -> Result<Tensor> {
    let have = t.dim(axis)?;
    if have == len {
        return Ok(t.clone());
    }
    let mut dims = t.dims().to_vec();
    dims[axis] = len - have;
    let zeros = Tensor::zeros(dims, t.dtype(), t.device())?;
    Ok(Tensor::cat(&[t, &zeros], axis)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn shape(heads: usize, kv: usize, mlp: usize) -> LayerShape {
        LayerShape {
            num_attention_heads: heads,
            num_key_value_heads: kv,
            intermediate_size: mlp,
        }
    }

    #[test]
    fn padding_appends_zeros_and_refuses_mismatched_groups() {
        let t = Tensor::ones((2, 3), DType::F32, &Device::Cpu).unwrap();
        let p = zero_pad(&t, 1, 5).unwrap();
        assert_eq!(p.dims(), &[2, 5]);
        let rows: Vec<Vec<f32>> = p.to_vec2().unwrap();
        assert_eq!(rows[0], vec![1., 1., 1., 0., 0.]);
        assert_eq!(widest(&[shape(8, 4, 10), shape(4, 2, 30)]), shape(8, 4, 30));
        let msg = pad_to_widest(BTreeMap::new(), &[shape(8, 4, 10), shape(4, 1, 10)], 2)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("layer 1 has 4 query heads for 1 key/value heads"),
            "{msg}"
        );
    }
}
