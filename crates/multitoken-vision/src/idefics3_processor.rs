//! `Idefics3ImageProcessor`-equal preprocessing (also SmolVLM's, which is the
//! same class under another name): one RGB image to its tiles of normalised
//! floats and the grid that the prompt describes.
//!
//! The steps follow transformers' PIL backend (`Idefics3ImageProcessorPil`):
//!
//! 1. `do_resize` with `size.longest_edge` `L`: the longer side becomes `L`
//!    (up or down), the other `int(L / aspect)` raised to even, both at least 1,
//!    then both scaled below 4096 (`MAX_IMAGE_SIZE`) the same way without the
//!    even rule; `{height, width}` resizes exactly.
//! 2. `do_image_splitting` with `max_image_size.longest_edge` `M`: the image is
//!    resized again to multiples of `M` (longer side first: `ceil(w / M) · M`,
//!    then the other `ceil(int(w / aspect) / M) · M`); when that is larger than
//!    one tile it is cut into `rows × cols` tiles of `M × M` (row-major) and
//!    followed by the whole image resized to `M × M`; otherwise it is the one
//!    `M × M` image (`rows = cols = 0`). Without splitting the image is resized
//!    to `M × M` (`rows = cols = 0`).
//! 3. Rescale and normalise (mean and std 0.5 by default), in transformers'
//!    arithmetic (a float64 product stored as float32, then float32).
//!
//! Every resize is Pillow's on 8-bit pixels (Lanczos by default), so every tile
//! is exactly `M × M` and the pixel mask is all ones: no padding reaches the
//! tower. Settings come from `preprocessor_config.json` or the
//! `image_processor` section of `processor_config.json`.

use std::path::Path;

use serde::Deserialize;

use crate::decode::RgbImage;
use crate::idefics2_processor::{Crop, Idefics2ProcessorConfig, IMAGENET_STANDARD};
use crate::processor::{parse_triple, read_json};
use crate::resample::{resize, ResampleFilter};
use crate::{Error, Result};

/// transformers' `MAX_IMAGE_SIZE`: no side is resized beyond it.
pub const MAX_IMAGE_SIZE: usize = 4096;

/// The first resize step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idefics3Resize {
    /// `{"longest_edge": n}`: the longer side becomes `n`.
    LongestEdge(usize),
    /// `{"height", "width"}`: exactly this size.
    Exact {
        /// Output height.
        height: usize,
        /// Output width.
        width: usize,
    },
}

/// Every preprocessing setting of an Idefics3 / SmolVLM image processor.
#[derive(Debug, Clone, PartialEq)]
pub struct Idefics3ProcessorConfig {
    /// The first resize, or `None` (`do_resize: false`).
    pub resize: Option<Idefics3Resize>,
    /// Cut into `max_image_size` tiles plus the whole image.
    pub do_image_splitting: bool,
    /// `max_image_size.longest_edge`: the side of every tile.
    pub max_image_size: usize,
    /// Pillow's resampling filter (`resample`, Lanczos by default).
    pub filter: ResampleFilter,
    /// Multiplier of the 0-255 values (`1/255`), or `None` to skip.
    pub rescale_factor: Option<f64>,
    /// Per-channel `(mean, std)`, or `None` to skip the normalisation.
    pub normalize: Option<([f32; 3], [f32; 3])>,
}

impl Default for Idefics3ProcessorConfig {
    /// `Idefics3ImageProcessor()`: longest edge 4 · 364, tiles of 364,
    /// splitting, Lanczos, mean and std 0.5.
    fn default() -> Self {
        Self {
            resize: Some(Idefics3Resize::LongestEdge(4 * 364)),
            do_image_splitting: true,
            max_image_size: 364,
            filter: ResampleFilter::Lanczos,
            rescale_factor: Some(1.0 / 255.0),
            normalize: Some((IMAGENET_STANDARD, IMAGENET_STANDARD)),
        }
    }
}

/// The JSON fields as transformers writes them; `do_pad` and `do_convert_rgb`
/// change nothing here (every tile is `M × M`, images are always RGB).
#[derive(Debug, Deserialize)]
struct RawConfig {
    do_resize: Option<bool>,
    size: Option<serde_json::Value>,
    resample: Option<u64>,
    do_rescale: Option<bool>,
    rescale_factor: Option<f64>,
    do_normalize: Option<bool>,
    image_mean: Option<serde_json::Value>,
    image_std: Option<serde_json::Value>,
    do_image_splitting: Option<bool>,
    max_image_size: Option<serde_json::Value>,
}

/// One image's tiles and the grid the prompt writes.
#[derive(Debug, Clone, PartialEq)]
pub struct Idefics3Tiles {
    /// Tile rows (0 when the image is not split).
    pub rows: usize,
    /// Tile columns (0 when the image is not split).
    pub cols: usize,
    /// `rows · cols` tiles row-major, then the whole image; or the one image.
    pub crops: Vec<Crop>,
}

impl Idefics3ProcessorConfig {
    /// Reads `dir/preprocessor_config.json`, else the `image_processor` section
    /// of `dir/processor_config.json`; `None` when neither holds one.
    pub fn from_model_dir(dir: &Path) -> Result<Option<Self>> {
        let pre = dir.join("preprocessor_config.json");
        if pre.is_file() {
            let value = read_json(&pre)?;
            return Self::from_json(&value, &pre.display().to_string()).map(Some);
        }
        let proc = dir.join("processor_config.json");
        if proc.is_file() {
            let value = read_json(&proc)?;
            if let Some(section) = value.get("image_processor") {
                return Self::from_json(section, &format!("{} image_processor", proc.display())).map(Some);
            }
        }
        Ok(None)
    }

    /// Parses a processor config object; `what` names it in errors.
    pub fn from_json(value: &serde_json::Value, what: &str) -> Result<Self> {
        let raw: RawConfig = serde_json::from_value(value.clone()).map_err(|e| Error::config(what, e.to_string()))?;
        let defaults = Self::default();
        let resize = if raw.do_resize.unwrap_or(true) {
            match &raw.size {
                None | Some(serde_json::Value::Null) => defaults.resize,
                Some(size) => Some(parse_size(size, what)?),
            }
        } else {
            None
        };
        let max_image_size = match &raw.max_image_size {
            None | Some(serde_json::Value::Null) => defaults.max_image_size,
            Some(v) => match v.get("longest_edge").and_then(serde_json::Value::as_u64) {
                Some(n) if n > 0 && n <= MAX_IMAGE_SIZE as u64 => n as usize,
                _ => {
                    return Err(Error::config(
                        what,
                        format!("max_image_size must be {{\"longest_edge\": n}} with 0 < n <= {MAX_IMAGE_SIZE}, got {v}"),
                    ))
                }
            },
        };
        let filter = match raw.resample {
            Some(code) => ResampleFilter::from_pil_code(code).map_err(|e| Error::config(what, e.to_string()))?,
            None => defaults.filter,
        };
        let rescale_factor = if raw.do_rescale.unwrap_or(true) {
            let factor = raw.rescale_factor.unwrap_or(1.0 / 255.0);
            if !factor.is_finite() {
                return Err(Error::config(what, "rescale_factor must be a finite number"));
            }
            Some(factor)
        } else {
            None
        };
        let normalize = if raw.do_normalize.unwrap_or(true) {
            let mean = parse_triple(raw.image_mean.as_ref(), IMAGENET_STANDARD, what, "image_mean")?;
            let std = parse_triple(raw.image_std.as_ref(), IMAGENET_STANDARD, what, "image_std")?;
            if std.iter().any(|s| *s == 0.0 || !s.is_finite()) || mean.iter().any(|m| !m.is_finite()) {
                return Err(Error::config(what, "image_mean must be finite and image_std finite and non-zero"));
            }
            Some((mean, std))
        } else {
            None
        };
        Ok(Self {
            resize,
            do_image_splitting: raw.do_image_splitting.unwrap_or(true),
            max_image_size,
            filter,
            rescale_factor,
            normalize,
        })
    }

    /// `(width, height)` after the first resize of a `width × height` image.
    pub fn resized_size(&self, width: usize, height: usize) -> (usize, usize) {
        match self.resize {
            None => (width, height),
            Some(Idefics3Resize::Exact { height, width }) => (width, height),
            Some(Idefics3Resize::LongestEdge(longest)) => {
                let (w, h) = rescale_to_max_len(width, height, longest);
                scale_below_upper_bound(w, h, MAX_IMAGE_SIZE)
            }
        }
    }

    /// `(width, height)` of the image before it is cut into tiles (splitting).
    fn split_size(&self, width: usize, height: usize) -> (usize, usize) {
        let m = self.max_image_size;
        // At least one tile per side: a sliver whose short side rounds to 0
        // would make transformers fail on a 0-pixel resize; we keep one row.
        let up = |x: usize| (x.div_ceil(m) * m).max(m);
        let aspect = width as f64 / height as f64;
        if width >= height {
            let w = up(width);
            (w, up((w as f64 / aspect) as usize))
        } else {
            let h = up(height);
            (up((h as f64 * aspect) as usize), h)
        }
    }

    /// The `(rows, cols)` of a `width × height` image's tiles, `(0, 0)` when it
    /// is not split, without touching pixels.
    pub fn grid(&self, width: usize, height: usize) -> Result<(usize, usize)> {
        check_size(width, height)?;
        if !self.do_image_splitting {
            return Ok((0, 0));
        }
        let (w, h) = self.resized_size(width, height);
        let (w, h) = self.split_size(w, h);
        let m = self.max_image_size;
        Ok(if w > m || h > m { (h / m, w / m) } else { (0, 0) })
    }

    /// Preprocesses one RGB image into its tiles, in transformers' order.
    pub fn preprocess(&self, image: &RgbImage) -> Result<Idefics3Tiles> {
        check_size(image.width, image.height)?;
        let m = self.max_image_size;
        let (w, h) = self.resized_size(image.width, image.height);
        let resized = if (w, h) == (image.width, image.height) && self.resize.is_none() {
            image.clone()
        } else {
            resize(image, w, h, self.filter)
        };
        let table = Idefics2ProcessorConfig {
            rescale_factor: self.rescale_factor,
            normalize: self.normalize,
            ..Idefics2ProcessorConfig::default()
        }
        .value_table();
        if !self.do_image_splitting {
            let whole = resize(&resized, m, m, self.filter);
            return Ok(Idefics3Tiles { rows: 0, cols: 0, crops: vec![to_crop(&whole, &table)] });
        }
        let (sw, sh) = self.split_size(w, h);
        let split = resize(&resized, sw, sh, self.filter);
        if sw <= m && sh <= m {
            return Ok(Idefics3Tiles { rows: 0, cols: 0, crops: vec![to_crop(&split, &table)] });
        }
        let (rows, cols) = (sh / m, sw / m);
        let mut crops = Vec::with_capacity(rows * cols + 1);
        for r in 0..rows {
            for c in 0..cols {
                crops.push(to_crop(&cut(&split, c * m, r * m, m), &table));
            }
        }
        let global = resize(&split, m, m, self.filter);
        crops.push(to_crop(&global, &table));
        Ok(Idefics3Tiles { rows, cols, crops })
    }
}

fn check_size(width: usize, height: usize) -> Result<()> {
    if width == 0 || height == 0 {
        return Err(Error::config("image", format!("a {width}x{height} image has no pixels")));
    }
    Ok(())
}

/// `_resize_output_size_rescale_to_max_len` (min_len 1): `(width, height)`.
fn rescale_to_max_len(width: usize, height: usize, max_len: usize) -> (usize, usize) {
    let aspect = width as f64 / height as f64;
    let even = |x: usize| if x.is_multiple_of(2) { x } else { x + 1 };
    let (w, h) = if width >= height {
        (max_len, even((max_len as f64 / aspect) as usize))
    } else {
        (even((max_len as f64 * aspect) as usize), max_len)
    };
    (w.max(1), h.max(1))
}

/// `_resize_output_size_scale_below_upper_bound`: `(width, height)`.
fn scale_below_upper_bound(width: usize, height: usize, max_len: usize) -> (usize, usize) {
    let aspect = width as f64 / height as f64;
    let (mut w, mut h) = (width, height);
    if width >= height && width > max_len {
        w = max_len;
        h = (w as f64 / aspect) as usize;
    } else if height > width && height > max_len {
        h = max_len;
        w = (h as f64 * aspect) as usize;
    }
    (w.max(1), h.max(1))
}

/// The `side × side` square of `image` at `(x0, y0)`.
fn cut(image: &RgbImage, x0: usize, y0: usize, side: usize) -> RgbImage {
    let mut pixels = Vec::with_capacity(side * side * 3);
    for y in y0..y0 + side {
        let start = (y * image.width + x0) * 3;
        pixels.extend_from_slice(&image.pixels[start..start + side * 3]);
    }
    RgbImage { width: side, height: side, pixels }
}

/// Channel-major normalised values of `image`.
fn to_crop(image: &RgbImage, table: &[[f32; 256]; 3]) -> Crop {
    let plane = image.width * image.height;
    let mut values = vec![0f32; 3 * plane];
    for (i, px) in image.pixels.chunks_exact(3).enumerate() {
        for c in 0..3 {
            values[c * plane + i] = table[c][usize::from(px[c])];
        }
    }
    Crop { height: image.height, width: image.width, values }
}

/// `size`: `{"longest_edge": n}` or `{"height": h, "width": w}`.
fn parse_size(value: &serde_json::Value, what: &str) -> Result<Idefics3Resize> {
    let positive = |key: &str| -> Result<Option<usize>> {
        match value.get(key) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) if n > 0 && n <= 1 << 16 => Ok(Some(n as usize)),
                _ => Err(Error::config(what, format!("size `{key}` must be a positive integer, got {v}"))),
            },
        }
    };
    if let Some(longest) = positive("longest_edge")? {
        return Ok(Idefics3Resize::LongestEdge(longest));
    }
    match (positive("height")?, positive("width")?) {
        (Some(height), Some(width)) => Ok(Idefics3Resize::Exact { height, width }),
        _ => Err(Error::config(what, format!("size {value} needs `longest_edge`, or `height` and `width`"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(longest: usize, tile: usize, split: bool) -> Idefics3ProcessorConfig {
        Idefics3ProcessorConfig {
            resize: Some(Idefics3Resize::LongestEdge(longest)),
            do_image_splitting: split,
            max_image_size: tile,
            ..Idefics3ProcessorConfig::default()
        }
    }

    /// The grids the fixture's processor reported (tests/fixtures/idefics3).
    #[test]
    fn grids_follow_the_processor() {
        let split = config(96, 32, true);
        for ((w, h), want) in [((40, 30), (3, 3)), ((23, 37), (3, 2)), ((130, 100), (3, 3)), ((90, 20), (1, 3)), ((33, 50), (3, 2)), ((20, 20), (3, 3))] {
            assert_eq!(split.grid(w, h).unwrap(), want, "{w}x{h}");
        }
        let smol = config(72, 36, true);
        assert_eq!(smol.grid(90, 20).unwrap(), (1, 2));
        assert_eq!(config(48, 24, false).grid(130, 100).unwrap(), (0, 0));
        // One tile after the resize: no split.
        assert_eq!(config(36, 36, true).grid(500, 20).unwrap(), (0, 0));
        // SmolVLM-256M's sizes: a 512x512 image becomes a 4x4 grid.
        assert_eq!(config(2048, 512, true).grid(512, 512).unwrap(), (4, 4));
        // Huge images are resized, never a crash.
        assert_eq!(config(1536, 364, true).grid(60000, 10).unwrap(), (1, 5));
        assert!(split.grid(0, 5).is_err());
    }

    #[test]
    fn resizes_round_as_the_processor_does() {
        // width >= height: height = int(L / aspect), raised to even.
        assert_eq!(rescale_to_max_len(90, 20, 96), (96, 22));
        assert_eq!(rescale_to_max_len(23, 37, 96), (60, 96));
        assert_eq!(scale_below_upper_bound(8000, 100, 4096), (4096, 51));
    }
}
