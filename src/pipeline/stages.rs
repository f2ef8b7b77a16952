//! The stages: each takes its settings and the [`StageContext`] and returns what it
//! produced as a [`StageOutput`]. None of them names or writes a report file: the
//! runner does (see `runner::write_outputs`), for a pipeline run and for the `inspect`,
//! `ppl`, `eval` and `merge` commands, which run these same functions.

use super::eval_cache;
use super::spec::{InspectSpec, LoadSpec};
use crate::adapters::{self, AttachSpec};
use crate::eval::{EvalReport, EvalSpec, PplSpec};
use crate::export::{self, ExportReport, ExportSpec};
use crate::inspect::ShapeReport;
use crate::model::{self, Llama, LlamaConfig, LoadedModel, ModelSource, TextTokenizer};
use crate::nn::frozen::MatmulPrecision;
use crate::progress;
use crate::prune::{PruneReport, PruneSpec};
use crate::train::{self, FinetuneReport, FinetuneSpec, Objective, PRE_PRUNE};
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device};
use std::path::{Path, PathBuf};

/// What the stages share: the model and what was done to it.
pub struct StageContext {
    pub device: Device,
    pub dtype: DType,
    pub seed: u64,
    pub model: Option<LoadedModel>,
    /// The settings of the attached adapters (resolved from a PEFT folder for `from`).
    pub attached: Option<AttachSpec>,
    /// The model's config before `prune` changed it: `inspect`'s default reference.
    pub dense_config: Option<LlamaConfig>,
    /// Keep a frozen copy of the model as `prune` found it in `dense_model`: a later
    /// `finetune` distils from it.
    pub keep_dense_model: bool,
    /// The model before `prune` (a clone shares the tensors, and pruning replaces the
    /// projections' weights rather than writing into them, so it stays the dense model).
    pub dense_model: Option<Llama>,
    /// The run folder: `finetune` keeps its log and checkpoints there and relative
    /// `export` folders live in it. `None` outside a pipeline run (a command): paths
    /// stay as given.
    pub run_dir: Option<PathBuf>,
    /// Continue fine-tuning from the newest checkpoint in the run folder.
    pub resume: bool,
}

/// What a stage produced. The runner writes `report` as `<base>.json`, `markdown` as
/// `<base>.md` (and shows it), each of `extra` as `<base>.<ext>`, and lists them with
/// `wrote` in the manifest (`<base>` from `Stage::report_base`).
pub struct StageOutput<R> {
    pub report: R,
    pub markdown: Option<String>,
    /// More report files by extension: eval's per-question `jsonl`.
    pub extra: Vec<(&'static str, String)>,
    /// Files and folders the stage wrote itself because they must exist while it runs
    /// (fine-tuning's log and checkpoints, which resuming reads) or are its product (the
    /// merged model, the adapter folder).
    pub wrote: Vec<PathBuf>,
}

impl<R> StageOutput<R> {
    /// A report and nothing else.
    pub fn new(report: R) -> Self {
        Self {
            report,
            markdown: None,
            extra: Vec::new(),
            wrote: Vec::new(),
        }
    }

    fn with_markdown(mut self, md: String) -> Self {
        self.markdown = Some(md);
        self
    }
}

impl StageContext {
    /// A context with no model yet, outside any run folder.
    pub fn new(device: Device, dtype: DType, seed: u64) -> Self {
        Self {
            device,
            dtype,
            seed,
            model: None,
            attached: None,
            dense_config: None,
            keep_dense_model: false,
            dense_model: None,
            run_dir: None,
            resume: false,
        }
    }

    fn model(&self, stage: &str) -> Result<&LoadedModel> {
        self.model
            .as_ref()
            .ok_or_else(|| anyhow!("stage `{stage}` needs a model; put a `load` stage first"))
    }

    fn model_mut(&mut self, stage: &str) -> Result<&mut LoadedModel> {
        self.model
            .as_mut()
            .ok_or_else(|| anyhow!("stage `{stage}` needs a model; put a `load` stage first"))
    }

    /// A relative path inside the run folder; as given outside a run.
    fn in_run_dir(&self, path: &Path) -> PathBuf {
        match &self.run_dir {
            Some(dir) if path.is_relative() => dir.join(path),
            _ => path.to_path_buf(),
        }
    }
}

pub fn load(spec: &LoadSpec, ctx: &mut StageContext) -> Result<()> {
    let source = ModelSource::parse(&spec.model)?;
    let loaded = model::load(&source, ctx.dtype, &ctx.device)?;
    progress::line(&format!(
        "loaded {source}: {} layers, hidden {}, vocab {}",
        loaded.model.num_layers(),
        loaded.model.config.hidden_size,
        loaded.model.config.vocab_size
    ));
    ctx.model = Some(loaded);
    Ok(())
}

pub fn inspect(spec: &InspectSpec, ctx: &mut StageContext) -> Result<StageOutput<ShapeReport>> {
    let loaded = ctx.model("inspect")?;
    // Default reference after a `prune`: the model as it was before.
    let reference = match (&spec.reference, &ctx.dense_config) {
        (Some(r), _) => Some((
            r.clone(),
            model::read_config_only(r).context("inspect.reference")?,
        )),
        (None, Some(dense)) => Some(("the model before pruning".to_string(), dense.clone())),
        (None, None) => None,
    };
    let report = ShapeReport::build(loaded, reference.as_ref().map(|(s, c)| (s.as_str(), c)));
    let md = report.to_markdown();
    Ok(StageOutput::new(report).with_markdown(md))
}

pub fn ppl(
    spec: &PplSpec,
    ctx: &mut StageContext,
) -> Result<StageOutput<crate::eval::perplexity::PerplexityReport>> {
    let loaded = ctx.model("ppl")?;
    let report = spec.score(&loaded.model, &loaded.tokenizer, "ppl.text")?;
    let md = report.to_markdown();
    Ok(StageOutput::new(report).with_markdown(md))
}

pub fn attach(
    spec: &AttachSpec,
    ctx: &mut StageContext,
) -> Result<StageOutput<adapters::AttachReport>> {
    let seed = ctx.seed;
    let loaded = ctx.model_mut("attach")?;
    let (resolved, report) = match &spec.from {
        Some(dir) => adapters::peft::attach_from_folder(&mut loaded.model, dir)?,
        None => (
            spec.clone(),
            adapters::attach(&mut loaded.model, spec, seed)?,
        ),
    };
    ctx.attached = Some(resolved);
    let placed = if report.adapted_modules > 0 {
        format!(" to {} projections", report.adapted_modules)
    } else {
        String::new()
    };
    progress::line(&format!(
        "attached {}{placed}: {} trainable parameters ({:.3}% of {})",
        report.settings, report.trainable_params, report.trainable_percent, report.model_params
    ));
    Ok(StageOutput::new(report))
}

pub fn finetune(
    spec: &FinetuneSpec,
    ctx: &mut StageContext,
) -> Result<StageOutput<FinetuneReport>> {
    let (seed, resume) = (ctx.seed, ctx.resume);
    let run_dir = ctx
        .run_dir
        .clone()
        .context("finetune keeps its log and checkpoints in a run folder; run it in a pipeline")?;
    let teacher = teacher(spec, ctx)?;
    let objective = Objective::from_spec(spec, teacher)?;
    let loaded = ctx.model_mut("finetune")?;
    let report = train::finetune(
        &mut loaded.model,
        &loaded.tokenizer,
        spec,
        objective,
        seed,
        &run_dir,
        resume,
    )?;
    progress::line(&format!(
        "finetune: {} of {} steps, loss {:.4} → {:.4}{}, {:.0} tokens/s ({} products)",
        report.steps,
        report.total_steps,
        report.first_loss.unwrap_or(f64::NAN),
        report.last_loss.unwrap_or(f64::NAN),
        report
            .val_loss
            .map_or(String::new(), |v| format!(", val loss {v:.4}")),
        report.tokens_per_s,
        report.matmul_precision
    ));
    let wrote = report.wrote.clone();
    Ok(StageOutput {
        wrote,
        ..StageOutput::new(report)
    })
}

/// The model `finetune` distils from: none for `objective: lm`; the model before `prune`
/// for `teacher: pre_prune` (or no teacher after a prune); otherwise the model source
/// `teacher` names, loaded like the student, which must share the student's tokenizer.
fn teacher(spec: &FinetuneSpec, ctx: &StageContext) -> Result<Option<Llama>> {
    if !spec.objective.distills() {
        return Ok(None);
    }
    let source = match spec.teacher.as_deref() {
        None | Some(PRE_PRUNE) => {
            let dense = ctx.dense_model.clone().with_context(|| {
                format!(
                    "finetune.teacher {PRE_PRUNE}: no `prune` stage kept the model before \
                     pruning; put one before `finetune` or name a teacher model"
                )
            })?;
            return Ok(Some(dense));
        }
        Some(source) => ModelSource::parse(source).context("finetune.teacher")?,
    };
    let student = ctx.model("finetune")?;
    let teacher = model::load(&source, ctx.dtype, &ctx.device)
        .with_context(|| format!("finetune.teacher {source}"))?;
    let (vs, vt) = (
        student.model.config.vocab_size,
        teacher.model.config.vocab_size,
    );
    let difference = if vs != vt {
        Some(format!("{vt} logits per token against {vs}"))
    } else {
        teacher.tokenizer.vocabulary_difference(&student.tokenizer)
    };
    if let Some(difference) = difference {
        bail!(
            "finetune.teacher {source} has another vocabulary than the student {}: {difference}; \
             distillation compares both models' distributions token by token, so the teacher \
             must use the student's tokenizer",
            student.source
        );
    }
    progress::line(&format!(
        "teacher {source}: {} layers, hidden {}, vocab {vt}",
        teacher.model.num_layers(),
        teacher.model.config.hidden_size
    ));
    Ok(Some(teacher.model))
}

pub fn export(spec: &ExportSpec, ctx: &mut StageContext) -> Result<StageOutput<ExportReport>> {
    // Relative export folders live in the run folder (`merged/`, `adapter/`).
    let mut spec = spec.clone();
    let outputs = [
        &mut spec.merged,
        &mut spec.merged_uniform,
        &mut spec.adapter,
        &mut spec.gguf,
        &mut spec.adapter_gguf,
        &mut spec.gguf_base,
    ];
    for dir in outputs.into_iter().flatten() {
        *dir = ctx.in_run_dir(dir);
    }
    let loaded = ctx.model("export")?;
    let report = export::export(loaded, ctx.attached.as_ref(), &spec)?;
    if let Some(m) = &report.merged {
        progress::line(&format!(
            "merged model ({}, {} shard{}) written to {}",
            m.dtype,
            m.shards,
            if m.shards == 1 { "" } else { "s" },
            m.dir.display()
        ));
    }
    if let (Some(d), Some(t)) = (report.verify_max_abs_diff, report.verify_tolerance) {
        progress::line(&format!("verified: reloaded merged model matches the adapted one (max |Δlogit| {d:.2e} ≤ {t:.2e})"));
    }
    if let Some(g) = &report.gguf {
        progress::line(&format!(
            "GGUF model ({}, architecture {}, {} tensors) written to {}",
            g.dtype,
            g.architecture,
            g.tensors,
            g.path.display()
        ));
    }
    if let Some(m) = &report.merged_uniform {
        progress::line(&format!(
            "zero-padded merged model ({}, loads in stock transformers) written to {}",
            m.dtype,
            m.dir.display()
        ));
    }
    let verified = [
        ("zero-padded merged", report.merged_uniform_verify),
        ("GGUF", report.gguf_verify),
    ];
    for (what, v) in verified {
        if let Some(v) = v {
            progress::line(&format!(
                "verified: reloaded {what} model matches the adapted one (max |Δlogit| {:.2e} ≤ {:.2e})",
                v.max_abs_diff, v.tolerance
            ));
        }
    }
    if let Some(g) = &report.gguf_base {
        progress::line(&format!(
            "base model without adapters (GGUF {}, for --lora) written to {}",
            g.dtype,
            g.path.display()
        ));
    }
    if let Some(a) = &report.adapter_gguf {
        progress::line(&format!(
            "adapter (llama.cpp --lora GGUF, {} pairs, adapter.lora.alpha {}) written to {}",
            a.pairs,
            a.alpha,
            a.path.display()
        ));
    }
    if let Some(a) = &report.adapter {
        progress::line(&format!("adapter (PEFT format) written to {}", a.display()));
    }
    for w in &report.warnings {
        progress::line(&format!("warning: {w}"));
    }
    let wrote = report
        .merged
        .iter()
        .map(|m| m.dir.clone())
        .chain(report.merged_uniform.iter().map(|m| m.dir.clone()))
        .chain(report.gguf.iter().map(|g| g.path.clone()))
        .chain(report.adapter_gguf.iter().map(|a| a.path.clone()))
        .chain(report.gguf_base.iter().map(|g| g.path.clone()))
        .chain(report.adapter.clone())
        .collect();
    Ok(StageOutput {
        wrote,
        ..StageOutput::new(report)
    })
}

pub fn prune(spec: &PruneSpec, ctx: &mut StageContext) -> Result<StageOutput<PruneReport>> {
    let keep = ctx.keep_dense_model && ctx.dense_model.is_none();
    let loaded = ctx.model_mut("prune")?;
    let mut dense = loaded.model.config.clone();
    dense.layer_shapes = Some(loaded.model.layer_shapes.clone());
    let before = keep.then(|| loaded.model.clone());
    let report = crate::prune::prune(&mut loaded.model, &loaded.tokenizer, spec)?;
    ctx.dense_config.get_or_insert(dense);
    if before.is_some() {
        ctx.dense_model = before;
    }
    progress::line(&format!(
        "pruned {:.1}% of the parameters ({} → {}) using {} calibration tokens",
        100.0 * report.pruned_ratio,
        report.params_before,
        report.params_after,
        report.calibration_tokens
    ));
    Ok(StageOutput::new(report))
}

pub fn eval(spec: &EvalSpec, ctx: &mut StageContext) -> Result<StageOutput<EvalReport>> {
    let seed = ctx.seed;
    let loaded = ctx.model_mut("eval")?;
    if loaded
        .model
        .set_matmul_precision_or_f32(spec.matmul_precision)?
        != spec.matmul_precision
    {
        progress::line(&MatmulPrecision::fallback_note("eval.matmul_precision"));
    }
    let run = evaluate_or_read_cache(spec, &loaded.model, &loaded.tokenizer, seed);
    // Drops the packed bf16 copies (as much memory as the weights): later stages start at f32.
    loaded.model.set_matmul_precision(MatmulPrecision::F32)?;
    let run = run?;
    let jsonl = run.records_jsonl()?;
    let md = run.report.to_markdown();
    Ok(StageOutput {
        extra: vec![("jsonl", jsonl)],
        ..StageOutput::new(run.report).with_markdown(md)
    })
}

/// The evaluation `spec` asks for: read back from `spec.cache` when the same weights,
/// settings, precision and seed were evaluated before, else run (and cached).
fn evaluate_or_read_cache(
    spec: &EvalSpec,
    model: &Llama,
    tok: &TextTokenizer,
    seed: u64,
) -> Result<crate::eval::EvalRun> {
    Ok(match &spec.cache {
        Some(dir) => {
            let key = eval_cache::key(spec, model, tok, seed)?;
            match eval_cache::read(dir, &key, &spec.label)? {
                Some(run) => {
                    progress::line(&format!(
                        "eval {}: read from the cache ({}, entry {key}): the same weights, \
                         settings and seed were evaluated before",
                        spec.label,
                        dir.display()
                    ));
                    run
                }
                None => {
                    let run = crate::eval::run_eval(spec, model, tok, seed)?;
                    eval_cache::write(dir, &key, &run)?;
                    run
                }
            }
        }
        None => crate::eval::run_eval(spec, model, tok, seed)?,
    })
}
