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
