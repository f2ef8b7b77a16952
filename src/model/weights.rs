//! A named set of tensors in Hugging Face naming, whatever file format they came from.

use anyhow::{anyhow, bail, Result};
use candle_core::{DType, Tensor};
use std::collections::BTreeMap;

pub struct Weights {
    tensors: BTreeMap<String, Tensor>,
    /// Where the tensors came from, for error messages ("model.safetensors in DIR").
    origin: String,
}

impl Weights {
    pub fn new(tensors: BTreeMap<String, Tensor>, origin: impl Into<String>) -> Self {
        Self {
            tensors,
            origin: origin.into(),
        }
    }

    pub fn origin(&self) -> &str {
        &self.origin
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }

    pub fn get(&self, name: &str) -> Result<&Tensor> {
        self.tensors.get(name).ok_or_else(|| {
            anyhow!(
                "tensor `{name}` is missing from {}; is this a LlamaForCausalLM checkpoint?",
                self.origin
            )
        })
    }

    /// The tensor, checked to be 2-D; returns it with its (rows, cols).
    pub fn matrix(&self, name: &str) -> Result<(&Tensor, usize, usize)> {
        let t = self.get(name)?;
        match t.dims() {
            [r, c] => Ok((t, *r, *c)),
            dims => bail!(
                "tensor `{name}` in {} has shape {dims:?}, expected a matrix",
                self.origin
            ),
        }
    }

    /// The tensor, checked to be a vector of length `len`.
    pub fn vector(&self, name: &str, len: usize) -> Result<&Tensor> {
        let t = self.get(name)?;
        if t.dims() != [len] {
            bail!(
                "tensor `{name}` in {} has shape {:?}, expected [{len}]",
                self.origin,
                t.dims()
            );
        }
        Ok(t)
    }

    pub fn to_dtype(self, dtype: DType) -> Result<Self> {
        let tensors = self
            .tensors
            .into_iter()
            .map(|(k, t)| Ok((k, t.to_dtype(dtype)?)))
            .collect::<Result<_>>()?;
        Ok(Self {
            tensors,
            origin: self.origin,
        })
    }
}
