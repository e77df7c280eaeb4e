//! `cargo xtask`: project automation (fixtures, weights, bench, tidy, demo-model).
//!
//! Each task lives in its own module; `main` only dispatches.
//!
//! `weights`, `fixtures` and `tidy` link no model crate, so the first command a
//! developer runs (`cargo xtask weights`) builds in seconds instead of compiling the
//! whole workspace. `bench` and `demo-model` need the model crates: they are
//! compiled only with the `models` feature, and a build without it (what the
//! `cargo xtask` alias runs) re-runs itself as `cargo run -p xtask --features
//! models -- <task> ...`, so the command stays `cargo xtask bench ...`.

/// The same allocator as the `multitoken` binary, so that benches measure what users run.
#[cfg(feature = "models")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[cfg(feature = "models")]
mod bench;
#[cfg(feature = "models")]
mod bench_audio;
#[cfg(feature = "models")]
mod bench_contended;
#[cfg(feature = "models")]
mod bench_decode_rows;
#[cfg(feature = "models")]
mod bench_document;
#[cfg(feature = "models")]
mod bench_moe;
#[cfg(feature = "models")]
mod bench_serve;
#[cfg(feature = "models")]
mod bench_qlora;
#[cfg(feature = "models")]
mod bench_train;
#[cfg(feature = "models")]
mod bench_vision;
#[cfg(feature = "models")]
mod bench_vlm;
#[cfg(feature = "models")]
mod demo_model;
mod fixtures;
mod tidy;
mod weights;
mod whisper_ct2;
mod whisper_ggml;

use anyhow::Result;

/// What `cargo xtask` with no (or an unknown) task prints.
const USAGE: &str = "usage: cargo xtask <task> [args]

tasks:
  weights      download the real weights the tests use into ~/.cache/multitoken
  fixtures     regenerate the parity fixtures (needs Python with torch/transformers)
  bench        speed benches (lm, vision, audio, document, vlm, moe, serve, train)
  tidy         the workspace's layering and lint checks
  demo-model   build, train and evaluate examples/demo-model

`cargo xtask <task> --help` describes a task's arguments.";

fn main() -> Result<()> {
    #[cfg(feature = "models")]
    keep_freed_memory();
    // As the multitoken binary: candle's spinning barrier pool off, our kernels'
    // pool in charge (see `multitoken::cli::setup_process`).
    #[cfg(feature = "models")]
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rest = args.get(1..).unwrap_or(&[]).to_vec();
    match args.first().map(String::as_str) {
        Some("fixtures") => fixtures::run(&rest),
        Some("weights") => weights::run(&rest),
        Some("tidy") => tidy::run(&rest),
        #[cfg(feature = "models")]
        Some("bench") => bench::run(&rest),
        #[cfg(feature = "models")]
        Some("demo-model") => demo_model::run(&rest),
        #[cfg(not(feature = "models"))]
        Some(task @ ("bench" | "demo-model")) => with_models(task, &rest),
        None | Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            Ok(())
        }
        Some(other) => {
            eprintln!("unknown task `{other}`\n\n{USAGE}");
            std::process::exit(2);
        }
    }
}

/// Runs `task` in a build of xtask with the `models` feature (which links the
/// model crates): `cargo run -p xtask --features models -- TASK ARGS`, in the
/// same profile and target directory as this run, exiting with its status.
#[cfg(not(feature = "models"))]
fn with_models(task: &str, rest: &[String]) -> Result<()> {
    use anyhow::Context;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = std::process::Command::new(&cargo);
    // whisper.cpp's bench anchor is one more feature (it builds whisper.cpp).
    let features = if rest.iter().any(|a| a == "--whisper-cpp") { "models,whisper-cpp" } else { "models" };
    command.args(["run", "--package", "xtask", "--features", features]);
    // This binary's own profile: target/<profile>/xtask.
    let profile = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().and_then(|d| d.file_name()).map(|n| n.to_string_lossy().into_owned()));
    if profile.as_deref() == Some("release") {
        command.arg("--release");
    }
    command.arg("--").arg(task).args(rest);
    command.current_dir(weights::workspace_root());
    let status = command
        .status()
        .with_context(|| format!("running {} run -p xtask --features models", cargo.to_string_lossy()))?;
    std::process::exit(status.code().unwrap_or(1));
}

/// Turns off mimalloc's purging of freed memory, unless `MIMALLOC_PURGE_DELAY`
/// says otherwise: freed pages stay committed for the next allocation instead of
/// being handed back and faulted in again (why: the workspace `Cargo.toml`).
/// The `multitoken` binary does the same.
#[cfg(feature = "models")]
fn keep_freed_memory() {
    /// `mi_option_purge_delay` in mimalloc's `mi_option_e`.
    const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: setting an option is allowed at any time; -1 means "never purge".
        unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, -1) };
    }
}
