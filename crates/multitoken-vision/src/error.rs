//! The one error type of `multitoken-vision`.

use std::path::PathBuf;

/// Errors of the vision modality. Every variant names the item, file or tensor
/// involved so that a user can act on it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An image could not be decoded: unknown format, truncated or corrupt data.
    #[error("image {item}: {reason}")]
    Decode {
        /// Which item: a path or `<N bytes>`.
        item: String,
        /// What went wrong.
        reason: String,
    },
    /// An image is larger than the decompression-bomb limit.
    #[error("image {item}: {width}x{height} exceeds the limit of {max_pixels} pixels ({max_side} per side)")]
    TooLarge {
        /// Which item.
        item: String,
        /// Declared width.
        width: u64,
        /// Declared height.
        height: u64,
        /// The pixel-count limit.
        max_pixels: u64,
        /// The per-side limit.
        max_side: u32,
    },
    /// An image has zero width or height.
    #[error("image {item}: has no pixels ({width}x{height})")]
    Empty {
        /// Which item.
        item: String,
        /// Width.
        width: u32,
        /// Height.
        height: u32,
    },
    /// An item kind the vision modality cannot take (e.g. inline text).
    #[error("image {item}: {reason}")]
    UnsupportedItem {
        /// Which item.
        item: String,
        /// Why.
        reason: String,
    },
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A config (preprocessor, CLIP, llava) is malformed or inconsistent.
    #[error("{what}: {reason}")]
    Config {
        /// Which config, e.g. a path to `preprocessor_config.json`.
        what: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A weight is missing or mis-shaped, or a tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// An error from the core contracts.
    #[error(transparent)]
    Core(#[from] multitoken_core::Error),
}

/// Result with the vision [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// A [`Error::Config`] for `what`.
    pub(crate) fn config(what: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Config {
            what: what.into(),
            reason: reason.into(),
        }
    }
}

impl From<Error> for multitoken_core::Error {
    fn from(error: Error) -> Self {
        match error {
            Error::Core(inner) => inner,
            Error::Candle(inner) => multitoken_core::Error::Candle(inner),
            other => multitoken_core::Error::Msg(other.to_string()),
        }
    }
}
