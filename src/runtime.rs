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
