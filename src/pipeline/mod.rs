//! Pipelines: the YAML spec, the run folder with its manifest, and the runner that
//! executes the stages in order.

pub mod plan;
pub mod run_dir;
pub mod runner;
pub mod spec;

pub use run_dir::RunDir;
pub use runner::run_pipeline;
pub use spec::PipelineSpec;
