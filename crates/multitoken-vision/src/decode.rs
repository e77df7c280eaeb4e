//! Image decoding: bytes in any supported format to an 8-bit RGB image.
//!
//! png, jpeg, webp, bmp and gif (first frame) are decoded with the `image` crate.
//! The result matches what a LLaVA-style Python pipeline feeds its processor
//! (`Image.open(p)`, `ImageOps.exif_transpose`, `.convert("RGB")`), except that
//! transparent pixels are composited on white with Pillow's own integer
//! `alpha_composite` arithmetic rather than dropped to whatever colour they hide.
//! Image dimensions are checked against [`DecodeLimits`] before any pixel is
//! decoded, so a decompression bomb costs a header read.

use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits};
use multitoken_core::Item;

use crate::{Error, Result};

/// An 8-bit RGB image, rows top to bottom, pixels interleaved (`HWC`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// `height * width * 3` bytes.
    pub pixels: Vec<u8>,
}

impl RgbImage {
    /// An image filled with one colour.
    pub fn filled(width: usize, height: usize, rgb: [u8; 3]) -> Self {
        let mut pixels = Vec::with_capacity(width * height * 3);
        for _ in 0..width * height {
            pixels.extend_from_slice(&rgb);
        }
        Self {
            width,
            height,
            pixels,
        }
    }

    /// The pixel at column `x`, row `y`.
    pub fn pixel(&self, x: usize, y: usize) -> [u8; 3] {
        let at = (y * self.width + x) * 3;
        [self.pixels[at], self.pixels[at + 1], self.pixels[at + 2]]
    }
}

/// Limits that keep a hostile file from exhausting memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Most pixels (`width * height`) an image may declare; Pillow's
    /// `MAX_IMAGE_PIXELS` (89,478,485) by default.
    pub max_pixels: u64,
    /// Most pixels along either side.
    pub max_side: u32,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        Self {
            max_pixels: 89_478_485,
            max_side: 65_535,
        }
    }
}

/// A short description of an item for error messages: its path, or its size.
pub fn describe_item(item: &Item) -> String {
    match item {
        Item::Path(path) => path.display().to_string(),
        Item::Bytes(bytes) => format!("<{} bytes>", bytes.len()),
        Item::Text(text) => format!("<text of {} chars>", text.chars().count()),
    }
}

/// Decodes an [`Item`] (a path or bytes) to RGB.
pub fn decode_item(item: &Item, limits: &DecodeLimits) -> Result<RgbImage> {
    let name = describe_item(item);
    match item {
        Item::Path(path) => {
            let bytes = std::fs::read(path).map_err(|source| Error::Io {
                path: path.clone(),
                source,
            })?;
            decode_bytes(&bytes, &name, limits)
        }
        Item::Bytes(bytes) => decode_bytes(bytes, &name, limits),
        Item::Text(_) => Err(Error::UnsupportedItem {
            item: name,
            reason: "inline text is not an image; give a path or the file's bytes".to_string(),
        }),
    }
}

/// Decodes image file bytes to RGB; `item` names the image in errors.
pub fn decode_bytes(bytes: &[u8], item: &str, limits: &DecodeLimits) -> Result<RgbImage> {
    let fail = |reason: String| Error::Decode {
        item: item.to_string(),
        reason,
    };
    if bytes.is_empty() {
        return Err(fail("the file is empty".to_string()));
    }
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| fail(e.to_string()))?;
    match reader.format() {
        Some(
            ImageFormat::Png
            | ImageFormat::Jpeg
            | ImageFormat::WebP
            | ImageFormat::Bmp
            | ImageFormat::Gif,
        ) => {}
        Some(other) => {
            return Err(fail(format!(
                "unsupported image format {other:?} (supported: png, jpeg, webp, bmp, gif)"
            )))
        }
        None => {
            return Err(fail(
                "not a recognised image (supported: png, jpeg, webp, bmp, gif)".to_string(),
            ))
        }
    }
    // zune-jpeg fills a truncated scan with grey where Pillow refuses the file.
    if reader.format() == Some(ImageFormat::Jpeg) && !bytes.windows(2).any(|w| w == [0xFF, 0xD9]) {
        return Err(fail("truncated jpeg: no end-of-image marker".to_string()));
    }
    let mut image_limits = Limits::default();
    image_limits.max_image_width = Some(limits.max_side);
    image_limits.max_image_height = Some(limits.max_side);
    // RGBA16 is the widest layout a decoder may allocate; leave room for one copy.
    image_limits.max_alloc = Some(limits.max_pixels.saturating_mul(8).saturating_add(1 << 20));
    reader.limits(image_limits);
    let mut decoder = reader.into_decoder().map_err(|e| fail(e.to_string()))?;
    let (width, height) = decoder.dimensions();
    check_dimensions(item, width, height, limits)?;
    let orientation = decoder
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut image = DynamicImage::from_decoder(decoder).map_err(|e| fail(e.to_string()))?;
    image.apply_orientation(orientation);
    Ok(to_rgb_on_white(&image))
}

/// Rejects empty images and images past the limits, before decoding pixels.
fn check_dimensions(item: &str, width: u32, height: u32, limits: &DecodeLimits) -> Result<()> {
    if width == 0 || height == 0 {
        return Err(Error::Empty {
            item: item.to_string(),
            width,
            height,
        });
    }
    let pixels = u64::from(width) * u64::from(height);
    if pixels > limits.max_pixels || width > limits.max_side || height > limits.max_side {
        return Err(Error::TooLarge {
            item: item.to_string(),
            width: u64::from(width),
            height: u64::from(height),
            max_pixels: limits.max_pixels,
            max_side: limits.max_side,
        });
    }
    Ok(())
}

/// RGB of a decoded image; transparency is composited on white.
fn to_rgb_on_white(image: &DynamicImage) -> RgbImage {
    let width = image.width() as usize;
    let height = image.height() as usize;
    let pixels = if image.color().has_alpha() {
        let rgba = image.to_rgba8();
        let mut pixels = Vec::with_capacity(width * height * 3);
        for px in rgba.as_raw().chunks_exact(4) {
            let alpha = u32::from(px[3]);
            for &channel in &px[..3] {
                pixels.push(over_white(u32::from(channel), alpha));
            }
        }
        pixels
    } else {
        image.to_rgb8().into_raw()
    };
    RgbImage {
        width,
        height,
        pixels,
    }
}

/// One channel of Pillow's `ImagingAlphaComposite` with an opaque white
/// destination (7 bits of extra precision, rounded division by 255).
fn over_white(src: u32, alpha: u32) -> u8 {
    const PRECISION_BITS: u32 = 7;
    if alpha == 0 {
        return 255;
    }
    let coef1 = alpha << PRECISION_BITS;
    let coef2 = (255 << PRECISION_BITS) - coef1;
    let tmp = src * coef1 + 255 * coef2 + (0x80 << PRECISION_BITS);
    let value = (((tmp >> 8) + tmp) >> 8) >> PRECISION_BITS;
    value.min(255) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn over_white_matches_pillow_corner_cases() {
        // alpha 255 keeps the colour, alpha 0 gives white, half alpha blends.
        assert_eq!(over_white(10, 255), 10);
        assert_eq!(over_white(10, 0), 255);
        assert_eq!(over_white(0, 128), 127);
    }
}
