//! The one error type of `multitoken-core`.

/// Errors raised by the core contracts. Every variant names the item, file or
/// tensor involved so that a user can act on it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A modality token count does not match the number of items given for it.
    #[error("the prompt has {tokens} `{token}` token(s) but {items} {data_key} item(s) were given")]
    ItemCountMismatch {
        /// The modality token, e.g. `<image>`.
        token: String,
        /// The dataset key of the items, e.g. `images`.
        data_key: String,
        /// How many modality tokens the text holds.
        tokens: usize,
        /// How many items were given.
        items: usize,
    },
    /// Anything else, with a message that says what and where.
    #[error("{0}")]
    Msg(String),
}

/// Result with the core [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An error carrying a message.
    pub fn msg(message: impl Into<String>) -> Self {
        Error::Msg(message.into())
    }
}
