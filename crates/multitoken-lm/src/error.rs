//! The one error type of `multitoken-lm`.

/// Errors raised while loading or running a language model. Messages name the
/// file or tensor involved and what was expected.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// An error from the core contracts.
    #[error(transparent)]
    Core(#[from] multitoken_core::Error),
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A configuration file is malformed or unsupported.
    #[error("{path}: {message}")]
    Config {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A checkpoint tensor is missing or has the wrong shape.
    #[error("tensor `{name}`: {message}")]
    Tensor {
        /// The checkpoint key.
        name: String,
        /// What is wrong.
        message: String,
    },
    /// The tokenizer failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// Anything else, with a message that says what and where.
    #[error("{0}")]
    Msg(String),
}

/// Result with the lm [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl From<Error> for multitoken_core::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Candle(c) => multitoken_core::Error::Candle(c),
            Error::Core(c) => c,
            other => multitoken_core::Error::Msg(other.to_string()),
        }
    }
}
