//! `recover bench eval`: times multiple-choice scoring with the eval's own batched scorer
//! on the benchmarks' random model.

use super::measure::{median, mib, proc_status_bytes, time_passes};
use super::shape::{random_ids, random_model, set_matmul_precision};
use super::TrainBenchSpec;
use anyhow::{bail, Result};
use candle_core::Device;
use rand::SeedableRng;
use serde::Serialize;

/// The scoring benchmark: questions of random tokens on `random_model(model)` (only the
/// model's shape and seed fields of `model` are used).
#[derive(Debug, Clone, Serialize)]
pub struct EvalBenchSpec {
    pub model: TrainBenchSpec,
    pub questions: usize,
    pub prompt_len: usize,
    pub options: usize,
    pub option_len: usize,
    /// Questions scored together (eval's `batch_size`).
    pub batch: usize,
    pub runs: usize,
}

impl Default for EvalBenchSpec {
    fn default() -> Self {
        Self {
            model: TrainBenchSpec::default(),
            questions: 64,
            prompt_len: 96,
            options: 4,
            option_len: 4,
            batch: 8,
            runs: 5,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct EvalBenchReport {
    pub spec: EvalBenchSpec,
    pub dtype: &'static str,
    pub threads: usize,
    /// Wall time of every timed pass over the questions.
    pub run_s: Vec<f64>,
    pub median_run_s: f64,
    pub questions_per_s: f64,
    /// Base-model parameters, embeddings included (a tied head counted once).
    pub base_params: u64,
    /// Tokens the model processed per pass (each prompt once, then each option's tokens).
    pub tokens_per_run: usize,
    /// Checksum of the scores (the sum over questions and options), for comparing builds.
    pub score_sum: f64,
    pub peak_rss_bytes: Option<u64>,
}

impl EvalBenchReport {
    pub fn to_markdown(&self) -> String {
        let s = &self.spec;
        let m = &s.model;
        let runs: Vec<String> = self.run_s.iter().map(|t| format!("{t:.3}")).collect();
        format!(
            "# recover bench eval\n\nshape: {}; \
             {} questions × ({} prompt tokens + {} options × {} tokens), {} per batch; f32, frozen products {}; {} threads\n\n\
             | metric | value |\n|---|---|\n\
             | questions/s | {:.1} |\n| median pass | {:.3} s |\n| passes (s) | {} |\n\
             | tokens per pass | {} |\n| params: base | {} |\n| score checksum | {:.4} |\n\
             | peak RSS | {} |\n",
            m.describe_shape(),
            s.questions,
            s.prompt_len,
            s.options,
            s.option_len,
            s.batch,
            m.matmul_precision,
            self.threads,
            self.questions_per_s,
            self.median_run_s,
            runs.join(", "),
            self.tokens_per_run,
            self.base_params,
            self.score_sum,
            mib(self.peak_rss_bytes),
        )
    }
}

/// Scores `spec.questions` random multiple-choice questions `spec.runs` times (after one
/// untimed pass) with the eval's own batched scorer.
pub fn bench_eval(spec: &EvalBenchSpec) -> Result<EvalBenchReport> {
    use crate::eval::scoring::{score_candidates, Candidate};
    if spec.runs == 0 || spec.questions == 0 || spec.options == 0 || spec.option_len == 0 {
        bail!("bench eval needs at least one run, question, option and option token");
    }
    let mut model = random_model(&spec.model, &Device::Cpu)?;
    set_matmul_precision(&mut model, &spec.model, "eval")?;
    let base_params = model.num_params() as u64;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(spec.model.seed.wrapping_add(2));
    let vocab = spec.model.vocab as u32;
    let questions: Vec<Vec<Candidate>> = (0..spec.questions)
        .map(|_| {
            let prompt = random_ids(&mut rng, spec.prompt_len, vocab);
            (0..spec.options)
                .map(|_| {
                    let mut ids = prompt.clone();
                    ids.extend(random_ids(&mut rng, spec.option_len, vocab));
                    Candidate {
                        ids,
                        n_ctx: spec.prompt_len,
                    }
                })
                .collect()
        })
        .collect();
    let pass = || -> Result<(f64, usize)> {
        let (mut sum, mut tokens) = (0.0, 0);
        for batch in questions.chunks(spec.batch.max(1)) {
            let scores = score_candidates(&model, batch)?;
            sum += scores.logprobs.iter().flatten().sum::<f64>();
            tokens += scores.tokens;
        }
        Ok((sum, tokens))
    };
    let (run_s, (score_sum, tokens_per_run)) = time_passes(spec.runs, pass)?;
    let median_run_s = median(&run_s);
    Ok(EvalBenchReport {
        spec: spec.clone(),
        dtype: "f32",
        threads: candle_core::utils::get_num_threads(),
        questions_per_s: spec.questions as f64 / median_run_s,
        run_s,
        median_run_s,
        base_params,
        tokens_per_run,
        score_sum,
        peak_rss_bytes: proc_status_bytes("VmHWM"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The benchmark runs the eval's scorer on the questions it describes: each prompt once
    /// plus every option's tokens, and scores near ln(vocab) per token for random weights.
    #[test]
    fn tiny_eval_bench_scores_like_the_reference_path() {
        let spec = EvalBenchSpec {
            model: TrainBenchSpec {
                hidden: 32,
                layers: 2,
                heads: 4,
                kv_heads: 2,
                intermediate: 48,
                vocab: 50,
                ..TrainBenchSpec::default()
            },
            questions: 3,
            prompt_len: 5,
            options: 2,
            option_len: 2,
            batch: 2,
            runs: 2,
        };
        let r = bench_eval(&spec).unwrap();
        assert_eq!(r.run_s.len(), 2);
        // Each prompt once (5), then each option's tokens but its last (nothing is predicted
        // after it): 3 × (5 + 2 × 1).
        assert_eq!(r.tokens_per_run, 21);
        // Random weights: each option token costs about ln(50), 12 option tokens in all.
        let per_token = -r.score_sum / 12.0;
        assert!((per_token - 50f64.ln()).abs() < 0.5, "{per_token}");
    }
}
