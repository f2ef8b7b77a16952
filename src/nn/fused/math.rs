//! Scalar building blocks written so that loops over them vectorise: no libm calls, no
//! branches the compiler cannot turn into selects. Callers put their loops in
//! `#[multiversion(targets = "simd")]` functions, compiled for AVX2+FMA and SSE4.1 as well
//! as the baseline and picked at run time. (AVX-512 variants measured no faster: these
//! loops are bound by memory, not arithmetic.)

const LOG2_E: f32 = std::f32::consts::LOG2_E;
/// ln 2 split in two so that `n · ln 2` is exact in f32 for |n| < 2⁹ (Cephes).
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;

/// `eˣ` in f32 (Cephes' `expf`: range reduction by ln 2, then a degree-6 polynomial):
/// within 2 ulp of libm's `expf` on [−87, 88.3]; clamped outside, so it returns
/// 1.6e-38 rather than 0 far below and 2e38 rather than ∞ far above. The lower clamp keeps
/// results normal: a denormal product costs a microcode assist of ~100 cycles, and masked
/// attention scores sent every lane there.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.376_26);
    let n = (x * LOG2_E + 0.5).floor();
    let r = x - n * LN2_HI - n * LN2_LO;
    // Plain products and sums, not `mul_add`: the same result on every CPU, and no
    // software FMA where the hardware has none.
    let p = ((((1.987_569_1e-4f32 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2)
        * r
        + 0.166_666_65)
        * r
        + 0.5;
    let y = p * (r * r) + r + 1.0;
    // 2ⁿ built from bits. Not `n as i32`: Rust's saturating float-to-int cast compiles to
    // scalar code per lane and kept this function from vectorising. Adding 2²³ puts the
    // integer n + 127 (in 1..=254 after the clamp) in the low mantissa bits; shifting by 23
    // moves it into the exponent field and drops the rest.
    let two_n = f32::from_bits((n + (127.0 + 8_388_608.0)).to_bits() << 23);
    y * two_n
}

/// The largest value of `xs` (−∞ when empty), in 16 independent lanes so that the loop
/// vectorises (a single running maximum is one long dependency chain).
#[inline(always)]
pub fn max(xs: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let mut chunks = xs.chunks_exact(16);
    for c in &mut chunks {
        for (l, v) in lanes.iter_mut().zip(c) {
            *l = l.max(*v);
        }
    }
    let tail = chunks.remainder().iter().copied();
    lanes
        .into_iter()
        .chain(tail)
        .fold(f32::NEG_INFINITY, f32::max)
}

/// The sum of `xs` in 16 independent lanes (see [`max`]); rounding differs from a
/// sequential sum by a few ulps.
#[inline(always)]
pub fn sum(xs: &[f32]) -> f32 {
    sum_map(xs, |v| v)
}

/// `Σ f(x)` over `xs`, in 16 lanes like [`sum`].
#[inline(always)]
pub fn sum_map(xs: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut lanes = [0f32; 16];
    let mut chunks = xs.chunks_exact(16);
    for c in &mut chunks {
        for (l, v) in lanes.iter_mut().zip(c) {
            *l += f(*v);
        }
    }
    lanes.iter().sum::<f32>() + chunks.remainder().iter().map(|v| f(*v)).sum::<f32>()
}

/// `Σ a·b`, in 16 lanes like [`sum`].
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut lanes = [0f32; 16];
    let (mut ca, mut cb) = (a.chunks_exact(16), b.chunks_exact(16));
    for (x, y) in (&mut ca).zip(&mut cb) {
        for ((l, x), y) in lanes.iter_mut().zip(x).zip(y) {
            *l += x * y;
        }
    }
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    lanes.iter().sum::<f32>() + tail
}

/// `1 / (1 + e^−x)`.
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// A 32-bit integer mix with good avalanche (Chris Wellons' `lowbias32`).
#[inline(always)]
pub fn hash32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^ (x >> 16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp_of_libm() {
        let mut worst = 0f32;
        let mut x = -86.9f32;
        while x < 88.0 {
            let (got, want) = (exp(x), x.exp());
            worst = worst.max((got - want).abs() / want);
            x += 0.0137;
        }
        // 2 ulp of f32 at the top of a binade: 2 · 2⁻²³ ≈ 2.4e-7.
        assert!(worst < 2.4e-7, "worst relative error {worst:e}");
        assert!(exp(-200.0) < 1e-37 && exp(-200.0).is_normal() && exp(200.0) > 1e38);
    }

    #[test]
    fn lane_max_and_sum_match_sequential() {
        let xs: Vec<f32> = (0..203)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.25)
            .collect();
        assert_eq!(
            max(&xs),
            xs.iter().copied().fold(f32::NEG_INFINITY, f32::max)
        );
        assert!((sum(&xs) - xs.iter().sum::<f32>()).abs() < 1e-4);
        let sq: f32 = xs.iter().map(|v| v * v).sum();
        assert!((dot(&xs, &xs) - sq).abs() < 1e-2 && (sum_map(&xs, |v| v * v) - sq).abs() < 1e-2);
        assert_eq!(max(&[]), f32::NEG_INFINITY);
        assert_eq!(sum(&[1.5]), 1.5);
    }

    #[test]
    fn hash32_spreads_consecutive_counters() {
        // Of 65,536 consecutive inputs, about half of the outputs have the top bit set.
        let high = (0..65_536u32).filter(|&i| hash32(i) >> 31 == 1).count();
        assert!((high as i64 - 32_768).abs() < 1_000, "{high}");
    }
}
