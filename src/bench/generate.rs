//! `recover bench generate`: times the `generate` protocol's decoding — greedy, batched
//! with left padding, KV cache — with the eval's own [`generate_batch`] on the benchmarks'
//! random model. No token stops a row (random weights would stop rows at random), so
//! every prompt gets exactly `new_tokens`, as transformers' `generate` does with
//! `min_new_tokens = max_new_tokens` in its peer `benches/peers/transformers_generate.py`.

use super::measure::{median, mib, proc_status_bytes, time_passes};
use super::shape::{random_ids, random_model, set_matmul_precision};
use super::TrainBenchSpec;
use crate::eval::generate::generate_batch;
use anyhow::{bail, Result};
use candle_core::Device;
use rand::SeedableRng;
use serde::Serialize;

/// The decoding benchmark: `prompts` random prompts of `prompt_len` tokens, `batch` at a
/// time, `new_tokens` new tokens each.
#[derive(Debug, Clone, Serialize)]
pub struct GenerateBenchSpec {
    pub model: TrainBenchSpec,
    pub prompts: usize,
    pub prompt_len: usize,
    pub new_tokens: usize,
    /// Prompts decoded together (eval's `batch_size`).
    pub batch: usize,
    pub runs: usize,
}

impl Default for GenerateBenchSpec {
    fn default() -> Self {
        Self {
            model: TrainBenchSpec::default(),
            prompts: 16,
            prompt_len: 64,
            new_tokens: 32,
            batch: 8,
            runs: 3,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct GenerateBenchReport {
    pub spec: GenerateBenchSpec,
    pub dtype: &'static str,
    pub threads: usize,
    /// Wall time of every timed pass over the prompts (prefill included).
    pub run_s: Vec<f64>,
    pub median_run_s: f64,
    /// New tokens per second: prompts × new_tokens / median pass.
    pub new_tokens_per_s: f64,
    pub base_params: u64,
    /// The sum of every generated id, for comparing builds.
    pub token_sum: u64,
    pub peak_rss_bytes: Option<u64>,
}

impl GenerateBenchReport {
    pub fn to_markdown(&self) -> String {
        let s = &self.spec;
        let runs: Vec<String> = self.run_s.iter().map(|t| format!("{t:.3}")).collect();
        format!(
            "# recover bench generate\n\nshape: {}; {} prompts of {} tokens, {} new tokens \
             each, {} per batch, greedy with a KV cache; f32, frozen products {}; {} threads\n\n\
             | metric | value |\n|---|---|\n\
             | new tokens/s | {:.1} |\n| median pass | {:.3} s |\n| passes (s) | {} |\n\
             | params: base | {} |\n| token checksum | {} |\n| peak RSS | {} |\n",
            s.model.describe_shape(),
            s.prompts,
            s.prompt_len,
            s.new_tokens,
            s.batch,
            s.model.matmul_precision,
            self.threads,
            self.new_tokens_per_s,
            self.median_run_s,
            runs.join(", "),
            self.base_params,
            self.token_sum,
            mib(self.peak_rss_bytes),
        )
    }
}

/// The benchmark's prompts: seeded random token ids.
pub fn bench_prompts(spec: &GenerateBenchSpec) -> Vec<Vec<u32>> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(spec.model.seed.wrapping_add(3));
    (0..spec.prompts)
        .map(|_| random_ids(&mut rng, spec.prompt_len, spec.model.vocab as u32))
        .collect()
}

/// Decodes the prompts `spec.runs` times (after one untimed pass).
pub fn bench_generate(spec: &GenerateBenchSpec) -> Result<GenerateBenchReport> {
    if spec.runs == 0 || spec.prompts == 0 || spec.prompt_len == 0 || spec.new_tokens == 0 {
        bail!("bench generate needs at least one run, prompt, prompt token and new token");
    }
    let mut model = random_model(&spec.model, &Device::Cpu)?;
    set_matmul_precision(&mut model, &spec.model, "generate")?;
    let prompts = bench_prompts(spec);
    let pass = || -> Result<u64> {
        let mut sum = 0u64;
        for batch in prompts.chunks(spec.batch.max(1)) {
            let out = generate_batch(&model, batch, spec.new_tokens, &[], 1)?;
            sum += out.iter().flatten().map(|&t| t as u64).sum::<u64>();
        }
        Ok(sum)
    };
    let (run_s, token_sum) = time_passes(spec.runs, pass)?;
    let median_run_s = median(&run_s);
    Ok(GenerateBenchReport {
        spec: spec.clone(),
        dtype: "f32",
        threads: candle_core::utils::get_num_threads(),
        new_tokens_per_s: (spec.prompts * spec.new_tokens) as f64 / median_run_s,
        run_s,
        median_run_s,
        base_params: model.num_params() as u64,
        token_sum,
        peak_rss_bytes: proc_status_bytes("VmHWM"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::generate::greedy_no_cache;

    /// The benchmark decodes what the uncached reference decodes, every prompt to its full
    /// length.
    #[test]
    fn tiny_generate_bench_decodes_like_the_uncached_reference() {
        let spec = GenerateBenchSpec {
            model: TrainBenchSpec {
                hidden: 32,
                layers: 2,
                heads: 4,
                kv_heads: 2,
                intermediate: 48,
                vocab: 50,
                ..TrainBenchSpec::default()
            },
            prompts: 3,
            prompt_len: 5,
            new_tokens: 4,
            batch: 2,
            runs: 2,
        };
        let r = bench_generate(&spec).unwrap();
        assert_eq!(r.run_s.len(), 2);
        let model = random_model(&spec.model, &Device::Cpu).unwrap();
        let expected: u64 = bench_prompts(&spec)
            .iter()
            .map(|p| {
                let out = greedy_no_cache(&model, p, spec.new_tokens, &[]).unwrap();
                assert_eq!(out.len(), spec.new_tokens);
                out.iter().map(|&t| t as u64).sum::<u64>()
            })
            .sum();
        assert_eq!(r.token_sum, expected);
    }
}
