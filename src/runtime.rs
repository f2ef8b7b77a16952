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
