//! The run folder: every output of a run, and `manifest.json` describing it (the
//! resolved pipeline, versions, seed, start/end times, per stage its wall time and the
//! files it wrote). Readers of a run (`report.md`, `recover sweep`) find its files
//! through the manifest.

use super::spec::PipelineSpec;
use crate::fsx;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// One finished stage in `manifest.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageRecord {
    /// Its position in `stages:`.
    pub index: usize,
    pub stage: String,
    pub started_at: String,
    pub wall_s: f64,
    /// Its JSON report (`eval-before.json`), when it has one.
    #[serde(default)]
    pub report: Option<String>,
    /// Every file and folder it wrote, its reports first: relative to the run folder when
    /// inside it (`eval-before.md`, `checkpoints`), else as given (an export elsewhere).
    #[serde(default)]
    pub files: Vec<String>,
}

/// What a stage wrote, for its [`StageRecord`].
#[derive(Debug, Clone, Default)]
pub struct Written {
    pub report: Option<String>,
    pub files: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Manifest {
    pub name: String,
    pub rora_version: String,
    pub seed: u64,
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub started_at: String,
    pub finished_at: Option<String>,
    pub wall_s: Option<f64>,
    pub cpu_threads: usize,
    pub pipeline_file: String,
    pub pipeline: PipelineSpec,
    pub stages: Vec<StageRecord>,
    /// Files the runner wrote for the run as a whole (`report.md`, its chart).
    pub files: Vec<String>,
}

pub struct RunDir {
    path: PathBuf,
    /// True when this run made the folder (so a run that fails before any stage
    /// finishes can remove it again).
    created: bool,
    manifest: Manifest,
    started: std::time::Instant,
}

pub fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

impl RunDir {
    pub fn create(spec: &PipelineSpec, pipeline_file: &Path) -> Result<Self> {
        let path = spec.run_dir();
        let created = !path.exists();
        std::fs::create_dir_all(&path).with_context(|| {
            format!(
                "cannot create run folder {}; choose another `run_dir`",
                path.display()
            )
        })?;
        let manifest = Manifest {
            name: spec.name.clone(),
            rora_version: env!("CARGO_PKG_VERSION").to_string(),
            seed: spec.seed,
            status: "running".into(),
            error: None,
            started_at: now_rfc3339(),
            finished_at: None,
            wall_s: None,
            cpu_threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            pipeline_file: pipeline_file.display().to_string(),
            pipeline: spec.clone(),
            stages: Vec::new(),
            files: Vec::new(),
        };
        let run = Self {
            path,
            created,
            manifest,
            started: std::time::Instant::now(),
        };
        run.write_manifest()?;
        Ok(run)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    pub fn record_stage(
        &mut self,
        index: usize,
        stage: &str,
        started_at: String,
        wall_s: f64,
        written: Written,
    ) -> Result<()> {
        self.manifest.stages.push(StageRecord {
            index,
            stage: stage.to_string(),
            started_at,
            wall_s,
            report: written.report,
            files: written.files,
        });
        self.write_manifest()
    }

    /// The stages finished so far.
    pub fn stages(&self) -> &[StageRecord] {
        &self.manifest.stages
    }

    /// Records a file written for the whole run.
    pub fn record_file(&mut self, name: &str) {
        self.manifest.files.push(name.to_string());
    }

    pub fn finish(&mut self, error: Option<String>) -> Result<()> {
        self.manifest.status = if error.is_some() { "failed" } else { "ok" }.into();
        self.manifest.error = error;
        self.manifest.finished_at = Some(now_rfc3339());
        self.manifest.wall_s = Some(self.started.elapsed().as_secs_f64());
        self.write_manifest()
    }

    /// Removes the folder if this run made it and no stage finished: a run that failed
    /// on its input leaves nothing behind.
    pub fn discard_if_empty_run(&self) {
        if self.created && self.manifest.stages.is_empty() {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }

    fn write_manifest(&self) -> Result<()> {
        fsx::write_json(&self.file("manifest.json"), &self.manifest)
    }
}

/// The finished stages of the run in `dir`, from its `manifest.json`.
pub fn read_stage_records(dir: &Path) -> Result<Vec<StageRecord>> {
    #[derive(Deserialize)]
    struct Stages {
        stages: Vec<StageRecord>,
    }
    let path = dir.join("manifest.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let m: Stages = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a run manifest", path.display()))?;
    Ok(m.stages)
}
