//! The jpeg decoder against Pillow (libjpeg-turbo) on the fixtures of
//! `xtask/fixtures/jpeg.py`: the same pixels to the bit. And hostile jpegs:
//! truncated, corrupt, oversized; each gives an error naming the item, never a
//! panic or an abort.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use multitoken_core::Item;
use multitoken_vision::{decode_bytes, decode_item, DecodeLimits, Error};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/jpeg")
}

fn image(name: &str) -> Vec<u8> {
    std::fs::read(fixtures().join("images").join(name)).unwrap()
}

#[test]
fn decodes_every_fixture_exactly_as_pillow() {
    let expected: HashMap<String, Tensor> =
        candle_core::safetensors::load(fixtures().join("decoded.safetensors"), &Device::Cpu)
            .unwrap();
    assert!(expected.len() >= 20, "only {} fixtures", expected.len());
    let mut wrong = Vec::new();
    for (name, want) in &expected {
        let got = decode_item(
            &Item::Path(fixtures().join("images").join(name)),
            &DecodeLimits::default(),
        )
        .unwrap();
        let (h, w, c) = want.dims3().unwrap();
        assert_eq!((got.height, got.width, c), (h, w, 3), "{name}: size");
        let want = want.flatten_all().unwrap().to_vec1::<u8>().unwrap();
        let differ = got.pixels.iter().zip(&want).filter(|(a, b)| a != b).count();
        if differ > 0 {
            let max = got
                .pixels
                .iter()
                .zip(&want)
                .map(|(a, b)| a.abs_diff(*b))
                .max()
                .unwrap_or(0);
            wrong.push(format!("{name}: {differ} bytes differ, by up to {max}"));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

/// Decodes `bytes` and returns the error message; panics if it decodes.
fn error_of(bytes: &[u8], limits: &DecodeLimits) -> String {
    match decode_bytes(bytes, "x", limits) {
        Ok(image) => panic!(
            "decoded {}x{}, expected an error",
            image.width, image.height
        ),
        Err(e) => {
            let message = e.to_string();
            assert!(message.starts_with("image x: "), "{message}");
            message
        }
    }
}

#[test]
fn truncated_jpegs_are_refused_as_pillow_refuses_them() {
    let d = DecodeLimits::default();
    for name in [
        "s420_q75_64x48.jpg",
        "progressive_s420_q75_45x31.jpg",
        "cmyk_q90_30x22.jpg",
    ] {
        let jpg = image(name);
        let whole = decode_bytes(&jpg, "x", &d).unwrap();
        // Cut anywhere, even just the last byte of the end-of-image marker: Pillow
        // says "image file is truncated"; libjpeg alone would pad with grey.
        for cut in [1, 2, 3, 10, jpg.len() / 2, jpg.len() - 200] {
            let message = error_of(&jpg[..jpg.len() - cut], &d);
            assert!(
                message.contains("truncated"),
                "{name} less {cut} bytes: {message}"
            );
        }
        for cut in [2, 20, 100] {
            error_of(&jpg[..cut], &d);
        }
        // A scan cut short but closed by an end-of-image marker decodes (libjpeg
        // warns and pads); Pillow decodes it too.
        let mut closed = jpg[..jpg.len() - 50].to_vec();
        closed.extend_from_slice(&[0xFF, 0xD9]);
        let padded = decode_bytes(&closed, "x", &d).unwrap();
        assert_eq!((padded.width, padded.height), (whole.width, whole.height));
        // Bytes after the end-of-image marker are ignored.
        let mut trailing = jpg.clone();
        trailing.extend_from_slice(b"trailing junk");
        assert_eq!(decode_bytes(&trailing, "x", &d).unwrap(), whole, "{name}");
    }
}

/// Where the SOF segment's height and width are (after `FF C0|C1|C2 len P`).
fn sof_dimensions_at(jpg: &[u8]) -> usize {
    let at = jpg
        .windows(2)
        .position(|w| w[0] == 0xFF && matches!(w[1], 0xC0..=0xC2))
        .unwrap();
    at + 5
}

#[test]
fn oversized_jpegs_are_refused_from_the_header() {
    let d = DecodeLimits::default();
    let mut jpg = image("s420_q75_64x48.jpg");
    let at = sof_dimensions_at(&jpg);
    // 60000 x 60000: refused before libjpeg allocates a row.
    jpg[at..at + 4].copy_from_slice(&[0xEA, 0x60, 0xEA, 0x60]);
    let message = error_of(&jpg, &d);
    assert!(
        message.contains("60000x60000 exceeds the limit of 89478485 pixels"),
        "{message}"
    );
    let small = DecodeLimits {
        max_pixels: 100,
        max_side: 1000,
    };
    let message = error_of(&image("s420_q75_64x48.jpg"), &small);
    assert!(
        message.contains("64x48 exceeds the limit of 100 pixels"),
        "{message}"
    );
    let narrow = DecodeLimits {
        max_pixels: 1 << 30,
        max_side: 40,
    };
    assert!(matches!(
        decode_bytes(&image("s420_q75_64x48.jpg"), "x", &narrow),
        Err(Error::TooLarge {
            width: 64,
            height: 48,
            ..
        })
    ));
    // Zero height (a DNL-sized image, which neither libjpeg nor Pillow takes).
    let mut jpg = image("s420_q75_64x48.jpg");
    jpg[at..at + 2].copy_from_slice(&[0, 0]);
    error_of(&jpg, &d);
}

/// A small xorshift generator: reproducible without a `rand` dependency.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[test]
fn corrupt_jpegs_give_errors_or_pixels_never_a_panic() {
    let d = DecodeLimits::default();
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    let (mut decoded, mut refused) = (0, 0);
    let mut tally = |result: Result<multitoken_vision::RgbImage, Error>| match result {
        Ok(image) => {
            assert_eq!(image.pixels.len(), image.width * image.height * 3);
            decoded += 1;
        }
        Err(e) => {
            assert!(e.to_string().starts_with("image x: "), "{e}");
            refused += 1;
        }
    };
    for name in [
        "s420_q75_64x48.jpg",
        "progressive_s444_q90_40x40.jpg",
        "restarts_s420_q75_64x40.jpg",
        "gray_progressive_q50_35x21.jpg",
        "cmyk_q90_30x22.jpg",
        "exif6_s420_q80_36x20.jpg",
    ] {
        let jpg = image(name);
        let sos = jpg.windows(2).position(|w| w == [0xFF, 0xDA]).unwrap();
        for round in 0..60 {
            let mut bytes = jpg.clone();
            if round % 3 == 0 {
                // Anywhere, headers and tables included.
                for _ in 0..1 + rng.below(8) {
                    let i = 2 + rng.below(bytes.len() - 2);
                    bytes[i] = rng.next() as u8;
                }
            } else if round % 3 == 1 {
                // Entropy-coded data only.
                for _ in 0..1 + rng.below(20) {
                    let i = sos + 2 + rng.below(bytes.len() - sos - 4);
                    bytes[i] = rng.next() as u8;
                }
            } else {
                // A valid header, then random bytes (with an end-of-image marker).
                bytes.truncate(sos + 2 + rng.below(bytes.len() - sos - 2));
                bytes.extend((0..rng.below(3000)).map(|_| rng.next() as u8));
                bytes.extend_from_slice(&[0xFF, 0xD9]);
            }
            tally(decode_bytes(&bytes, "x", &d));
        }
    }
    // Random bytes after a bare start-of-image marker.
    for _ in 0..100 {
        let mut bytes = vec![0xFF, 0xD8, 0xFF];
        bytes.extend((0..rng.below(500)).map(|_| rng.next() as u8));
        bytes.extend_from_slice(&[0xFF, 0xD9]);
        tally(decode_bytes(&bytes, "x", &d));
    }
    assert!(
        decoded > 0 && refused > 0,
        "decoded {decoded}, refused {refused}"
    );
}
