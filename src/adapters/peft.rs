//! The adapter alone in PEFT's format: `adapter_config.json` and
//! `adapter_model.safetensors` with PEFT's key names, so `PeftModel.from_pretrained` loads
//! what we train and we load what PEFT trains. LoRA/DoRA and prefix tuning are PEFT's
//! `LORA` and `PREFIX_TUNING`; series/parallel adapters are LLM-Adapters' `BOTTLENECK`.

use super::bottleneck::BottleneckConfig;
use super::prefix::{load_prefix, PeftPrefixConfig, PROMPT_EMBEDDINGS};
use super::{attach, trainable_vars, AttachReport, AttachSpec, Method};
use crate::fsx;
use crate::model::Llama;
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// The fields of PEFT's `LoraConfig` that describe our adapters; the rest are written
/// with PEFT's defaults.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeftLoraConfig {
    pub peft_type: String,
    #[serde(default)]
    pub task_type: Option<String>,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    pub r: usize,
    #[serde(serialize_with = "whole_as_integer")]
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f64,
    pub target_modules: TargetModules,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub use_dora: bool,
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, usize>,
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, f64>,
    #[serde(default)]
    pub layers_to_transform: Option<LayersToTransform>,
    #[serde(default = "none_str")]
    pub bias: String,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    pub inference_mode: bool,
    #[serde(default = "yes")]
    pub init_lora_weights: serde_json::Value,
}

/// PEFT writes `lora_alpha: 16`, not `16.0`.
fn whole_as_integer<S: serde::Serializer>(x: &f64, s: S) -> std::result::Result<S::Ok, S::Error> {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        s.serialize_i64(*x as i64)
    } else {
        s.serialize_f64(*x)
    }
}

pub(super) fn none_str() -> String {
    "none".into()
}
fn yes() -> serde_json::Value {
    serde_json::Value::Bool(true)
}

/// PEFT accepts a list of module names or one regex string.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    List(Vec<String>),
    Regex(String),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LayersToTransform {
    One(usize),
    Many(Vec<usize>),
}

impl PeftLoraConfig {
    pub fn from_spec(spec: &AttachSpec, base_model: Option<String>) -> Result<Self> {
        let method = spec.method()?;
        Ok(Self {
            peft_type: "LORA".into(),
            task_type: Some("CAUSAL_LM".into()),
            base_model_name_or_path: base_model,
            r: spec.rank,
            lora_alpha: spec.alpha(),
            lora_dropout: spec.dropout(),
            target_modules: TargetModules::List(spec.targets()),
            use_rslora: method.rank_stabilized(),
            use_dora: method.is_dora(),
            rank_pattern: spec.rank_pattern.clone(),
            alpha_pattern: spec.alpha_pattern.clone(),
            layers_to_transform: spec.layers.clone().map(LayersToTransform::Many),
            bias: "none".into(),
            fan_in_fan_out: false,
            modules_to_save: None,
            inference_mode: true,
            init_lora_weights: yes(),
        })
    }

    /// The equivalent attach settings, refusing what rora cannot represent.
    pub fn to_spec(&self, file: &Path) -> Result<AttachSpec> {
        let bad =
            |what: &str| anyhow::anyhow!("{}: {what} is not supported by rora", file.display());
        if self.peft_type != "LORA" {
            return Err(bad(&format!(
                "peft_type `{}` (LORA, with use_dora for DoRA; PREFIX_TUNING; LLM-Adapters' BOTTLENECK)",
                self.peft_type
            )));
        }
        if self.bias != "none" {
            return Err(bad(&format!("bias `{}`", self.bias)));
        }
        if self.fan_in_fan_out {
            return Err(bad("fan_in_fan_out"));
        }
        if self.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
            return Err(bad("modules_to_save"));
        }
        let targets = match &self.target_modules {
            TargetModules::List(l) => l.clone(),
            TargetModules::Regex(r) => {
                return Err(bad(&format!(
                    "a regex target_modules `{r}`; list the modules"
                )))
            }
        };
        let method = match (self.use_rslora, self.use_dora) {
            (false, false) => Method::Lora,
            (true, false) => Method::Rora,
            (false, true) => Method::Dora,
            (true, true) => Method::RoraDora,
        };
        Ok(AttachSpec {
            rank: self.r,
            alpha: Some(self.lora_alpha),
            dropout: Some(self.lora_dropout),
            targets: Some(targets),
            layers: self.layers_to_transform.clone().map(|l| match l {
                LayersToTransform::One(i) => vec![i],
                LayersToTransform::Many(v) => v,
            }),
            rank_pattern: self.rank_pattern.clone(),
            alpha_pattern: self.alpha_pattern.clone(),
            ..AttachSpec::new(method)
        })
    }
}

/// Writes the model's adapters into `dir` (created; files replaced atomically).
pub fn write_adapter(
    model: &Llama,
    spec: &AttachSpec,
    base_model: Option<String>,
    dir: &Path,
) -> Result<()> {
    let vars = trainable_vars(model);
    if vars.is_empty() {
        bail!("there is no adapter to export; put an `attach` stage before `export`");
    }
    let method = spec.method()?;
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create adapter folder {}", dir.display()))?;
    let config = dir.join(CONFIG_FILE);
    let weights = || -> HashMap<String, Tensor> {
        vars.iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect()
    };
    let tensors = match (&model.prefix, method) {
        (Some(prefix), Method::Prefix) => {
            fsx::write_json(&config, &PeftPrefixConfig::new(prefix, spec, base_model))?;
            HashMap::from([(PROMPT_EMBEDDINGS.to_string(), prefix.rows()?)])
        }
        (None, m) if m.is_bottleneck() => {
            fsx::write_json(&config, &BottleneckConfig::from_spec(spec, base_model)?)?;
            weights()
        }
        (None, m) if m.is_low_rank() => {
            fsx::write_json(&config, &PeftLoraConfig::from_spec(spec, base_model)?)?;
            weights()
        }
        _ => bail!(
            "export.adapter: the attach settings ({}) do not describe the model's adapters",
            spec.describe()
        ),
    };
    let tmp = dir.join(format!(".{WEIGHTS_FILE}.tmp-{}", std::process::id()));
    candle_core::safetensors::save(&tensors, &tmp)?;
    std::fs::rename(&tmp, dir.join(WEIGHTS_FILE))?;
    Ok(())
}

/// An adapter folder's config, whichever of the three formats it is.
pub enum AdapterConfig {
    Lora(PeftLoraConfig),
    Prefix(PeftPrefixConfig),
    Bottleneck(BottleneckConfig),
}

/// Reads `dir/adapter_config.json`.
pub fn read_config(dir: &Path) -> Result<AdapterConfig> {
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "cannot read {}; `attach.from` must be a PEFT (or LLM-Adapters) adapter folder",
            path.display()
        )
    })?;
    let value: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    let peft_type = value
        .get("peft_type")
        .and_then(|v| v.as_str())
        .unwrap_or_default()
        .to_string();
    let parse = |what: &str| format!("{} is not a {what} config", path.display());
    Ok(match peft_type.as_str() {
        "PREFIX_TUNING" => AdapterConfig::Prefix(
            serde_json::from_value(value).with_context(|| parse("PEFT prefix-tuning"))?,
        ),
        "BOTTLENECK" => AdapterConfig::Bottleneck(
            serde_json::from_value(value).with_context(|| parse("LLM-Adapters bottleneck"))?,
        ),
        "LORA" => {
            AdapterConfig::Lora(serde_json::from_value(value).with_context(|| parse("PEFT LoRA"))?)
        }
        other => bail!(
            "{}: peft_type `{other}` is not supported by rora (LORA, with use_dora for DoRA; \
             PREFIX_TUNING; LLM-Adapters' BOTTLENECK)",
            path.display()
        ),
    })
}

/// Reads `dir/adapter_config.json` as attach settings.
pub fn read_adapter_config(dir: &Path) -> Result<AttachSpec> {
    let path = dir.join(CONFIG_FILE);
    match read_config(dir)? {
        AdapterConfig::Lora(cfg) => cfg.to_spec(&path),
        AdapterConfig::Prefix(cfg) => Ok(cfg.to_spec()),
        AdapterConfig::Bottleneck(cfg) => cfg.to_spec(&path),
    }
}

/// Attaches the adapters of an adapter folder: the settings from its config, the weights
/// from its safetensors (every tensor must be used, every adapter filled).
pub fn attach_from_folder(model: &mut Llama, dir: &Path) -> Result<(AttachSpec, AttachReport)> {
    let config = read_config(dir)?;
    let spec = read_adapter_config(dir)?;
    let path = dir.join(WEIGHTS_FILE);
    let device = model.device().clone();
    let mut tensors = candle_core::safetensors::load(&path, &device)
        .with_context(|| format!("cannot read {}", path.display()))?;
    if let AdapterConfig::Prefix(cfg) = &config {
        let rows = tensors
            .remove(PROMPT_EMBEDDINGS)
            .with_context(|| format!("{} has no tensor `{PROMPT_EMBEDDINGS}`", path.display()))?;
        if let Some(extra) = tensors.keys().next() {
            bail!(
                "{}: tensor `{extra}` is not part of a prefix-tuning adapter",
                path.display()
            );
        }
        // `attach` builds and counts a fresh prefix; the saved rows then replace it.
        let report = attach(model, &spec, 0)?;
        model.prefix = Some(load_prefix(model, cfg, rows, &path)?);
        return Ok((spec, report));
    }
    let report = attach(model, &spec, 0)?;
    for (name, var) in trainable_vars(model) {
        let t = tensors.remove(&name).with_context(|| {
            format!(
                "{} has no tensor `{name}` that its config implies",
                path.display()
            )
        })?;
        if t.shape() != var.shape() {
            bail!(
                "{}: tensor `{name}` has shape {:?}, the model needs {:?}",
                path.display(),
                t.dims(),
                var.dims()
            );
        }
        var.set(&t.to_dtype(candle_core::DType::F32)?)?;
    }
    if let Some(extra) = tensors.keys().next() {
        bail!(
            "{}: tensor `{extra}` matches no adapter of this model (different layers or targets?)",
            path.display()
        );
    }
    Ok((spec, report))
}
