//! `cargo xtask`: project automation (fixtures, weights, bench, tidy).
//!
//! Each task lives in its own module; `main` only dispatches.

/// The same allocator as the `multitoken` binary, so that benches measure what users run.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod bench;
mod bench_audio;
mod bench_document;
mod bench_moe;
mod bench_serve;
mod bench_train;
mod bench_vision;
mod bench_vlm;
mod demo_model;
mod fixtures;
mod tidy;
mod weights;
mod whisper_ct2;
mod whisper_ggml;

use anyhow::{bail, Result};

fn main() -> Result<()> {
    keep_freed_memory();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rest = args.get(1..).unwrap_or(&[]).to_vec();
    match args.first().map(String::as_str) {
        Some("fixtures") => fixtures::run(&rest),
        Some("weights") => weights::run(&rest),
        Some("bench") => bench::run(&rest),
        Some("tidy") => tidy::run(&rest),
        Some("demo-model") => demo_model::run(&rest),
        _ => bail!("usage: cargo xtask <fixtures|weights|bench|tidy|demo-model> [args]"),
    }
}

/// Turns off mimalloc's purging of freed memory, unless `MIMALLOC_PURGE_DELAY`
/// says otherwise: freed pages stay committed for the next allocation instead of
/// being handed back and faulted in again (why: the workspace `Cargo.toml`).
/// The `multitoken` binary does the same.
fn keep_freed_memory() {
    /// `mi_option_purge_delay` in mimalloc's `mi_option_e`.
    const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: setting an option is allowed at any time; -1 means "never purge".
        unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, -1) };
    }
}
