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
mod demo_model;
mod fixtures;
mod tidy;
mod weights;
mod whisper_ct2;
mod whisper_ggml;

use anyhow::{bail, Result};

fn main() -> Result<()> {
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
