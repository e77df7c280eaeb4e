//! `Idefics2ImageProcessor`-equal preprocessing: one RGB image to its crops of
//! normalised floats.
//!
//! The steps follow transformers' PIL backend (`Idefics2ImageProcessorPil`,
//! which `Idefics2Processor.from_pretrained` loads): with `do_image_splitting`
//! the image is cut into four quarters (`⌊w/2⌋`, `⌊h/2⌋` split points: top-left,
//! top-right, bottom-left, bottom-right) followed by the whole image, always
//! five crops whatever the size, *before* resizing; each crop is then resized on
//! its own with Pillow's filter (bilinear by default): longer than
//! `longest_edge` → scaled to it with the other side `int(...)` of the aspect
//! ratio, and then each side raised to at least `shortest_edge` (which may
//! change the aspect ratio; a small image is not scaled up), or to a fixed
//! `height × width`; rescaled, normalised (mean and std 0.5 by default). Padding
//! to the batch's largest crop is left to the caller ([`pack_crops`]): the
//! tower encodes each crop alone.
//!
//! Settings come from `preprocessor_config.json` (the hub layout, e.g.
//! HuggingFaceM4/idefics2-8b) or from the `image_processor` section of
//! `processor_config.json` (what transformers 5 saves).

use std::path::Path;

use serde::Deserialize;

use crate::decode::RgbImage;
use crate::processor::{parse_triple, read_json};
use crate::resample::{resize_window_rows, ResampleFilter, Window};
use crate::{Error, Result};

/// transformers' `IMAGENET_STANDARD_MEAN` and `_STD` (Idefics2's defaults).
pub const IMAGENET_STANDARD: [f32; 3] = [0.5, 0.5, 0.5];

/// Crops per image when splitting: four quarters and the whole image.
pub const SPLIT_CROPS: usize = 5;

/// The resize step of Idefics2's processor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idefics2Resize {
    /// `{"shortest_edge", "longest_edge"}`: shrink to `longest` when longer,
    /// then raise each side to at least `shortest`.
    Edges {
        /// `shortest_edge`.
        shortest: usize,
        /// `longest_edge`.
        longest: usize,
    },
    /// `{"height", "width"}`: exactly this size.
    Exact {
        /// Output height.
        height: usize,
        /// Output width.
        width: usize,
    },
}

impl Idefics2Resize {
    /// `(width, height)` of a crop of `width × height` after the resize, in the
    /// processor's own arithmetic (Python floats, `int()` truncation).
    pub fn target(self, width: usize, height: usize) -> (usize, usize) {
        match self {
            Idefics2Resize::Exact { height, width } => (width, height),
            Idefics2Resize::Edges { shortest, longest } => {
                let (mut w, mut h) = (width, height);
                let aspect = width as f64 / height as f64;
                if w >= h && w > longest {
                    w = longest;
                    h = (longest as f64 / aspect) as usize;
                } else if h > w && h > longest {
                    h = longest;
                    w = (longest as f64 * aspect) as usize;
                }
                (w.max(shortest), h.max(shortest))
            }
        }
    }
}

/// Every preprocessing setting of an Idefics2 processor.
#[derive(Debug, Clone, PartialEq)]
pub struct Idefics2ProcessorConfig {
    /// Four quarter crops plus the whole image per image.
    pub do_image_splitting: bool,
    /// The resize step, or `None` to keep each crop's size.
    pub resize: Option<Idefics2Resize>,
    /// Pillow's resampling filter (`resample`, bilinear by default).
    pub filter: ResampleFilter,
    /// Multiplier of the 0-255 values (`1/255`), or `None` to skip.
    pub rescale_factor: Option<f64>,
    /// Per-channel `(mean, std)`, or `None` to skip the normalisation.
    pub normalize: Option<([f32; 3], [f32; 3])>,
}

impl Default for Idefics2ProcessorConfig {
    /// `Idefics2ImageProcessor()`: no splitting, edges 378 / 980, bilinear,
    /// mean and std 0.5.
    fn default() -> Self {
        Self {
            do_image_splitting: false,
            resize: Some(Idefics2Resize::Edges {
                shortest: 378,
                longest: 980,
            }),
            filter: ResampleFilter::Bilinear,
            rescale_factor: Some(1.0 / 255.0),
            normalize: Some((IMAGENET_STANDARD, IMAGENET_STANDARD)),
        }
    }
}

/// The JSON fields as transformers writes them; `do_pad` and `do_convert_rgb`
/// change nothing here (crops are encoded alone, images are always RGB).
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
}

/// One preprocessed crop: `[3, height, width]` floats, channel-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Crop {
    /// Rows.
    pub height: usize,
    /// Columns.
    pub width: usize,
    /// `3 · height · width` normalised values.
    pub values: Vec<f32>,
}

impl Idefics2ProcessorConfig {
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
                None => defaults.resize,
                Some(size) => Some(parse_size(size, what)?),
            }
        } else {
            None
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
            do_image_splitting: raw.do_image_splitting.unwrap_or(false),
            resize,
            filter,
            rescale_factor,
            normalize,
        })
    }

    /// Crops per image: 5 when splitting, else 1.
    pub fn crops_per_image(&self) -> usize {
        if self.do_image_splitting {
            SPLIT_CROPS
        } else {
            1
        }
    }

    /// `(width, height)` of each crop of a `width × height` image, in order,
    /// without touching pixels. Fails when the image cannot be split (a side
    /// of one pixel leaves an empty quarter, which transformers cannot resize).
    pub fn crop_sizes(&self, width: usize, height: usize) -> Result<Vec<(usize, usize)>> {
        Ok(self
            .crop_rects(width, height)?
            .into_iter()
            .map(|r| self.resized(r.width, r.height))
            .collect())
    }

    /// Preprocesses one RGB image into its crops, in transformers' order.
    pub fn preprocess(&self, image: &RgbImage) -> Result<Vec<Crop>> {
        let rects = self.crop_rects(image.width, image.height)?;
        let table = self.value_table();
        rects
            .into_iter()
            .map(|rect| {
                let whole = rect.width == image.width && rect.height == image.height;
                if whole {
                    Ok(self.process_crop(image, &table))
                } else {
                    Ok(self.process_crop(&cut(image, rect), &table))
                }
            })
            .collect()
    }

    /// The crops' rectangles in the source image.
    fn crop_rects(&self, width: usize, height: usize) -> Result<Vec<Window>> {
        if width == 0 || height == 0 {
            return Err(Error::config("image", format!("a {width}x{height} image has no pixels")));
        }
        let whole = Window {
            x0: 0,
            y0: 0,
            width,
            height,
        };
        if !self.do_image_splitting {
            return Ok(vec![whole]);
        }
        if width < 2 || height < 2 {
            return Err(Error::config(
                "image",
                format!("a {width}x{height} image cannot be split into 4 crops (do_image_splitting needs at least 2x2 pixels)"),
            ));
        }
        let (mid_w, mid_h) = (width / 2, height / 2);
        let rect = |x0, y0, width, height| Window { x0, y0, width, height };
        Ok(vec![
            rect(0, 0, mid_w, mid_h),
            rect(mid_w, 0, width - mid_w, mid_h),
            rect(0, mid_h, mid_w, height - mid_h),
            rect(mid_w, mid_h, width - mid_w, height - mid_h),
            whole,
        ])
    }

    /// `(width, height)` of a crop after the resize step.
    fn resized(&self, width: usize, height: usize) -> (usize, usize) {
        match self.resize {
            Some(resize) => resize.target(width, height),
            None => (width, height),
        }
    }

    /// The 256 values each channel's bytes become (rescale, then normalise, in
    /// transformers' arithmetic: a float64 product stored as float32, then
    /// `(v - mean) / std` in float32).
    pub(crate) fn value_table(&self) -> [[f32; 256]; 3] {
        let value = |v: u8, c: usize| -> f32 {
            let v = match self.rescale_factor {
                Some(s) => (f64::from(v) * s) as f32,
                None => f32::from(v),
            };
            match self.normalize {
                Some((mean, std)) => (v - mean[c]) / std[c],
                None => v,
            }
        };
        std::array::from_fn(|c| std::array::from_fn(|v| value(v as u8, c)))
    }

    fn process_crop(&self, crop: &RgbImage, table: &[[f32; 256]; 3]) -> Crop {
        let (w, h) = self.resized(crop.width, crop.height);
        let plane = w * h;
        let mut values = vec![0f32; 3 * plane];
        let window = Window {
            x0: 0,
            y0: 0,
            width: w,
            height: h,
        };
        resize_window_rows(crop, w, h, window, self.filter, &mut |y, row| {
            for (x, px) in row.chunks_exact(3).enumerate() {
                for c in 0..3 {
                    values[c * plane + y * w + x] = table[c][usize::from(px[c])];
                }
            }
        });
        Crop {
            height: h,
            width: w,
            values,
        }
    }
}

/// A copy of `rect` of `image`.
fn cut(image: &RgbImage, rect: Window) -> RgbImage {
    let mut pixels = Vec::with_capacity(rect.width * rect.height * 3);
    for y in rect.y0..rect.y0 + rect.height {
        let start = (y * image.width + rect.x0) * 3;
        pixels.extend_from_slice(&image.pixels[start..start + rect.width * 3]);
    }
    RgbImage {
        width: rect.width,
        height: rect.height,
        pixels,
    }
}

/// Packs crops into one `[crops, 4, H, W]` array (`H`, `W` the largest crop
/// height and width): channels 0-2 the values padded bottom and right with
/// 0.0 (transformers' `do_pad`), channel 3 the pixel mask (1.0 on the crop's
/// own pixels, 0.0 on padding). Returns `(data, crops, H, W)`.
pub fn pack_crops(crops: &[Crop]) -> (Vec<f32>, usize, usize, usize) {
    let max_h = crops.iter().map(|c| c.height).max().unwrap_or(0);
    let max_w = crops.iter().map(|c| c.width).max().unwrap_or(0);
    let plane = max_h * max_w;
    let mut data = vec![0f32; crops.len() * 4 * plane];
    for (i, crop) in crops.iter().enumerate() {
        let base = i * 4 * plane;
        let src_plane = crop.height * crop.width;
        for c in 0..4 {
            for y in 0..crop.height {
                let dst = base + c * plane + y * max_w;
                let row = &mut data[dst..dst + crop.width];
                if c < 3 {
                    let src = c * src_plane + y * crop.width;
                    row.copy_from_slice(&crop.values[src..src + crop.width]);
                } else {
                    row.fill(1.0);
                }
            }
        }
    }
    (data, crops.len(), max_h, max_w)
}

/// `size`: `{"shortest_edge", "longest_edge"}` (both) or `{"height", "width"}`.
fn parse_size(value: &serde_json::Value, what: &str) -> Result<Idefics2Resize> {
    let positive = |key: &str| -> Result<Option<usize>> {
        match value.get(key) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) if n > 0 && n <= 1 << 16 => Ok(Some(n as usize)),
                _ => Err(Error::config(what, format!("size `{key}` must be a positive integer, got {v}"))),
            },
        }
    };
    match (positive("shortest_edge")?, positive("longest_edge")?) {
        (Some(shortest), Some(longest)) => return Ok(Idefics2Resize::Edges { shortest, longest }),
        (None, None) => {}
        _ => {
            return Err(Error::config(
                what,
                format!("size {value} needs both `shortest_edge` and `longest_edge` (Idefics2's processor)"),
            ))
        }
    }
    match (positive("height")?, positive("width")?) {
        (Some(height), Some(width)) => Ok(Idefics2Resize::Exact { height, width }),
        _ => Err(Error::config(
            what,
            format!("size {value} needs `shortest_edge` and `longest_edge`, or `height` and `width`"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resize_targets_follow_the_processor() {
        let edges = Idefics2Resize::Edges {
            shortest: 378,
            longest: 980,
        };
        // Shrunk to the longest edge, aspect kept by int().
        assert_eq!(edges.target(2000, 1000), (980, 490));
        assert_eq!(edges.target(1000, 3000), (378, 980));
        // Not scaled up; only raised to the shortest edge per side.
        assert_eq!(edges.target(500, 300), (500, 378));
        assert_eq!(edges.target(100, 100), (378, 378));
        // A very wide image: int() gives 0, raised to 378.
        assert_eq!(edges.target(10000, 1), (980, 378));
    }

    #[test]
    fn split_rects_cover_the_image() {
        let config = Idefics2ProcessorConfig {
            do_image_splitting: true,
            resize: None,
            ..Default::default()
        };
        assert_eq!(
            config.crop_sizes(5, 3).unwrap(),
            vec![(2, 1), (3, 1), (2, 2), (3, 2), (5, 3)]
        );
        assert!(config.crop_sizes(1, 9).is_err());
    }
}
