//! The crate's one error type.
//!
//! Every error about an input names the item (a path, "N bytes" or "raw samples")
//! so that a user with many clips in a prompt or a dataset knows which one failed.

/// Errors of the audio modality.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The item could not be read from disk.
    #[error("{item}: cannot read: {source}")]
    Io {
        /// The item, as a user would recognise it.
        item: String,
        /// The underlying IO error.
        source: std::io::Error,
    },
    /// The container or the stream inside it is not valid audio.
    #[error("{item}: not a decodable audio file: {reason}")]
    Corrupt {
        /// The item.
        item: String,
        /// What the decoder said.
        reason: String,
    },
    /// The file is a known container whose codec is not supported.
    #[error("{item}: unsupported audio format or codec: {reason}")]
    Unsupported {
        /// The item.
        item: String,
        /// What is unsupported.
        reason: String,
    },
    /// The stream ended before the number of frames its header announced.
    #[error("{item}: truncated audio: the header announces {expected} frames, only {got} could be decoded")]
    Truncated {
        /// The item.
        item: String,
        /// Frames announced by the header.
        expected: u64,
        /// Frames decoded.
        got: u64,
    },
    /// No samples at all.
    #[error("{item}: zero-length audio (no samples)")]
    Empty {
        /// The item.
        item: String,
    },
    /// A sample is NaN or infinite.
    #[error("{item}: sample {index} is not a finite number ({value})")]
    NonFinite {
        /// The item.
        item: String,
        /// Index of the first bad sample (interleaved, before downmix).
        index: usize,
        /// The bad value.
        value: f32,
    },
    /// The audio is longer than the configured limit.
    #[error("{item}: audio is {seconds:.1} s long, over the limit of {limit:.1} s (raise `max_seconds` to accept it)")]
    TooLong {
        /// The item.
        item: String,
        /// Length (or a lower bound of it) in seconds.
        seconds: f64,
        /// The configured limit in seconds.
        limit: f64,
    },
    /// A sample rate or channel count that cannot be used.
    #[error("{item}: {reason}")]
    Format {
        /// The item.
        item: String,
        /// What is wrong.
        reason: String,
    },
    /// A configuration value (config.json, modality settings, CLI options) is invalid.
    #[error("{0}")]
    Config(String),
    /// Reading a JSON file failed.
    #[error("{path}: {reason}")]
    Json {
        /// The file.
        path: String,
        /// The parse error.
        reason: String,
    },
    /// The tokenizer failed to load or decode.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A weight is missing or has the wrong shape.
    #[error("whisper checkpoint: {0}")]
    Checkpoint(String),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<Error> for multitoken_core::Error {
    fn from(error: Error) -> Self {
        match error {
            Error::Candle(e) => multitoken_core::Error::Candle(e),
            other => multitoken_core::Error::Msg(other.to_string()),
        }
    }
}
