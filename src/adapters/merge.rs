//! Folding adapters into the base weights (export): computed in f32, cast at the end.
//! LoRA/RoRA: `W' = W + γBA`; DoRA: `W' = (m / ‖W + γBA‖_row) ⊙ (W + γBA)`.

use crate::model::Llama;
use crate::nn::Adapter;
use anyhow::Result;
use candle_core::{DType, Tensor};

/// The merged weight of one projection, in `dtype`.
pub fn merged_weight(weight: &Tensor, adapter: &Adapter, dtype: DType) -> Result<Tensor> {
    let w = weight.to_dtype(DType::F32)?;
    let updated = (&w + adapter.lora().delta_weight()?)?;
    let merged = match adapter {
        Adapter::Lora(_) => updated,
        Adapter::Dora(d) => {
            let norm = updated.sqr()?.sum_keepdim(1)?.sqrt()?;
            let scale = d.magnitude.as_tensor().unsqueeze(1)?.broadcast_div(&norm)?;
            updated.broadcast_mul(&scale)?
        }
    };
    Ok(merged.to_dtype(dtype)?)
}

/// Replaces every adapted projection's weight by its merged weight and removes the
/// adapters: the model then computes what the adapted model did, with no adapter.
pub fn merge_into_base(model: &mut Llama) -> Result<()> {
    let dtype = model.dtype();
    for (_, _, linear) in model.projections_mut() {
        if let Some(adapter) = linear.adapter().cloned() {
            let merged = merged_weight(linear.weight(), &adapter, dtype)?;
            linear.set_weight(merged);
            linear.set_adapter(None);
        }
    }
    Ok(())
}
