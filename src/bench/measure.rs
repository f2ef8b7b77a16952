//! What the benchmarks measure besides time: the median of the timed runs and the
//! process's resident set from `/proc/self/status`.

/// The middle value of `xs` (the mean of the two middle ones for an even count).
pub(super) fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Runs `pass` once untimed, then `runs` times timed: the wall time of each timed pass
/// and the last pass's result.
pub(super) fn time_passes<R>(
    runs: usize,
    mut pass: impl FnMut() -> anyhow::Result<R>,
) -> anyhow::Result<(Vec<f64>, R)> {
    let mut last = pass()?;
    let mut run_s = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t0 = std::time::Instant::now();
        last = pass()?;
        run_s.push(t0.elapsed().as_secs_f64());
    }
    Ok((run_s, last))
}

/// A `kB` line of `/proc/self/status` (`VmRSS`, `VmHWM`) in bytes; `None` off Linux.
pub(super) fn proc_status_bytes(key: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status
        .lines()
        .find(|l| l.strip_prefix(key).is_some_and(|r| r.starts_with(':')))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Bytes as `12.3 MiB`, `n/a` when unknown (off Linux).
pub(super) fn mib(bytes: Option<u64>) -> String {
    bytes.map_or("n/a".to_string(), |b| {
        format!("{:.1} MiB", b as f64 / 1024.0 / 1024.0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
