//! Errors of the importers.

use std::path::PathBuf;

/// An importer's error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A config file is missing a field, has a wrong type or an unsupported value.
    #[error("{path}: {message}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The LM side (weights, tokenizer, ...).
    #[error(transparent)]
    Lm(#[from] multitoken_lm::Error),
    /// The core (projector, registry, ...).
    #[error(transparent)]
    Core(#[from] multitoken_core::Error),
    /// The MoE layers.
    #[error(transparent)]
    Moe(#[from] multitoken_moe::Error),
    /// A tensor operation.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result of the importers.
pub type Result<T> = std::result::Result<T, Error>;

impl From<Error> for multitoken_lm::Error {
    fn from(error: Error) -> Self {
        match error {
            Error::Lm(inner) => inner,
            other => multitoken_lm::Error::Msg(other.to_string()),
        }
    }
}
