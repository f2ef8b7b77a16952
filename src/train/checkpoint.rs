//! Checkpoints: `checkpoints/step-N/` with the adapter (PEFT names), the optimizer
//! moments and `state.json`. Written to a temporary folder and renamed, so a checkpoint
//! folder is always complete; only the newest `keep` are kept.

use super::optim::AdamW;
use crate::fsx;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor, Var};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps done.
    pub step: usize,
    pub total_steps: usize,
    /// Examples consumed, i.e. the position in the seeded epoch orders.
    pub examples_seen: usize,
    pub seed: u64,
    /// Dropout masks and data order derive from the seed and the step; nothing else
    /// random remains to be saved.
    pub rng: String,
}

/// The folder of a run's checkpoints, inside its run folder.
pub fn root(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints")
}

pub fn checkpoint_dir(root: &Path, step: usize) -> PathBuf {
    root.join(format!("step-{step}"))
}

pub fn save(
    root: &Path,
    vars: &[(String, Var)],
    opt: &AdamW,
    state: &TrainState,
    keep: usize,
) -> Result<PathBuf> {
    std::fs::create_dir_all(root).with_context(|| format!("cannot create {}", root.display()))?;
    let dir = checkpoint_dir(root, state.step);
    let tmp = root.join(format!(".step-{}.tmp-{}", state.step, std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp)?;
    let adapter: HashMap<String, Tensor> = vars
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect();
    candle_core::safetensors::save(&adapter, tmp.join("adapter_model.safetensors"))?;
    candle_core::safetensors::save(&opt.state_tensors()?, tmp.join("optimizer.safetensors"))?;
    fsx::write_json(&tmp.join("state.json"), state)?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::rename(&tmp, &dir)
        .with_context(|| format!("cannot move checkpoint into {}", dir.display()))?;
    prune_old(root, keep)?;
    Ok(dir)
}

/// Step numbers of the complete checkpoints under `root`, ascending.
pub fn list(root: &Path) -> Vec<usize> {
    let mut steps: Vec<usize> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.strip_prefix("step-")?.parse().ok())
        .collect();
    steps.sort_unstable();
    steps
}

fn prune_old(root: &Path, keep: usize) -> Result<()> {
    let steps = list(root);
    if keep > 0 && steps.len() > keep {
        for s in &steps[..steps.len() - keep] {
            std::fs::remove_dir_all(checkpoint_dir(root, *s))?;
        }
    }
    Ok(())
}

/// Restores adapter weights and optimizer moments from `dir`; returns its state.
pub fn load(
    dir: &Path,
    vars: &[(String, Var)],
    opt: &mut AdamW,
    device: &Device,
) -> Result<TrainState> {
    let state_path = dir.join("state.json");
    let state: TrainState = serde_json::from_str(
        &std::fs::read_to_string(&state_path)
            .with_context(|| format!("cannot read {}", state_path.display()))?,
    )
    .with_context(|| format!("{} is not a rora checkpoint state", state_path.display()))?;
    let adapter = candle_core::safetensors::load(dir.join("adapter_model.safetensors"), device)
        .with_context(|| format!("cannot read the adapter of checkpoint {}", dir.display()))?;
    for (name, var) in vars {
        let Some(t) = adapter.get(name) else {
            bail!(
                "checkpoint {} has no `{name}`: it was made with other adapter settings",
                dir.display()
            );
        };
        if t.shape() != var.shape() {
            bail!(
                "checkpoint tensor `{name}` has shape {:?}, the adapter has {:?}",
                t.dims(),
                var.dims()
            );
        }
        var.set(t)?;
    }
    let moments = candle_core::safetensors::load(dir.join("optimizer.safetensors"), device)
        .with_context(|| {
            format!(
                "cannot read the optimizer state of checkpoint {}",
                dir.display()
            )
        })?;
    opt.load_state(&moments, state.step)?;
    Ok(state)
}
