//! Runs a pipeline's stages in order inside its run folder.

use super::run_dir::{now_rfc3339, RunDir};
use super::spec::{InspectSpec, PipelineSpec, PplSpec, Stage};
use crate::adapters::{self, AttachSpec};
use crate::data::{expand_globs, read_scoring_text};
use crate::eval::perplexity::{perplexity, PerplexityOptions};
use crate::export::{self, ExportSpec};
use crate::fsx;
use crate::inspect::ShapeReport;
use crate::model::{self, LoadedModel, ModelSource};
use crate::progress;
use crate::train::{self, FinetuneSpec};
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device};
use std::path::{Path, PathBuf};

/// What the stages share while a pipeline runs.
pub struct RunContext {
    pub spec: PipelineSpec,
    pub run: RunDir,
    pub device: Device,
    pub dtype: DType,
    pub model: Option<LoadedModel>,
    /// The settings of the attached adapters (resolved from a PEFT folder for `from`).
    pub attached: Option<AttachSpec>,
    /// The model's config before `prune` changed it: `inspect`'s default reference.
    pub dense_config: Option<crate::model::LlamaConfig>,
    /// `eval-<label>.json` files written so far, in order.
    pub eval_reports: Vec<PathBuf>,
    /// Resuming, and whether the run is one of a sweep's.
    pub options: RunOptions,
}

/// How a run behaves beyond what its pipeline file says.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunOptions {
    /// Continue fine-tuning from the newest checkpoint in the run folder.
    pub resume: bool,
    /// Set by `recover sweep` for each of its runs: stage reports stay off stdout (the
    /// sweep prints its own summary) and the `sweep:` block is not mentioned.
    pub part_of_sweep: bool,
}

impl RunContext {
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

    /// Prints a stage's report on stdout, unless the run is one of a sweep's.
    fn show(&self, report: &str) {
        if !self.options.part_of_sweep {
            println!("{report}");
        }
    }
}

/// Runs the pipeline in `file` with `--set` overrides; returns the run folder.
pub fn run_pipeline(file: &Path, overrides: &[String], options: RunOptions) -> Result<PathBuf> {
    let spec = check(file, overrides)?;
    if spec.sweep.is_some() && !options.part_of_sweep {
        progress::line(
            "note: the `sweep:` block is read by `recover sweep`; this runs the pipeline once, as written",
        );
    }
    let device = make_device(&spec)?;
    let run = RunDir::create(&spec, file)?;
    let mut ctx = RunContext {
        dtype: spec.dtype.dtype(),
        spec,
        run,
        device,
        model: None,
        attached: None,
        dense_config: None,
        eval_reports: Vec::new(),
        options,
    };
    let stages = ctx.spec.stages.clone();
    let total = stages.len();
    let mut outcome = Ok(());
    for (i, stage) in stages.iter().enumerate() {
        progress::line(&format!("[{}/{total}] {}", i + 1, stage.name()));
        let started_at = now_rfc3339();
        let t0 = std::time::Instant::now();
        if let Err(e) = run_stage(stage, &mut ctx) {
            outcome = Err(e.context(format!("stage `{}` (stages[{i}]) failed", stage.name())));
            break;
        }
        ctx.run
            .record_stage(i, stage.name(), started_at, t0.elapsed().as_secs_f64())?;
    }
    let outcome = outcome.and_then(|()| write_run_report(&ctx));
    match outcome {
        Ok(()) => {
            ctx.run.finish(None)?;
            progress::line(&format!("run folder: {}", ctx.run.path().display()));
            Ok(ctx.run.path().to_path_buf())
        }
        Err(e) => {
            ctx.run.finish(Some(format!("{e:#}")))?;
            ctx.run.discard_if_empty_run();
            Err(e)
        }
    }
}

/// Validates the pipeline and prints its plan, loading nothing (`--dry-run`). Local
/// inputs must exist; a hub model need not be downloaded yet.
pub fn dry_run(file: &Path, overrides: &[String]) -> Result<String> {
    let spec = PipelineSpec::from_file(file, overrides)?;
    preflight_files(&spec, true).with_context(|| format!("pipeline {}", file.display()))?;
    let mut plan = super::plan::plan(&spec)?;
    match &spec.sweep {
        Some(sweep) if sweep.grids.is_empty() => plan.push_str(
            "\nThe `sweep:` block has no grids; `recover sweep --grid KEY=V1,V2` gives them.\n",
        ),
        Some(_) => plan.push_str(&crate::sweep::plan(file, overrides, &Default::default())?),
        None => {}
    }
    Ok(plan)
}

/// Reads the pipeline with its overrides and checks what can be checked without loading
/// anything (input files exist, tasks are known), so that bad input fails before a run
/// folder exists.
pub fn check(file: &Path, overrides: &[String]) -> Result<PipelineSpec> {
    let spec = PipelineSpec::from_file(file, overrides)?;
    preflight_files(&spec, false).with_context(|| format!("pipeline {}", file.display()))?;
    Ok(spec)
}

fn preflight_files(spec: &PipelineSpec, dry: bool) -> Result<()> {
    for (i, stage) in spec.stages.iter().enumerate() {
        match stage {
            Stage::Load(l) if !(dry && l.model.starts_with("hf:")) => {
                ModelSource::parse(&l.model).with_context(|| format!("stages[{i}].load.model"))?;
            }
            Stage::Eval(e) => {
                for task in e.validate()? {
                    task.test_file(&e.data_dir)
                        .with_context(|| format!("stages[{i}].eval"))?;
                }
            }
            Stage::Prune(p) if !p.calibration.is_file() => {
                bail!(
                    "stages[{i}].prune.calibration: {} is not a file",
                    p.calibration.display()
                );
            }
            Stage::Ppl(p) if !p.text.is_file() => {
                bail!("stages[{i}].ppl.text: {} is not a file", p.text.display());
            }
            Stage::Finetune(f) => {
                expand_globs(&f.data, &format!("stages[{i}].finetune.data"))?;
                expand_globs(&f.text, &format!("stages[{i}].finetune.text"))?;
            }
            _ => {}
        }
    }
    Ok(())
}

fn make_device(spec: &PipelineSpec) -> Result<Device> {
    match spec.device {
        super::spec::DeviceKind::Cpu => Ok(Device::Cpu),
        super::spec::DeviceKind::Cuda => {
            Ok(Device::new_cuda(0).context("cannot open CUDA device 0")?)
        }
    }
}

fn run_stage(stage: &Stage, ctx: &mut RunContext) -> Result<()> {
    match stage {
        Stage::Load(l) => {
            let source = ModelSource::parse(&l.model)?;
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
        Stage::Inspect(spec) => run_inspect(spec.as_ref().cloned().unwrap_or_default(), ctx),
        Stage::Ppl(spec) => run_ppl(spec, ctx),
        Stage::Attach(spec) => run_attach(spec, ctx),
        Stage::Finetune(spec) => run_finetune(spec, ctx),
        Stage::Export(spec) => run_export(spec, ctx),
        Stage::Prune(spec) => run_prune(spec, ctx),
        Stage::Eval(spec) => run_eval_stage(spec, ctx),
    }
}

fn labelled(base: &str, label: Option<&str>, ext: &str) -> String {
    match label {
        Some(l) => format!("{base}-{l}.{ext}"),
        None => format!("{base}.{ext}"),
    }
}

/// The JSON report a `ppl` or `eval` stage writes into the run folder.
pub fn report_json(stage: &Stage) -> Option<String> {
    match stage {
        Stage::Ppl(p) => Some(labelled("ppl", p.label.as_deref(), "json")),
        Stage::Eval(e) => Some(labelled("eval", Some(&e.label), "json")),
        _ => None,
    }
}

fn run_inspect(spec: InspectSpec, ctx: &mut RunContext) -> Result<()> {
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
    let label = spec.label.as_deref();
    fsx::write_json(&ctx.run.file(&labelled("inspect", label, "json")), &report)?;
    fsx::atomic_write(
        &ctx.run.file(&labelled("inspect", label, "md")),
        md.as_bytes(),
    )?;
    ctx.show(&md);
    Ok(())
}

fn run_ppl(spec: &PplSpec, ctx: &mut RunContext) -> Result<()> {
    let loaded = ctx.model("ppl")?;
    let text = read_scoring_text(&spec.text, "ppl.text")?;
    let report = perplexity(
        &loaded.model,
        &loaded.tokenizer,
        &text,
        &spec.text.display().to_string(),
        &PerplexityOptions {
            max_len: spec.max_len,
            bos: spec.bos,
            batch_size: spec.batch_size,
            max_tokens: spec.max_tokens,
        },
    )?;
    let md = report.to_markdown();
    let label = spec.label.as_deref();
    fsx::write_json(&ctx.run.file(&labelled("ppl", label, "json")), &report)?;
    fsx::atomic_write(&ctx.run.file(&labelled("ppl", label, "md")), md.as_bytes())?;
    ctx.show(&md);
    Ok(())
}

fn run_attach(spec: &AttachSpec, ctx: &mut RunContext) -> Result<()> {
    let seed = ctx.spec.seed;
    let loaded = ctx.model_mut("attach")?;
    let (resolved, report) = match &spec.from {
        Some(dir) => adapters::peft::attach_from_folder(&mut loaded.model, dir)?,
        None => (
            spec.clone(),
            adapters::attach(&mut loaded.model, spec, seed)?,
        ),
    };
    ctx.attached = Some(resolved);
    progress::line(&format!(
        "attached {:?} (rank {}, alpha {}, γ = {:.4}) to {} projections: {} trainable parameters \
         ({:.3}% of {})",
        report.method,
        report.rank,
        report.alpha,
        report.scaling,
        report.adapted_modules,
        report.trainable_params,
        report.trainable_percent,
        report.model_params
    ));
    fsx::write_json(&ctx.run.file("attach.json"), &report)
}

fn run_finetune(spec: &FinetuneSpec, ctx: &mut RunContext) -> Result<()> {
    let (seed, resume) = (ctx.spec.seed, ctx.options.resume);
    let run_dir = ctx.run.path().to_path_buf();
    let loaded = ctx.model_mut("finetune")?;
    let report = train::finetune(
        &mut loaded.model,
        &loaded.tokenizer,
        spec,
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
    fsx::write_json(&ctx.run.file("finetune.json"), &report)
}

fn run_export(spec: &ExportSpec, ctx: &mut RunContext) -> Result<()> {
    // Relative export folders live in the run folder (`merged/`, `adapter/`).
    let mut spec = spec.clone();
    for dir in [&mut spec.merged, &mut spec.adapter].into_iter().flatten() {
        if dir.is_relative() {
            *dir = ctx.run.file(&dir.to_string_lossy());
        }
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
    if let Some(a) = &report.adapter {
        progress::line(&format!("adapter (PEFT format) written to {}", a.display()));
    }
    for w in &report.warnings {
        progress::line(&format!("warning: {w}"));
    }
    fsx::write_json(&ctx.run.file("export.json"), &report)
}

fn run_prune(spec: &crate::prune::PruneSpec, ctx: &mut RunContext) -> Result<()> {
    let loaded = ctx.model_mut("prune")?;
    let mut dense = loaded.model.config.clone();
    dense.layer_shapes = Some(loaded.model.layer_shapes.clone());
    let report = crate::prune::prune(&mut loaded.model, &loaded.tokenizer, spec)?;
    ctx.dense_config.get_or_insert(dense);
    progress::line(&format!(
        "pruned {:.1}% of the parameters ({} → {}) using {} calibration tokens",
        100.0 * report.pruned_ratio,
        report.params_before,
        report.params_after,
        report.calibration_tokens
    ));
    fsx::write_json(&ctx.run.file("prune.json"), &report)
}

fn run_eval_stage(spec: &crate::eval::EvalSpec, ctx: &mut RunContext) -> Result<()> {
    let loaded = ctx.model("eval")?;
    let report = crate::eval::run_eval(
        spec,
        &loaded.model,
        &loaded.tokenizer,
        ctx.spec.seed,
        ctx.run.path(),
    )?;
    ctx.show(&report.to_markdown());
    ctx.eval_reports
        .push(ctx.run.file(&labelled("eval", Some(&spec.label), "json")));
    Ok(())
}

/// `report.md` for a run with two or more evaluations: every eval row and the
/// last-minus-first difference, a bar chart, perplexities, fine-tuning and the shapes.
fn write_run_report(ctx: &RunContext) -> Result<()> {
    use crate::report::compare;
    if ctx.eval_reports.len() < 2 {
        return Ok(());
    }
    let rows = ctx
        .eval_reports
        .iter()
        .map(|p| compare::read_report(p, None))
        .map(|r| {
            r.map(|mut row| {
                row.label = row.report.label.clone();
                row
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let mut md = format!("# Run report: {}\n\n", ctx.spec.name);
    md.push_str(&compare::to_markdown(&rows));
    compare::bar_chart(&ctx.run.file("eval-comparison.svg"), &rows)?;
    md.push_str("\n![accuracy by task](eval-comparison.svg)\n\n");
    let mut ppl: Vec<PathBuf> = std::fs::read_dir(ctx.run.path())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
            name.starts_with("ppl") && name.ends_with(".md")
        })
        .collect();
    ppl.sort();
    for p in ppl {
        md.push_str(&std::fs::read_to_string(&p)?);
        md.push('\n');
    }
    if ctx.run.file("finetune.json").is_file() {
        md.push_str("## Fine-tuning\n\n![loss curve](loss-curve.svg)\n\nSee `finetune.json` and `train-log.jsonl`.\n\n");
    }
    if ctx.run.file("inspect.md").is_file() {
        md.push_str(&std::fs::read_to_string(ctx.run.file("inspect.md"))?);
    }
    fsx::atomic_write(&ctx.run.file("report.md"), md.as_bytes())?;
    progress::line(&format!("report: {}", ctx.run.file("report.md").display()));
    Ok(())
}
