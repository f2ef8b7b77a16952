//! The `prune` stage: structured pruning that makes the kind of model rora repairs.
//! Whole key/value groups (with their query heads, so grouped-query attention stays
//! valid) and MLP channels (rows of gate/up, columns of down) are removed by Wanda-style
//! importance from calibration text: for an input column j of `o_proj` or `down_proj`,
//! `‖X_j‖₂ · Σ_i |W_ij|`, summed over a head group's columns.

use crate::data::read_scoring_text;
use crate::model::{Llama, TextTokenizer};
use crate::nn::linear::Linear;
use crate::nn::Mode;
use crate::progress;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PruneSpec {
    /// The calibration text: a UTF-8 file, or an LLM-Adapters `.json` (its instructions).
    pub calibration: PathBuf,
    /// Calibration sequences (BOS + `seq_len - 1` tokens each).
    #[serde(default = "d_samples")]
    pub n_samples: usize,
    #[serde(default = "d_seq")]
    pub seq_len: usize,
    /// Share of MLP channels removed in each pruned layer.
    #[serde(default)]
    pub mlp_ratio: f64,
    /// Share of key/value groups (with their query heads) removed in each pruned layer.
    #[serde(default)]
    pub head_ratio: f64,
    /// First and last layer to prune, inclusive. Default: LLM-Pruner's, which leaves the
    /// first 3 layers and the last one whole.
    #[serde(default)]
    pub layers: Option<[usize; 2]>,
    /// Per-layer ratios overriding the uniform ones: `{5: {mlp_ratio: 0.6}}`.
    #[serde(default)]
    pub per_layer: BTreeMap<usize, LayerRatios>,
    /// Keep every pruned layer's MLP width a multiple of this (kernels and q8_0's blocks
    /// of 32 like multiples of 32 or 64): the count the ratio gives is rounded up, and the
    /// importance ranking decides which extra channels stay. A layer narrower than the
    /// rounded count stays whole. Heads are removed in whole groups already.
    #[serde(default = "d_multiple_of")]
    pub multiple_of: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerRatios {
    #[serde(default)]
    pub mlp_ratio: Option<f64>,
    #[serde(default)]
    pub head_ratio: Option<f64>,
}

fn d_samples() -> usize {
    32
}
fn d_seq() -> usize {
    128
}
fn d_multiple_of() -> usize {
    1
}

/// Channels an MLP of `width` keeps when `ratio` of them is removed: at least one, rounded
/// up to a multiple of `multiple_of`, never more than `width`.
pub fn kept_mlp_width(width: usize, ratio: f64, multiple_of: usize) -> usize {
    let keep = (width - (width as f64 * ratio).round() as usize).max(1);
    keep.div_ceil(multiple_of)
        .saturating_mul(multiple_of)
        .min(width)
}

impl PruneSpec {
    pub fn validate(&self) -> Result<()> {
        let ratios = [self.mlp_ratio, self.head_ratio].into_iter().chain(
            self.per_layer
                .values()
                .flat_map(|r| [r.mlp_ratio, r.head_ratio])
                .flatten(),
        );
        for r in ratios {
            if !(0.0..1.0).contains(&r) {
                bail!("prune ratios must be in [0, 1), got {r}");
            }
        }
        if self.multiple_of == 0 {
            bail!("prune.multiple_of must be at least 1 (1: any width)");
        }
        if self.n_samples == 0 || self.seq_len < 2 {
            bail!("prune needs n_samples ≥ 1 and seq_len ≥ 2");
        }
        if let Some([a, b]) = self.layers {
            if a > b {
                bail!("prune.layers [{a}, {b}]: the first layer comes after the last");
            }
        }
        Ok(())
    }

    /// (mlp, head) ratios of `layer` in a model of `n` layers; zero outside the range.
    fn ratios(&self, layer: usize, n: usize) -> (f64, f64) {
        let [first, last] = self.layers.unwrap_or([3, n.saturating_sub(2)]);
        if layer < first || layer > last {
            return (0.0, 0.0);
        }
        let o = self.per_layer.get(&layer);
        (
            o.and_then(|r| r.mlp_ratio).unwrap_or(self.mlp_ratio),
            o.and_then(|r| r.head_ratio).unwrap_or(self.head_ratio),
        )
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct PrunedLayer {
    pub layer: usize,
    pub kv_heads: [usize; 2],
    pub heads: [usize; 2],
    pub mlp_width: [usize; 2],
}

#[derive(Debug, Clone, Serialize)]
pub struct PruneReport {
    pub calibration_tokens: usize,
    pub params_before: usize,
    pub params_after: usize,
    /// 1 - after / before.
    pub pruned_ratio: f64,
    /// `[before, after]` per layer.
    pub layers: Vec<PrunedLayer>,
}

/// Prunes `model` in place. Adapters must not be attached yet.
pub fn prune(model: &mut Llama, tok: &TextTokenizer, spec: &PruneSpec) -> Result<PruneReport> {
    spec.validate()?;
    if model.has_adapters() {
        bail!("prune must come before `attach`: the model already has adapters");
    }
    let n = model.num_layers();
    if let Some([_, last]) = spec.layers {
        if last >= n {
            bail!("prune.layers: layer {last} does not exist (the model has {n} layers)");
        }
    }
    let params_before = model.num_params();

    // 1. Calibration: record the inputs of o_proj and down_proj.
    let text = read_scoring_text(&spec.calibration, "prune.calibration")?;
    let tokens = tok.encode(&text, false)?;
    let samples: Vec<Vec<u32>> = tokens
        .chunks(spec.seq_len - 1)
        .filter(|c| c.len() == spec.seq_len - 1)
        .take(spec.n_samples)
        .map(|c| tok.bos_id().into_iter().chain(c.iter().copied()).collect())
        .collect();
    if samples.is_empty() {
        bail!(
            "prune.calibration {} has fewer than seq_len ({}) tokens",
            spec.calibration.display(),
            spec.seq_len
        );
    }
    let recorders: Vec<_> = model
        .layers
        .iter_mut()
        .map(|l| {
            (
                l.self_attn.o_proj.record_inputs(),
                l.mlp.down_proj.record_inputs(),
            )
        })
        .collect();
    let pb = progress::bar(samples.len() as u64, "calibrate");
    for batch in samples.chunks(4) {
        let width = batch[0].len();
        let flat: Vec<u32> = batch.iter().flatten().copied().collect();
        let ids = Tensor::from_vec(flat, (batch.len(), width), model.device())?;
        model.forward_embeds(&model.embed(&ids)?, None, None, Mode::Eval)?;
        pb.inc(batch.len() as u64);
    }
    pb.finish_and_clear();
    for l in model.layers.iter_mut() {
        l.self_attn.o_proj.stop_recording();
        l.mlp.down_proj.stop_recording();
    }

    // 2. Per layer: score, keep the most important, cut the tensors.
    let mut report_layers = Vec::new();
    for (i, (o_rec, down_rec)) in recorders.into_iter().enumerate() {
        let (mlp_ratio, head_ratio) = spec.ratios(i, n);
        let layer = &mut model.layers[i];
        let attn = &mut layer.self_attn;
        let (h0, kv0, hd) = (attn.num_heads, attn.num_kv_heads, attn.head_dim);
        let mlp0 = layer.mlp.down_proj.weight().dim(1)?;
        if mlp_ratio > 0.0 {
            let scores = column_scores(
                layer.mlp.down_proj.weight(),
                &down_rec.lock().expect("recorder").sum_sq,
            )?;
            let keep = top_k(&scores, kept_mlp_width(mlp0, mlp_ratio, spec.multiple_of));
            let idx = index_tensor(&keep, layer.mlp.down_proj.weight())?;
            let mlp = &mut layer.mlp;
            mlp.gate_proj = Linear::new(mlp.gate_proj.weight().index_select(&idx, 0)?);
            mlp.up_proj = Linear::new(mlp.up_proj.weight().index_select(&idx, 0)?);
            mlp.down_proj = Linear::new(mlp.down_proj.weight().index_select(&idx, 1)?);
        }
        if head_ratio > 0.0 {
            let rep = h0 / kv0;
            let cols = column_scores(
                attn.o_proj.weight(),
                &o_rec.lock().expect("recorder").sum_sq,
            )?;
            let group_scores: Vec<f64> = (0..kv0)
                .map(|g| cols[g * rep * hd..(g + 1) * rep * hd].iter().sum())
                .collect();
            let keep = top_k(
                &group_scores,
                kv0 - (kv0 as f64 * head_ratio).round() as usize,
            );
            let q_rows: Vec<usize> = keep
                .iter()
                .flat_map(|g| g * rep * hd..(g + 1) * rep * hd)
                .collect();
            let kv_rows: Vec<usize> = keep.iter().flat_map(|g| g * hd..(g + 1) * hd).collect();
            let (qi, kvi) = (
                index_tensor(&q_rows, attn.q_proj.weight())?,
                index_tensor(&kv_rows, attn.k_proj.weight())?,
            );
            attn.q_proj = Linear::new(attn.q_proj.weight().index_select(&qi, 0)?);
            attn.k_proj = Linear::new(attn.k_proj.weight().index_select(&kvi, 0)?);
            attn.v_proj = Linear::new(attn.v_proj.weight().index_select(&kvi, 0)?);
            attn.o_proj = Linear::new(attn.o_proj.weight().index_select(&qi, 1)?);
            attn.num_kv_heads = keep.len();
            attn.num_heads = keep.len() * rep;
        }
        let shape = &mut model.layer_shapes[i];
        shape.num_attention_heads = model.layers[i].self_attn.num_heads;
        shape.num_key_value_heads = model.layers[i].self_attn.num_kv_heads;
        shape.intermediate_size = model.layers[i].mlp.down_proj.weight().dim(1)?;
        report_layers.push(PrunedLayer {
            layer: i,
            kv_heads: [kv0, shape.num_key_value_heads],
            heads: [h0, shape.num_attention_heads],
            mlp_width: [mlp0, shape.intermediate_size],
        });
    }
    model.config.layer_shapes = Some(model.layer_shapes.clone());
    let params_after = model.num_params();
    Ok(PruneReport {
        calibration_tokens: samples.len() * spec.seq_len,
        params_before,
        params_after,
        pruned_ratio: 1.0 - params_after as f64 / params_before as f64,
        layers: report_layers,
    })
}

/// `‖X_j‖₂ · Σ_i |W_ij|` for every input column j of `w` (out, in).
fn column_scores(w: &Tensor, sum_sq: &[f64]) -> Result<Vec<f64>> {
    let col_abs = w.to_dtype(DType::F32)?.abs()?.sum(0)?.to_vec1::<f32>()?;
    if col_abs.len() != sum_sq.len() {
        bail!(
            "calibration saw no input for a layer (widths {} vs {})",
            col_abs.len(),
            sum_sq.len()
        );
    }
    Ok(col_abs
        .iter()
        .zip(sum_sq)
        .map(|(a, s)| *a as f64 * s.sqrt())
        .collect())
}

/// Indices of the `k` (at least 1) largest scores, ascending (ties: lower index first).
fn top_k(scores: &[f64], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    let mut keep: Vec<usize> = order.into_iter().take(k.max(1)).collect();
    keep.sort_unstable();
    keep
}

fn index_tensor(idx: &[usize], like: &Tensor) -> Result<Tensor> {
    let v: Vec<u32> = idx.iter().map(|&i| i as u32).collect();
    Ok(Tensor::from_vec(v, idx.len(), like.device())?)
}

#[cfg(test)]
mod tests {
    #[test]
    fn kept_widths_round_up_to_the_multiple() {
        use super::kept_mlp_width;
        assert_eq!(kept_mlp_width(172, 0.5, 1), 86);
        assert_eq!(kept_mlp_width(172, 0.5, 32), 96);
        assert_eq!(kept_mlp_width(1536, 0.5, 64), 768);
        assert_eq!(kept_mlp_width(100, 0.99, 32), 32);
        assert_eq!(
            kept_mlp_width(40, 0.5, 64),
            40,
            "never wider than the layer"
        );
    }
}
