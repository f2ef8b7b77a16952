//! Process-wide settings that must be made before the first tensor operation.

/// candle runs elementwise ops on a pool of spin-waiting threads sized by
/// `CANDLE_NUM_THREADS`. On a 2-core machine the spinning main thread and the worker
/// fight for cores with the matmul threads: fine-tuning stories260K took 25–30 s for 15
/// steps with the default pool against 9–10 s with one thread (median of 2, same
/// session). Unless the user chose a value, elementwise ops stay on the calling thread;
/// matmuls still use every core (`RAYON_NUM_THREADS`).
pub fn configure_threads() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // Called first thing in `main`, before any other thread exists.
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

/// glibc's malloc serves every allocation above its mmap threshold (128 KiB, raised
/// dynamically up to 32 MiB) with a fresh mmap and hands it back on free, and trims the
/// heap top eagerly; a training step allocates and frees hundreds of activation-sized
/// buffers, so it spent ~12% of its time in page faults and zeroing fresh pages (1.8M
/// faults in 6 steps of `recover bench train`). Fixing the threshold at its maximum and
/// never trimming keeps freed buffers for reuse: 0.67M faults, −18% CPU time. (mimalloc
/// and jemalloc were both slower here: they return pages to the OS even more eagerly.)
pub fn configure_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before other threads exist.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// Stack of rayon's worker threads: `run_on_pool` moves the whole command onto one, so it
/// gets the main thread's usual 8 MiB rather than rayon's default 2 MiB.
const WORKER_STACK_BYTES: usize = 8 << 20;

/// Runs `work` on a worker thread of rayon's global pool and waits for it.
///
/// Every parallel product (ours, gemm's) goes through rayon. Called from the main thread,
/// each one is injected into the pool and the main thread sleeps on a futex until a worker
/// has finished it: two context switches per product. Decoding does hundreds of small
/// products a token, and with `RAYON_NUM_THREADS=1` spent more time in those wake-ups than
/// in the products (SmolLM2's shape, bf16, 8 prompts: 72 ms a token from the main thread,
/// 36 ms from a worker). From a worker, a product's tasks go on that worker's own queue
/// and idle workers steal them: no hand-over to wait for. Must be called before anything
/// else uses rayon (it sizes the pool's stacks).
pub fn run_on_pool<R: Send>(work: impl FnOnce() -> R + Send) -> R {
    // Fails only if the pool already exists (a library caller built it): use it as it is.
    let _ = rayon::ThreadPoolBuilder::new()
        .stack_size(WORKER_STACK_BYTES)
        .build_global();
    // `scope` runs its body on a worker of the global pool when called from outside it.
    rayon::scope(|_| work())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_work_runs_on_a_worker_of_the_pool() {
        assert_eq!(
            rayon::current_thread_index(),
            None,
            "tests start outside the pool"
        );
        let index = super::run_on_pool(rayon::current_thread_index);
        assert!(
            index.is_some(),
            "run_on_pool ran its work outside rayon's pool"
        );
    }
}
