//! Learning-rate schedules with linear warmup, as Hugging Face's
//! `get_{linear,cosine,constant}_schedule_with_warmup`.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedule {
    #[default]
    Linear,
    Cosine,
    Constant,
}

impl LrSchedule {
    /// The learning rate for optimizer step `step` (0-based) of `total`.
    pub fn lr(self, base: f64, step: usize, warmup: usize, total: usize) -> f64 {
        if step < warmup {
            return base * step as f64 / warmup.max(1) as f64;
        }
        let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
        match self {
            LrSchedule::Linear => base * (1.0 - progress).max(0.0),
            LrSchedule::Cosine => {
                base * 0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos())
            }
            LrSchedule::Constant => base,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::LrSchedule::*;

    #[test]
    fn warmup_then_decay() {
        assert_eq!(Linear.lr(1.0, 0, 10, 110), 0.0);
        assert_eq!(Linear.lr(1.0, 5, 10, 110), 0.5);
        assert_eq!(Linear.lr(1.0, 10, 10, 110), 1.0);
        assert_eq!(Linear.lr(1.0, 60, 10, 110), 0.5);
        assert_eq!(Linear.lr(1.0, 110, 10, 110), 0.0);
        assert!((Cosine.lr(1.0, 60, 10, 110) - 0.5).abs() < 1e-12);
        assert_eq!(Constant.lr(2e-4, 99, 10, 110), 2e-4);
    }
}
