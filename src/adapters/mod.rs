//! Adapters on the frozen projections: LoRA, RoRA (LoRA scaled by `alpha/sqrt(r)`) and
//! DoRA, with PEFT's initialisation, naming and scaling so that adapters move between
//! rora and PEFT unchanged.

pub mod merge;
pub mod peft;

use crate::model::Llama;
use crate::nn::dora::row_norms;
use crate::nn::{Adapter, DoraAdapter, LoraAdapter};
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The projections an adapter can target, in the order a layer applies them.
pub use crate::model::schema::MODULES;

/// DoRA's commonsense recipe.
pub fn default_targets() -> Vec<String> {
    ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
        .map(String::from)
        .to_vec()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    Lora,
    /// LoRA with `alpha / sqrt(r)`.
    Rora,
    Dora,
    /// DoRA with `alpha / sqrt(r)`.
    RoraDora,
}

impl Method {
    pub fn is_dora(self) -> bool {
        matches!(self, Method::Dora | Method::RoraDora)
    }

    /// `alpha / sqrt(r)` (PEFT `use_rslora`)?
    pub fn rank_stabilized(self) -> bool {
        matches!(self, Method::Rora | Method::RoraDora)
    }

    /// The adapter's output scale γ.
    pub fn scaling(self, alpha: f64, rank: usize) -> f64 {
        if self.rank_stabilized() {
            alpha / (rank as f64).sqrt()
        } else {
            alpha / rank as f64
        }
    }
}

/// Settings of the `attach` stage.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachSpec {
    /// Start from a PEFT adapter folder instead of fresh adapters: method, rank, alpha,
    /// dropout, targets and patterns then come from its `adapter_config.json`.
    #[serde(default)]
    pub from: Option<std::path::PathBuf>,
    /// Required unless `from` is given.
    #[serde(default)]
    pub method: Option<Method>,
    #[serde(default = "default_rank")]
    pub rank: usize,
    /// Default: twice the rank (DoRA's recipe uses alpha = 2r).
    #[serde(default)]
    pub alpha: Option<f64>,
    #[serde(default = "default_dropout")]
    pub dropout: f64,
    #[serde(default = "default_targets")]
    pub targets: Vec<String>,
    /// Layer indices to adapt; default all.
    #[serde(default)]
    pub layers: Option<Vec<usize>>,
    /// Per-module rank, like PEFT's `rank_pattern` (key: a module name such as `v_proj`,
    /// or a full `layers.N.self_attn.v_proj`).
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, usize>,
    /// Per-module alpha, like PEFT's `alpha_pattern`.
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, f64>,
}

fn default_rank() -> usize {
    8
}
fn default_dropout() -> f64 {
    0.05
}

impl AttachSpec {
    /// `attach: {from: dir}`: the adapter in the PEFT folder `dir`, with its own settings.
    pub fn from_folder(dir: std::path::PathBuf) -> Self {
        Self {
            from: Some(dir),
            method: None,
            rank: default_rank(),
            alpha: None,
            dropout: default_dropout(),
            targets: default_targets(),
            layers: None,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
        }
    }

    pub fn alpha(&self) -> f64 {
        self.alpha.unwrap_or(2.0 * self.rank as f64)
    }

    /// The method of a fresh attach (validated to be present).
    pub fn method(&self) -> Result<Method> {
        self.method.ok_or_else(|| {
            anyhow::anyhow!(
                "attach needs `method` (lora, rora, dora or rora_dora) or `from: ADAPTER_DIR`"
            )
        })
    }

    pub fn validate(&self, num_layers: Option<usize>) -> Result<()> {
        if let Some(dir) = &self.from {
            if self.method.is_some() {
                bail!(
                    "attach: give either `from` (settings come from {}/adapter_config.json) or `method`, not both",
                    dir.display()
                );
            }
            return Ok(());
        }
        self.method()?;
        if self.rank == 0 || self.rank_pattern.values().any(|&r| r == 0) {
            bail!("attach.rank (and every rank_pattern value) must be at least 1");
        }
        if !(0.0..1.0).contains(&self.dropout) {
            bail!("attach.dropout must be in [0, 1), got {}", self.dropout);
        }
        if self.targets.is_empty() {
            bail!(
                "attach.targets is empty; name modules from {}",
                MODULES.join(", ")
            );
        }
        for t in &self.targets {
            if !MODULES.contains(&t.as_str()) {
                bail!(
                    "attach.targets: unknown module `{t}`; choose from {}",
                    MODULES.join(", ")
                );
            }
        }
        for key in self.rank_pattern.keys().chain(self.alpha_pattern.keys()) {
            let module = key.rsplit('.').next().unwrap_or(key);
            if !MODULES.contains(&module) {
                bail!(
                    "attach rank_pattern/alpha_pattern key `{key}` names no module ({})",
                    MODULES.join(", ")
                );
            }
        }
        if let (Some(layers), Some(n)) = (&self.layers, num_layers) {
            if let Some(bad) = layers.iter().find(|&&l| l >= n) {
                bail!("attach.layers: layer {bad} does not exist (the model has {n} layers)");
            }
        }
        Ok(())
    }

    /// Rank and alpha for one module, after the patterns (full path wins over module name).
    fn rank_alpha(&self, layer: usize, path: &str) -> (usize, f64) {
        let module = path.rsplit('.').next().unwrap_or(path);
        let full = format!("layers.{layer}.{path}");
        let rank = self
            .rank_pattern
            .get(&full)
            .or_else(|| self.rank_pattern.get(module))
            .copied()
            .unwrap_or(self.rank);
        let alpha = self
            .alpha_pattern
            .get(&full)
            .or_else(|| self.alpha_pattern.get(module))
            .copied()
            .unwrap_or(self.alpha());
        (rank, alpha)
    }
}

/// What `attach` did, for the log and the reports.
#[derive(Debug, Clone, Serialize)]
pub struct AttachReport {
    pub method: Method,
    pub rank: usize,
    pub alpha: f64,
    pub scaling: f64,
    pub adapted_modules: usize,
    pub trainable_params: u64,
    pub model_params: u64,
    /// trainable / model parameters, in percent (the papers' "# Params (%)").
    pub trainable_percent: f64,
}

/// PEFT's name prefix of a projection: `base_model.model.model.layers.N.self_attn.q_proj`.
pub fn peft_prefix(layer: usize, path: &str) -> String {
    format!("{}.{path}", crate::model::schema::peft_layer_prefix(layer))
}

/// Uniform(−1/sqrt(in), 1/sqrt(in)): PyTorch's `kaiming_uniform_(a=sqrt(5))`, PEFT's
/// default for `lora_A`.
fn kaiming_uniform(
    rng: &mut impl Rng,
    rows: usize,
    cols: usize,
    device: &Device,
) -> Result<Tensor> {
    let bound = 1.0 / (cols as f64).sqrt();
    let v: Vec<f32> = (0..rows * cols)
        .map(|_| rng.random_range(-bound..bound) as f32)
        .collect();
    Ok(Tensor::from_vec(v, (rows, cols), device)?)
}

/// Attaches fresh adapters (A random, B zero, DoRA magnitude = ‖W‖_row) to the targeted
/// projections. Initialisation draws from a ChaCha stream seeded with `seed`, module by
/// module in layer order, so a seed always gives the same adapters.
pub fn attach(model: &mut Llama, spec: &AttachSpec, seed: u64) -> Result<AttachReport> {
    spec.validate(Some(model.num_layers()))?;
    let method = spec.method()?;
    let model_params_before = model.num_params() as u64;
    let device = model.device().clone();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut trainable = 0u64;
    let mut adapted = 0usize;
    for (layer, path, linear) in model.projections_mut() {
        let module = path.rsplit('.').next().unwrap_or(path);
        let layer_selected = spec.layers.as_ref().is_none_or(|ls| ls.contains(&layer));
        if !layer_selected || !spec.targets.iter().any(|t| t == module) {
            continue;
        }
        let (out_dim, in_dim) = linear.weight().dims2()?;
        let (rank, alpha) = spec.rank_alpha(layer, path);
        let lora = LoraAdapter {
            a: Var::from_tensor(&kaiming_uniform(&mut rng, rank, in_dim, &device)?)?,
            b: Var::from_tensor(&Tensor::zeros((out_dim, rank), DType::F32, &device)?)?,
            scale: method.scaling(alpha, rank),
            dropout: spec.dropout,
            id: (layer * MODULES.len() + MODULES.iter().position(|m| *m == module).unwrap_or(0))
                as u64,
        };
        trainable += (rank * (in_dim + out_dim)) as u64;
        let adapter = if method.is_dora() {
            trainable += out_dim as u64;
            Adapter::Dora(DoraAdapter {
                magnitude: Var::from_tensor(&row_norms(linear.weight(), None)?)?,
                lora,
            })
        } else {
            Adapter::Lora(lora)
        };
        linear.set_adapter(Some(adapter));
        adapted += 1;
    }
    if adapted == 0 {
        bail!("attach matched no projection: check `targets` and `layers`");
    }
    Ok(AttachReport {
        method,
        rank: spec.rank,
        alpha: spec.alpha(),
        scaling: method.scaling(spec.alpha(), spec.rank),
        adapted_modules: adapted,
        trainable_params: trainable,
        model_params: model_params_before,
        trainable_percent: 100.0 * trainable as f64 / model_params_before as f64,
    })
}

/// Every trainable tensor of the model under its PEFT name, in a fixed order.
pub fn trainable_vars(model: &Llama) -> Vec<(String, Var)> {
    let mut out = Vec::new();
    for (layer, path, linear) in model.projections() {
        if let Some(adapter) = linear.adapter() {
            for (suffix, var) in adapter.vars() {
                out.push((
                    format!("{}.{suffix}", peft_prefix(layer, path)),
                    var.clone(),
                ));
            }
        }
    }
    out
}
