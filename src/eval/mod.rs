//! Evaluation: language-modelling perplexity (and, later, the commonsense tasks).

pub mod perplexity;
