//! The adapter a projection may hold: the slot [`Linear`](super::Linear) forwards through.

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
}

impl Adapter {
    pub fn forward(&self, x: &Tensor, weight: &FrozenWeight, mode: Mode) -> Result<Tensor> {
        match self {
            Adapter::Lora(a) => a.forward(x, weight, mode),
            Adapter::Dora(a) => a.forward(x, weight, mode),
        }
    }

    pub fn lora(&self) -> &LoraAdapter {
        match self {
            Adapter::Lora(a) => a,
            Adapter::Dora(a) => &a.lora,
        }
    }

    /// Trainable tensors with PEFT's suffixes.
    pub fn vars(&self) -> Vec<(&'static str, &Var)> {
        let l = self.lora();
        let mut v = vec![("lora_A.weight", &l.a), ("lora_B.weight", &l.b)];
        if let Adapter::Dora(d) = self {
            v.push(("lora_magnitude_vector", &d.magnitude));
        }
        v
    }
}
