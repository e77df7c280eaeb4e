//! The `multitoken` command line: `generate`, `chat`, and (in later issues)
//! `train`, `serve`, `moe`, `dataset`, `inspect`.
//!
//! Argument parsing and printing live here; the work is done by the libraries.

mod cli;

/// mimalloc rather than glibc's allocator: see the workspace `Cargo.toml`.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::Result;
use clap::Parser;

fn main() -> Result<()> {
    keep_freed_memory();
    pin_thread_count();
    let args = cli::Cli::parse();
    cli::run(args)
}

/// candle asks for the CPU count on every matmul unless `RAYON_NUM_THREADS` is set,
/// which costs measurable time per decoded token; answer it once, here, before
/// any thread pool exists.
fn pin_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
}

/// Turns off mimalloc's purging of freed memory, unless `MIMALLOC_PURGE_DELAY`
/// says otherwise: freed pages stay committed for the next allocation instead of
/// being handed back and faulted in again (why: the workspace `Cargo.toml`).
/// `cargo xtask` does the same, so that benches measure what users run.
fn keep_freed_memory() {
    /// `mi_option_purge_delay` in mimalloc's `mi_option_e`.
    const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: setting an option is allowed at any time; -1 means "never purge".
        unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, -1) };
    }
}
