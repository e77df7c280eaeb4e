//! The thread pool every hot kernel runs on: spins briefly, then parks, and
//! never waits for a thread that has not started.
//!
//! candle's barrier pool (which these kernels used before) hands each call to
//! every worker and then spins, without ever yielding, until each one has
//! checked in. With another process on one of the cores, a worker is often not
//! running when a call comes, and the caller burns its time slice waiting for
//! it: SmolLM2's decode fell from ~100 to 4.4 tokens/s with one busy process
//! beside it on two cores (issue 21).
//!
//! Here a call opens a job, and each worker *joins* it when it gets to run;
//! the work is handed out in chunks from a shared cursor, and once the caller
//! has taken the last chunk it closes the job and waits only for the workers
//! that joined, which are running (or were, a moment ago). A worker that was
//! not scheduled in time simply misses the job, so under load the caller does
//! the work alone instead of waiting for a core it does not get. Every wait,
//! the caller's and the workers', spins for a few microseconds (a decode step
//! makes ~300 calls of tens of microseconds, too short for a futex round trip)
//! and then parks, leaving the core to whoever can use it.
//!
//! The pool has `get_num_threads() - 1` workers (candle's count: the
//! `RAYON_NUM_THREADS` environment variable, else the physical cores); the
//! caller is the last thread. Calls from several threads at once do not queue:
//! whoever finds the pool busy runs its call alone, as does a call made from
//! inside a pool job.

use std::any::Any;
use std::cell::Cell;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::thread::Thread;
use std::time::{Duration, Instant};

/// How long an idle worker spins for the next job before it parks. Decode
/// steps issue their calls a few microseconds apart, so a worker that spins
/// this long is there for the next one; a longer spin only takes the core
/// from other processes when the machine is shared.
const WORKER_SPIN: Duration = Duration::from_micros(50);

/// How long the caller spins for joined workers to finish before it yields
/// and then parks (they are running a chunk of the same job, so usually they
/// finish within this).
const CALLER_SPIN: Duration = Duration::from_micros(20);

/// The job state word: `generation << 32 | CLOSED | joined workers`.
const CLOSED: u64 = 1 << 31;
/// The bits that count the workers in the current job.
const COUNT: u64 = CLOSED - 1;
/// One generation.
const GEN: u64 = 1 << 32;

thread_local! {
    /// Whether this thread is inside a pool job (a pool worker, or a caller
    /// running its own job): nested calls run inline.
    static IN_JOB: Cell<bool> = const { Cell::new(false) };
}

/// One call's work, on the caller's stack for the duration of the call.
struct Job<'a> {
    f: &'a (dyn Fn(Range<usize>) + Sync),
    n_items: usize,
    chunk: usize,
    cursor: AtomicUsize,
    /// Woken by the last worker to leave a closed job.
    caller: Thread,
    /// The first panic of a worker, re-raised in the caller.
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

impl Job<'_> {
    /// Takes chunks until none are left.
    fn run(&self) {
        loop {
            let start = self.cursor.fetch_add(self.chunk, Ordering::Relaxed);
            if start >= self.n_items {
                return;
            }
            (self.f)(start..self.n_items.min(start + self.chunk));
        }
    }
}

/// What the workers share with callers.
struct Shared {
    /// See [`CLOSED`].
    state: AtomicU64,
    /// The open job (a `Job` with its lifetime erased); only read by a worker
    /// that has joined, while the caller waits for it.
    job: AtomicPtr<Job<'static>>,
    /// Ends the workers (never set today: the pool lives for the process).
    stop: AtomicBool,
}

/// The pool.
struct Pool {
    shared: &'static Shared,
    workers: Vec<Thread>,
    /// Set by the one caller whose job is open.
    busy: AtomicBool,
}

/// The process's pool, started on first use.
fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let shared: &'static Shared = Box::leak(Box::new(Shared {
            state: AtomicU64::new(CLOSED),
            job: AtomicPtr::new(std::ptr::null_mut()),
            stop: AtomicBool::new(false),
        }));
        let n_workers = threads().saturating_sub(1);
        let workers = (0..n_workers)
            .filter_map(|i| {
                std::thread::Builder::new()
                    .name(format!("multitoken-pool-{i}"))
                    .spawn(move || worker(shared))
                    // A worker that cannot be spawned is one fewer helper, not an error:
                    // the caller does the work of whoever is missing.
                    .ok()
                    .map(|handle| handle.thread().clone())
            })
            .collect();
        Pool { shared, workers, busy: AtomicBool::new(false) }
    })
}

/// Threads a call may use: candle's count (`RAYON_NUM_THREADS`, else the
/// physical cores), so that one setting sizes every pool.
pub fn threads() -> usize {
    candle_core::utils::get_num_threads().max(1)
}

/// The pool's workers and the caller (fixed when the pool starts; unlike
/// [`threads`] it reads no environment variable, which matters at ~300 calls
/// per decoded token).
fn pool_threads() -> usize {
    if use_candle_pool() {
        return threads();
    }
    pool().workers.len() + 1
}

/// Calls `f` on disjoint ranges that together cover `0..n_items`, on the
/// pool's threads and the calling one; returns when every range is done.
/// Ranges are about `n_items / (8 × threads)` long, so that a slow thread's
/// share is picked up by the others. A panic in `f` is re-raised here.
pub fn for_each_range(n_items: usize, f: impl Fn(Range<usize>) + Sync) {
    if n_items == 0 {
        return;
    }
    let threads = pool_threads();
    if n_items == 1 || threads <= 1 || IN_JOB.with(Cell::get) {
        f(0..n_items);
        return;
    }
    let chunk = n_items.div_ceil(threads * 8).max(1);
    run(n_items, chunk, &f);
}

/// Calls `f(i)` for every `i` in `0..n_items` on the pool, one item at a time
/// (for items that are already a thread's worth of work each).
pub fn for_each_item(n_items: usize, f: impl Fn(usize) + Sync) {
    if n_items <= 1 || pool_threads() <= 1 || IN_JOB.with(Cell::get) {
        (0..n_items).for_each(f);
        return;
    }
    run(n_items, 1, &|range: Range<usize>| range.for_each(&f));
}

/// Whether `MULTITOKEN_POOL=candle` asked for candle's barrier pool instead
/// (read once): the pool these kernels used before, kept so that
/// `cargo xtask bench lm --contended` can show both under the same load.
fn use_candle_pool() -> bool {
    static CANDLE: OnceLock<bool> = OnceLock::new();
    *CANDLE.get_or_init(|| std::env::var("MULTITOKEN_POOL").is_ok_and(|v| v == "candle"))
}

fn run(n_items: usize, chunk: usize, f: &(dyn Fn(Range<usize>) + Sync)) {
    if use_candle_pool() {
        candle_core::utils::barrier_pool().execute_chunked(n_items.div_ceil(chunk), |units| {
            f(units.start * chunk..n_items.min(units.end * chunk));
        });
        return;
    }
    let pool = pool();
    // No workers, or another thread's job is open: do this one alone rather than queue.
    if pool.workers.is_empty() || pool.busy.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed).is_err() {
        f(0..n_items);
        return;
    }
    let _busy = Busy(&pool.busy);
    let job = Job {
        f,
        n_items,
        chunk,
        cursor: AtomicUsize::new(0),
        caller: std::thread::current(),
        panic: Mutex::new(None),
    };
    let shared = pool.shared;
    // SAFETY (lifetime erasure): workers dereference the pointer only after joining
    // the job opened below, and `Close` does not return before every joined worker
    // has left; after that no worker can join until the next call opens a new job.
    shared.job.store((&job as *const Job<'_>).cast_mut().cast(), Ordering::Relaxed);
    let state = shared.state.load(Ordering::Relaxed);
    // The next generation, open, nobody joined (the previous job ended closed and empty).
    shared.state.store((state & !(CLOSED | COUNT)).wrapping_add(GEN), Ordering::Release);
    for worker in &pool.workers {
        // Cheap when the worker is spinning (no system call); wakes it when parked.
        worker.unpark();
    }
    {
        // Closes the job and waits for the workers in it, also when `f` panics here.
        let _close = Close { shared };
        IN_JOB.with(|c| c.set(true));
        job.run();
        IN_JOB.with(|c| c.set(false));
    }
    let payload = job.panic.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(payload) = payload {
        std::panic::resume_unwind(payload);
    }
}

/// Frees the pool for the next caller when a call ends (also by a panic).
struct Busy<'a>(&'a AtomicBool);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Closes the open job and waits until the workers that joined it have left.
struct Close<'a> {
    shared: &'a Shared,
}

impl Drop for Close<'_> {
    fn drop(&mut self) {
        IN_JOB.with(|c| c.set(false));
        let state = &self.shared.state;
        if state.fetch_or(CLOSED, Ordering::AcqRel) & COUNT == 0 {
            return;
        }
        let start = Instant::now();
        let mut spins = 0u32;
        while state.load(Ordering::Acquire) & COUNT != 0 {
            spins += 1;
            if !spins.is_multiple_of(64) || start.elapsed() < CALLER_SPIN {
                std::hint::spin_loop();
            } else {
                // A joined worker is still busy (or was preempted mid-chunk): leave
                // the core. The last worker to leave a closed job unparks us; a
                // token left from an earlier job only costs one more look.
                std::thread::park();
            }
        }
        // Nothing refers to the job any more.
        self.shared.job.store(std::ptr::null_mut(), Ordering::Relaxed);
    }
}

fn worker(shared: &'static Shared) {
    IN_JOB.with(|c| c.set(true));
    let mut seen = 0u64;
    loop {
        // Wait for a generation we have not seen, and join it if it is still open.
        let mut start: Option<Instant> = None;
        let mut spins = 0u32;
        let joined = loop {
            if shared.stop.load(Ordering::Relaxed) {
                return;
            }
            let state = shared.state.load(Ordering::Acquire);
            if state >> 32 != seen {
                if state & CLOSED != 0 {
                    // Missed it: the caller finished alone.
                    seen = state >> 32;
                    continue;
                }
                if shared.state.compare_exchange_weak(state, state + 1, Ordering::Acquire, Ordering::Relaxed).is_ok() {
                    break state >> 32;
                }
                continue;
            }
            spins += 1;
            if !spins.is_multiple_of(64) {
                std::hint::spin_loop();
                continue;
            }
            let began = *start.get_or_insert_with(Instant::now);
            if began.elapsed() < WORKER_SPIN {
                std::hint::spin_loop();
            } else {
                // The caller unparks every worker after opening a job; a token
                // left from an earlier job just makes this return early.
                std::thread::park();
                start = None;
            }
        };
        seen = joined;
        let job_ptr = shared.job.load(Ordering::Relaxed);
        // SAFETY: we joined an open job (the CAS above, Acquire, pairs with the
        // caller's Release store of the state after it stored `job`), so the job is
        // alive until we leave it by decrementing the count below.
        let job = unsafe { &*job_ptr };
        let caller = job.caller.clone();
        if let Err(payload) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job.run())) {
            let mut slot = job.panic.lock().unwrap_or_else(|e| e.into_inner());
            slot.get_or_insert(payload);
        }
        // Leave; `job` must not be touched after this.
        let before = shared.state.fetch_sub(1, Ordering::AcqRel);
        if before & CLOSED != 0 && before & COUNT == 1 {
            caller.unpark();
        }
    }
}

/// Calls `f(first_item, items)` on disjoint runs of `out`, which holds
/// `out.len() / item_len` items of `item_len` values each; spread over the
/// kernels' pool when `parallel`, else one call on the calling thread.
pub fn fill_items(out: &mut [f32], item_len: usize, parallel: bool, f: impl Fn(usize, &mut [f32]) + Sync) {
    let n_items = out.len().checked_div(item_len).unwrap_or(0);
    if !parallel || n_items < 2 {
        f(0, out);
        return;
    }
    let base = crate::Shared(out.as_mut_ptr());
    let base = &base;
    for_each_range(n_items, |range| {
        // SAFETY: `for_each_range` hands out disjoint ranges of `0..n_items`,
        // so each call gets its own `item_len`-wide items of `out`, which is
        // borrowed mutably for the whole pool call.
        let items = unsafe { std::slice::from_raw_parts_mut(base.at(range.start * item_len), range.len() * item_len) };
        f(range.start, items);
    });
}


#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[test]
    fn every_item_runs_once() {
        for n in [0usize, 1, 2, 3, 7, 64, 1000, 100_003] {
            let hits: Vec<AtomicU32> = (0..n).map(|_| AtomicU32::new(0)).collect();
            for_each_range(n, |range| {
                for i in range {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                }
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1), "n = {n}");
            let hits: Vec<AtomicU32> = (0..n).map(|_| AtomicU32::new(0)).collect();
            for_each_item(n, |i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1), "n = {n}");
        }
    }

    #[test]
    fn many_calls_from_many_threads() {
        // Concurrent callers (one runs on the pool, the others alone) and nested calls.
        std::thread::scope(|scope| {
            for t in 0..4u64 {
                scope.spawn(move || {
                    for round in 0..500u64 {
                        let n = 1 + ((round * 31 + t * 7) % 97) as usize;
                        let sum = AtomicU64::new(0);
                        for_each_range(n, |range| {
                            for i in range {
                                let inner = AtomicU64::new(0);
                                for_each_item(3, |j| {
                                    inner.fetch_add(j as u64, Ordering::Relaxed);
                                });
                                sum.fetch_add(i as u64 + inner.load(Ordering::Relaxed), Ordering::Relaxed);
                            }
                        });
                        let n = n as u64;
                        assert_eq!(sum.load(Ordering::Relaxed), n * (n - 1) / 2 + 3 * n);
                    }
                });
            }
        });
    }

    #[test]
    fn a_panic_reaches_the_caller_and_the_pool_still_works() {
        let result = std::panic::catch_unwind(|| {
            for_each_item(64, |i| {
                if i == 40 {
                    panic!("unit 40");
                }
            });
        });
        assert!(result.is_err());
        let count = AtomicUsize::new(0);
        for_each_item(64, |_| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), 64);
    }
}
