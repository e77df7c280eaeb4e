//! The vision modalities of multitoken: `<image>` items in prompts.
//!
//! - [`decode`]: png, jpeg, webp, bmp, gif (first frame) to RGB, alpha on white,
//!   EXIF orientation applied, a decompression-bomb limit.
//! - [`resample`]: Pillow's resampling filters, bit for bit.
//! - [`processor`]: `CLIPImageProcessor`-equal preprocessing (and LLaVA-1.5's pad
//!   to square), configured from `preprocessor_config.json`.
//! - [`clip`]: the CLIP vision tower with every layer's hidden states and the
//!   feature selection of LLaVA (`vision_feature_layer`, `default`/`full`) and
//!   multi_token (pooled).
//! - [`modality`]: the `vision_clip` and `vision_clip_pool` builders, registered
//!   with the core registry; linking this crate is all a binary needs.
//! - [`presets`]: named recipes as data (`llava-1.5`, `jnana`).
//! - [`idefics2_processor`]: `Idefics2ImageProcessor`-equal preprocessing
//!   (4 quarter crops + the whole image, edge-bounded resize, pixel masks).
//! - [`siglip`]: Idefics2's SigLIP tower with NaViT position buckets, images
//!   of any size and aspect ratio.
//! - [`siglip_modality`]: the `vision_siglip` builder (Idefics2's images:
//!   `<fake_token_around_image>`-wrapped crops, one piece per crop).
//! - [`anyres`], [`anyres_modality`]: LLaVA-NeXT / OneVision AnyRes tiles and the
//!   `vision_anyres` builder (CLIP or plain SigLIP tower).
//! - [`qwen2_vl_processor`]: `Qwen2VLImageProcessor`-equal preprocessing
//!   (`smart_resize`, patch rows in merge-window order, `image_grid_thw`).
//! - [`qwen2_vl`]: Qwen2-VL's vision tower (Conv3d patch embedding, 2-D rotary
//!   attention; Qwen2.5-VL's window attention, RMSNorm, gated MLP), its patch
//!   merger being the core projector `qwen2_vl_merger`.
//! - [`qwen2_vl_modality`]: the `vision_qwen2_vl` builder (`<|image_pad|>`:
//!   one slot per merged patch, with its position grid).
//! - [`idefics3_processor`]: `Idefics3ImageProcessor`-equal preprocessing (also
//!   SmolVLM's): longest-edge resize, `max_image_size` tiles + the whole image.
//! - [`idefics3_modality`]: the `vision_idefics3` builder (Idefics3 / SmolVLM:
//!   `<row_r_col_c>` tiles and `<global-img>`, pixel-shuffle connector).

// Tests may unwrap and panic: a failure there is the report.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod clip;
pub mod anyres;
pub mod anyres_modality;
pub mod decode;
pub mod error;
pub mod idefics2_processor;
pub mod idefics3_modality;
pub mod idefics3_processor;
pub mod modality;
pub mod presets;
pub mod processor;
pub mod qwen2_vl;
pub mod qwen2_vl_modality;
pub mod qwen2_vl_processor;
mod qwen2_vl_weights;
pub mod resample;
pub mod siglip;
pub mod siglip_modality;

pub use clip::{ClipVisionConfig, ClipVisionOutput, ClipVisionTower, FeatureSelect};
pub use decode::{decode_bytes, decode_bytes_with, decode_item, decode_item_with, describe_item, DecodeLimits, RgbImage, Transparency};
pub use error::{Error, Result};
pub use idefics2_processor::{pack_crops, Crop, Idefics2ProcessorConfig, Idefics2Resize};
pub use modality::{VisionClip, VisionClipConfig, VisionMode, IMAGES_KEY, IMAGE_TOKEN};
pub use processor::{ImageProcessorConfig, ResizeTo};
pub use resample::{resize, resize_window, ResampleFilter, Window};
pub use siglip::{navit_position_ids, SiglipVisionConfig, SiglipVisionTower};
pub use siglip_modality::{VisionSiglip, VisionSiglipConfig, FAKE_IMAGE_TOKEN};
pub use qwen2_vl::{vision_position_ids, window_order, Qwen2VisionConfig, Qwen2VisionTower};
pub use qwen2_vl_modality::{VisionQwen2Vl, VisionQwen2VlConfig, QWEN2_VL_IMAGE_TOKEN};
pub use qwen2_vl_processor::{smart_resize, Qwen2VlPatches, Qwen2VlProcessorConfig};
pub use idefics3_modality::{PatchRule, VisionIdefics3, VisionIdefics3Config, GLOBAL_IMAGE_TOKEN};
pub use idefics3_processor::{Idefics3ProcessorConfig, Idefics3Resize, Idefics3Tiles};

/// Forces the linker to keep this crate's `inventory` registrations
/// (`vision_clip`, `vision_clip_pool`, `vision_siglip`) in a binary: call it
/// once (e.g. from `main`); it does nothing else.
pub fn link() {
    modality::keep_registration();
    siglip_modality::keep_registration();
    anyres_modality::keep_registration();
    qwen2_vl_modality::keep_registration();
    idefics3_modality::keep_registration();
}
