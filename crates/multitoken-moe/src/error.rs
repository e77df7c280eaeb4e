//! The one error type of `multitoken-moe`.

use std::path::PathBuf;

/// Errors raised while building, loading, running or training a mixture of
/// experts. Messages name the file, tensor or item involved and the problem.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// Loading or running the language model failed.
    #[error(transparent)]
    Lm(#[from] multitoken_lm::Error),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file's contents are malformed or do not fit the model.
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Anything else, with a message that says what and where.
    #[error("{0}")]
    Msg(String),
}

/// Result with the moe [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl From<Error> for multitoken_lm::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Lm(e) => e,
            Error::Candle(c) => multitoken_lm::Error::Candle(c),
            other => multitoken_lm::Error::Msg(other.to_string()),
        }
    }
}

/// An [`Error::Io`] for `path`.
pub(crate) fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// An [`Error::File`] for `path`.
pub(crate) fn file_error(path: &std::path::Path, message: impl Into<String>) -> Error {
    Error::File {
        path: path.to_path_buf(),
        message: message.into(),
    }
}
