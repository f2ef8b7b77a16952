//! rora: recover the accuracy of pruned LLaMA-architecture models with RoRA adapters.
//!
//! The pipeline (`recover --pipeline FILE.yaml`) is
//! `load → inspect → [prune] → eval(before) → attach → finetune → eval(after) → export`;
//! each stage is one module here, the model is in [`model`].
//!
//! Layers, lowest first; a module imports only from the layers below it:
//! - [`nn`]: frozen weights, fused kernels, `Linear` with its adapter slot, LoRA / DoRA /
//!   bottleneck / dropout, prefix-tuning vectors, the train/eval [`nn::Mode`];
//! - [`model`]: config, tensor schema, loading (folders, GGUF, hub), tokenizer, the LLaMA;
//! - [`data`] (training and task files), [`adapters`] (attach policy, PEFT and
//!   LLM-Adapters I/O, merge);
//! - the stages: [`inspect`], [`prune`], [`eval`], [`export`], with [`report`]; then
//!   [`train`], which runs [`eval`] at checkpoints (`finetune.checkpoint_eval`);
//! - [`pipeline`] (spec, stage functions, the runner that writes every file), [`sweep`]
//!   (grids of pipelines), [`bench`], and [`cli`] on top.

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
