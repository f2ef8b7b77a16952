//! The pipeline file: a typed YAML spec. Unknown keys are errors that name the key, its
//! line and the keys allowed; stages that this version does not have are refused before
//! any work starts.

use crate::adapters::AttachSpec;
use crate::eval::{EvalSpec, PplSpec};
use crate::export::ExportSpec;
use crate::model::DtypeName;
use crate::prune::PruneSpec;
use crate::train::{FinetuneSpec, PRE_PRUNE};
use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_yaml_ng::Value;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineSpec {
    pub name: String,
    #[serde(default = "default_seed")]
    pub seed: u64,
    #[serde(default)]
    pub device: DeviceKind,
    #[serde(default)]
    pub dtype: DtypeName,
    /// Default: `runs/<name>`.
    #[serde(default)]
    pub run_dir: Option<PathBuf>,
    pub stages: Vec<Stage>,
    /// Read by `recover sweep` only (`sweep::SweepSpec::of` parses it): the grid of
    /// overrides to run this pipeline over. Kept as written so that the pipeline does not
    /// depend on the sweep that runs it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sweep: Option<Value>,
}

fn default_seed() -> u64 {
    42
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    #[default]
    Cpu,
    Cuda,
}

/// One item of `stages:`, written as a one-key mapping: `- load: {model: ...}`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    Load(LoadSpec),
    Inspect(Option<InspectSpec>),
    Ppl(PplSpec),
    Attach(AttachSpec),
    /// Boxed: the largest spec by far (it holds an `EvalSpec` for `checkpoint_eval`).
    Finetune(Box<FinetuneSpec>),
    Export(ExportSpec),
    Prune(PruneSpec),
    Eval(EvalSpec),
}

impl Stage {
    pub fn name(&self) -> &'static str {
        match self {
            Stage::Load(_) => "load",
            Stage::Inspect(_) => "inspect",
            Stage::Ppl(_) => "ppl",
            Stage::Prune(_) => "prune",
            Stage::Eval(_) => "eval",
            Stage::Attach(_) => "attach",
            Stage::Finetune(_) => "finetune",
            Stage::Export(_) => "export",
        }
    }

    /// The base name of the stage's report files, the one place report files are named:
    /// `eval-<label>`, `ppl[-<label>]`, `inspect[-<label>]`, else the stage's name
    /// (`attach`, `finetune`, `export`, `prune`).
    pub fn report_base(&self) -> String {
        let label = match self {
            Stage::Inspect(Some(i)) => i.label.as_deref(),
            Stage::Ppl(p) => p.label.as_deref(),
            Stage::Eval(e) => Some(e.label.as_str()),
            _ => None,
        };
        match label {
            Some(l) => format!("{}-{l}", self.name()),
            None => self.name().to_string(),
        }
    }

    /// `report_base().ext`: `eval-before.json`, `ppl.md`...
    pub fn report_file(&self, ext: &str) -> String {
        format!("{}.{ext}", self.report_base())
    }
}

const ALL_STAGES: &[&str] = &[
    "load", "inspect", "ppl", "prune", "eval", "attach", "finetune", "export",
];

// A hand-written visitor rather than serde's enum support: the YAML crate reads enums
// from `!tags`, while pipelines write each stage as a one-key mapping. Reading the
// settings with `next_value` keeps the YAML crate's line numbers in errors.
impl<'de> Deserialize<'de> for Stage {
    fn deserialize<D: serde::Deserializer<'de>>(de: D) -> std::result::Result<Self, D::Error> {
        struct StageVisitor;
        impl<'de> serde::de::Visitor<'de> for StageVisitor {
            type Value = Stage;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                write!(
                    f,
                    "a stage written as `- NAME: {{settings}}`, NAME one of {}",
                    ALL_STAGES.join(", ")
                )
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Stage, A::Error> {
                use serde::de::Error;
                let name: String = map
                    .next_key()?
                    .ok_or_else(|| A::Error::custom("empty stage; write `- NAME: {settings}`"))?;
                let stage = match name.as_str() {
                    "load" => Stage::Load(map.next_value()?),
                    "inspect" => Stage::Inspect(map.next_value()?),
                    "ppl" => Stage::Ppl(map.next_value()?),
                    "prune" => Stage::Prune(map.next_value()?),
                    "eval" => Stage::Eval(map.next_value()?),
                    "attach" => Stage::Attach(map.next_value()?),
                    "finetune" => Stage::Finetune(map.next_value()?),
                    "export" => Stage::Export(map.next_value()?),
                    other => return Err(A::Error::unknown_variant(other, ALL_STAGES)),
                };
                if let Some(extra) = map.next_key::<String>()? {
                    return Err(A::Error::custom(format!(
                        "stage `{name}` has a second key `{extra}` at the same level; each list item \
                         is one stage (`- {name}:` then its settings indented below it)"
                    )));
                }
                Ok(stage)
            }
            fn visit_str<E: serde::de::Error>(self, name: &str) -> std::result::Result<Stage, E> {
                // `- inspect` with no settings.
                match name {
                    "inspect" => Ok(Stage::Inspect(None)),
                    other if ALL_STAGES.contains(&other) => Err(E::custom(format!(
                        "stage `{other}` needs settings: write `- {other}:` and its keys below it"
                    ))),
                    other => Err(E::unknown_variant(other, ALL_STAGES)),
                }
            }
        }
        de.deserialize_any(StageVisitor)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadSpec {
    /// A Hugging Face folder, a `.gguf` file, or `hf:org/name[@revision]`.
    pub model: String,
    /// The model's config.json, for `--dry-run` plans when the model itself is not at
    /// hand (a hub id not yet downloaded). Loading always reads the model's own config.
    #[serde(default)]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InspectSpec {
    /// The dense model's config (a config.json, a model folder, a .gguf or a hub id), for
    /// pruning ratios.
    #[serde(default)]
    pub reference: Option<String>,
    /// Suffix of the report files (`inspect-<label>.json`); default `inspect.json`.
    #[serde(default)]
    pub label: Option<String>,
}

impl PipelineSpec {
    /// Reads, expands `${VAR:-default}`, applies `--set key.path=value` overrides and
    /// validates a pipeline file.
    pub fn from_file(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read pipeline file {}", path.display()))?;
        Self::from_yaml(&text, overrides)
            .with_context(|| format!("invalid pipeline {}", path.display()))
    }

    pub fn from_yaml(text: &str, overrides: &[String]) -> Result<Self> {
        // Through a value tree: merge keys (`<<: *anchor`) resolve, variables expand and
        // overrides apply.
        let mut value: Value = serde_yaml_ng::from_str(text)?;
        value.apply_merge()?;
        expand_env(&mut value)?;
        for o in overrides {
            apply_override(&mut value, o)?;
        }
        let spec: PipelineSpec = match serde_yaml_ng::from_value(value) {
            Ok(spec) => spec,
            Err(e) => {
                // A value tree has no line numbers: read the text directly for an error
                // that has them, unless that error is only about merge keys.
                if let Err(with_line) = serde_yaml_ng::from_str::<PipelineSpec>(text) {
                    if !with_line.to_string().contains("`<<`") {
                        return Err(anyhow!("{with_line}"));
                    }
                }
                if overrides.is_empty() {
                    return Err(anyhow!("{e}"));
                }
                return Err(anyhow!(
                    "after applying --set {}: {e}",
                    overrides.join(" --set ")
                ));
            }
        };
        spec.validate()?;
        Ok(spec)
    }

    fn validate(&self) -> Result<()> {
        if self.name.is_empty() || self.name.contains(['/', '\\']) {
            bail!("`name` must be a non-empty name without slashes (it names the run folder)");
        }
        if self.stages.is_empty() {
            bail!("`stages` is empty; a pipeline needs at least a `load` stage");
        }
        if !matches!(self.stages[0], Stage::Load(_)) {
            bail!(
                "the first stage must be `load` (stages[0] is `{}`)",
                self.stages[0].name()
            );
        }
        if let Some(i) = self
            .stages
            .iter()
            .skip(1)
            .position(|s| matches!(s, Stage::Load(_)))
        {
            bail!(
                "`load` may appear only once, as the first stage (found again at stages[{}])",
                i + 1
            );
        }
        if self.device == DeviceKind::Cuda && !cfg!(feature = "cuda") {
            bail!("device `cuda` needs a build with `--features cuda`; this build is CPU-only");
        }
        let (mut attached, mut pruned) = (false, false);
        let mut method = None;
        for (i, stage) in self.stages.iter().enumerate() {
            match stage {
                Stage::Attach(a) => {
                    a.validate(None)
                        .with_context(|| format!("stages[{i}].attach"))?;
                    if attached {
                        bail!("stages[{i}]: adapters are already attached by an earlier `attach` stage");
                    }
                    attached = true;
                    // A folder's method, when its config can be read now.
                    method = a.method.or_else(|| {
                        let dir = a.from.as_ref()?;
                        crate::adapters::peft::read_adapter_config(dir).ok()?.method
                    });
                }
                Stage::Finetune(f) => {
                    f.validate()
                        .with_context(|| format!("stages[{i}].finetune"))?;
                    if !attached {
                        bail!("stages[{i}]: `finetune` trains adapters; put an `attach` stage before it");
                    }
                    let explicit_backward = self.dtype == DtypeName::F32
                        && self.device == DeviceKind::Cpu
                        && method != Some(crate::adapters::Method::Prefix);
                    if f.activation_checkpointing && !explicit_backward {
                        bail!(
                            "stages[{i}].finetune.activation_checkpointing needs the explicit \
                             backward pass: `dtype: f32`, `device: cpu` and an adapter other than \
                             prefix tuning; turn it off or change those"
                        );
                    }
                    if f.objective.distills()
                        && f.teacher.as_deref().is_none_or(|t| t == PRE_PRUNE)
                        && !pruned
                    {
                        bail!(
                            "stages[{i}].finetune: objective {} distils from a teacher: set \
                             `teacher` to a model (folder, .gguf or hf:org/name), or put a \
                             `prune` stage before it to distil from the model before pruning \
                             (`teacher: {PRE_PRUNE}`, the default after a prune)",
                            f.objective
                        );
                    }
                }
                Stage::Export(e) => {
                    e.validate()
                        .with_context(|| format!("stages[{i}].export"))?;
                    if let Some(m) = method.filter(|m| !m.is_low_rank()) {
                        let mut refused = e.merging_outputs();
                        if e.adapter_gguf.is_some() {
                            refused.push("adapter_gguf");
                        }
                        if let Some(key) = refused.first() {
                            bail!(
                                "stages[{i}].export.{key}: {} adapters are neither a weight update \
                                 nor LoRA pairs (prefix tuning adds key/value vectors; bottleneck \
                                 adapters are nonlinear), so they cannot be merged or written for \
                                 llama.cpp's --lora; export the adapter alone with `adapter: DIR`",
                                m.name()
                            );
                        }
                    }
                }
                Stage::Eval(e) => {
                    e.validate().with_context(|| format!("stages[{i}].eval"))?;
                }
                Stage::Prune(p) => {
                    p.validate().with_context(|| format!("stages[{i}].prune"))?;
                    if attached {
                        bail!("stages[{i}]: `prune` must come before `attach`");
                    }
                    pruned = true;
                }
                _ => {}
            }
        }
        for stage in &self.stages {
            if let Stage::Ppl(p) = stage {
                p.validate()?;
            }
        }
        Ok(())
    }

    /// Whether a `finetune` distils from the model as `prune` found it, which the run
    /// must then keep.
    pub fn needs_pre_prune_teacher(&self) -> bool {
        self.stages.iter().any(|s| {
            matches!(s, Stage::Finetune(f) if f.objective.distills()
                && f.teacher.as_deref().is_none_or(|t| t == PRE_PRUNE))
        })
    }

    pub fn run_dir(&self) -> PathBuf {
        self.run_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("runs").join(&self.name))
    }
}

/// Expands `${VAR}` and `${VAR:-default}` in every string of the tree.
fn expand_env(value: &mut Value) -> Result<()> {
    match value {
        Value::String(s) if s.contains("${") => *s = expand_str(s)?,
        Value::Sequence(items) => items.iter_mut().try_for_each(expand_env)?,
        Value::Mapping(map) => map.values_mut().try_for_each(expand_env)?,
        Value::Tagged(t) => expand_env(&mut t.value)?,
        _ => {}
    }
    Ok(())
}

fn expand_str(s: &str) -> Result<String> {
    let mut out = String::new();
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        // The matching `}`: a default may itself hold `${...}`.
        let mut depth = 0usize;
        let mut end = None;
        for (i, c) in rest[start..].char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = Some(start + i);
                        break;
                    }
                }
                _ => {}
            }
        }
        let end = end.ok_or_else(|| anyhow!("unclosed `${{` in `{s}`"))?;
        let inner = &rest[start + 2..end];
        let (var, default) = match inner.split_once(":-") {
            Some((v, d)) => (v, Some(d)),
            None => (inner, None),
        };
        match (std::env::var(var).ok().filter(|v| !v.is_empty()), default) {
            (Some(v), _) => out.push_str(&v),
            (None, Some(d)) => out.push_str(&expand_str(d)?),
            (None, None) => bail!(
                "`{s}` uses ${{{var}}} but {var} is not set; set it or write ${{{var}:-default}}"
            ),
        }
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// `key.path=value`. The first part is a top-level key (`seed`), a stage name (every
/// stage of that name: `eval.limit=10`) or `stages.N`; the value is parsed as YAML.
pub fn apply_override(root: &mut Value, assignment: &str) -> Result<()> {
    let (path, raw) = assignment
        .split_once('=')
        .ok_or_else(|| anyhow!("--set `{assignment}` must look like key.path=value"))?;
    let new_value: Value =
        serde_yaml_ng::from_str(raw).unwrap_or_else(|_| Value::String(raw.to_string()));
    let parts: Vec<&str> = path.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        bail!("--set `{assignment}`: the key path `{path}` has an empty part");
    }
    let top = root
        .as_mapping_mut()
        .ok_or_else(|| anyhow!("the pipeline is not a mapping"))?;
    let head = parts[0];
    if parts.len() == 1 {
        top.insert(Value::String(head.to_string()), new_value);
        return Ok(());
    }
    let stages = top
        .get_mut("stages")
        .and_then(Value::as_sequence_mut)
        .ok_or_else(|| anyhow!("the pipeline has no `stages` list"))?;
    let mut targets: Vec<&mut Value> = Vec::new();
    let rest: &[&str] = if head == "stages" {
        let idx: usize = parts[1]
            .parse()
            .map_err(|_| anyhow!("--set `{assignment}`: after `stages.` comes a stage index"))?;
        let n = stages.len();
        let stage = stages.get_mut(idx).ok_or_else(|| {
            anyhow!("--set `{assignment}`: there is no stages[{idx}] ({n} stages)")
        })?;
        let body = stage
            .as_mapping_mut()
            .and_then(|m| m.values_mut().next())
            .ok_or_else(|| anyhow!("stages[{idx}] is not a one-key mapping"))?;
        targets.push(body);
        &parts[2..]
    } else {
        for stage in stages.iter_mut() {
            if let Some(body) = stage.as_mapping_mut().and_then(|m| m.get_mut(head)) {
                targets.push(body);
            }
        }
        if targets.is_empty() {
            bail!("--set `{assignment}`: `{head}` is neither a top-level key nor a stage of this pipeline");
        }
        &parts[1..]
    };
    if rest.is_empty() {
        bail!("--set `{assignment}`: name a setting inside the stage, e.g. {head}.KEY=VALUE");
    }
    for body in targets {
        set_path(body, rest, new_value.clone())?;
    }
    Ok(())
}

fn set_path(node: &mut Value, path: &[&str], value: Value) -> Result<()> {
    if node.is_null() {
        *node = Value::Mapping(Default::default());
    }
    let map = node
        .as_mapping_mut()
        .ok_or_else(|| anyhow!("`{}` is not a mapping, cannot set a key inside it", path[0]))?;
    if path.len() == 1 {
        map.insert(Value::String(path[0].to_string()), value);
        return Ok(());
    }
    let child = map
        .entry(Value::String(path[0].to_string()))
        .or_insert(Value::Null);
    set_path(child, &path[1..], value)
}

#[cfg(test)]
mod tests {
    use super::expand_str;

    #[test]
    fn defaults_may_nest_variables() {
        // PATH is set in any test environment; the unset name is unlikely to be.
        let path = std::env::var("PATH").expect("PATH is set");
        let got = expand_str("${RORA_TEST_SURELY_UNSET_VAR:-${PATH}/x}/y").expect("expands");
        assert_eq!(got, format!("{path}/x/y"));
        assert_eq!(
            expand_str("a${RORA_TEST_SURELY_UNSET_VAR:-b}c").expect("expands"),
            "abc"
        );
        assert!(expand_str("${RORA_TEST_SURELY_UNSET_VAR:-${PATH}").is_err());
    }
}
