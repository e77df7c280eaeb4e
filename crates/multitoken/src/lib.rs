//! The multitoken facade: re-exports the workspace crates so that a user needs
//! one dependency, links every modality crate into the binary, and holds the
//! whole command line ([`cli`]) so that a custom binary is
//! `fn main() -> anyhow::Result<()> { multitoken::cli::main() }`.

pub mod cli;
pub mod conversation;
pub mod hub;

pub use multitoken_audio as audio;
pub use multitoken_core as core;
pub use multitoken_document as document;
pub use multitoken_eval as eval;
pub use multitoken_lm as lm;
pub use multitoken_moe as moe;
pub use multitoken_serve as serve;
pub use multitoken_train as train;
pub use multitoken_vision as vision;
pub use multitoken_vlm as vlm;

/// mimalloc rather than glibc's allocator (why: the workspace `Cargo.toml`).
/// In the library, so that every binary built on [`cli::main`] gets it; turn
/// the default `mimalloc` feature off to declare another global allocator.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
