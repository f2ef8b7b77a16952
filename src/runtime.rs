//! Process-wide settings that must be made before the first tensor operation, and how
//! work runs on rayon's pool.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

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

/// Runs `work` (on a worker of rayon's pool) while the pool's other workers wait for its
/// parallel tasks spinning instead of asleep.
///
/// An idle rayon worker yields a few times and then sleeps on a futex; the next parallel
/// product has to wake it (a system call and a context switch, ~10–50 µs before it takes
/// its share). Decoding runs ~120 parallel products a token on SmolLM2's shape with
/// serial work between them (norms, rotary, attention over the cache) longer than
/// rayon's spin, so every product paid that: `perf` put futex wake-ups and sleeps at
/// ~15% of a bf16 decoding step. Here each other worker runs a job that steals pending
/// tasks in a loop (`rayon::yield_now`) until `work` returns — a busy core, as
/// llama.cpp's spinning thread pool has, for as long as `work` lasts. Used around a
/// decoding loop, a batch of scoring and a training step: each is hundreds of parallel
/// products with serial element-wise work between them (decoding +28–50% new tokens/s in
/// bf16, scoring +6–20%, a training step of the small shape +6–14%; docs/performance.md,
/// round 10).
///
/// `work` simply runs outside the pool, with one thread, when its tensors are not on the
/// CPU (`on_cpu` false: the cores would spin through GPU work), and while another call
/// has the workers spinning: two spinning regions at once could each end up running the
/// other's spinner inside a wait of its own work, and neither would return.
pub fn with_workers_spinning<R>(on_cpu: bool, work: impl FnOnce() -> R) -> R {
    let Some(me) = rayon::current_thread_index() else {
        return work();
    };
    let others = rayon::current_num_threads().saturating_sub(1);
    if !on_cpu || others == 0 || SPINNING_REGION.swap(true, Ordering::AcqRel) {
        return work();
    }
    let done = Arc::new(AtomicBool::new(false));
    let started = Arc::new(AtomicUsize::new(0));
    for _ in 0..others {
        let (done, started) = (done.clone(), started.clone());
        rayon::spawn(move || {
            // Picked up by `work`'s own thread while it waits inside `work` (a spawned job
            // sits on its deque): spinning there would never let `work` return.
            if rayon::current_thread_index() == Some(me) {
                return;
            }
            SPINNERS.fetch_add(1, Ordering::AcqRel);
            started.fetch_add(1, Ordering::Release);
            while !done.load(Ordering::Acquire) {
                if rayon::yield_now() != Some(rayon::Yield::Executed) {
                    // Not a pure spin: on a machine with more runnable threads than cores
                    // (two jobs at once) the core goes to them, not to this loop.
                    std::thread::yield_now();
                }
            }
            SPINNERS.fetch_sub(1, Ordering::AcqRel);
        });
    }
    // Let the spinners leave this thread's deque before `work` pushes tasks above them;
    // a worker busy elsewhere just joins later.
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(5);
    while started.load(Ordering::Acquire) < others && std::time::Instant::now() < deadline {
        std::hint::spin_loop();
    }
    /// Stops the spinners and frees the region when `work` returns or panics.
    struct Stop(Arc<AtomicBool>);
    impl Drop for Stop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Release);
            SPINNING_REGION.store(false, Ordering::Release);
        }
    }
    let _stop = Stop(done);
    work()
}

/// Whether a [`with_workers_spinning`] region is running.
static SPINNING_REGION: AtomicBool = AtomicBool::new(false);

/// Spinner jobs running now (for the tests: they must all have stopped after a region).
static SPINNERS: AtomicUsize = AtomicUsize::new(0);

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

    fn pool(threads: usize) -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("a local pool")
    }

    /// Waits up to 10 s for `cond` (a liveness check, not a timing: it holds at once when
    /// things work, and the test fails instead of hanging when they do not).
    fn eventually(cond: impl Fn() -> bool) -> bool {
        let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::time::Instant::now() < end {
            if cond() {
                return true;
            }
            std::thread::yield_now();
        }
        false
    }

    /// One test, run in sequence: the spinning region is process-wide.
    ///
    /// While the work runs, every other worker spins (and runs its tasks: the sums are
    /// right); when it returns, or panics, every spinner stops. Outside the pool, with one
    /// thread, off the CPU and inside a running region the work just runs. A spinner left
    /// on the caller's own deque (the other worker busy when the region starts) is run by
    /// the caller's `yield_local` and returns at once instead of spinning forever.
    #[test]
    fn the_other_workers_spin_while_the_work_runs_and_stop_after_it() {
        use super::{with_workers_spinning, SPINNERS};
        use rayon::prelude::*;
        use std::sync::atomic::Ordering;
        let spinners = || SPINNERS.load(Ordering::Acquire);
        let sum = || (0..100_000u64).into_par_iter().map(|i| i % 7).sum::<u64>();
        let want: u64 = (0..100_000u64).map(|i| i % 7).sum();

        assert_eq!(with_workers_spinning(true, sum), want, "outside the pool");
        for threads in [1, 2, 3] {
            let p = pool(threads);
            let (got, seen) = p.install(|| {
                with_workers_spinning(true, || {
                    let seen = eventually(|| spinners() == threads - 1);
                    (sum(), seen)
                })
            });
            assert_eq!(got, want, "{threads} threads");
            assert!(
                seen,
                "{threads} threads: {} spinners, not {}",
                spinners(),
                threads - 1
            );
            assert!(
                eventually(|| spinners() == 0),
                "spinners left after the work"
            );
        }

        let p = pool(3);
        let none = p.install(|| {
            with_workers_spinning(false, || {
                std::thread::sleep(std::time::Duration::from_millis(20));
                spinners()
            })
        });
        assert_eq!(none, 0, "no spinning for work off the CPU");
        let inner = p.install(|| {
            with_workers_spinning(true, || {
                assert!(eventually(|| spinners() == 2));
                with_workers_spinning(true, spinners)
            })
        });
        assert_eq!(inner, 2, "a region inside a region adds no spinners");
        assert!(eventually(|| spinners() == 0));

        // The other worker busy when the region starts: the spinner waits on the caller's
        // deque, and the caller runs it itself.
        let p = pool(2);
        let got = p.install(|| {
            let (_, got) = rayon::join(
                || std::thread::sleep(std::time::Duration::from_millis(200)),
                || {
                    with_workers_spinning(true, || {
                        while rayon::yield_local() == Some(rayon::Yield::Executed) {}
                        sum()
                    })
                },
            );
            got
        });
        assert_eq!(got, want, "the other worker busy at the start");
        assert!(eventually(|| spinners() == 0));

        let caught = p.install(|| {
            std::panic::catch_unwind(|| with_workers_spinning::<()>(true, || panic!("boom")))
        });
        assert!(caught.is_err(), "the panic reaches the caller");
        assert!(
            eventually(|| spinners() == 0),
            "spinners left after a panic"
        );
        assert_eq!(p.install(|| with_workers_spinning(true, sum)), want);
    }
}
