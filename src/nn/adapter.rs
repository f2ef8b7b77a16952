//! The adapter a projection may hold: the slot [`Linear`](super::Linear) forwards through.

use super::bottleneck::BottleneckAdapter;
use super::dora::DoraAdapter;
use super::frozen::FrozenWeight;
use super::lora::LoraAdapter;
use super::mode::Mode;
use anyhow::Result;
use candle_core::{Tensor, Var};

/// The adapter held by one projection.
#[derive(Clone, Debug)]
pub enum Adapter {
    Lora(LoraAdapter),
    Dora(DoraAdapter),
    /// Series or parallel bottleneck adapter (nonlinear: never merged).
    Bottleneck(BottleneckAdapter),
}

impl Adapter {
    pub fn forward(&self, x: &Tensor, weight: &FrozenWeight, mode: Mode) -> Result<Tensor> {
        match self {
            Adapter::Lora(a) => a.forward(x, weight, mode),
            Adapter::Dora(a) => a.forward(x, weight, mode),
            Adapter::Bottleneck(a) => a.forward(x, weight, mode),
        }
    }

    /// The low-rank pair of a LoRA or DoRA adapter; `None` for a bottleneck adapter.
    pub fn lora(&self) -> Option<&LoraAdapter> {
        match self {
            Adapter::Lora(a) => Some(a),
            Adapter::Dora(a) => Some(&a.lora),
            Adapter::Bottleneck(_) => None,
        }
    }

    /// The settings that change what the adapter computes besides its tensors (for
    /// content hashes).
    pub fn settings(&self) -> String {
        match self {
            Adapter::Lora(l) => format!("lora scale {} dropout {}", l.scale, l.dropout),
            Adapter::Dora(d) => format!("dora scale {} dropout {}", d.lora.scale, d.lora.dropout),
            Adapter::Bottleneck(b) => format!(
                "bottleneck {:?} {} scaling {} dropout {}",
                b.placement,
                b.non_linearity.name(),
                b.scaling,
                b.dropout
            ),
        }
    }

    /// Trainable tensors with PEFT's (LoRA, DoRA) or LLM-Adapters' (bottleneck) suffixes.
    pub fn vars(&self) -> Vec<(&'static str, &Var)> {
        match self {
            Adapter::Lora(l) => vec![("lora_A.weight", &l.a), ("lora_B.weight", &l.b)],
            Adapter::Dora(d) => vec![
                ("lora_A.weight", &d.lora.a),
                ("lora_B.weight", &d.lora.b),
                ("lora_magnitude_vector", &d.magnitude),
            ],
            Adapter::Bottleneck(b) => {
                vec![
                    ("adapter_down.weight", &b.down),
                    ("adapter_up.weight", &b.up),
                ]
            }
        }
    }
}
