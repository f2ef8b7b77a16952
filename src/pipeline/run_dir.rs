//! The run folder: every output of a run, and `manifest.json` describing it (the
//! resolved pipeline, versions, seed, start/end times, per-stage wall time).

use super::spec::PipelineSpec;
use crate::fsx;
use anyhow::{Context, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize)]
pub struct StageTiming {
    pub index: usize,
    pub stage: String,
    pub started_at: String,
    pub wall_s: f64,
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
    pub stages: Vec<StageTiming>,
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
    ) -> Result<()> {
        self.manifest.stages.push(StageTiming {
            index,
            stage: stage.to_string(),
            started_at,
            wall_s,
        });
        self.write_manifest()
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
