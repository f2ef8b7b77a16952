//! `report.md`: the whole run on one page, put together from the files its stages wrote
//! as the manifest lists them.

use super::run_dir::{RunDir, StageRecord};
use super::spec::{PipelineSpec, Stage};
use crate::fsx;
use crate::progress;
use crate::report::compare;
use anyhow::Result;

const REPORT: &str = "report.md";
const CHART: &str = "eval-comparison.svg";

/// `report.md` for a run with two or more evaluations: every eval row and the
/// last-minus-first difference, a bar chart, perplexities, fine-tuning and the shapes.
pub fn write(run: &mut RunDir, spec: &PipelineSpec) -> Result<()> {
    let records = run.stages();
    let of = |stage: &'static str| records.iter().filter(move |r| r.stage == stage);
    let evals: Vec<&str> = of("eval").filter_map(|r| r.report.as_deref()).collect();
    if evals.len() < 2 {
        return Ok(());
    }
    let rows = evals
        .iter()
        .map(|name| compare::read_report(&run.file(name), None))
        .map(|r| {
            r.map(|mut row| {
                row.label = row.report.label.clone();
                row
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let mut md = format!("# Run report: {}\n\n", spec.name);
    md.push_str(&compare::to_markdown(&rows));
    compare::bar_chart(&run.file(CHART), &rows)?;
    md.push_str(&format!("\n![accuracy by task]({CHART})\n\n"));
    // In file-name order, as one file per name: the order report.md has always had.
    let mut ppl: Vec<&str> = of("ppl").flat_map(markdown_files).collect();
    ppl.sort_unstable();
    ppl.dedup();
    for name in ppl {
        md.push_str(&std::fs::read_to_string(run.file(name))?);
        md.push('\n');
    }
    if of("finetune").next().is_some() {
        md.push_str("## Fine-tuning\n\n![loss curve](loss-curve.svg)\n\nSee `finetune.json` and `train-log.jsonl`.\n\n");
    }
    // The shapes of the unlabelled `inspect` (the last one, whose file stands).
    let shapes = of("inspect")
        .filter(|r| {
            matches!(spec.stages.get(r.index), Some(Stage::Inspect(i))
                if i.as_ref().is_none_or(|i| i.label.is_none()))
        })
        .flat_map(markdown_files)
        .last();
    if let Some(name) = shapes {
        md.push_str(&std::fs::read_to_string(run.file(name))?);
    }
    fsx::atomic_write(&run.file(REPORT), md.as_bytes())?;
    run.record_file(REPORT);
    run.record_file(CHART);
    progress::line(&format!("report: {}", run.file(REPORT).display()));
    Ok(())
}

fn markdown_files(record: &StageRecord) -> impl Iterator<Item = &str> {
    record
        .files
        .iter()
        .map(String::as_str)
        .filter(|f| f.ends_with(".md"))
}
