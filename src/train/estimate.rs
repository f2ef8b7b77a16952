//! How long a run's training step takes on this machine, measured rather than guessed
//! (`--dry-run` prints it beside the memory estimate).
//!
//! A calibration: for each distinct layer shape of the run, a random model of that one
//! shape with one layer and with two, the run's adapters attached, trains one row of
//! `cutoff_len` tokens with the run's objective (a `kd` teacher is the same random model;
//! its forward pass is in the step). The two-layer step minus the one-layer step is the
//! cost of a layer; the one-layer step minus a layer is everything else (embeddings,
//! head, loss, optimizer). The step is then Σ over the run's layers + the rest, per row,
//! times the rows of a step (`batch_size`). Rows cost the same whatever the micro-batch
//! size up to memory effects, so the estimate is a little high for large micro-batches.

use super::objective::Objective;
use super::spec::FinetuneSpec;
use super::trainer::Trainer;
use crate::adapters::{self, AttachSpec};
use crate::data::Example;
use crate::model::random::{random_weights, RandomInit};
use crate::model::{LayerShape, Llama, LlamaConfig};
use anyhow::Result;
use candle_core::Device;
use std::time::Instant;

/// A measured step time.
#[derive(Debug, Clone)]
pub struct StepEstimate {
    /// One optimizer step of `batch_size` rows.
    pub step_s: f64,
    /// Per distinct layer shape: its cost per row.
    pub layer_s: Vec<(LayerShape, f64)>,
    /// Embeddings, head, loss and optimizer per row.
    pub rest_s: f64,
    /// What the calibration itself took.
    pub calibration_s: f64,
}

/// Measures a training step of `spec` on a model of `config` with these layer `shapes`,
/// `attach` adapters on it.
pub fn estimate_step(
    config: &LlamaConfig,
    shapes: &[LayerShape],
    attach: &AttachSpec,
    spec: &FinetuneSpec,
) -> Result<StepEstimate> {
    let t0 = Instant::now();
    let mut distinct: Vec<LayerShape> = Vec::new();
    for s in shapes {
        if !distinct.contains(s) {
            distinct.push(*s);
        }
    }
    let mut layer_s = Vec::with_capacity(distinct.len());
    let mut rest_s = f64::INFINITY;
    for shape in &distinct {
        let one = row_step_seconds(config, *shape, 1, attach, spec)?;
        let two = row_step_seconds(config, *shape, 2, attach, spec)?;
        let layer = (two - one).max(0.0);
        layer_s.push((*shape, layer));
        rest_s = rest_s.min((one - layer).max(0.0));
    }
    let per_row: f64 = shapes
        .iter()
        .map(|s| {
            layer_s
                .iter()
                .find(|(d, _)| d == s)
                .map_or(0.0, |(_, t)| *t)
        })
        .sum::<f64>()
        + rest_s;
    Ok(StepEstimate {
        step_s: per_row * spec.batch_size as f64,
        layer_s,
        rest_s,
        calibration_s: t0.elapsed().as_secs_f64(),
    })
}

/// The faster of two timed steps (after one untimed) of a `layers`-layer random model of
/// `shape` on one row of `spec.cutoff_len` random tokens.
fn row_step_seconds(
    config: &LlamaConfig,
    shape: LayerShape,
    layers: usize,
    attach: &AttachSpec,
    spec: &FinetuneSpec,
) -> Result<f64> {
    let config = LlamaConfig {
        num_hidden_layers: layers,
        num_attention_heads: shape.num_attention_heads,
        num_key_value_heads: Some(shape.num_key_value_heads),
        intermediate_size: Some(shape.intermediate_size),
        layer_shapes: Some(vec![shape; layers]),
        max_position_embeddings: Some(
            config
                .max_position_embeddings
                .unwrap_or(0)
                .max(spec.cutoff_len),
        ),
        ..config.clone()
    };
    let weights = random_weights(&config, &RandomInit::hugging_face(), 0, &Device::Cpu)?;
    let mut model = Llama::from_weights(config, &weights)?;
    let teacher = spec.objective.distills().then(|| model.clone());
    adapters::attach(&mut model, attach, 0)?;
    let row = Example {
        ids: (0..spec.cutoff_len)
            .map(|i| (i * 7919 % model.config.vocab_size) as u32)
            .collect(),
        targets: vec![true; spec.cutoff_len],
    };
    let one_row = FinetuneSpec {
        batch_size: 1,
        micro_batch_size: 1,
        max_steps: Some(3),
        warmup_steps: 0,
        ..spec.clone()
    };
    let objective = Objective::from_spec(&one_row, teacher)?;
    let mut trainer = Trainer::from_examples(&model, &one_row, 0, objective, vec![row], vec![])?;
    let mut best = f64::INFINITY;
    for i in 0..3 {
        let batch = trainer.next_batch()?;
        let t = Instant::now();
        trainer.step(&batch)?;
        if i > 0 {
            best = best.min(t.elapsed().as_secs_f64());
        }
    }
    Ok(best)
}
