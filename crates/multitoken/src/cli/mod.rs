//! The `multitoken` command line as a library: every subcommand of the
//! `multitoken` binary, so that a binary which links one more modality crate
//! gets all of them without copying any code:
//!
//! ```no_run
//! // src/main.rs of a crate that depends on `multitoken` and on `my_modality`
//! // (which registers its builder with `multitoken::core::inventory::submit!`).
//! // `use … as _` keeps the crate, and so its registration, in the binary.
//! // use my_modality as _;
//! fn main() -> anyhow::Result<()> {
//!     multitoken::cli::main()
//! }
//! ```
//!
//! [`main`] reads the process's arguments; [`run`] takes them from an iterator
//! (the first one is the program name, as in `std::env::args`). Both set the
//! process up first ([`setup_process`]): the rayon thread count, mimalloc's
//! options, and the registrations of every modality crate this crate links
//! (vision, audio, documents, the VLM importers, the MoE loader).
//!
//! The allocator: with the default `mimalloc` feature this *library* declares
//! mimalloc the `#[global_allocator]` (why: the workspace `Cargo.toml`), so
//! every binary linking it runs on the allocator the benches measured. A
//! binary that declares its own global allocator must depend on `multitoken`
//! with `default-features = false` (two global allocators do not link).

mod chat;
mod embed;
mod eval;
mod generate;
mod mel;
mod modality;
mod model_args;
mod transcribe;

use std::ffi::OsString;
use std::sync::Once;

use anyhow::Result;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand};

pub use embed::embed_items;
pub use mel::log_mel_windows;
pub use modality::ModalityArgs;
pub use model_args::{ModelArgs, SamplingArgs};
pub use transcribe::transcribe_item;

/// Large multimodal models in Rust: chat, generate, train, serve.
#[derive(Debug, Parser)]
#[command(name = "multitoken", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate a completion for one prompt.
    Generate(generate::GenerateArgs),
    /// Chat in the terminal; answers stream as they are generated.
    Chat(chat::ChatArgs),
    /// Sentence embeddings of documents and texts (one JSON row per input with --json).
    Embed(embed::EmbedArgs),
    /// Print Whisper's log-mel spectrogram of an audio file.
    Mel(mel::MelArgs),
    /// Transcribe an audio file with Whisper (greedy).
    Transcribe(transcribe::TranscribeArgs),
    /// Train projectors, LoRA adapters or the whole model on a dataset.
    Train(multitoken_train::cli::TrainArgs),
    /// Convert and check datasets.
    Dataset(multitoken_train::cli::DatasetArgs),
    /// Merge a PEFT LoRA adapter into the base model's weights.
    MergeLora(multitoken_train::cli::MergeLoraArgs),
    /// A model's score on MMBench, MMMU, POPE or VQAv2 files (their reference rules), or on held-out rows.
    Eval(eval::EvalArgs),
    /// Build and tune a mixture of experts from fine-tuned models.
    Moe(multitoken_moe::cli::MoeArgs),
    /// Serve a model over HTTP (/generate, OpenAI-compatible API, web chat page).
    Serve(multitoken_serve::cli::ServeArgs),
    /// The modality builders linked in; add a modality to a model.
    Modality(modality::ModalityArgs),
}

/// The whole command line of the running process: parse `std::env::args_os`,
/// run the subcommand. Usage errors print the usage and exit with status 2,
/// `--help` and `--version` print and exit with 0, as any clap binary does.
pub fn main() -> Result<()> {
    setup_process();
    let matches = Cli::command().get_matches();
    let cli = from_matches(&matches).unwrap_or_else(|error| error.exit());
    execute(cli)
}

/// The parsed command line, plus what only the matches know (the order in which
/// `embed` was given its FILEs and `--text`s).
fn from_matches(matches: &ArgMatches) -> Result<Cli, clap::Error> {
    let mut cli = Cli::from_arg_matches(matches)?;
    if let (Command::Embed(args), Some(sub)) = (&mut cli.command, matches.subcommand_matches("embed")) {
        args.record_order(sub);
    }
    Ok(cli)
}

/// The command line from `args` (the first one is the program name). Unlike
/// [`main`] it never exits the process: a usage error is returned as the
/// error (its text is clap's message), `--help` and `--version` are printed
/// and give `Ok(())`.
pub fn run<I, T>(args: I) -> Result<()>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    setup_process();
    let cli = match Cli::command().try_get_matches_from(args).and_then(|matches| from_matches(&matches)) {
        Ok(cli) => cli,
        Err(error) => {
            use clap::error::ErrorKind;
            if matches!(error.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                print!("{error}");
                return Ok(());
            }
            return Err(anyhow::anyhow!("{}", error.render()));
        }
    };
    execute(cli)
}

/// Runs an already parsed command line (after [`setup_process`]).
pub fn execute(cli: Cli) -> Result<()> {
    link_modalities();
    match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Chat(args) => chat::run(args),
        Command::Embed(args) => embed::run(args),
        Command::Mel(args) => mel::run(args),
        Command::Transcribe(args) => transcribe::run(args),
        // Every --model (and the TOML file's `model`, the base and experts of a
        // mixture, an adapter) may be a hub id; the facade resolves them, since
        // network IO never lives below it.
        Command::Train(args) => multitoken_train::cli::train_with(args, &crate::hub::resolve_model_arg),
        Command::Dataset(mut args) => {
            if let multitoken_train::cli::DatasetCommand::Check { model: Some(model), .. } = &mut args.command {
                *model = crate::hub::resolve_model_arg(model)?;
            }
            multitoken_train::cli::dataset(args)
        }
        Command::MergeLora(mut args) => {
            args.model = crate::hub::resolve_model_arg(&args.model)?;
            args.adapter = args.adapter.map(|a| crate::hub::resolve_model_arg(&a)).transpose()?;
            multitoken_train::cli::merge_lora(args)
        }
        Command::Eval(args) => eval::run(args),
        Command::Moe(mut args) => {
            if let multitoken_moe::cli::MoeCommand::Build { base, experts, .. } = &mut args.command {
                *base = crate::hub::resolve_model_arg(base)?;
                for expert in experts.iter_mut() {
                    *expert = crate::hub::resolve_model_arg(expert)?;
                }
            }
            multitoken_moe::cli::run(args)
        }
        Command::Serve(mut args) => {
            args.model = args.model.map(|m| crate::hub::resolve_model_arg(&m)).transpose()?;
            multitoken_serve::cli::run(args)
        }
        Command::Modality(args) => modality::run(args),
    }
}

/// Keeps the registry entries of every modality crate this crate depends on in
/// the binary: the linker drops a crate nothing calls into, and with it its
/// `inventory` submissions. A custom modality crate is kept by the binary's own
/// `use my_modality as _;` (or any call into it).
pub fn link_modalities() {
    multitoken_document::link();
    multitoken_audio::link();
    multitoken_vision::link();
    // The MoE directory loader's registration.
    multitoken_moe::link();
    // The VLM importers (Idefics2, Cephalo MoE, LLaVA-NeXT, ...).
    multitoken_vlm::link();
}

/// What the binary does before parsing its arguments, once per process:
/// pins the rayon thread count and turns off mimalloc's purging (see the
/// private helpers for why). [`main`] and [`run`] call it; a custom binary
/// that calls [`execute`] itself should call it first, before any thread pool
/// exists.
pub fn setup_process() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        keep_freed_memory();
        pin_thread_count();
        // A panic in a modality crate's code is caught and reported as an
        // error naming the modality; without this it is also printed raw.
        multitoken_core::install_panic_hook();
    });
}

/// candle asks for the CPU count on every matmul unless `RAYON_NUM_THREADS` is set,
/// which costs measurable time per decoded token; answer it once, here, before
/// any thread pool exists.
fn pin_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
    // candle's barrier pool (its element-wise ops on large tensors) waits for its
    // workers in a spin loop that never yields, which collapses when another process
    // holds a core; sized to one thread those ops run inline, and every threaded
    // kernel of ours runs on `multitoken_kernels::pool` instead (sized by
    // RAYON_NUM_THREADS). Beside a busy process on 2 cores: prefill 118 -> 225 tok/s,
    // a LoRA step 7.1 -> 10.8 steps/s (`cargo xtask bench lm --contended`).
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

/// Turns off mimalloc's purging of freed memory, unless `MIMALLOC_PURGE_DELAY`
/// says otherwise: freed pages stay committed for the next allocation instead of
/// being handed back and faulted in again (why: the workspace `Cargo.toml`).
/// `cargo xtask` does the same, so that benches measure what users run.
#[cfg(feature = "mimalloc")]
fn keep_freed_memory() {
    /// `mi_option_purge_delay` in mimalloc's `mi_option_e`.
    const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: setting an option is allowed at any time; -1 means "never purge".
        unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, -1) };
    }
}

/// Without the `mimalloc` feature the binary's own allocator is in charge.
#[cfg(not(feature = "mimalloc"))]
fn keep_freed_memory() {}

/// A clap value parser for a length limit in seconds: a positive, finite number
/// (`NaN` would compare false with every length and turn the limit off).
pub(crate) fn positive_seconds(text: &str) -> std::result::Result<f64, String> {
    let value: f64 = text.parse().map_err(|e| format!("{text:?} is not a number: {e}"))?;
    if value.is_finite() && value > 0.0 {
        Ok(value)
    } else {
        Err(format!("must be a positive, finite number of seconds, got {text}"))
    }
}
