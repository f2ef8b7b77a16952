//! Pipelines: the YAML spec, the stages, the run folder with its manifest, and the
//! runner that executes the stages in order and writes every file they produce.

pub mod eval_cache;
pub mod plan;
pub mod run_dir;
pub mod run_report;
pub mod runner;
pub mod spec;
pub mod stages;

pub use run_dir::RunDir;
pub use runner::run_pipeline;
pub use spec::{PipelineSpec, Stage};
pub use stages::{StageContext, StageOutput};
