//! The `Modality` trait: how an encoder plugs into multitoken.

use std::path::PathBuf;

use candle_core::Tensor;

use crate::{ProjectorSpec, Result};

/// One item given to a modality: an image, an audio clip, a document.
///
/// URLs are fetched only by the CLI/server layer, never by a modality.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    /// A file on disk.
    Path(PathBuf),
    /// Raw file bytes.
    Bytes(Vec<u8>),
    /// Inline text (documents).
    Text(String),
}

/// A pluggable encoder for one kind of input.
pub trait Modality: Send + Sync {
    /// Builder name, e.g. `vision_clip`.
    fn name(&self) -> &str;
    /// The token that stands for one item in the text, e.g. `<image>`.
    fn token(&self) -> &str;
    /// The dataset row key that lists the items, e.g. `images`.
    fn data_key(&self) -> &str;
    /// Number of LM positions one item occupies.
    fn token_width(&self) -> usize;
    /// Width of the encoder features fed to the projector.
    fn feature_dim(&self) -> usize;
    /// CPU work on one item: decode, resize/normalize, resample, log-mel, chunk.
    fn preprocess(&self, item: &Item) -> Result<Tensor>;
    /// The frozen encoder on a batch of preprocessed items.
    fn encode(&self, batch: &Tensor) -> Result<Tensor>;
    /// The projector that maps this modality's features into the LM's
    /// embedding space (built with [`crate::Projector::load`]).
    fn projector(&self) -> ProjectorSpec;
}
