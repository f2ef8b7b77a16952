//! Evaluation: language-modelling perplexity and the eight commonsense tasks under three
//! protocols (`generate`, `choice`, `content`; see DESIGN.md, Evaluation).

pub mod answer;
pub mod content;
pub mod generate;
pub mod perplexity;
pub mod protocols;
pub mod report;
pub mod run;
pub mod scoring;
pub mod spec;

pub use perplexity::PplSpec;
pub use report::{
    wilson_interval, EvalReport, EvalRun, ProtocolResult, QuestionRecord, TaskResult,
};
pub use run::run_eval;
pub use spec::{EvalSpec, EvalTask, Protocol};
