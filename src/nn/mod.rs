//! The building blocks a model is made of, and nothing else: frozen weights (f32, or
//! packed bf16 for AMX or AVX512-BF16), the fused CPU kernels with their backward passes, [`Linear`]
//! with its optional adapter slot, the LoRA / DoRA / bottleneck / dropout forward passes
//! and the prefix-tuning key/value vectors. The
//! model (`model/`) and the attach policy (`adapters/`) both stand on this module and
//! never on each other. Train vs eval is a [`Mode`] argument of every forward pass.

pub mod adapter;
pub mod bottleneck;
pub mod dora;
pub mod dropout;
pub mod frozen;
pub mod fused;
pub mod linear;
pub mod lora;
pub mod mode;
pub mod prefix;
pub mod tape;

pub use adapter::Adapter;
pub use bottleneck::{BottleneckAdapter, NonLinearity, Placement};
pub use dora::DoraAdapter;
pub use frozen::{frozen_matmul_t, FrozenWeight, MatmulPrecision};
pub use linear::{InputStats, Linear};
pub use lora::LoraAdapter;
pub use mode::Mode;
pub use prefix::{PrefixParams, PrefixTuning};
