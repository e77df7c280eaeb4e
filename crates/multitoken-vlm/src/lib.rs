//! multitoken-vlm: checkpoint importers for vision-language model families, one
//! folder per family (mistral.rs's folder-per-model, without its giant loader).
//!
//! Each family translates its `config.json` into our runtime configs, maps its
//! checkpoint keys onto our LM's and builds its towers through the core registry
//! by name (the tower and processor code lives in the modality crates). Importers
//! register themselves with multitoken-lm's [`MultimodalImporter`] inventory, so
//! `MultimodalModel::load` (and so `generate`, `chat`, `serve`, `train`) loads
//! those directories as they are.
//!
//! - [`idefics2`]: `Idefics2ForConditionalGeneration` and Cephalo's
//!   mixture-of-experts checkpoints (`model_type: idefics2_moe`).
//! - [`llava_next`]: `LlavaNextForConditionalGeneration` and
//!   `LlavaOnevisionForConditionalGeneration` (AnyRes tiles, `image_newline`).
//! - [`idefics3`]: `Idefics3ForConditionalGeneration` and
//!   `SmolVLMForConditionalGeneration` (`model_type` `idefics3` / `smolvlm`).
//! - [`qwen2_vl`]: `Qwen2VLForConditionalGeneration` and
//!   `Qwen2_5_VLForConditionalGeneration` (dynamic resolution, M-RoPE
//!   positions; Qwen2.5-VL's window-attention tower).
//!
//! [`MultimodalImporter`]: multitoken_lm::multimodal::MultimodalImporter

pub mod error;
pub mod idefics2;
pub mod llava_next;
pub mod idefics3;
pub mod qwen2_vl;

pub use error::{Error, Result};

/// Forces the linker to keep this crate's `inventory` registrations in a
/// binary: call it once (e.g. from `main`); it does nothing else.
pub fn link() {
    std::hint::black_box(idefics2::is_idefics2_dir as fn(&std::path::Path) -> bool);
    std::hint::black_box(llava_next::is_llava_next_dir as fn(&std::path::Path) -> bool);
    std::hint::black_box(idefics3::is_idefics3_dir as fn(&std::path::Path) -> bool);
    std::hint::black_box(qwen2_vl::is_qwen2_vl_dir as fn(&std::path::Path) -> bool);
}
