//! The one error type of `multitoken-document`.
//!
//! Every variant about an input names the item (a path, "inline text", "N bytes
//! of document data") so that a user with many documents knows which one failed.

use std::path::PathBuf;

/// Errors of text extraction, chunking, the sentence encoder and the modality.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read.
    #[error("{item}: cannot read: {source}")]
    Io {
        /// The item (a path).
        item: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The document is larger than the configured limit.
    #[error("{item}: {size} bytes is over the {limit}-byte document size limit (raise max_bytes to allow it)")]
    TooLarge {
        /// The item.
        item: String,
        /// Its size in bytes.
        size: u64,
        /// The limit in bytes.
        limit: u64,
    },
    /// The document is within the byte limit but over another bound: pages, inflated
    /// PDF streams or extracted text.
    #[error("{item}: {reason}")]
    Limit {
        /// The item.
        item: String,
        /// Which bound, the document's figure and the limit.
        reason: String,
    },
    /// The PDF is password-protected and cannot be opened with an empty password.
    #[error("{item}: encrypted PDF (password-protected); decrypt it first")]
    EncryptedPdf {
        /// The item.
        item: String,
    },
    /// The PDF is corrupt, truncated or uses features the parser cannot read.
    #[error("{item}: cannot read PDF: {reason}")]
    Pdf {
        /// The item.
        item: String,
        /// What the parser said.
        reason: String,
    },
    /// A PDF that parses but carries no text layer (for example a scan).
    #[error("{item}: no extractable text (the PDF has no text layer, e.g. a scanned document; OCR it first)")]
    NoExtractableText {
        /// The item.
        item: String,
    },
    /// A text or Markdown document with nothing but whitespace.
    #[error("{item}: empty document (no text after extraction)")]
    Empty {
        /// The item.
        item: String,
    },
    /// Bytes that do not decode as text in any encoding.
    #[error("{item}: looks like binary data, not text ({reason})")]
    Binary {
        /// The item.
        item: String,
        /// Why it was judged binary.
        reason: String,
    },
    /// A sentence-transformers model directory that cannot be loaded.
    #[error("sentence encoder {}: {reason}", dir.display())]
    Encoder {
        /// The model directory.
        dir: PathBuf,
        /// What is missing or wrong.
        reason: String,
    },
    /// The tokenizer failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A modality or chunking setting that cannot work.
    #[error("document config: {0}")]
    Config(String),
    /// A preprocessed batch of the wrong shape or type was given to `encode`.
    #[error("document modality: {0}")]
    Input(String),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<Error> for multitoken_core::Error {
    fn from(error: Error) -> Self {
        match error {
            Error::Candle(inner) => multitoken_core::Error::Candle(inner),
            other => multitoken_core::Error::msg(other.to_string()),
        }
    }
}
