//! The one error type of `multitoken-core`.

use std::path::PathBuf;

/// Errors raised by the core contracts. Every variant names the item, file or
/// tensor involved so that a user can act on it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A modality token count does not match the number of items given for it.
    #[error(
        "the prompt has {tokens} `{token}` token(s) but {items} {data_key} item(s) were given"
    )]
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
    /// No modality builder is registered under the requested name.
    #[error("no modality builder named `{name}` is linked in; known builders: {known}")]
    UnknownModality {
        /// The name that was asked for.
        name: String,
        /// The registered names, comma separated (or `none`).
        known: String,
    },
    /// Two linked crates registered a modality builder under the same name.
    #[error("modality builder `{name}` is registered {count} times; each name must be unique")]
    DuplicateModalityBuilder {
        /// The clashing name.
        name: String,
        /// How many registrations carry it.
        count: usize,
    },
    /// A projector spec that cannot be built or parsed.
    #[error("projector `{kind}`: {reason}")]
    Projector {
        /// The projector kind, e.g. `mlp2x_gelu`.
        kind: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A chat template failed to parse or render (including `raise_exception`).
    #[error("chat template `{template}`: {source}")]
    Template {
        /// Which template: the built-in name or where the source came from.
        template: String,
        /// The minijinja error (its display includes the line when known).
        #[source]
        source: Box<minijinja::Error>,
    },
    /// The tokenizer failed to encode text.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// Truncation to the model's maximum length would cut a placeholder run in half.
    #[error(
        "truncating to model_max_length {max_length} would cut `{token}` item {item_index} \
         (positions {start}..{end}); the row is rejected"
    )]
    PlaceholderCut {
        /// The modality token of the cut span.
        token: String,
        /// Which item of that modality (0-based).
        item_index: usize,
        /// First position of the span.
        start: usize,
        /// One past the last position of the span.
        end: usize,
        /// The maximum length that was asked for.
        max_length: usize,
    },
    /// Projected item embeddings do not fit the span they are spliced into.
    #[error(
        "splice: sequence {sequence}, span of modality {modality} item {item_index} at \
         {start}..{end}: {reason}"
    )]
    SpliceShape {
        /// Index of the sequence in the batch.
        sequence: usize,
        /// Modality index of the span.
        modality: usize,
        /// Item index of the span.
        item_index: usize,
        /// First position of the span.
        start: usize,
        /// One past the last position of the span.
        end: usize,
        /// What did not match.
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
    /// A JSON document is malformed or lacks an expected field.
    #[error("{what}: {reason}")]
    Json {
        /// Which document, e.g. a path to `tokenizer_config.json`.
        what: String,
        /// What is wrong with it.
        reason: String,
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

    /// A [`Error::Projector`] for `kind` with a reason.
    pub(crate) fn projector(kind: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Projector {
            kind: kind.into(),
            reason: reason.into(),
        }
    }

    /// A [`Error::Template`] for the template named `template`.
    pub(crate) fn template(template: impl Into<String>, source: minijinja::Error) -> Self {
        Error::Template {
            template: template.into(),
            source: Box::new(source),
        }
    }
}
