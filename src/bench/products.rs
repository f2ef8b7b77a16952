//! `recover bench products`: the matrix products of a training step at a model's shape,
//! each timed alone with every kernel this CPU has (AMX, AVX512-BF16, f32 gemm) and set
//! against that kernel's *ceiling on this machine*: its instruction run back to back on
//! operands held in registers (or tiles), on every thread at once. A product's share of
//! its ceiling says how much a better kernel could still win; which products a step spends
//! its time in is `perf`'s answer on `recover bench train`, not this one's.

use super::TrainBenchSpec;
use crate::nn::fused::bf16::{self, Bf16Kernel, PackedRhs};
use crate::nn::fused::{frozen_product, frozen_product_t, product_tn};
use anyhow::{bail, Result};
use rand::{Rng, SeedableRng};
use serde::Serialize;
use std::fmt::Write as _;
use std::time::Instant;

/// Which products, at which size.
#[derive(Debug, Clone, Serialize)]
pub struct ProductsBenchSpec {
    /// The shape the products come from (its hidden, kv, MLP and vocabulary widths).
    pub model: TrainBenchSpec,
    /// Rows of every product: the step's tokens (batch × sequence).
    pub rows: usize,
    /// The adapters' rank (their products have k = rank or n = rank).
    pub rank: usize,
    /// Timed calls per product and kernel (the fastest is reported).
    pub runs: usize,
    /// Only the products whose name contains this text.
    pub only: Option<String>,
}

/// A kernel a product can run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProductKernel {
    Bf16(Bf16Kernel),
    /// The f32 products of `matmul_precision: f32` (gemm, every thread).
    F32,
}

impl ProductKernel {
    /// This CPU's kernels: the bf16 ones it has, then f32.
    pub fn available() -> Vec<ProductKernel> {
        let mut kernels: Vec<_> = Bf16Kernel::available()
            .iter()
            .map(|&k| ProductKernel::Bf16(k))
            .collect();
        kernels.push(ProductKernel::F32);
        kernels
    }

    fn name(self) -> String {
        match self {
            ProductKernel::Bf16(k) => k.to_string(),
            ProductKernel::F32 => "f32 gemm".to_string(),
        }
    }

    /// One iteration of the ceiling loop, on the calling thread: the FLOP done, or `None`
    /// where this build has no loop for the CPU (f32 without AVX-512 or AVX2 + FMA).
    fn peak_loop(self, iters: u64) -> Option<u64> {
        match self {
            ProductKernel::Bf16(k) => Some(bf16::peak_loop(k, iters)),
            ProductKernel::F32 => f32_peak_loop(iters),
        }
    }
}

/// A product's right operand: a weight `W` (out × in) as the step uses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Operand {
    /// `x Wᵀ`: the forward pass (n = out, k = in).
    Forward,
    /// `dy W`: the input's gradient (n = in, k = out).
    Backward,
    /// `aᵀ b` summed over the rows: an adapter's weight gradient (`uᵀ drop(x)` for dA,
    /// `downᵀ dy` for dB; m = r, n = in or out, k = rows), its (rows × in or out)
    /// operand packed on every call as the step does.
    WeightGradient,
}

#[derive(Debug, Clone, Serialize)]
pub struct KernelTiming {
    pub kernel: String,
    pub best_s: f64,
    pub gflops: f64,
    /// `gflops` over the kernel's ceiling; `None` where the ceiling was not measured.
    pub share_of_ceiling: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ProductTiming {
    pub name: String,
    /// Output rows, output columns, and the summed dimension.
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub operand: Operand,
    pub kernels: Vec<KernelTiming>,
}

#[derive(Debug, Clone, Serialize)]
pub struct KernelCeiling {
    pub kernel: String,
    /// FLOP per second on every thread at once; `None`: no ceiling loop for it here.
    pub gflops: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ProductsBenchReport {
    pub spec: ProductsBenchSpec,
    pub threads: usize,
    pub ceilings: Vec<KernelCeiling>,
    pub products: Vec<ProductTiming>,
}

/// The products of one training step of `spec.model`, by projection: (name, m, n, k),
/// then the adapters' and the head's.
fn step_products(spec: &ProductsBenchSpec) -> Vec<(String, usize, usize, usize, Operand)> {
    let s = &spec.model;
    let (h, m, r, rows) = (s.hidden, s.intermediate, spec.rank, spec.rows);
    let kv = s.kv_heads * (s.hidden / s.heads);
    let mut v = Vec::new();
    for (name, out, inp) in [
        ("q_proj, o_proj", h, h),
        ("k_proj, v_proj", kv, h),
        ("gate_proj, up_proj", m, h),
        ("down_proj", h, m),
    ] {
        v.push((format!("{name}: x Wᵀ"), rows, out, inp, Operand::Forward));
        v.push((format!("{name}: dy W"), rows, inp, out, Operand::Backward));
    }
    v.push((
        format!("adapter A (r {r}): x Aᵀ"),
        rows,
        r,
        h,
        Operand::Forward,
    ));
    v.push((
        format!("adapter B (r {r}): u Bᵀ"),
        rows,
        h,
        r,
        Operand::Forward,
    ));
    v.push((
        format!("adapter dA, dB (r {r}): uᵀ x"),
        r,
        h,
        rows,
        Operand::WeightGradient,
    ));
    v.push((
        "lm_head: x Eᵀ".to_string(),
        rows,
        s.vocab,
        h,
        Operand::Forward,
    ));
    v
}

/// Times every product of [`step_products`] on every kernel of this CPU.
pub fn bench_products(spec: &ProductsBenchSpec) -> Result<ProductsBenchReport> {
    if spec.rows == 0 || spec.rank == 0 || spec.runs == 0 {
        bail!("bench products: --rows, --rank and --runs must be at least 1");
    }
    let kernels = ProductKernel::available();
    let ceilings: Vec<(ProductKernel, Option<f64>)> =
        kernels.iter().map(|&k| (k, ceiling(k))).collect();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(spec.model.seed);
    let mut random =
        |len: usize| -> Vec<f32> { (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect() };
    let mut products = Vec::new();
    let all = step_products(spec);
    let chosen: Vec<_> = all
        .iter()
        .filter(|p| {
            spec.only
                .as_ref()
                .is_none_or(|text| p.0.contains(text.as_str()))
        })
        .cloned()
        .collect();
    if chosen.is_empty() {
        let names: Vec<&str> = all.iter().map(|p| p.0.as_str()).collect();
        bail!(
            "bench products: no product's name contains {:?}; --only takes part of one of: {}",
            spec.only.as_deref().unwrap_or_default(),
            names.join("; ")
        );
    }
    for (name, m, n, k, operand) in chosen {
        let lhs = random(m * k);
        // The right operand: a weight as the model holds it (out × in), or the (rows × r)
        // activation of a weight gradient.
        let (out_dim, in_dim) = match operand {
            Operand::Forward => (n, k),
            Operand::Backward | Operand::WeightGradient => (k, n),
        };
        let w = random(out_dim * in_dim);
        let flop = 2.0 * (m * n * k) as f64;
        let mut timings = Vec::new();
        for &(kernel, peak) in &ceilings {
            let bf16 = match kernel {
                ProductKernel::Bf16(b) => Some(b),
                ProductKernel::F32 => None,
            };
            let best_s = match (operand, bf16) {
                // The lhs is read transposed: (k × m) holds it.
                (Operand::WeightGradient, _) => {
                    best_time(spec.runs, || product_tn(&lhs, m, &w, n, 1.0, bf16))
                }
                (_, Some(b)) => {
                    // Packing is the model's once-per-weight work: outside the timing.
                    let packed = match operand {
                        Operand::Forward => PackedRhs::for_product_t(&w, out_dim, in_dim),
                        _ => PackedRhs::for_product(&w, out_dim, in_dim),
                    };
                    best_time(spec.runs, || bf16::product_with(b, &lhs, m, &packed))
                }
                (_, None) => best_time(spec.runs, || match operand {
                    Operand::Forward => frozen_product_t(&lhs, m, &w, (out_dim, in_dim), None),
                    _ => frozen_product(&lhs, m, &w, (out_dim, in_dim), None),
                }),
            };
            let gflops = flop / best_s / 1e9;
            timings.push(KernelTiming {
                kernel: kernel.name(),
                best_s,
                gflops,
                share_of_ceiling: peak.map(|p| gflops / p),
            });
        }
        products.push(ProductTiming {
            name,
            m,
            n,
            k,
            operand,
            kernels: timings,
        });
    }
    Ok(ProductsBenchReport {
        spec: spec.clone(),
        threads: rayon::current_num_threads(),
        ceilings: ceilings
            .into_iter()
            .map(|(k, gflops)| KernelCeiling {
                kernel: k.name(),
                gflops,
            })
            .collect(),
        products,
    })
}

/// The fastest of `runs` calls of `product`, after one untimed call (the output is
/// freshly allocated each time, as in a training step).
fn best_time(runs: usize, mut product: impl FnMut() -> Vec<f32>) -> f64 {
    std::hint::black_box(product());
    (0..runs)
        .map(|_| {
            let t0 = Instant::now();
            std::hint::black_box(product());
            t0.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

/// `kernel`'s ceiling in GFLOP/s: its loop on every thread of rayon's pool at once, long
/// enough (≥ 50 ms per thread) for the timer, best of 5.
fn ceiling(kernel: ProductKernel) -> Option<f64> {
    kernel.peak_loop(1)?;
    // Iterations for ~50 ms on one thread.
    let mut iters = 1u64 << 10;
    loop {
        let t0 = Instant::now();
        kernel.peak_loop(iters);
        if t0.elapsed().as_secs_f64() > 0.05 {
            break;
        }
        iters *= 2;
    }
    let best = (0..5)
        .map(|_| {
            let t0 = Instant::now();
            let flop: u64 = rayon::broadcast(|_| kernel.peak_loop(iters).unwrap_or(0))
                .into_iter()
                .sum();
            flop as f64 / t0.elapsed().as_secs_f64()
        })
        .fold(0.0, f64::max);
    Some(best / 1e9)
}

/// f32 FMA on registers, 16 independent 512-bit (or 256-bit) chains: the f32 products'
/// ceiling. `None` on a CPU with neither AVX-512 nor AVX2 + FMA.
fn f32_peak_loop(iters: u64) -> Option<u64> {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F.
            unsafe { fma_loop_avx512(iters) };
            return Some(iters * 16 * 16 * 2);
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has AVX2 and FMA.
            unsafe { fma_loop_avx2(iters) };
            return Some(iters * 16 * 8 * 2);
        }
    }
    let _ = iters;
    None
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn fma_loop_avx512(iters: u64) {
    use std::arch::x86_64::*;
    let (a, b) = (_mm512_set1_ps(0.999), _mm512_set1_ps(1e-3));
    let mut acc = [_mm512_setzero_ps(); 16];
    for _ in 0..iters {
        for sum in acc.iter_mut() {
            *sum = _mm512_fmadd_ps(*sum, a, b);
        }
    }
    std::hint::black_box(acc);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fma_loop_avx2(iters: u64) {
    use std::arch::x86_64::*;
    let (a, b) = (_mm256_set1_ps(0.999), _mm256_set1_ps(1e-3));
    let mut acc = [_mm256_setzero_ps(); 16];
    for _ in 0..iters {
        for sum in acc.iter_mut() {
            *sum = _mm256_fmadd_ps(*sum, a, b);
        }
    }
    std::hint::black_box(acc);
}

impl ProductsBenchReport {
    pub fn to_markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "## bench products: {} rows, {} threads\n\nShape: {}. Each product's fastest of {} \
             calls (output freshly allocated; a weight packed beforehand, as the model does \
             once; a weight gradient's activation packed in the timing, as every step does), \
             in GFLOP/s and as a share of the kernel's ceiling on this machine (its \
             instruction back to back on registers or tiles, every thread at once).\n",
            self.spec.rows,
            self.threads,
            self.spec.model.describe_shape(),
            self.spec.runs
        );
        let _ = write!(s, "| product | m × n × k |");
        for c in &self.ceilings {
            let _ = write!(s, " {} |", c.kernel);
        }
        let _ = write!(s, "\n|---|---|");
        for _ in &self.ceilings {
            let _ = write!(s, "---:|");
        }
        let _ = write!(s, "\n| *ceiling* | |");
        for c in &self.ceilings {
            let _ = match c.gflops {
                Some(g) => write!(s, " *{g:.0}* |"),
                None => write!(s, " n/a |"),
            };
        }
        for p in &self.products {
            let _ = write!(s, "\n| {} | {} × {} × {} |", p.name, p.m, p.n, p.k);
            for t in &p.kernels {
                let _ = match t.share_of_ceiling {
                    Some(share) => write!(s, " {:.0} ({:.0}%) |", t.gflops, 100.0 * share),
                    None => write!(s, " {:.0} |", t.gflops),
                };
            }
        }
        s.push('\n');
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::BenchShape;

    #[test]
    fn step_products_cover_every_projection_both_ways_at_the_shape() {
        let spec = ProductsBenchSpec {
            model: BenchShape::Smollm2.spec(),
            rows: 1024,
            rank: 32,
            runs: 1,
            only: None,
        };
        let products = step_products(&spec);
        let find = |name: &str| {
            products
                .iter()
                .find(|p| p.0 == name)
                .map(|p| (p.2, p.3, p.4))
                .unwrap_or_else(|| panic!("{name} missing"))
        };
        // SmolLM2: hidden 576, 3 kv heads of 64, MLP 1536, vocab 49152.
        assert_eq!(find("k_proj, v_proj: x Wᵀ"), (192, 576, Operand::Forward));
        assert_eq!(find("k_proj, v_proj: dy W"), (576, 192, Operand::Backward));
        assert_eq!(find("down_proj: x Wᵀ"), (576, 1536, Operand::Forward));
        assert_eq!(
            find("gate_proj, up_proj: dy W"),
            (576, 1536, Operand::Backward)
        );
        assert_eq!(find("adapter B (r 32): u Bᵀ"), (576, 32, Operand::Forward));
        assert_eq!(find("lm_head: x Eᵀ"), (49152, 576, Operand::Forward));
        assert_eq!(
            find("adapter dA, dB (r 32): uᵀ x"),
            (576, 1024, Operand::WeightGradient)
        );
        assert_eq!(products.len(), 12);
    }

    #[test]
    fn every_kernel_times_a_small_product_within_its_ceiling() {
        let spec = ProductsBenchSpec {
            model: TrainBenchSpec {
                hidden: 64,
                heads: 4,
                kv_heads: 2,
                intermediate: 96,
                vocab: 100,
                ..TrainBenchSpec::default()
            },
            rows: 32,
            rank: 8,
            runs: 2,
            only: None,
        };
        let report = bench_products(&spec).unwrap();
        assert_eq!(report.products.len(), 12);
        for p in &report.products {
            assert_eq!(p.kernels.len(), ProductKernel::available().len());
            for t in &p.kernels {
                assert!(t.best_s > 0.0 && t.gflops.is_finite(), "{p:?}");
                // No upper bound: a ceiling measured while the machine was busy can sit
                // below a product timed when it was not (timings are benchmarks' business).
                if let Some(share) = t.share_of_ceiling {
                    assert!(share > 0.0, "{} {}: {share}", p.name, t.kernel);
                }
            }
        }
        let md = report.to_markdown();
        assert!(
            md.contains("| *ceiling* |") && md.contains("f32 gemm"),
            "{md}"
        );
    }
}
