//! Broken, hostile and unsupported inputs give clear errors naming the item.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

use multitoken_core::Item;
use multitoken_vision::{decode_bytes, decode_item, DecodeLimits, ImageProcessorConfig, RgbImage};

fn fixture(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/vision/images").join(name);
    std::fs::read(path).unwrap()
}

/// Decodes `bytes` as item `x` and checks that the error contains `expect`.
fn check(bytes: &[u8], limits: DecodeLimits, expect: &str) {
    match decode_bytes(bytes, "x", &limits) {
        Ok(image) => panic!("decoded {}x{} but expected an error with {expect:?}", image.width, image.height),
        Err(e) => {
            let message = e.to_string();
            assert!(message.starts_with("image x: "), "{message}");
            assert!(message.contains(expect), "{message:?} lacks {expect:?}");
        }
    }
}

/// A BMP header declaring `width x height` with no pixel data after it.
fn bmp_header(width: i32, height: i32) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(b"BM");
    b.extend_from_slice(&54u32.to_le_bytes());
    b.extend_from_slice(&[0; 4]);
    b.extend_from_slice(&54u32.to_le_bytes());
    b.extend_from_slice(&40u32.to_le_bytes());
    b.extend_from_slice(&width.to_le_bytes());
    b.extend_from_slice(&height.to_le_bytes());
    b.extend_from_slice(&1u16.to_le_bytes());
    b.extend_from_slice(&24u16.to_le_bytes());
    b.extend_from_slice(&[0; 24]);
    b
}

#[test]
fn broken_inputs_give_errors_naming_the_item() {
    let d = DecodeLimits::default();
    check(b"", d, "the file is empty");
    check(b"hello, I am not an image", d, "not a recognised image");
    check(&[0u8; 64], d, "not a recognised image");
    // Formats `image` knows but we do not take.
    check(b"P6\n2 2\n255\n000000000000", d, "unsupported image format");
    let png = fixture("rgb_96x64.png");
    check(&png[..png.len() / 2], d, "");
    check(&png[..40], d, "");
    let jpg = fixture("rgb_64x48.jpg");
    check(&jpg[..jpg.len() / 3], d, "");
    let mut corrupt = png.clone();
    for b in corrupt.iter_mut().skip(60).take(200) {
        *b ^= 0x5a;
    }
    check(&corrupt, d, "");
    let gif = fixture("anim_37x29.gif");
    check(&gif[..gif.len() / 2], d, "");
    let webp = fixture("rgb_45x36.webp");
    check(&webp[..webp.len() / 2], d, "");
    // Absurd dimensions are refused from the header, before any allocation.
    check(&bmp_header(60_000, 60_000), d, "exceeds the limit of 89478485 pixels");
    let small = DecodeLimits { max_pixels: 100, max_side: 1000 };
    check(&png, small, "96x64 exceeds the limit of 100 pixels");
    check(&bmp_header(0, 10), d, "");
}

#[test]
fn items_name_themselves_in_errors() {
    let d = DecodeLimits::default();
    let missing = decode_item(&Item::Path("/nonexistent/cat.png".into()), &d).unwrap_err();
    assert!(missing.to_string().contains("/nonexistent/cat.png"), "{missing}");
    let text = decode_item(&Item::Text("a cat".into()), &d).unwrap_err();
    assert!(text.to_string().contains("inline text is not an image"), "{text}");
    let bytes = decode_item(&Item::Bytes(b"junk".to_vec()), &d).unwrap_err();
    assert!(bytes.to_string().starts_with("image <4 bytes>:"), "{bytes}");
}

#[test]
fn bad_processor_configs_are_explained() {
    let check = |json: serde_json::Value, expect: &str| {
        let err = ImageProcessorConfig::from_json(&json, "cfg").unwrap_err().to_string();
        assert!(err.contains(expect), "{err:?} lacks {expect:?}");
    };
    check(serde_json::json!({"size": {"longest": 3}}), "needs `shortest_edge`");
    check(serde_json::json!({"size": 0}), "positive integer");
    check(serde_json::json!({"crop_size": {"height": -1, "width": 2}}), "positive integer");
    check(serde_json::json!({"image_mean": [0.5, 0.5]}), "3 numbers");
    check(serde_json::json!({"image_std": [0.0, 1.0, 1.0]}), "non-zero");
    check(serde_json::json!({"resample": 0}), "not supported");
    // Tiny and extreme aspect ratios do not panic.
    let config = ImageProcessorConfig::default();
    for (w, h) in [(1, 1), (1, 500), (500, 1), (3, 2)] {
        let (values, oh, ow) = config.preprocess(&RgbImage::filled(w, h, [9, 9, 9])).unwrap();
        assert_eq!((values.len(), oh, ow), (3 * 224 * 224, 224, 224), "{w}x{h}");
    }
    assert!(config.preprocess(&RgbImage::filled(0, 5, [0; 3])).is_err());
}
