//! The document modality of multitoken (`<document>`, data key `documents`).
//!
//! A document (PDF, plain text in any encoding, Markdown, or inline text) is
//! extracted to normalised text ([`extract`]), cut into windows of the encoder's
//! tokenizer ([`chunk`]), embedded by a BERT-family sentence-transformers model
//! ([`SentenceEncoder`]: all-MiniLM-L6-v2, thenlper/gte-*), and the window
//! embeddings are averaged into one vector that multi_token's vector projector
//! maps to `num_tokens` LM positions ([`DocumentModality`]).
//!
//! Linking this crate registers the builders `document_gte` and
//! `document_minilm` with `multitoken-core`'s registry.
//!
//! ```no_run
//! use multitoken_document::{ChunkConfig, SentenceEncoder};
//! # fn main() -> multitoken_document::Result<()> {
//! let encoder = SentenceEncoder::load(
//!     multitoken_document::default_minilm_dir(),
//!     &candle_core::Device::Cpu,
//!     candle_core::DType::F32,
//! )?;
//! let rows = encoder.embed_texts(&["A cat sits on the mat."], &ChunkConfig::default())?;
//! assert_eq!(rows[0].len(), encoder.dim());
//! # Ok(())
//! # }
//! ```

// Tests may unwrap and panic: a failure there is the report.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod bert;
pub mod chunk;
pub mod encoder;
pub mod error;
pub mod extract;
pub mod modality;

use std::path::PathBuf;

pub use chunk::ChunkConfig;
pub use encoder::{PoolingMode, SentenceEncoder};
pub use error::{Error, Result};
pub use extract::{
    check_document, describe_item, detect_format, extract_bytes, extract_item, DocumentFormat, ExtractConfig,
    DEFAULT_MAX_BYTES, DEFAULT_MAX_PAGES, DEFAULT_MAX_PDF_STREAM_BYTES, DEFAULT_MAX_TEXT_BYTES,
};
pub use modality::{document_item_from_json, DocumentConfig, DocumentModality, DOCUMENT_DATA_KEY, DOCUMENT_TOKEN};

/// Where `cargo xtask weights` installs all-MiniLM-L6-v2:
/// `${MULTITOKEN_WEIGHTS:-$HOME/.cache/multitoken}/all-minilm-l6-v2`.
pub fn default_minilm_dir() -> PathBuf {
    let cache = std::env::var_os("MULTITOKEN_WEIGHTS")
        .filter(|dir| !dir.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache").join("multitoken")))
        .unwrap_or_else(|| PathBuf::from(".cache").join("multitoken"));
    cache.join("all-minilm-l6-v2")
}

/// Does nothing; call it (or `use multitoken_document as _;`) from a binary so
/// that the linker keeps this crate and its registry entries.
pub fn link() {}
