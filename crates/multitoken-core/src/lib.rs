//! Core contracts of multitoken.
//!
//! This crate knows no concrete encoder and no concrete language model. It defines
//! the [`Modality`] trait and its registry, projector specs and modules, chat
//! templates, the [`InputPreparer`] that turns messages + items into token ids,
//! labels and placeholder spans, the splice of projected embeddings into the token
//! embeddings, batch collation, and the small [`LanguageModel`] trait through which
//! everything else talks to a decoder.

pub mod error;
pub mod lm;
pub mod modality;

pub use error::{Error, Result};
pub use lm::{KvCache, LanguageModel, LogitsSelection};
pub use modality::{Item, Modality};
