//! The bias-free projections of a Llama layer. Each keeps its frozen weight and is the
//! one place where an adapter hooks in, so the forward pass never changes when one is
//! attached.

use super::adapter::Adapter;
use super::frozen::{frozen_matmul_t, frozen_matmul_t_shared, FrozenWeight, MatmulPrecision};
use super::mode::Mode;
use anyhow::Result;
use candle_core::{DType, Tensor};
use std::sync::{Arc, Mutex};

#[derive(Clone, Debug)]
pub struct Linear {
    /// (out, in), frozen.
    weight: FrozenWeight,
    adapter: Option<Adapter>,
    /// Calibration (pruning): statistics of the inputs this projection sees.
    recorder: Option<Arc<Mutex<InputStats>>>,
}

/// Per input column: the sum of squares over every row seen (‖X_j‖² for Wanda-style
/// importance), and the number of rows.
#[derive(Debug, Default)]
pub struct InputStats {
    pub sum_sq: Vec<f64>,
    pub rows: usize,
}

impl InputStats {
    fn add(&mut self, x: &Tensor) -> Result<()> {
        let in_dim = x.dim(candle_core::D::Minus1)?;
        let rows = x.elem_count() / in_dim.max(1);
        let col_sq = x
            .reshape((rows, in_dim))?
            .to_dtype(DType::F32)?
            .sqr()?
            .sum(0)?
            .to_vec1::<f32>()?;
        if self.sum_sq.is_empty() {
            self.sum_sq = vec![0.0; in_dim];
        }
        for (acc, v) in self.sum_sq.iter_mut().zip(col_sq) {
            *acc += v as f64;
        }
        self.rows += rows;
        Ok(())
    }
}

impl Linear {
    pub fn new(weight: Tensor) -> Self {
        Self {
            weight: FrozenWeight::new(weight),
            adapter: None,
            recorder: None,
        }
    }

    pub fn weight(&self) -> &Tensor {
        self.weight.tensor()
    }

    /// The frozen weight with its packed bf16 copies, if any.
    pub fn frozen_weight(&self) -> &FrozenWeight {
        &self.weight
    }

    /// Replaces the weight (its products go back to f32).
    pub fn set_weight(&mut self, weight: Tensor) {
        self.weight = FrozenWeight::new(weight);
    }

    /// Whether the weight's products run from packed bf16 copies.
    pub fn is_packed(&self) -> bool {
        self.weight.packed().is_some()
    }

    /// See [`FrozenWeight::set_precision`].
    pub fn set_matmul_precision(&mut self, precision: MatmulPrecision) -> Result<bool> {
        self.weight.set_precision(precision)
    }

    pub fn adapter(&self) -> Option<&Adapter> {
        self.adapter.as_ref()
    }

    pub fn set_adapter(&mut self, adapter: Option<Adapter>) {
        self.adapter = adapter;
    }

    /// Starts collecting input statistics; returns the shared record.
    pub fn record_inputs(&mut self) -> Arc<Mutex<InputStats>> {
        let stats = Arc::new(Mutex::new(InputStats::default()));
        self.recorder = Some(stats.clone());
        stats
    }

    pub fn stop_recording(&mut self) {
        self.recorder = None;
    }

    /// `x`: (..., in) → (..., out).
    pub fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        if let Some(rec) = &self.recorder {
            rec.lock()
                .map_err(|_| anyhow::anyhow!("input recorder poisoned"))?
                .add(x)?;
        }
        match &self.adapter {
            None => frozen_matmul_t(x, &self.weight),
            Some(adapter) => adapter.forward(x, &self.weight, mode),
        }
    }

    /// `x` through several projections that read it (a layer's q, k and v; gate and up).
    /// Plain frozen projections (no adapter, no recorder) whose products run in bf16, on
    /// an input no gradient flows to (evaluation, decoding, a distillation teacher), share
    /// one parallel pass: the threads meet once instead of once a projection (SmolLM2's
    /// shape decodes 7 products a layer, each a few tens of µs). Anything else runs each
    /// projection's own forward, as [`Linear::forward`].
    pub fn forward_each(projections: &[&Linear], x: &Tensor, mode: Mode) -> Result<Vec<Tensor>> {
        let plain: Option<Vec<&FrozenWeight>> = projections
            .iter()
            .map(|p| (p.adapter.is_none() && p.recorder.is_none()).then_some(&p.weight))
            .collect();
        if let Some(weights) = plain {
            if let Some(ys) = frozen_matmul_t_shared(x, &weights)? {
                return Ok(ys);
            }
        }
        projections.iter().map(|p| p.forward(x, mode)).collect()
    }
}
