//! Seeded random LLaMA weights for the benchmarks and the tests: every tensor of the
//! schema, drawn in [`TensorRole::all`] order from one ChaCha8 stream, so a seed gives the
//! same model on every machine.

use super::config::{LayerShape, LlamaConfig};
use super::schema::TensorRole;
use super::weights::Weights;
use anyhow::{anyhow, Result};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;

/// How the values of one kind of tensor are drawn.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Draw {
    /// N(0, std²) by Box–Muller, from two uniform f64 draws per value.
    Normal { std: f64 },
    /// Uniform(−half_width, half_width).
    Uniform { half_width: f32 },
    /// 1 + Uniform(−half_width, half_width): norm weights near one.
    OnePlusUniform { half_width: f32 },
    /// All ones; draws nothing from the stream.
    Ones,
}

impl Draw {
    fn values(self, rng: &mut impl Rng, n: usize) -> Vec<f32> {
        match self {
            Draw::Normal { std } => (0..n)
                .map(|_| {
                    let u1: f64 = 1.0 - rng.random::<f64>();
                    let u2: f64 = rng.random::<f64>();
                    (std * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
                })
                .collect(),
            Draw::Uniform { half_width: w } => (0..n).map(|_| rng.random_range(-w..w)).collect(),
            Draw::OnePlusUniform { half_width: w } => {
                (0..n).map(|_| 1.0 + rng.random_range(-w..w)).collect()
            }
            Draw::Ones => vec![1.0; n],
        }
    }
}

/// How each kind of tensor is drawn.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RandomInit {
    pub embeddings: Draw,
    pub projections: Draw,
    /// The layers' norms and the final norm.
    pub norms: Draw,
    /// The output head (untied models only).
    pub head: Draw,
}

impl RandomInit {
    /// Hugging Face's initialisation: matrices ~ N(0, 0.02²) (`initializer_range`),
    /// norms one. The benchmarks' model.
    pub fn hugging_face() -> Self {
        let normal = Draw::Normal { std: 0.02 };
        Self {
            embeddings: normal,
            projections: normal,
            norms: Draw::Ones,
            head: normal,
        }
    }

    fn draw(&self, role: TensorRole) -> Draw {
        match role {
            TensorRole::Embeddings => self.embeddings,
            TensorRole::Projection(..) => self.projections,
            TensorRole::FinalNorm | TensorRole::Norm(..) => self.norms,
            TensorRole::Head => self.head,
        }
    }
}

/// Every tensor of a model of `config`'s shape (its declared per-layer widths; an output
/// head unless tied), in f32 on `device`, under Hugging Face names.
pub fn random_weights(
    config: &LlamaConfig,
    init: &RandomInit,
    seed: u64,
    device: &Device,
) -> Result<Weights> {
    let layer_shapes = (0..config.num_hidden_layers)
        .map(|i| {
            config.declared_layer_shape(i).ok_or_else(|| {
                anyhow!("a random model needs intermediate_size (or layer_shapes) in its config")
            })
        })
        .collect::<Result<Vec<LayerShape>>>()?;
    let (hidden, vocab, head_dim) = (config.hidden_size, config.vocab_size, config.head_dim());
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut tensors = BTreeMap::new();
    for role in TensorRole::all(config.num_hidden_layers, config.tie_word_embeddings()) {
        let shape = role.shape(hidden, vocab, head_dim, &layer_shapes);
        let values = init.draw(role).values(&mut rng, shape.iter().product());
        tensors.insert(role.hf_name(), Tensor::from_vec(values, shape, device)?);
    }
    Ok(Weights::new(
        tensors,
        format!("random weights (seed {seed})"),
    ))
}
