//! Adapters on the frozen model: LoRA, RoRA (LoRA scaled by `alpha/sqrt(r)`) and DoRA with
//! PEFT's initialisation, naming and scaling, so that adapters move between rora and PEFT
//! unchanged; and the paper's other baselines, LLM-Adapters' series and parallel bottleneck
//! adapters and PEFT's prefix tuning.

pub mod bottleneck;
pub mod merge;
pub mod peft;
pub mod prefix;

use crate::model::config::LayerShape;
use crate::model::schema::Projection;
use crate::model::Llama;
use crate::nn::dora::row_norms;
use crate::nn::{Adapter, BottleneckAdapter, DoraAdapter, LoraAdapter, NonLinearity, Placement};
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
    /// Prefix tuning: trainable keys and values before the sequence in every layer.
    Prefix,
    /// Series bottleneck adapters (Houlsby): on a projection's input or output.
    Series,
    /// Parallel bottleneck adapters (He et al.): beside a projection.
    Parallel,
}

impl Method {
    pub fn is_dora(self) -> bool {
        matches!(self, Method::Dora | Method::RoraDora)
    }

    /// `alpha / sqrt(r)` (PEFT `use_rslora`)?
    pub fn rank_stabilized(self) -> bool {
        matches!(self, Method::Rora | Method::RoraDora)
    }

    /// LoRA, RoRA, DoRA or RoRA+DoRA: a low-rank update that merges into the weights.
    pub fn is_low_rank(self) -> bool {
        matches!(
            self,
            Method::Lora | Method::Rora | Method::Dora | Method::RoraDora
        )
    }

    pub fn is_bottleneck(self) -> bool {
        matches!(self, Method::Series | Method::Parallel)
    }

    pub fn name(self) -> &'static str {
        match self {
            Method::Lora => "lora",
            Method::Rora => "rora",
            Method::Dora => "dora",
            Method::RoraDora => "rora_dora",
            Method::Prefix => "prefix",
            Method::Series => "series",
            Method::Parallel => "parallel",
        }
    }

    /// The low-rank update's output scale γ.
    pub fn scaling(self, alpha: f64, rank: usize) -> f64 {
        if self.rank_stabilized() {
            alpha / (rank as f64).sqrt()
        } else {
            alpha / rank as f64
        }
    }

    /// LLM-Adapters' default targets for LLaMA (bottleneck: gate/up/down; parallel:
    /// q/k/v), DoRA's recipe for the low-rank methods; none for prefix tuning.
    pub fn default_targets(self) -> Vec<String> {
        let names: &[&str] = match self {
            Method::Series => &["gate_proj", "up_proj", "down_proj"],
            Method::Parallel => &["q_proj", "k_proj", "v_proj"],
            Method::Prefix => &[],
            _ => return default_targets(),
        };
        names.iter().map(|s| s.to_string()).collect()
    }

    /// PEFT's `lora_dropout` default in LLM-Adapters' recipes (0.05); bottleneck
    /// adapters' `adapter_dropout` (0.0); prefix tuning has none.
    pub fn default_dropout(self) -> f64 {
        if self.is_low_rank() {
            0.05
        } else {
            0.0
        }
    }
}

/// Where a series adapter sits on a projection, after LLM-Adapters' LLaMA table
/// (`gate_proj`/`up_proj`: on the input, `down_proj`: on the output), extended to
/// attention the same way: on the input of q/k/v, on the output of o.
pub fn series_placement(module: &str) -> Placement {
    if matches!(module, "o_proj" | "down_proj") {
        Placement::After
    } else {
        Placement::Before
    }
}

/// Settings of the `attach` stage.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachSpec {
    /// Start from an adapter folder (PEFT's LoRA or prefix tuning, LLM-Adapters'
    /// bottleneck) instead of fresh adapters: the settings then come from its
    /// `adapter_config.json`.
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
    /// Default: 0.05 for the low-rank methods (`lora_dropout`), 0 for bottleneck adapters
    /// (LLM-Adapters' `adapter_dropout`); prefix tuning has none.
    #[serde(default)]
    pub dropout: Option<f64>,
    /// Default: [`Method::default_targets`].
    #[serde(default)]
    pub targets: Option<Vec<String>>,
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
    /// Series/parallel: the bottleneck width (LLM-Adapters' default 256).
    #[serde(default = "default_bottleneck_size")]
    pub bottleneck_size: usize,
    /// Series/parallel: the bottleneck's activation (LLM-Adapters' default tanh).
    #[serde(default)]
    pub non_linearity: NonLinearity,
    /// Series/parallel: the adapter branch's output scale (LLM-Adapters' default 1.0).
    #[serde(default = "default_scaling")]
    pub scaling: f64,
    /// Prefix: virtual tokens per layer (LLM-Adapters' default 30).
    #[serde(default = "default_virtual_tokens")]
    pub num_virtual_tokens: usize,
    /// Prefix: train the prefix through PEFT's two-layer MLP (`prefix_projection`).
    #[serde(default)]
    pub prefix_projection: bool,
    /// Prefix: the MLP's hidden width; default the key/value width, PEFT's `token_dim`.
    #[serde(default)]
    pub encoder_hidden_size: Option<usize>,
}

fn default_rank() -> usize {
    8
}
fn default_bottleneck_size() -> usize {
    256
}
fn default_scaling() -> f64 {
    1.0
}
fn default_virtual_tokens() -> usize {
    30
}

impl AttachSpec {
    /// Fresh adapters of `method` with every other setting at its default.
    pub fn new(method: Method) -> Self {
        Self {
            from: None,
            method: Some(method),
            ..Self::from_folder(std::path::PathBuf::new())
        }
    }

    /// `attach: {from: dir}`: the adapter in the folder `dir`, with its own settings.
    pub fn from_folder(dir: std::path::PathBuf) -> Self {
        Self {
            from: Some(dir),
            method: None,
            rank: default_rank(),
            alpha: None,
            dropout: None,
            targets: None,
            layers: None,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            bottleneck_size: default_bottleneck_size(),
            non_linearity: NonLinearity::default(),
            scaling: default_scaling(),
            num_virtual_tokens: default_virtual_tokens(),
            prefix_projection: false,
            encoder_hidden_size: None,
        }
    }

    pub fn alpha(&self) -> f64 {
        self.alpha.unwrap_or(2.0 * self.rank as f64)
    }

    /// The method of a fresh attach (validated to be present).
    pub fn method(&self) -> Result<Method> {
        self.method.ok_or_else(|| {
            anyhow::anyhow!(
                "attach needs `method` (lora, rora, dora, rora_dora, prefix, series or parallel) \
                 or `from: ADAPTER_DIR`"
            )
        })
    }

    pub fn dropout(&self) -> f64 {
        self.dropout
            .unwrap_or_else(|| self.method.map_or(0.05, Method::default_dropout))
    }

    pub fn targets(&self) -> Vec<String> {
        self.targets.clone().unwrap_or_else(|| {
            self.method
                .map_or_else(default_targets, Method::default_targets)
        })
    }

    /// One line for logs and plans.
    pub fn describe(&self) -> String {
        let Some(method) = self.method else {
            return match &self.from {
                Some(d) => format!("adapters from {}", d.display()),
                None => "?".into(),
            };
        };
        let targets = self.targets().join(", ");
        match method {
            Method::Prefix => format!(
                "prefix, {} virtual tokens{}",
                self.num_virtual_tokens,
                if self.prefix_projection {
                    format!(
                        " through an MLP (hidden {})",
                        self.encoder_hidden_size
                            .map_or("= key/value width".into(), |e| e.to_string())
                    )
                } else {
                    String::new()
                }
            ),
            Method::Series | Method::Parallel => format!(
                "{} bottleneck {} ({}, scaling {}) on {targets}",
                method.name(),
                self.bottleneck_size,
                self.non_linearity.name(),
                self.scaling
            ),
            _ => format!(
                "{} rank {} alpha {} (γ = {:.4}) on {targets}",
                method.name(),
                self.rank,
                self.alpha(),
                method.scaling(self.alpha(), self.rank)
            ),
        }
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
        let method = self.method()?;
        let dropout = self.dropout();
        if !(0.0..1.0).contains(&dropout) {
            bail!("attach.dropout must be in [0, 1), got {dropout}");
        }
        if let (Some(layers), Some(n)) = (&self.layers, num_layers) {
            if let Some(bad) = layers.iter().find(|&&l| l >= n) {
                bail!("attach.layers: layer {bad} does not exist (the model has {n} layers)");
            }
        }
        if method == Method::Prefix {
            if self.num_virtual_tokens == 0 {
                bail!("attach.num_virtual_tokens must be at least 1");
            }
            if self.encoder_hidden_size == Some(0) {
                bail!("attach.encoder_hidden_size must be at least 1");
            }
            if dropout > 0.0 {
                bail!("attach.dropout: prefix tuning has no dropout (PEFT has none); remove it");
            }
            if self.targets.is_some() || self.layers.is_some() {
                bail!(
                    "attach: prefix tuning adds keys and values to every layer's attention; \
                     `targets` and `layers` do not apply (remove them)"
                );
            }
            return Ok(());
        }
        if method.is_bottleneck() && self.bottleneck_size == 0 {
            bail!("attach.bottleneck_size must be at least 1");
        }
        if method.is_low_rank() && (self.rank == 0 || self.rank_pattern.values().any(|&r| r == 0)) {
            bail!("attach.rank (and every rank_pattern value) must be at least 1");
        }
        let has_patterns = !(self.rank_pattern.is_empty() && self.alpha_pattern.is_empty());
        if !method.is_low_rank() && has_patterns {
            bail!(
                "attach: rank_pattern/alpha_pattern are LoRA settings; {} adapters have none",
                method.name()
            );
        }
        let targets = self.targets();
        if targets.is_empty() {
            bail!(
                "attach.targets is empty; name modules from {}",
                MODULES.join(", ")
            );
        }
        for t in &targets {
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

    /// Trainable parameters these settings give a model of these shapes, counted from the
    /// shapes alone (the dry run's figure; `attach` counts the tensors it makes).
    pub fn trainable_params(&self, hidden: usize, head_dim: usize, shapes: &[LayerShape]) -> u64 {
        let Some(method) = self.method else {
            return 0;
        };
        if method == Method::Prefix {
            let kv_dim = shapes.first().map_or(0, |s| s.num_key_value_heads) * head_dim;
            let row = (shapes.len() * 2 * kv_dim) as u64;
            let n = self.num_virtual_tokens as u64;
            if !self.prefix_projection {
                return n * row;
            }
            let e = self.encoder_hidden_size.unwrap_or(kv_dim) as u64;
            let kv_dim = kv_dim as u64;
            return n * kv_dim + e * kv_dim + e + row * e + row;
        }
        let targets = self.targets();
        let mut total = 0u64;
        for (i, s) in shapes.iter().enumerate() {
            if self.layers.as_ref().is_some_and(|ls| !ls.contains(&i)) {
                continue;
            }
            for proj in Projection::ALL
                .into_iter()
                .filter(|p| targets.iter().any(|t| t == p.module()))
            {
                let (out, inp) = proj.shape(s, hidden, head_dim);
                total += match method {
                    Method::Series => {
                        let d = match series_placement(proj.module()) {
                            Placement::After => out,
                            _ => inp,
                        };
                        2 * self.bottleneck_size * d
                    }
                    Method::Parallel => self.bottleneck_size * (inp + out),
                    _ => {
                        let (r, _) = self.rank_alpha(i, proj.path());
                        r * (inp + out) + if method.is_dora() { out } else { 0 }
                    }
                } as u64;
            }
        }
        total
    }
}

/// What `attach` did, for the log and the reports.
#[derive(Debug, Clone, Serialize)]
pub struct AttachReport {
    pub method: Method,
    /// [`AttachSpec::describe`].
    pub settings: String,
    pub rank: usize,
    pub alpha: f64,
    /// The low-rank update's γ; 0 for the other methods.
    pub scaling: f64,
    /// Projections holding an adapter (0 for prefix tuning).
    pub adapted_modules: usize,
    pub trainable_params: u64,
    pub model_params: u64,
    /// trainable / model parameters, in percent.
    pub trainable_percent: f64,
    /// trainable / (model + trainable) parameters, in percent: PEFT's
    /// `print_trainable_parameters` and the papers' "# Params (%)".
    pub trainable_percent_of_all: f64,
}

impl AttachReport {
    fn new(spec: &AttachSpec, method: Method, modules: usize, trainable: u64, base: u64) -> Self {
        Self {
            method,
            settings: spec.describe(),
            rank: spec.rank,
            alpha: spec.alpha(),
            scaling: if method.is_low_rank() {
                method.scaling(spec.alpha(), spec.rank)
            } else {
                0.0
            },
            adapted_modules: modules,
            trainable_params: trainable,
            model_params: base,
            trainable_percent: 100.0 * trainable as f64 / base as f64,
            trainable_percent_of_all: 100.0 * trainable as f64 / (base + trainable) as f64,
        }
    }
}

/// PEFT's name prefix of a projection: `base_model.model.model.layers.N.self_attn.q_proj`.
pub fn peft_prefix(layer: usize, path: &str) -> String {
    format!("{}.{path}", crate::model::schema::peft_layer_prefix(layer))
}

/// Uniform(−1/sqrt(in), 1/sqrt(in)): PyTorch's `kaiming_uniform_(a=sqrt(5))`, PEFT's
/// default for `lora_A` (and `nn.Linear`'s for weights and biases).
fn kaiming_uniform(
    rng: &mut impl Rng,
    shape: &[usize],
    fan_in: usize,
    device: &Device,
) -> Result<Tensor> {
    let bound = 1.0 / (fan_in as f64).sqrt();
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| rng.random_range(-bound..bound) as f32)
        .collect();
    Ok(Tensor::from_vec(v, shape, device)?)
}

fn new_var(t: Tensor) -> Result<Var> {
    Ok(Var::from_tensor(&t)?)
}

/// Attaches fresh adapters: LoRA/DoRA with A random, B zero and DoRA's magnitude = ‖W‖_row;
/// bottleneck adapters with `down` random and `up` zero (LLM-Adapters' `mam_adapter`
/// init, so a fresh adapter changes nothing); a prefix as PEFT initialises it.
/// Initialisation draws from a ChaCha stream seeded with `seed`, module by module in
/// layer order, so a seed always gives the same adapters.
pub fn attach(model: &mut Llama, spec: &AttachSpec, seed: u64) -> Result<AttachReport> {
    spec.validate(Some(model.num_layers()))?;
    if model.has_adapters() {
        bail!("attach: the model already has adapters (one `attach` stage per pipeline)");
    }
    let method = spec.method()?;
    let model_params_before = model.num_params() as u64;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    if method == Method::Prefix {
        let prefix = prefix::fresh_prefix(model, spec, &mut rng)?;
        let trainable: u64 = prefix
            .vars()
            .iter()
            .map(|(_, v)| v.elem_count() as u64)
            .sum();
        model.prefix = Some(prefix);
        return Ok(AttachReport::new(
            spec,
            method,
            0,
            trainable,
            model_params_before,
        ));
    }
    let device = model.device().clone();
    let targets = spec.targets();
    let dropout = spec.dropout();
    let mut trainable = 0u64;
    let mut adapted = 0usize;
    for (layer, path, linear) in model.projections_mut() {
        let module = path.rsplit('.').next().unwrap_or(path);
        let layer_selected = spec.layers.as_ref().is_none_or(|ls| ls.contains(&layer));
        if !layer_selected || !targets.iter().any(|t| t == module) {
            continue;
        }
        let (out_dim, in_dim) = linear.weight().dims2()?;
        let id =
            (layer * MODULES.len() + MODULES.iter().position(|m| *m == module).unwrap_or(0)) as u64;
        let adapter = if method.is_bottleneck() {
            let b = spec.bottleneck_size;
            let placement = match method {
                Method::Parallel => Placement::Parallel,
                _ => series_placement(module),
            };
            let (d_in, d_out) = match placement {
                Placement::Before => (in_dim, in_dim),
                Placement::After => (out_dim, out_dim),
                Placement::Parallel => (in_dim, out_dim),
            };
            let down = new_var(kaiming_uniform(&mut rng, &[b, d_in], d_in, &device)?)?;
            let up = new_var(Tensor::zeros((d_out, b), DType::F32, &device)?)?;
            Adapter::Bottleneck(BottleneckAdapter {
                down,
                up,
                placement,
                non_linearity: spec.non_linearity,
                scaling: spec.scaling,
                dropout,
                id,
            })
        } else {
            let (rank, alpha) = spec.rank_alpha(layer, path);
            let lora = LoraAdapter {
                a: new_var(kaiming_uniform(&mut rng, &[rank, in_dim], in_dim, &device)?)?,
                b: new_var(Tensor::zeros((out_dim, rank), DType::F32, &device)?)?,
                scale: method.scaling(alpha, rank),
                dropout,
                id,
            };
            if method.is_dora() {
                Adapter::Dora(DoraAdapter::new(
                    lora,
                    new_var(row_norms(linear.weight(), None)?)?,
                ))
            } else {
                Adapter::Lora(lora)
            }
        };
        trainable += adapter
            .vars()
            .iter()
            .map(|(_, v)| v.elem_count() as u64)
            .sum::<u64>();
        linear.set_adapter(Some(adapter));
        adapted += 1;
    }
    if adapted == 0 {
        bail!("attach matched no projection: check `targets` and `layers`");
    }
    Ok(AttachReport::new(
        spec,
        method,
        adapted,
        trainable,
        model_params_before,
    ))
}

/// Every trainable tensor of the model under its PEFT (LLM-Adapters for bottleneck
/// adapters) name, in a fixed order.
pub fn trainable_vars(model: &Llama) -> Vec<(String, Var)> {
    let mut out = Vec::new();
    if let Some(prefix) = &model.prefix {
        for (suffix, var) in prefix.vars() {
            out.push((format!("prompt_encoder.default.{suffix}"), var.clone()));
        }
    }
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
