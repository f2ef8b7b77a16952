//! Evaluation: language-modelling perplexity (and, later, the commonsense tasks).

pub mod generate;
pub mod perplexity;
