//! Fuzz target: arbitrary bytes decoded as an image (with a small
//! decompression-bomb limit) and, when they decode, preprocessed with the
//! CLIP and LLaVA pad-to-square settings and with Idefics2's (split into 5
//! crops) must give pixels or an error, never panic, hang or allocate without
//! bound.

#![no_main]

use libfuzzer_sys::fuzz_target;
use multitoken_vision::{decode_bytes, pack_crops, DecodeLimits, Idefics2ProcessorConfig, ImageProcessorConfig};

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
    let idefics2 = serde_json::json!({"do_image_splitting": true, "size": {"shortest_edge": 16, "longest_edge": 48}});
    if let Ok(config) = Idefics2ProcessorConfig::from_json(&idefics2, "fuzz idefics2") {
        if let Ok(crops) = config.preprocess(&image) {
            assert_eq!(crops.len(), 5, "a split image has 5 crops");
            let (data, n, h, w) = pack_crops(&crops);
            assert_eq!(data.len(), n * 4 * h * w, "packed buffer and reported size disagree");
        }
    }
});
