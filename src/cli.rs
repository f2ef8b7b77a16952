//! The `recover` command line: argument definitions and dispatch to the library.

use crate::model::{self, DtypeName, ModelSource};
use crate::nn::frozen::MatmulPrecision;
use crate::pipeline::runner::write_outputs;
use crate::pipeline::spec::{InspectSpec, LoadSpec};
use crate::pipeline::{self, stages, Stage, StageContext, StageOutput};
use anyhow::{bail, Result};
use candle_core::Device;
use clap::{Args, Parser, Subcommand};
use serde::Serialize;
use std::path::PathBuf;

/// Win back the accuracy a pruned LLaMA-architecture model lost, with RoRA adapters.
///
/// Run a whole recovery pipeline with `recover --pipeline FILE.yaml`, or use one of the
/// commands below on their own. Model sources everywhere are a Hugging Face folder
/// (config.json, safetensors, tokenizer.json), a llama.cpp `.gguf` file, or
/// `hf:org/name[@revision]` from the Hugging Face cache.
#[derive(Debug, Parser)]
#[command(name = "recover", version, args_conflicts_with_subcommands = true)]
pub struct Cli {
    /// The pipeline to run (YAML: name, seed, device, dtype, run_dir, stages).
    #[arg(long, value_name = "FILE.yaml")]
    pub pipeline: Option<PathBuf>,

    /// Override a pipeline value: `seed=7`, `load.model=DIR`, `ppl.max_len=128`,
    /// `stages.2.label=x`. The value is parsed as YAML. Repeatable.
    #[arg(long = "set", value_name = "KEY.PATH=VALUE", requires = "pipeline")]
    pub set: Vec<String>,

    /// Continue fine-tuning from the newest checkpoint in the run folder.
    #[arg(long, requires = "pipeline")]
    pub resume: bool,

    /// Validate the pipeline and print its plan (stages, trainable parameters, memory
    /// estimate) without loading weights or writing anything.
    #[arg(long, requires = "pipeline", conflicts_with = "resume")]
    pub dry_run: bool,

    /// With --dry-run: measure a training step of the pipeline's shapes on this machine
    /// (a random model of one and two layers of each layer shape; seconds to a minute for
    /// 7B-sized layers) and print the time per step and per epoch.
    #[arg(long, requires = "dry_run")]
    pub measure: bool,

    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the shape report of a model: per-layer heads, widths and parameters.
    Inspect(InspectArgs),
    /// Perplexity of a model on a text file.
    Ppl(PplArgs),
    /// Continue a prompt (greedy, or sampled with --temperature).
    Generate(GenerateArgs),
    /// Fold a PEFT adapter into a model and write a merged Hugging Face folder.
    Merge(MergeArgs),
    /// Commonsense accuracy of any model (optionally with a PEFT adapter).
    Eval(EvalArgs),
    /// Compare eval reports (eval-<label>.json): a table and a grouped bar chart.
    Compare(CompareArgs),
    /// Recovery curves of several runs side by side (their checkpoint evaluations): a
    /// markdown table and charts of pooled accuracy and perplexity against tokens.
    Curves(CurvesArgs),
    /// Benchmarks: `recover bench train` times LoRA training steps on a fixed random model.
    Bench(crate::bench::BenchArgs),
    /// Run a pipeline over a grid of --set overrides, one run folder each, and summarize.
    Sweep(SweepArgs),
}

/// `recover sweep`. Every setting here replaces the one of the pipeline's `sweep:` block.
#[derive(Debug, Args)]
pub struct SweepArgs {
    /// The pipeline each run runs.
    #[arg(long, value_name = "FILE.yaml")]
    pub pipeline: PathBuf,
    /// An axis of the grid: a --set key and its values, `attach.rank=8,16`. Repeatable:
    /// the runs are every combination. Replaces `sweep.grids` and their `rows`, `columns`
    /// and `best_of`.
    #[arg(long = "grid", value_name = "KEY=V1,V2")]
    pub grid: Vec<crate::sweep::Axis>,
    /// An axis every cell is run over and averaged across, `seed=1,2`. Replaces
    /// `sweep.repeat`.
    #[arg(long = "repeat", value_name = "KEY=V1,V2")]
    pub repeat: Vec<crate::sweep::Axis>,
    /// Override a pipeline value in every run (as `recover --set`). Repeatable.
    #[arg(long = "set", value_name = "KEY.PATH=VALUE")]
    pub set: Vec<String>,
    /// The axis of the summary table's rows (default: the first axis).
    #[arg(long, value_name = "KEY")]
    pub rows: Option<String>,
    /// The axis of its columns (default: the next axis).
    #[arg(long, value_name = "KEY")]
    pub columns: Option<String>,
    /// Axes reduced to their value with the best mean metric, comma-separated.
    #[arg(long, value_name = "KEY,...", value_delimiter = ',')]
    pub best_of: Vec<String>,
    /// What best means (default: accuracy when the pipeline evaluates tasks, else ppl).
    #[arg(long, value_enum)]
    pub metric: Option<crate::sweep::Metric>,
    /// The protocol the accuracy is read from (default: content when the evaluation ran
    /// it, else its first). Finished runs are re-read, not rerun.
    #[arg(long, value_enum)]
    pub protocol: Option<crate::eval::Protocol>,
    /// The sweep folder (default: `sweep.out`, else runs/<name>-sweep).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Check every run and list them without running any.
    #[arg(long)]
    pub dry_run: bool,
    /// Print sweep.json instead of sweep.md.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct CompareArgs {
    /// eval-<label>.json files, first = baseline.
    #[arg(required = true, num_args = 1..)]
    pub reports: Vec<PathBuf>,
    /// The grouped bar chart.
    #[arg(long, default_value = "compare.svg")]
    pub svg: PathBuf,
}

#[derive(Debug, Args)]
pub struct CurvesArgs {
    /// Run folders of finetune stages with `checkpoint_eval` (their train-log.jsonl).
    #[arg(required = true, num_args = 1..)]
    pub runs: Vec<PathBuf>,
    /// A name for each run, in order, one `--label` per run (default: the folder names).
    #[arg(long = "label")]
    pub labels: Vec<String>,
    /// The accuracy chart; the perplexity chart is written beside it (`-perplexity.svg`).
    #[arg(long, default_value = "curves.svg")]
    pub svg: PathBuf,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Model source: folder, .gguf, or hf:org/name.
    #[arg(long)]
    pub model: String,
    /// PEFT adapter folder to attach first.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Comma-separated: boolq, piqa, social_i_qa, hellaswag, winogrande, ARC-Easy,
    /// ARC-Challenge, openbookqa.
    #[arg(long, value_delimiter = ',', required = true)]
    pub tasks: Vec<String>,
    /// Comma-separated: content, choice, generate.
    #[arg(long, value_delimiter = ',', default_value = "content")]
    pub protocol: Vec<String>,
    /// First N questions per task.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Leave out the first N questions of each task (before --limit): a confirmation set
    /// disjoint from an evaluation of the first N.
    #[arg(long, default_value_t = 0)]
    pub skip: usize,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Folder of the task data (LLM-Adapters format).
    #[arg(long, default_value = "../shared/data/commonsense")]
    pub data_dir: PathBuf,
    /// Where to write eval-<label>.json/.md/.jsonl (default: print only).
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long, default_value = "eval")]
    pub label: String,
    /// Put BOS before every prompt and context (default: what the model's tokenizer
    /// does, `add_bos_token`).
    #[arg(long, action = clap::ArgAction::Set)]
    pub bos: Option<bool>,
    /// f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Inputs of the frozen weights' products (`eval.matmul_precision`): bf16 on AMX or
    /// AVX512-BF16 is several times faster, as lm-evaluation-harness's `dtype=bfloat16`.
    #[arg(long, value_enum, default_value_t = MatmulPrecision::F32)]
    pub matmul_precision: MatmulPrecision,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct MergeArgs {
    /// Base model source: folder, .gguf, or hf:org/name.
    #[arg(long)]
    pub model: String,
    /// PEFT adapter folder (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    pub adapter: PathBuf,
    /// Output folder for the merged Hugging Face model (written atomically).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Also (or instead) write the merged model zero-padded to the widest layer widths, a
    /// folder stock transformers loads.
    #[arg(long)]
    pub out_uniform: Option<PathBuf>,
    /// Also (or instead) write the merged model as one GGUF file for llama.cpp.
    #[arg(long)]
    pub gguf: Option<PathBuf>,
    /// Weight type of the GGUF file: f32, f16, bf16 or q8_0.
    #[arg(long, default_value = "f16")]
    pub gguf_dtype: String,
    /// dtype of the merged weights: bf16, f16 or f32 (merging is done in f32).
    #[arg(long, default_value = "bf16")]
    pub dtype: String,
    /// Shard the safetensors above this size.
    #[arg(long, default_value = "5GB")]
    pub max_shard_size: String,
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Model source: folder, .gguf, or hf:org/name.
    #[arg(long)]
    pub model: String,
    #[arg(long)]
    pub prompt: String,
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Number of samples (each with seed, seed+1, ...), separated by blank lines.
    #[arg(long, default_value_t = 1)]
    pub samples: usize,
    /// f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Model source: folder, .gguf, or hf:org/name.
    pub model: String,
    /// Dense reference config (config.json, folder, .gguf or hub id) for pruning ratios.
    #[arg(long)]
    pub reference: Option<String>,
    /// dtype to load in (sets the byte count of the report): f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct PplArgs {
    /// Model source: folder, .gguf, or hf:org/name.
    #[arg(long)]
    pub model: String,
    /// UTF-8 text file to score.
    #[arg(long)]
    pub text: PathBuf,
    /// Chunk length in tokens (including BOS when it is prepended).
    #[arg(long, default_value_t = 256)]
    pub max_len: usize,
    /// Prepend the BOS token to every chunk (default: what the model's tokenizer does).
    #[arg(long, action = clap::ArgAction::Set)]
    pub bos: Option<bool>,
    /// Chunks per forward pass.
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Score only the first N tokens of the text.
    #[arg(long)]
    pub max_tokens: Option<usize>,
    /// f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    match (cli.command, cli.pipeline) {
        (Some(Command::Inspect(a)), _) => inspect(a),
        (Some(Command::Ppl(a)), _) => ppl(a),
        (Some(Command::Generate(a)), _) => generate(a),
        (Some(Command::Merge(a)), _) => merge(a),
        (Some(Command::Eval(a)), _) => eval(a),
        (Some(Command::Compare(a)), _) => compare(a),
        (Some(Command::Curves(a)), _) => curves(a),
        (Some(Command::Bench(a)), _) => crate::bench::run(a),
        (Some(Command::Sweep(a)), _) => sweep(a),
        (None, Some(file)) => {
            // The `sweep:` block is checked in a plain run too, though only `recover
            // sweep` runs it.
            let spec = pipeline::PipelineSpec::from_file(&file, &cli.set)?;
            let sweep = crate::sweep::SweepSpec::of(&spec, &file)?;
            if cli.dry_run {
                let mut plan = pipeline::runner::dry_run(&file, &cli.set, cli.measure)?;
                plan.push_str(&crate::sweep::block_plan(sweep.as_ref(), &file, &cli.set)?);
                println!("{plan}");
                return Ok(());
            }
            let options = pipeline::runner::RunOptions {
                resume: cli.resume,
                part_of_sweep: false,
            };
            pipeline::run_pipeline(&file, &cli.set, options).map(|_| ())
        }
        (None, None) => {
            bail!("nothing to do: give --pipeline FILE.yaml or a command (see `recover --help`)")
        }
    }
}

/// A context holding the model of `source` in `dtype` on the CPU, loaded by the
/// pipeline's `load` stage, outside any run folder.
fn loaded(source: &str, dtype: DtypeName, seed: u64) -> Result<StageContext> {
    let mut ctx = StageContext::new(Device::Cpu, dtype.dtype(), seed);
    let load = LoadSpec {
        model: source.to_string(),
        config: None,
    };
    stages::load(&load, &mut ctx)?;
    Ok(ctx)
}

/// Prints a stage's report: one JSON object, or its Markdown.
fn print<R: Serialize>(out: &StageOutput<R>, json: bool) -> Result<()> {
    match (&out.markdown, json) {
        (Some(md), false) => println!("{md}"),
        _ => println!("{}", serde_json::to_string(&out.report)?),
    }
    Ok(())
}

/// Attaches the PEFT adapter in `dir` with the `attach` stage.
fn attach_folder(dir: &std::path::Path, ctx: &mut StageContext) -> Result<()> {
    let spec = crate::adapters::AttachSpec::from_folder(dir.to_path_buf());
    stages::attach(&spec, ctx).map(|_| ())
}

fn inspect(a: InspectArgs) -> Result<()> {
    if let Some(r) = &a.reference {
        // Before loading the model: a wrong reference fails at once.
        model::read_config_only(r).map_err(|e| e.context("--reference"))?;
    }
    let mut ctx = loaded(&a.model, a.dtype.parse()?, 0)?;
    let spec = InspectSpec {
        reference: a.reference,
        label: None,
    };
    print(&stages::inspect(&spec, &mut ctx)?, a.json)
}

fn ppl(a: PplArgs) -> Result<()> {
    if !a.text.is_file() {
        bail!("cannot read --text {}: not a file", a.text.display());
    }
    let spec = crate::eval::PplSpec {
        text: a.text,
        max_tokens: a.max_tokens,
        max_len: a.max_len,
        bos: a.bos,
        batch_size: a.batch_size,
        label: None,
    };
    let mut ctx = loaded(&a.model, a.dtype.parse()?, 0)?;
    print(&stages::ppl(&spec, &mut ctx)?, a.json)
}

fn generate(a: GenerateArgs) -> Result<()> {
    let source = ModelSource::parse(&a.model)?;
    let dtype: DtypeName = a.dtype.parse()?;
    let loaded = model::load(&source, dtype.dtype(), &Device::Cpu)?;
    let prompt = loaded.tokenizer.encode(&a.prompt, true)?;
    for i in 0..a.samples {
        let sampling = crate::eval::generate::Sampling {
            temperature: a.temperature,
            seed: a.seed + i as u64,
        };
        let new = crate::eval::generate::generate(
            &loaded.model,
            &prompt,
            a.max_new_tokens,
            loaded.tokenizer.eos_ids(),
            sampling,
        )?;
        let all: Vec<u32> = prompt.iter().chain(&new).copied().collect();
        println!("{}\n", loaded.tokenizer.decode(&all)?);
    }
    Ok(())
}

fn merge(a: MergeArgs) -> Result<()> {
    let dtype: DtypeName = a.dtype.parse()?;
    let gguf_dtype: crate::export::GgufDtype = a.gguf_dtype.parse()?;
    if a.out.is_none() && a.out_uniform.is_none() && a.gguf.is_none() {
        bail!("recover merge needs --out DIR, --out-uniform DIR or --gguf FILE");
    }
    // Merging is done in f32 whatever the export dtype.
    let mut ctx = loaded(&a.model, DtypeName::F32, 0)?;
    attach_folder(&a.adapter, &mut ctx)?;
    let spec = crate::export::ExportSpec {
        merged: a.out,
        merged_uniform: a.out_uniform,
        gguf: a.gguf,
        gguf_dtype,
        adapter: None,
        adapter_gguf: None,
        gguf_base: None,
        dtype,
        max_shard_size: a.max_shard_size,
        base_model_name_or_path: None,
        verify: true,
    };
    stages::export(&spec, &mut ctx).map(|_| ())
}

fn eval(a: EvalArgs) -> Result<()> {
    let tasks: Vec<crate::eval::EvalTask> = a
        .tasks
        .iter()
        .map(|t| crate::eval::EvalTask::parse(t))
        .collect::<Result<_>>()?;
    let mut spec = crate::eval::EvalSpec::new(&a.label, tasks);
    spec.protocol = a
        .protocol
        .iter()
        .map(|p| {
            serde_yaml_ng::from_str(p)
                .map_err(|_| anyhow::anyhow!("--protocol `{p}`: use content, choice or generate"))
        })
        .collect::<Result<_>>()?;
    spec.limit = a.limit;
    spec.skip = a.skip;
    spec.batch_size = a.batch_size;
    spec.data_dir = a.data_dir;
    spec.bos = a.bos;
    spec.matmul_precision = a.matmul_precision;
    spec.validate()?;
    let mut ctx = loaded(&a.model, a.dtype.parse()?, 0)?;
    if let Some(dir) = &a.adapter {
        attach_folder(dir, &mut ctx)?;
    }
    let out = stages::eval(&spec, &mut ctx)?;
    if let Some(dir) = &a.out {
        write_outputs(dir, &Stage::Eval(spec), &out)?;
    }
    print(&out, a.json)
}

fn compare(a: CompareArgs) -> Result<()> {
    use crate::report::compare;
    let rows = a
        .reports
        .iter()
        .map(|p| compare::read_report(p, None))
        .collect::<Result<Vec<_>>>()?;
    println!("{}", compare::to_markdown(&rows));
    compare::bar_chart(&a.svg, &rows)?;
    eprintln!("chart: {}", a.svg.display());
    Ok(())
}

fn curves(a: CurvesArgs) -> Result<()> {
    use crate::train::curves;
    if !a.labels.is_empty() && a.labels.len() != a.runs.len() {
        bail!(
            "{} --label values for {} run folders: give one per run, in order",
            a.labels.len(),
            a.runs.len()
        );
    }
    let curves = a
        .runs
        .iter()
        .enumerate()
        .map(|(i, dir)| curves::read_curve(dir, a.labels.get(i).cloned()))
        .collect::<Result<Vec<_>>>()?;
    println!("{}", curves::to_markdown(&curves));
    for path in curves::plot(&a.svg, &curves)? {
        eprintln!("chart: {}", path.display());
    }
    Ok(())
}

fn sweep(a: SweepArgs) -> Result<()> {
    use crate::sweep::{Grid, SweepSpec};
    let from_cli = SweepSpec {
        out: a.out,
        grids: if a.grid.is_empty() {
            Vec::new()
        } else {
            vec![Grid { axes: a.grid }]
        },
        repeat: Grid { axes: a.repeat },
        rows: a.rows,
        columns: a.columns,
        best_of: a.best_of,
        metric: a.metric,
        protocol: a.protocol,
    };
    if a.dry_run {
        println!("{}", crate::sweep::plan(&a.pipeline, &a.set, &from_cli)?);
        return Ok(());
    }
    let summary = crate::sweep::run_sweep(&a.pipeline, &a.set, &from_cli)?;
    if a.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        println!("{}", summary.to_markdown());
    }
    summary.ensure_all_ok()
}
