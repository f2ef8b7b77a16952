//! Runs a pipeline's stages in order inside its run folder.

//! The runner is the only writer of a run's files: stages return what they produced
//! ([`StageOutput`]), [`write_outputs`] names and writes it, and the manifest lists every
//! file each stage wrote.

use super::run_dir::{now_rfc3339, RunDir, Written};
use super::spec::{PipelineSpec, Stage};
use super::stages::{self, StageContext, StageOutput};
use crate::data::expand_globs;
use crate::fsx;
use crate::model::{self, ModelSource};
use crate::progress;
use crate::train::PRE_PRUNE;
use anyhow::{bail, Context, Result};
use candle_core::Device;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// How a run behaves beyond what its pipeline file says.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunOptions {
    /// Continue fine-tuning from the newest checkpoint in the run folder.
    pub resume: bool,
    /// Set by `recover sweep` for each of its runs: stage reports stay off stdout (the
    /// sweep prints its own summary) and the `sweep:` block is not mentioned.
    pub part_of_sweep: bool,
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
    let mut run = RunDir::create(&spec, file)?;
    let mut ctx = StageContext::new(device, spec.dtype.dtype(), spec.seed);
    ctx.run_dir = Some(run.path().to_path_buf());
    ctx.resume = options.resume;
    ctx.keep_dense_model = spec.needs_pre_prune_teacher();
    let total = spec.stages.len();
    let mut outcome = Ok(());
    for (i, stage) in spec.stages.iter().enumerate() {
        progress::line(&format!("[{}/{total}] {}", i + 1, stage.name()));
        let started_at = now_rfc3339();
        let t0 = std::time::Instant::now();
        let written = match run_stage(stage, &mut ctx, run.path(), !options.part_of_sweep) {
            Ok(written) => written,
            Err(e) => {
                outcome = Err(e.context(format!("stage `{}` (stages[{i}]) failed", stage.name())));
                break;
            }
        };
        run.record_stage(
            i,
            stage.name(),
            started_at,
            t0.elapsed().as_secs_f64(),
            written,
        )?;
    }
    let outcome = outcome.and_then(|()| super::run_report::write(&mut run, &spec));
    match outcome {
        Ok(()) => {
            run.finish(None)?;
            progress::line(&format!("run folder: {}", run.path().display()));
            Ok(run.path().to_path_buf())
        }
        Err(e) => {
            run.finish(Some(format!("{e:#}")))?;
            run.discard_if_empty_run();
            Err(e)
        }
    }
}

/// Validates the pipeline and prints its plan, loading nothing (`--dry-run`); with
/// `measure`, a calibrated time per training step (see [`crate::train::estimate`]). Local
/// inputs must exist; a hub model need not be downloaded yet. (A `sweep:` block's runs
/// are listed by `sweep::block_plan`.)
pub fn dry_run(file: &Path, overrides: &[String], measure: bool) -> Result<String> {
    let spec = PipelineSpec::from_file(file, overrides)?;
    preflight_files(&spec, true).with_context(|| format!("pipeline {}", file.display()))?;
    super::plan::plan(&spec, measure)
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
                if let Some(teacher) = f.teacher.as_deref().filter(|t| *t != PRE_PRUNE) {
                    preflight_teacher(spec, teacher, dry)
                        .with_context(|| format!("stages[{i}].finetune.teacher"))?;
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// A local teacher must exist; where both configs can be read without downloading
/// anything, its vocabulary size must be the student's (the tokenizers themselves are
/// compared when `finetune` loads the teacher).
fn preflight_teacher(spec: &PipelineSpec, teacher: &str, dry: bool) -> Result<()> {
    if dry && teacher.starts_with("hf:") {
        return Ok(());
    }
    ModelSource::parse(teacher)?;
    let Some(Stage::Load(load)) = spec.stages.first() else {
        return Ok(());
    };
    let local = |s: &str| !s.starts_with("hf:");
    if !(local(teacher) && local(&load.model)) {
        return Ok(());
    }
    let (student, teacher_config) = (
        model::read_config_only(&load.model)?,
        model::read_config_only(teacher)?,
    );
    if student.vocab_size != teacher_config.vocab_size {
        bail!(
            "the teacher {teacher} has a vocabulary of {} tokens, the student {} one of {}; \
             distillation compares both models' distributions token by token, so the teacher \
             must use the student's tokenizer",
            teacher_config.vocab_size,
            load.model,
            student.vocab_size
        );
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

/// Runs one stage; writes its outputs into `dir` and, with `show`, prints its Markdown.
fn run_stage(stage: &Stage, ctx: &mut StageContext, dir: &Path, show: bool) -> Result<Written> {
    fn done<R: Serialize>(
        stage: &Stage,
        dir: &Path,
        show: bool,
        out: StageOutput<R>,
    ) -> Result<Written> {
        let written = write_outputs(dir, stage, &out)?;
        if let (true, Some(md)) = (show, &out.markdown) {
            println!("{md}");
        }
        Ok(written)
    }
    match stage {
        Stage::Load(l) => stages::load(l, ctx).map(|()| Written::default()),
        Stage::Inspect(spec) => {
            let spec = spec.clone().unwrap_or_default();
            done(stage, dir, show, stages::inspect(&spec, ctx)?)
        }
        Stage::Ppl(spec) => done(stage, dir, show, stages::ppl(spec, ctx)?),
        Stage::Attach(spec) => done(stage, dir, show, stages::attach(spec, ctx)?),
        Stage::Finetune(spec) => done(stage, dir, show, stages::finetune(spec, ctx)?),
        Stage::Export(spec) => done(stage, dir, show, stages::export(spec, ctx)?),
        Stage::Prune(spec) => done(stage, dir, show, stages::prune(spec, ctx)?),
        Stage::Eval(spec) => done(stage, dir, show, stages::eval(spec, ctx)?),
    }
}

/// Writes what `stage` produced into `dir` (created if needed): `<base>.json`,
/// `<base>.md`, `<base>.<ext>` for each extra file, with `<base>` from
/// [`Stage::report_base`]. Returns them, with the files the stage wrote itself that
/// exist, for the manifest.
pub fn write_outputs<R: Serialize>(
    dir: &Path,
    stage: &Stage,
    out: &StageOutput<R>,
) -> Result<Written> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let json = stage.report_file("json");
    fsx::write_json(&dir.join(&json), &out.report)?;
    let mut files = vec![json.clone()];
    let texts = out
        .markdown
        .iter()
        .map(|md| ("md", md))
        .chain(out.extra.iter().map(|(ext, text)| (*ext, text)));
    for (ext, text) in texts {
        let name = stage.report_file(ext);
        fsx::atomic_write(&dir.join(&name), text.as_bytes())?;
        files.push(name);
    }
    for path in out.wrote.iter().filter(|p| p.exists()) {
        files.push(path.strip_prefix(dir).unwrap_or(path).display().to_string());
    }
    Ok(Written {
        report: Some(json),
        files,
    })
}
