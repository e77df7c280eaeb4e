//! The crate's error type.

use std::path::PathBuf;

/// Everything reading, prompting and scoring a benchmark can fail with.
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
    /// A row of a benchmark or predictions file is malformed.
    #[error("{file}:{line}: {message}")]
    Row {
        /// The file.
        file: PathBuf,
        /// 1-based line of the row (for a TSV, the line its record starts on).
        line: usize,
        /// What is wrong, naming the row's index when it has one.
        message: String,
    },
    /// A whole file is unusable (missing columns, no rows, another benchmark's file).
    #[error("{file}: {message}")]
    File {
        /// The file.
        file: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A bad setting (flag, benchmark name).
    #[error("{0}")]
    Config(String),
    /// Loading or running the model failed.
    #[error("{0}")]
    Model(String),
}

impl Error {
    /// An IO error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}

impl From<multitoken_lm::Error> for Error {
    fn from(e: multitoken_lm::Error) -> Self {
        Self::Model(e.to_string())
    }
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;
