//! LLM-Adapters' `BOTTLENECK` adapter folder: its `BottleneckConfig` as `save_pretrained`
//! writes it, and the weights under the names its `get_peft_model_state_dict` keeps
//! (`base_model.model.model.layers.N.mlp.down_proj.adapter_down.weight`, …). LLM-Adapters
//! saves them as `adapter_model.bin` (a torch pickle); rora writes the same tensors as
//! `adapter_model.safetensors` (the README gives the one-line conversion).

use super::{AttachSpec, Method};
use crate::nn::NonLinearity;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BottleneckConfig {
    pub peft_type: String,
    #[serde(default)]
    pub task_type: Option<String>,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    pub bottleneck_size: usize,
    pub non_linearity: String,
    #[serde(default)]
    pub adapter_dropout: f64,
    #[serde(default)]
    pub target_modules: Option<Vec<String>>,
    #[serde(default)]
    pub use_parallel_adapter: bool,
    #[serde(default)]
    pub use_adapterp: bool,
    /// A number, or `"learned"` (not supported).
    pub scaling: serde_json::Value,
    #[serde(default = "super::peft::none_str")]
    pub bias: String,
    #[serde(default = "mam")]
    pub init_weights: String,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    pub inference_mode: bool,
}

fn mam() -> String {
    "mam_adapter".into()
}

impl BottleneckConfig {
    pub fn from_spec(spec: &AttachSpec, base_model: Option<String>) -> Result<Self> {
        let method = spec.method()?;
        Ok(Self {
            peft_type: "BOTTLENECK".into(),
            task_type: Some("CAUSAL_LM".into()),
            base_model_name_or_path: base_model,
            bottleneck_size: spec.bottleneck_size,
            non_linearity: spec.non_linearity.name().into(),
            adapter_dropout: spec.dropout(),
            target_modules: Some(spec.targets()),
            use_parallel_adapter: method == Method::Parallel,
            use_adapterp: false,
            scaling: serde_json::json!(spec.scaling),
            bias: "none".into(),
            // rora's init (up = 0); the other, `bert`, only matters for fresh adapters.
            init_weights: "mam_adapter".into(),
            modules_to_save: None,
            inference_mode: true,
        })
    }

    /// The equivalent attach settings, refusing what rora cannot represent.
    pub fn to_spec(&self, file: &Path) -> Result<AttachSpec> {
        let bad =
            |what: String| anyhow::anyhow!("{}: {what} is not supported by rora", file.display());
        if self.bias != "none" {
            return Err(bad(format!("bias `{}`", self.bias)));
        }
        if self.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
            return Err(bad("modules_to_save".into()));
        }
        let Some(scaling) = self.scaling.as_f64() else {
            return Err(bad(format!("scaling {} (a number is)", self.scaling)));
        };
        let non_linearity: NonLinearity =
            serde_json::from_value(serde_json::json!(self.non_linearity)).map_err(|_| {
                bad(format!(
                    "non_linearity `{}` (tanh, relu, gelu or silu are)",
                    self.non_linearity
                ))
            })?;
        let method = if self.use_parallel_adapter {
            Method::Parallel
        } else {
            Method::Series
        };
        // LLM-Adapters' defaults when the config names no modules (`use_adapterp`: after
        // the MLP only).
        let targets = match (&self.target_modules, method, self.use_adapterp) {
            (Some(t), _, _) => t.clone(),
            (None, Method::Series, true) => vec!["down_proj".to_string()],
            (None, m, _) => m.default_targets(),
        };
        if !(self.init_weights == "bert" || self.init_weights == "mam_adapter") {
            bail!(
                "{}: init_weights `{}` is neither `bert` nor `mam_adapter`",
                file.display(),
                self.init_weights
            );
        }
        Ok(AttachSpec {
            dropout: Some(self.adapter_dropout),
            targets: Some(targets),
            bottleneck_size: self.bottleneck_size,
            non_linearity,
            scaling,
            ..AttachSpec::new(method)
        })
    }
}
