//! Fuzz target: arbitrary bytes decoded as an image (with a small
//! decompression-bomb limit) and, when they decode, preprocessed with the
//! CLIP and LLaVA pad-to-square settings must give pixels or an error, never
//! panic, hang or allocate without bound.

#![no_main]

use libfuzzer_sys::fuzz_target;
use multitoken_vision::{decode_bytes, DecodeLimits, ImageProcessorConfig};

fuzz_target!(|data: &[u8]| {
    let limits = DecodeLimits { max_pixels: 1 << 22, max_side: 1 << 13 };
    let Ok(image) = decode_bytes(data, "fuzz input", &limits) else { return };
    let llava = serde_json::json!({
        "image_processor_type": "LlavaImageProcessor", "do_pad": true,
        "size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}
    });
    let configs = [Some(ImageProcessorConfig::default()), ImageProcessorConfig::from_json(&llava, "fuzz llava").ok()];
    for config in configs.into_iter().flatten() {
        if let Ok((values, h, w)) = config.preprocess(&image) {
            assert_eq!(values.len(), 3 * h * w, "pixel buffer and reported size disagree");
        }
    }
});
