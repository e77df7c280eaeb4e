//! The multitoken facade: re-exports the workspace crates so that a user needs
//! one dependency, and links every modality crate into the binary.

pub use multitoken_audio as audio;
pub use multitoken_core as core;
pub use multitoken_document as document;
pub use multitoken_lm as lm;
pub use multitoken_vision as vision;
pub use multitoken_vlm as vlm;
