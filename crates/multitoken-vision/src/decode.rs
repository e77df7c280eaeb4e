//! Image decoding: bytes in any supported format to an 8-bit RGB image.
//!
//! png, webp, bmp and gif (first frame) are decoded with the `image` crate; jpeg
//! with libjpeg-turbo's decoder (the `mozjpeg` crate, its C code built by `cc`),
//! configured as Pillow configures its libjpeg-turbo, so that jpeg pixels are
//! Pillow's to the bit (islow IDCT, fancy upsampling, libjpeg's YCbCr tables).
//! The result matches what a LLaVA-style Python pipeline feeds its processor
//! (`Image.open(p)`, `ImageOps.exif_transpose`, `.convert("RGB")`), except that
//! transparent pixels are composited on white with Pillow's own integer
//! `alpha_composite` arithmetic rather than dropped to whatever colour they hide.
//! Image dimensions are checked against [`DecodeLimits`] before any pixel is
//! decoded, so a decompression bomb costs a header read.

use std::cell::Cell;
use std::io::{BufRead, Cursor, Read};
use std::panic::{catch_unwind, AssertUnwindSafe};

use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits};
use mozjpeg::{ColorSpace, DctMethod, Decompress, Marker};
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

/// Decodes an [`Item`] (a path or bytes) to RGB, transparency over white.
pub fn decode_item(item: &Item, limits: &DecodeLimits) -> Result<RgbImage> {
    decode_item_with(item, limits, Transparency::OverWhite)
}

/// [`decode_item`] with a choice of what becomes of transparency.
pub fn decode_item_with(item: &Item, limits: &DecodeLimits, transparency: Transparency) -> Result<RgbImage> {
    let name = describe_item(item);
    match item {
        Item::Path(path) => {
            let bytes = std::fs::read(path).map_err(|source| Error::Io {
                path: path.clone(),
                source,
            })?;
            decode_bytes_with(&bytes, &name, limits, transparency)
        }
        Item::Bytes(bytes) => decode_bytes_with(bytes, &name, limits, transparency),
        Item::Text(_) => Err(Error::UnsupportedItem {
            item: name,
            reason: "inline text is not an image; give a path or the file's bytes".to_string(),
        }),
    }
}

/// What becomes of an image's transparency.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Transparency {
    /// Composited on white with Pillow's `alpha_composite` arithmetic
    /// (transformers' `convert_to_rgb`, which the image processors call).
    #[default]
    OverWhite,
    /// Dropped: the colour channels as stored, Pillow's `convert("RGB")`.
    /// Processors that load every image with transformers' `load_image`
    /// first (Idefics2's `Idefics2Processor.__call__`) see this.
    Dropped,
}

/// Decodes image file bytes to RGB; `item` names the image in errors.
pub fn decode_bytes(bytes: &[u8], item: &str, limits: &DecodeLimits) -> Result<RgbImage> {
    decode_bytes_with(bytes, item, limits, Transparency::OverWhite)
}

/// [`decode_bytes`] with a choice of what becomes of transparency.
pub fn decode_bytes_with(bytes: &[u8], item: &str, limits: &DecodeLimits, transparency: Transparency) -> Result<RgbImage> {
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
    if reader.format() == Some(ImageFormat::Jpeg) {
        return decode_jpeg(bytes, item, limits);
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
    let image = DynamicImage::from_decoder(decoder).map_err(|e| fail(e.to_string()))?;
    let mut image = to_pillow_depth(image).ok_or_else(|| fail("a 16-bit image whose pixels do not fill it".to_string()))?;
    image.apply_orientation(orientation);
    Ok(match transparency {
        Transparency::OverWhite => to_rgb_on_white(&image),
        Transparency::Dropped => {
            let rgb = image.to_rgb8();
            RgbImage { width: rgb.width() as usize, height: rgb.height() as usize, pixels: rgb.into_raw() }
        }
    })
}

/// Decodes a jpeg as Pillow does: libjpeg-turbo's decoder with its defaults
/// (islow IDCT, fancy upsampling), RGB out of YCbCr / RGB / grayscale files,
/// CMYK and YCCK files as CMYK, inverted (Pillow's `CMYK;I`, Adobe polarity) and
/// converted by Pillow's `cmyk2rgb`; then the EXIF orientation.
///
/// libjpeg reports a fatal error by unwinding out of its error handler (the
/// `mozjpeg` crate's `C-unwind` callbacks); that unwind is caught here and
/// becomes [`Error::Decode`]. Warnings (corrupt entropy data, which libjpeg
/// patches over) are ignored, as Pillow ignores them. A file that ends before
/// libjpeg has read its end-of-image marker is refused, as Pillow refuses it
/// ("image file is truncated"), although libjpeg would pad it with grey.
fn decode_jpeg(bytes: &[u8], item: &str, limits: &DecodeLimits) -> Result<RgbImage> {
    let fail = |reason: String| Error::Decode {
        item: item.to_string(),
        reason,
    };
    // Cheap first test: with no end-of-image marker anywhere the file is cut short.
    if !bytes.windows(2).any(|w| w == [0xFF, 0xD9]) {
        return Err(fail("truncated jpeg: no end-of-image marker".to_string()));
    }
    let ran_out = Cell::new(false);
    let source = WatchedSlice {
        rest: bytes,
        ran_out: &ran_out,
    };
    // Only the decoder's own state, dropped during the unwind, is touched by a
    // caught unwind; nothing of it is used afterwards.
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        decode_jpeg_pixels(source, item, limits)
    }));
    let (mut image, orientation) = match outcome {
        // libjpeg asked for bytes past the end (and went on with a fake end marker).
        Ok(Ok(_)) | Ok(Err(JpegFailure::Io(_))) | Err(_) if ran_out.get() => {
            return Err(fail(
                "truncated jpeg: the data ends before the image does".to_string(),
            ))
        }
        Ok(Ok(decoded)) => decoded,
        Ok(Err(JpegFailure::Limits(error))) => return Err(error),
        Ok(Err(JpegFailure::Io(error))) => return Err(fail(format!("libjpeg: {error}"))),
        Err(payload) => {
            let message = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied())
                .unwrap_or("libjpeg failed");
            let message = message
                .strip_prefix("libjpeg fatal error: ")
                .unwrap_or(message);
            return Err(fail(format!("libjpeg: {message}")));
        }
    };
    if orientation != Orientation::NoTransforms {
        image.apply_orientation(orientation);
    }
    let rgb = image.into_rgb8();
    Ok(RgbImage {
        width: rgb.width() as usize,
        height: rgb.height() as usize,
        pixels: rgb.into_raw(),
    })
}

/// Why [`decode_jpeg_pixels`] stopped without unwinding.
enum JpegFailure {
    /// The image is empty or past the limits.
    Limits(Error),
    /// The `mozjpeg` crate's own checks (allocation, short reads).
    Io(std::io::Error),
}

impl From<std::io::Error> for JpegFailure {
    fn from(error: std::io::Error) -> Self {
        Self::Io(error)
    }
}

/// The libjpeg part of [`decode_jpeg`]: header, limits, pixels, EXIF orientation.
/// A libjpeg error unwinds out of this function.
fn decode_jpeg_pixels(
    source: WatchedSlice<'_>,
    item: &str,
    limits: &DecodeLimits,
) -> std::result::Result<(DynamicImage, Orientation), JpegFailure> {
    let mut jpeg = Decompress::with_markers(&[Marker::APP(1)]).from_reader(source)?;
    let (width, height) = jpeg.size();
    check_dimensions(
        item,
        u32::try_from(width).unwrap_or(u32::MAX),
        u32::try_from(height).unwrap_or(u32::MAX),
        limits,
    )
    .map_err(JpegFailure::Limits)?;
    // Pillow reads the first Exif APP1 segment (later ones are appended to it).
    let orientation = jpeg
        .markers()
        .filter(|m| m.marker == Marker::APP(1))
        .find_map(|m| m.data.strip_prefix(b"Exif\0\0"))
        .and_then(Orientation::from_exif_chunk)
        .unwrap_or(Orientation::NoTransforms);
    // libjpeg's defaults, spelled out: they are what Pillow decodes with.
    jpeg.dct_method(DctMethod::IntegerSlow);
    jpeg.do_fancy_upsampling(true);
    let cmyk = jpeg.components().len() == 4;
    // Grayscale, YCbCr and RGB files come out as RGB (gray is copied to all three
    // channels, as Pillow's `L` to `RGB`); libjpeg refuses other layouts.
    let out_space = if cmyk {
        ColorSpace::JCS_CMYK
    } else {
        ColorSpace::JCS_RGB
    };
    let mut started = jpeg.to_colorspace(out_space)?;
    let (out_width, out_height) = (started.width(), started.height());
    let mut pixels: Vec<u8> = started.read_scanlines()?;
    started.finish()?;
    if cmyk {
        pixels = pixels
            .chunks_exact(4)
            .flat_map(inverted_cmyk_to_rgb)
            .collect();
    }
    let image = image::RgbImage::from_raw(out_width as u32, out_height as u32, pixels).ok_or_else(
        || {
            JpegFailure::Io(std::io::Error::other(
                "libjpeg returned fewer pixels than the image has",
            ))
        },
    )?;
    Ok((DynamicImage::ImageRgb8(image), orientation))
}

/// One pixel of a CMYK jpeg as Pillow sees it: libjpeg's CMYK samples inverted
/// (`CMYK;I`, Adobe's polarity, which Pillow always assumes), then Pillow's
/// `cmyk2rgb`: `255 - k - c * (255 - k) / 255` per channel, rounded its way.
fn inverted_cmyk_to_rgb(px: &[u8]) -> [u8; 3] {
    let nk = u32::from(px[3]); // 255 - (255 - k)
    let channel = |v: u8| {
        let c = 255 - u32::from(v);
        let tmp = c * nk + 128;
        let scaled = ((tmp >> 8) + tmp) >> 8;
        nk.saturating_sub(scaled) as u8
    };
    [channel(px[0]), channel(px[1]), channel(px[2])]
}

/// The bytes of a jpeg, handed to libjpeg in one piece; notes when libjpeg asks
/// for more after the last byte (a truncated file: libjpeg would go on with a
/// fake end-of-image marker and grey pixels).
struct WatchedSlice<'a> {
    rest: &'a [u8],
    ran_out: &'a Cell<bool>,
}

impl Read for WatchedSlice<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.fill_buf()?.len().min(buf.len());
        buf[..n].copy_from_slice(&self.rest[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl BufRead for WatchedSlice<'_> {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        if self.rest.is_empty() {
            self.ran_out.set(true);
        }
        Ok(self.rest)
    }

    fn consume(&mut self, amount: usize) {
        self.rest = &self.rest[amount.min(self.rest.len())..];
    }
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

/// 16-bit images as Pillow opens them (8-bit conversions in the `image` crate
/// round `v / 257` instead): 16-bit grayscale is Pillow's `I;16`, which its
/// conversions to `L` / `RGB` / `RGBA` clip to 255 (so most of a full-range image
/// is white); 16-bit RGB, RGBA and gray+alpha PNGs are unpacked to 8 bits by taking
/// each sample's high byte. `None` only if a buffer does not match its size.
fn to_pillow_depth(image: DynamicImage) -> Option<DynamicImage> {
    use image::ImageBuffer;
    fn high_bytes(samples: Vec<u16>) -> Vec<u8> {
        samples.into_iter().map(|v| (v >> 8) as u8).collect()
    }
    Some(match image {
        DynamicImage::ImageLuma16(img) => {
            let (w, h) = img.dimensions();
            let clipped = img.into_raw().into_iter().map(|v| v.min(255) as u8).collect();
            DynamicImage::ImageLuma8(ImageBuffer::from_raw(w, h, clipped)?)
        }
        DynamicImage::ImageLumaA16(img) => {
            let (w, h) = img.dimensions();
            DynamicImage::ImageLumaA8(ImageBuffer::from_raw(w, h, high_bytes(img.into_raw()))?)
        }
        DynamicImage::ImageRgb16(img) => {
            let (w, h) = img.dimensions();
            DynamicImage::ImageRgb8(ImageBuffer::from_raw(w, h, high_bytes(img.into_raw()))?)
        }
        DynamicImage::ImageRgba16(img) => {
            let (w, h) = img.dimensions();
            DynamicImage::ImageRgba8(ImageBuffer::from_raw(w, h, high_bytes(img.into_raw()))?)
        }
        other => other,
    })
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
    fn transparency_is_composited_on_white_or_dropped() {
        let mut png = Vec::new();
        let pixels = image::RgbaImage::from_raw(2, 1, vec![107, 125, 13, 0, 10, 20, 30, 255]).unwrap();
        pixels.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
        let limits = DecodeLimits::default();
        let white = decode_bytes_with(&png, "t", &limits, Transparency::OverWhite).unwrap();
        assert_eq!(white.pixels, vec![255, 255, 255, 10, 20, 30]);
        let dropped = decode_bytes_with(&png, "t", &limits, Transparency::Dropped).unwrap();
        assert_eq!(dropped.pixels, vec![107, 125, 13, 10, 20, 30]);
    }

    fn png16<P: image::PixelWithColorType<Subpixel = u16>>(width: u32, samples: Vec<u16>) -> Vec<u8> {
        let channels = usize::from(P::CHANNEL_COUNT);
        let height = (samples.len() / channels) as u32 / width;
        let img = image::ImageBuffer::<P, Vec<u16>>::from_raw(width, height, samples).unwrap();
        let mut png = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
        png
    }

    /// Numbers from Pillow 13 (`Image.open(p)` then transformers' `convert_to_rgb`).
    #[test]
    fn sixteen_bit_pngs_decode_as_pillow_opens_them() {
        let limits = DecodeLimits::default();
        let red = |png: &[u8]| -> Vec<u8> { decode_bytes(png, "t", &limits).unwrap().pixels.iter().step_by(3).copied().collect() };
        // 16-bit gray is Pillow's `I;16`: clipped to 255, not scaled.
        let gray = png16::<image::Luma<u16>>(8, vec![0, 1, 200, 255, 256, 300, 1000, 65535]);
        assert_eq!(red(&gray), vec![0, 1, 200, 255, 255, 255, 255, 255]);
        // RGB / RGBA / gray+alpha: the high byte of each sample (not v / 257 rounded).
        let v: [u16; 6] = [0, 0x80FF, 0x7F80, 0xFFFF, 0x0180, 0x1234];
        let rgb: Vec<u16> = (0..6).flat_map(|i| [v[i], v[5 - i], v[i]]).collect();
        assert_eq!(red(&png16::<image::Rgb<u16>>(6, rgb)), vec![0, 128, 127, 255, 1, 18]);
        let rgba: Vec<u16> = (0..6).flat_map(|i| [v[i], v[5 - i], v[i], 0x8000]).collect();
        assert_eq!(red(&png16::<image::Rgba<u16>>(6, rgba)), vec![127, 191, 191, 255, 128, 136]);
        let la: Vec<u16> = (0..6).flat_map(|i| [v[i], 0xFFFF]).collect();
        assert_eq!(red(&png16::<image::LumaA<u16>>(6, la)), vec![0, 128, 127, 255, 1, 18]);
    }

    #[test]
    fn over_white_matches_pillow_corner_cases() {
        // alpha 255 keeps the colour, alpha 0 gives white, half alpha blends.
        assert_eq!(over_white(10, 255), 10);
        assert_eq!(over_white(10, 0), 255);
        assert_eq!(over_white(0, 128), 127);
    }
}
