//! rora: recover the accuracy of pruned LLaMA-architecture models with RoRA adapters.
//!
//! The pipeline (`recover --pipeline FILE.yaml`) is
//! `load → inspect → [prune] → eval(before) → attach → finetune → eval(after) → export`;
//! each stage is one module here, the model is in [`model`].

pub mod adapters;
pub mod bench;
pub mod cli;
pub mod data;
pub mod eval;
pub mod export;
pub mod fsx;
pub mod inspect;
pub mod model;
pub mod nn;
pub mod pipeline;
pub mod progress;
pub mod prune;
pub mod report;
pub mod require;
pub mod runtime;
pub mod sweep;
pub mod train;
