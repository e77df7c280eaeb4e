//! Core contracts of multitoken.
//!
//! This crate knows no concrete encoder and no concrete language model. It defines
//! the [`Modality`] trait and its registry, projector specs and modules, chat
//! templates, the [`InputPreparer`] that turns messages + items into token ids,
//! labels and placeholder spans, the splice of projected embeddings into the token
//! embeddings, batch collation, and the small [`LanguageModel`] trait through which
//! everything else talks to a decoder.
//!
//! The data flow, in the order the modules are used:
//!
//! 1. [`ChatTemplate`] renders messages with the model's own jinja template.
//! 2. [`InputPreparer`] splits the text at modality tokens, replaces each by its
//!    item's [`ItemLayout`] (text pieces and runs of embedding slots; a
//!    fixed-width modality's is `token_width` slots), tokenizes the text and
//!    builds labels, giving a [`PreparedInput`] with its [`PlaceholderSpan`]s.
//! 3. Each [`Modality`] preprocesses and encodes its items ([`encode_item`]); a
//!    [`Projector`] maps the features to the item's `[slots, lm_hidden]` rows
//!    ([`project_item`]).
//! 4. [`collate()`] pads a batch; [`splice_embeddings`] writes the projected items
//!    into the LM's token embeddings at the spans.

// Tests may unwrap and panic: a failure there is the report.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod chat_template;
pub mod collate;
pub mod error;
pub mod lm;
pub mod modality;
pub mod preparer;
pub mod projector;
pub mod registry;
pub mod splice;

/// Re-exported so that a modality crate can write
/// `multitoken_core::inventory::submit!` without depending on `inventory`.
pub use inventory;

pub use chat_template::{ChatTemplate, Message, RenderedChat};
pub use collate::{collate, Batch, CollateConfig, PaddingSide};
pub use error::{Error, Result};
pub use lm::{KvCache, LanguageModel, LogitsSelection};
pub use modality::{check_regular_file, item_from_json, EncoderWeights, Item, ItemLayout, ItemLimits, ItemMedia, LayoutPart, Modality, TextRule};
pub use preparer::{
    InputPreparer, ItemsByKey, LayoutSource, LeadingSpecialTokens, ModalityToken, PlaceholderSpan, PreparedInput,
    PreparerConfig, IGNORE_INDEX, substitute_text_items, TextModality, RopePositions, LITERAL_END, LITERAL_START,
};
pub use projector::{Projector, ProjectorSpec};
pub use registry::{
    build_modality, build_text_modality, builder_names, builders, find_builder, guard, install_panic_hook, is_text_modality,
    load_into_varmap,
    modality_infos, registered_tokens, ModalityInfo, ModalityBuilder, ModalityContext, TextModalityBuilder,
};
pub use splice::{encode_item, project_item, span_embeddings, splice_embeddings, SpanEmbedding};
