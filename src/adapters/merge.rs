//! Folding adapters into the base weights (export): computed in f32, cast at the end.
//! LoRA/RoRA: `W' = W + γBA`; DoRA: `W' = (m / ‖W + γBA‖_row) ⊙ (W + γBA)`.

use crate::model::Llama;
use crate::nn::Adapter;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

/// Why the model's adapters cannot be folded into its weights, if they cannot: prefix
/// tuning is not a weight and bottleneck adapters are nonlinear.
pub fn unmergeable(model: &Llama) -> Option<String> {
    if model.prefix.is_some() {
        return Some(
            "prefix tuning adds key/value vectors, not a weight update, so there is nothing to \
             fold into the weights"
                .into(),
        );
    }
    model
        .projections()
        .find_map(|(layer, path, l)| match l.adapter() {
            Some(Adapter::Bottleneck(b)) => Some(format!(
            "the {:?} bottleneck adapter on layers.{layer}.{path} is nonlinear ({}), so it has no \
             equivalent weight",
            b.placement,
            b.non_linearity.name()
        )),
            _ => None,
        })
}

/// Refuses `what` (an export that needs merged weights) for unmergeable adapters.
pub fn ensure_mergeable(model: &Llama, what: &str) -> Result<()> {
    if let Some(why) = unmergeable(model) {
        bail!(
            "{what} needs the adapters merged into the weights, and {why}; export the adapter \
             alone (`export: {{adapter: DIR}}`) and load it on the base model instead"
        );
    }
    Ok(())
}

/// The merged weight of one projection, in `dtype`.
pub fn merged_weight(weight: &Tensor, adapter: &Adapter, dtype: DType) -> Result<Tensor> {
    let w = weight.to_dtype(DType::F32)?;
    let Some(lora) = adapter.lora() else {
        bail!("a bottleneck adapter is nonlinear and cannot be merged into its weight");
    };
    let updated = (&w + lora.delta_weight()?)?;
    let merged = match adapter {
        Adapter::Dora(d) => {
            let norm = updated.sqr()?.sum_keepdim(1)?.sqrt()?;
            let scale = d.magnitude.as_tensor().unsqueeze(1)?.broadcast_div(&norm)?;
            updated.broadcast_mul(&scale)?
        }
        _ => updated,
    };
    Ok(merged.to_dtype(dtype)?)
}

/// Replaces every adapted projection's weight by its merged weight and removes the
/// adapters: the model then computes what the adapted model did, with no adapter.
pub fn merge_into_base(model: &mut Llama) -> Result<()> {
    ensure_mergeable(model, "merging")?;
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
