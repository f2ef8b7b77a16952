//! Train or evaluate: an argument of every forward pass, never state held by the model,
//! so that an early return can never leave a model in training mode.

/// How a forward pass runs. Only adapter dropout depends on it today.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// No dropout.
    #[default]
    Eval,
    /// Adapter dropout on, each adapter's mask derived from (`dropout_key`, its own id).
    Train { dropout_key: u64 },
}

impl Mode {
    /// Training with masks derived from `key` (the trainer uses seed and micro-step). The
    /// top bit is cleared so that masks equal those of runs made when the key shared a
    /// word with an "evaluating" flag: resuming such a run stays bitwise exact.
    pub fn train(key: u64) -> Self {
        Mode::Train {
            dropout_key: key & !(1 << 63),
        }
    }

    /// The dropout key, or `None` when evaluating.
    pub fn dropout_key(self) -> Option<u64> {
        match self {
            Mode::Eval => None,
            Mode::Train { dropout_key } => Some(dropout_key),
        }
    }
}
