//! The integration tests, one binary: each module is one area (as `tests/NAME.rs` files
//! were), sharing `common`. One binary links candle once instead of once per area.

mod adapters;
mod backprop;
mod baselines;
mod checkpoint_eval;
mod cli_pipeline;
mod common;
mod distill;
mod eval_cache;
mod eval_models;
mod eval_smollm2;
mod eval_tasks;
mod export;
mod export_adapter_gguf;
mod export_gguf;
mod export_padded;
mod finetune;
mod fused;
mod gguf;
mod gradients;
mod hub_cache;
mod model_loading;
mod model_reference;
mod prune;
mod recovery_data;
mod sweep;
