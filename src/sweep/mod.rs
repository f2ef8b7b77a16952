//! `recover sweep`: one pipeline run over a grid of `--set` overrides, one run folder per
//! run, resumable, with a summary of the results (`sweep.json`, `sweep.md`, `sweep.svg`).
//!
//! [`spec`] is the `sweep:` block and its command-line counterpart, [`grid`] expands it
//! into runs, [`run`] runs them, [`metrics`] reads what each measured, [`pivot`] reduces
//! the runs to the summary table and [`summary`] writes it.

pub mod grid;
pub mod metrics;
pub mod pivot;
pub mod record;
pub mod run;
pub mod spec;
pub mod summary;

pub use run::{block_plan, plan, run_sweep};
pub use spec::{Axis, Grid, Metric, SweepSpec};
pub use summary::SweepSummary;
