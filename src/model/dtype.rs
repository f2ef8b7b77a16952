//! The weight dtypes rora loads, computes and exports in, and their one spelling: the
//! pipeline's `dtype:` values, the `--dtype` flags, report fields and Hugging Face's
//! `torch_dtype` all come from here.

use anyhow::{bail, Result};
use candle_core::DType;
use serde::{Deserialize, Serialize};

/// A dtype as the user names it: `f32`, `bf16` or `f16` (serde spells the variants the
/// way [`DtypeName::name`] does).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DtypeName {
    #[default]
    F32,
    Bf16,
    F16,
}

impl DtypeName {
    pub const ALL: [DtypeName; 3] = [DtypeName::F32, DtypeName::Bf16, DtypeName::F16];

    pub fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::Bf16 => DType::BF16,
            Self::F16 => DType::F16,
        }
    }

    /// `f32`, `bf16`, `f16`: candle's own names.
    pub fn name(self) -> &'static str {
        self.dtype().as_str()
    }

    /// Hugging Face's `torch_dtype` (`float32`, `bfloat16`, `float16`).
    pub fn torch_name(self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::Bf16 => "bfloat16",
            Self::F16 => "float16",
        }
    }

    /// The name of a tensor dtype, `None` for one rora does not hold weights in.
    pub fn of(dtype: DType) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.dtype() == dtype)
    }
}

/// The name of any tensor dtype: `f32`, `bf16`, `f16`, or candle's name of another.
pub fn dtype_name(dtype: DType) -> &'static str {
    dtype.as_str()
}

/// `f32`, `bf16`, `f16`, or their `torch_dtype` spellings.
impl std::str::FromStr for DtypeName {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match Self::ALL
            .into_iter()
            .find(|d| s == d.name() || s == d.torch_name())
        {
            Some(d) => Ok(d),
            None => bail!("dtype `{s}` is not supported; use f32, bf16 or f16"),
        }
    }
}

impl std::fmt::Display for DtypeName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_spelling_everywhere() {
        for d in DtypeName::ALL {
            let yaml = serde_yaml_ng::to_string(&d).unwrap();
            assert_eq!(yaml.trim(), d.name());
            assert_eq!(d.name().parse::<DtypeName>().unwrap(), d);
            assert_eq!(d.torch_name().parse::<DtypeName>().unwrap(), d);
            assert_eq!(DtypeName::of(d.dtype()), Some(d));
        }
        assert_eq!(DtypeName::of(DType::F64), None);
        assert_eq!(dtype_name(DType::F64), "f64");
        let err = "f8".parse::<DtypeName>().unwrap_err().to_string();
        assert!(err.contains("use f32, bf16 or f16"), "{err}");
    }
}
