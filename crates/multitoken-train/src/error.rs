//! The crate's error type.

use std::path::PathBuf;

/// Everything training can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
    /// A dataset row is malformed.
    #[error("{file}:{line}{id}: {message}")]
    Row {
        /// The dataset file.
        file: PathBuf,
        /// 1-based line (JSONL) or element (JSON array) number.
        line: usize,
        /// ` (id X)` when the row has an id, empty otherwise.
        id: String,
        /// What is wrong.
        message: String,
    },
    /// A bad setting (flag, TOML file, model directory).
    #[error("{0}")]
    Config(String),
    /// A checkpoint cannot be used.
    #[error("checkpoint {path}: {message}")]
    Checkpoint {
        /// The checkpoint directory or file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The loss became NaN or infinite.
    #[error("{0}")]
    NonFinite(String),
    /// The run was asked to stop (Ctrl-C in Python); its last checkpoint is named.
    #[error("{0}")]
    Interrupted(String),
    /// From the LM crate.
    #[error(transparent)]
    Lm(#[from] multitoken_lm::Error),
    /// From the core crate.
    #[error(transparent)]
    Core(#[from] multitoken_core::Error),
    /// From candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}
