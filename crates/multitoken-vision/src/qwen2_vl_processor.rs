//! `Qwen2VLImageProcessor`-equal preprocessing: one RGB image to the rows of
//! flattened patches Qwen2-VL's vision tower takes, and its `image_grid_thw`.
//!
//! The steps follow transformers' PIL backend (`Qwen2VLImageProcessorPil`,
//! `models/qwen2_vl/image_processing_pil_qwen2_vl.py`):
//!
//! 1. [`smart_resize`]: both sides to multiples of `factor = patch_size ·
//!    merge_size`, the pixel count brought inside `[min_pixels, max_pixels]`
//!    keeping the aspect ratio as closely as possible (an image past
//!    `max_pixels` shrinks, a tiny one grows); an aspect ratio over 200 is
//!    refused, as transformers refuses it.
//! 2. Pillow's resize with `resample` (bicubic by default), then rescale
//!    (`1/255`) and normalise (CLIP's mean and std by default), in the
//!    arithmetic of the other processors here.
//! 3. The still image is repeated `temporal_patch_size` times (2) to fill one
//!    temporal patch, and cut into `grid_h × grid_w` patches of `patch_size²`
//!    pixels, listed in merge-window order: the `merge_size × merge_size`
//!    patches that the merger later joins are consecutive rows. Each row is
//!    `(channel, time, patch row, patch column)` flattened, the layout of the
//!    patch embedding's `Conv3d` kernel.
//!
//! Settings come from `preprocessor_config.json` or the `image_processor`
//! section of `processor_config.json`. Both spellings of the pixel bounds are
//! read: `size: {"shortest_edge", "longest_edge"}` (what transformers 5 saves)
//! and the hub's older top-level `min_pixels` / `max_pixels`, which win over
//! `size` as in transformers' constructor.

use std::path::Path;

use serde::Deserialize;

use crate::decode::RgbImage;
use crate::processor::{parse_triple, read_json};
use crate::resample::{resize_window_rows, ResampleFilter, Window};
use crate::{Error, Result};

/// transformers' `OPENAI_CLIP_MEAN` and `OPENAI_CLIP_STD`: Qwen2-VL's defaults.
pub use crate::processor::{OPENAI_CLIP_MEAN, OPENAI_CLIP_STD};

/// The largest aspect ratio `smart_resize` accepts.
const MAX_ASPECT_RATIO: f64 = 200.0;

/// The most pixels a resized image may have: twice Pillow's decompression-bomb
/// limit (a config asking for more would exhaust memory, not fail cleanly).
const MAX_RESIZED_PIXELS: u64 = 2 * 89_478_485;

/// Every preprocessing setting of a Qwen2-VL image processor.
#[derive(Debug, Clone, PartialEq)]
pub struct Qwen2VlProcessorConfig {
    /// Resize with [`smart_resize`]; without it the image must already have
    /// sides that are multiples of `patch_size · merge_size`.
    pub do_resize: bool,
    /// Lower bound on the resized pixel count (`size.shortest_edge`, `min_pixels`).
    pub min_pixels: u64,
    /// Upper bound on the resized pixel count (`size.longest_edge`, `max_pixels`).
    pub max_pixels: u64,
    /// Pillow's resampling filter (`resample`, bicubic by default).
    pub filter: ResampleFilter,
    /// Multiplier of the 0-255 values (`1/255`), or `None` to skip.
    pub rescale_factor: Option<f64>,
    /// Per-channel `(mean, std)`, or `None` to skip the normalisation.
    pub normalize: Option<([f32; 3], [f32; 3])>,
    /// Patch side in pixels (14).
    pub patch_size: usize,
    /// Frames per temporal patch (2): a still image is repeated this often.
    pub temporal_patch_size: usize,
    /// Side of the window of patches merged into one LM position (2).
    pub merge_size: usize,
}

impl Default for Qwen2VlProcessorConfig {
    /// `Qwen2VLImageProcessor()`: 56² to 28²·1280 pixels, bicubic, CLIP's mean
    /// and std, patch 14, temporal patch 2, merge 2.
    fn default() -> Self {
        Self {
            do_resize: true,
            min_pixels: 56 * 56,
            max_pixels: 28 * 28 * 1280,
            filter: ResampleFilter::Bicubic,
            rescale_factor: Some(1.0 / 255.0),
            normalize: Some((OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)),
            patch_size: 14,
            temporal_patch_size: 2,
            merge_size: 2,
        }
    }
}

/// The JSON fields as transformers writes them; `do_convert_rgb` changes
/// nothing here (images are always decoded to RGB, transparency on white, as
/// its `convert_to_rgb` does).
#[derive(Debug, Deserialize)]
struct RawConfig {
    do_resize: Option<bool>,
    size: Option<serde_json::Value>,
    min_pixels: Option<serde_json::Value>,
    max_pixels: Option<serde_json::Value>,
    resample: Option<u64>,
    do_rescale: Option<bool>,
    rescale_factor: Option<f64>,
    do_normalize: Option<bool>,
    image_mean: Option<serde_json::Value>,
    image_std: Option<serde_json::Value>,
    patch_size: Option<serde_json::Value>,
    temporal_patch_size: Option<serde_json::Value>,
    merge_size: Option<serde_json::Value>,
}

/// One preprocessed image: the tower's input rows and their grid.
#[derive(Debug, Clone, PartialEq)]
pub struct Qwen2VlPatches {
    /// `[grid_t, grid_h, grid_w]` in patches (`image_grid_thw`); `grid_t` is 1
    /// for a still image.
    pub grid: [usize; 3],
    /// Width of one row: `channels · temporal_patch_size · patch_size²`.
    pub row_width: usize,
    /// `grid_t · grid_h · grid_w` rows of `row_width` values, in
    /// merge-window order (transformers' `pixel_values`).
    pub values: Vec<f32>,
}

impl Qwen2VlPatches {
    /// Number of rows (`grid_t · grid_h · grid_w`).
    pub fn rows(&self) -> usize {
        self.grid.iter().product()
    }
}

impl Qwen2VlProcessorConfig {
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
        let count = |v: &serde_json::Value, key: &str| -> Result<u64> {
            v.as_u64()
                .ok_or_else(|| Error::config(what, format!("`{key}` must be a non-negative integer, got {v}")))
        };
        let side = |v: Option<&serde_json::Value>, key: &str, default: usize| -> Result<usize> {
            match v {
                None => Ok(default),
                Some(v) => match v.as_u64() {
                    Some(n) if n > 0 && n <= 1 << 12 => Ok(n as usize),
                    _ => Err(Error::config(what, format!("`{key}` must be a positive integer, got {v}"))),
                },
            }
        };
        // transformers' constructor: `size` (or the default), then top-level
        // `min_pixels` / `max_pixels` override its two edges.
        let (mut min_pixels, mut max_pixels) = (Some(defaults.min_pixels), Some(defaults.max_pixels));
        if let Some(size) = &raw.size {
            if !size.is_object() {
                return Err(Error::config(what, format!("`size` must be an object, got {size}")));
            }
            // Older files wrote the bounds inside `size` as `min_pixels` / `max_pixels`.
            let edge = |key: &str, alias: &str| size.get(key).or_else(|| size.get(alias));
            min_pixels = edge("shortest_edge", "min_pixels").map(|v| count(v, "size.shortest_edge")).transpose()?;
            max_pixels = edge("longest_edge", "max_pixels").map(|v| count(v, "size.longest_edge")).transpose()?;
        }
        if let Some(v) = &raw.min_pixels {
            min_pixels = Some(count(v, "min_pixels")?);
        }
        if let Some(v) = &raw.max_pixels {
            max_pixels = Some(count(v, "max_pixels")?);
        }
        let do_resize = raw.do_resize.unwrap_or(true);
        // transformers' resize refuses a missing or zero bound ("`size` dict must
        // contain 'shortest_edge' and 'longest_edge'").
        let (min_pixels, max_pixels) = match (min_pixels, max_pixels) {
            (Some(lo), Some(hi)) if lo > 0 && hi > 0 => (lo, hi),
            _ if !do_resize => (defaults.min_pixels, defaults.max_pixels),
            _ => {
                return Err(Error::config(
                    what,
                    "needs positive pixel bounds: `size` with `shortest_edge` and `longest_edge`, or `min_pixels` and `max_pixels`",
                ))
            }
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
            let mean = parse_triple(raw.image_mean.as_ref(), OPENAI_CLIP_MEAN, what, "image_mean")?;
            let std = parse_triple(raw.image_std.as_ref(), OPENAI_CLIP_STD, what, "image_std")?;
            if std.iter().any(|s| *s == 0.0 || !s.is_finite()) || mean.iter().any(|m| !m.is_finite()) {
                return Err(Error::config(what, "image_mean must be finite and image_std finite and non-zero"));
            }
            Some((mean, std))
        } else {
            None
        };
        Ok(Self {
            do_resize,
            min_pixels,
            max_pixels,
            filter,
            rescale_factor,
            normalize,
            patch_size: side(raw.patch_size.as_ref(), "patch_size", defaults.patch_size)?,
            temporal_patch_size: side(raw.temporal_patch_size.as_ref(), "temporal_patch_size", defaults.temporal_patch_size)?,
            merge_size: side(raw.merge_size.as_ref(), "merge_size", defaults.merge_size)?,
        })
    }

    /// `patch_size · merge_size`: both resized sides are multiples of it.
    pub fn factor(&self) -> usize {
        self.patch_size * self.merge_size
    }

    /// `(height, width)` in pixels of a `width × height` image after the
    /// resize step; fails when transformers would (an aspect ratio over 200,
    /// sides that are not multiples of the factor without `do_resize`).
    pub fn resized_size(&self, width: usize, height: usize) -> Result<(usize, usize)> {
        if width == 0 || height == 0 {
            return Err(Error::config("image", format!("a {width}x{height} image has no pixels")));
        }
        let factor = self.factor();
        if !self.do_resize {
            if !height.is_multiple_of(factor) || !width.is_multiple_of(factor) {
                return Err(Error::config(
                    "image",
                    format!(
                        "a {width}x{height} image without do_resize must have sides that are multiples of \
                         patch_size * merge_size = {factor}"
                    ),
                ));
            }
            return Ok((height, width));
        }
        smart_resize(height, width, factor, self.min_pixels, self.max_pixels)
    }

    /// The patch grid `[1, grid_h, grid_w]` of a `width × height` image.
    pub fn grid(&self, width: usize, height: usize) -> Result<[usize; 3]> {
        let (h, w) = self.resized_size(width, height)?;
        Ok([1, h / self.patch_size, w / self.patch_size])
    }

    /// Preprocesses one RGB image into its patch rows.
    pub fn preprocess(&self, image: &RgbImage) -> Result<Qwen2VlPatches> {
        let (h, w) = self.resized_size(image.width, image.height)?;
        let planes = self.normalised_planes(image, w, h);
        let (p, t, m) = (self.patch_size, self.temporal_patch_size, self.merge_size);
        let (grid_h, grid_w) = (h / p, w / p);
        let channels = 3;
        let row_width = channels * t * p * p;
        let mut values = vec![0f32; grid_h * grid_w * row_width];
        let plane = h * w;
        // Rows in (block row, block column, row in block, column in block)
        // order; each row (channel, time, y, x) with every frame the same image.
        let mut rows = values.chunks_exact_mut(row_width);
        for block_y in 0..grid_h / m {
            for block_x in 0..grid_w / m {
                for in_y in 0..m {
                    for in_x in 0..m {
                        let Some(row) = rows.next() else { continue };
                        let (y0, x0) = ((block_y * m + in_y) * p, (block_x * m + in_x) * p);
                        let mut at = 0;
                        for c in 0..channels {
                            for _ in 0..t {
                                for dy in 0..p {
                                    let src = c * plane + (y0 + dy) * w + x0;
                                    row[at..at + p].copy_from_slice(&planes[src..src + p]);
                                    at += p;
                                }
                            }
                        }
                    }
                }
            }
        }
        Ok(Qwen2VlPatches {
            grid: [1, grid_h, grid_w],
            row_width,
            values,
        })
    }

    /// The image resized to `w × h`, rescaled and normalised: `[3, h, w]` floats.
    fn normalised_planes(&self, image: &RgbImage, w: usize, h: usize) -> Vec<f32> {
        let table = self.value_table();
        let plane = w * h;
        let mut planes = vec![0f32; 3 * plane];
        let window = Window {
            x0: 0,
            y0: 0,
            width: w,
            height: h,
        };
        resize_window_rows(image, w, h, window, self.filter, &mut |y, row| {
            for (x, px) in row.chunks_exact(3).enumerate() {
                for c in 0..3 {
                    planes[c * plane + y * w + x] = table[c][usize::from(px[c])];
                }
            }
        });
        planes
    }

    /// The 256 values each channel's bytes become: a float64 product stored as
    /// float32 (numpy's rescale), then `(v - mean) / std` in float32.
    fn value_table(&self) -> [[f32; 256]; 3] {
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
}

/// transformers' `smart_resize`: `(height, width)` with both sides multiples
/// of `factor`, the pixel count within `[min_pixels, max_pixels]` and the
/// aspect ratio kept as closely as possible. Python's float arithmetic
/// throughout (`round` to even, `floor`, `ceil`, true division).
///
/// Fails on an aspect ratio over 200 (transformers raises), when the bounds
/// leave no room for one `factor × factor` block, and past
/// twice Pillow's decompression-bomb limit in pixels.
pub fn smart_resize(height: usize, width: usize, factor: usize, min_pixels: u64, max_pixels: u64) -> Result<(usize, usize)> {
    if height == 0 || width == 0 || factor == 0 {
        return Err(Error::config(
            "image",
            format!("cannot resize a {width}x{height} image to multiples of {factor}"),
        ));
    }
    let (hf, wf, ff) = (height as f64, width as f64, factor as f64);
    let ratio = hf.max(wf) / hf.min(wf);
    if ratio > MAX_ASPECT_RATIO {
        return Err(Error::config(
            "image",
            format!("a {width}x{height} image has an aspect ratio of {ratio:.1}; Qwen2-VL accepts at most 200"),
        ));
    }
    let mut h_bar = (hf / ff).round_ties_even() * ff;
    let mut w_bar = (wf / ff).round_ties_even() * ff;
    let pixels = (height as f64) * (width as f64);
    if h_bar * w_bar > max_pixels as f64 {
        let beta = (pixels / max_pixels as f64).sqrt();
        h_bar = ff.max((hf / beta / ff).floor() * ff);
        w_bar = ff.max((wf / beta / ff).floor() * ff);
    } else if h_bar * w_bar < min_pixels as f64 {
        let beta = (min_pixels as f64 / pixels).sqrt();
        h_bar = (hf * beta / ff).ceil() * ff;
        w_bar = (wf * beta / ff).ceil() * ff;
    }
    if h_bar * w_bar > MAX_RESIZED_PIXELS as f64 {
        return Err(Error::config(
            "image",
            format!(
                "a {width}x{height} image resizes to {w_bar}x{h_bar} pixels with min_pixels {min_pixels}, \
                 more than {MAX_RESIZED_PIXELS}; lower min_pixels / max_pixels"
            ),
        ));
    }
    if !(h_bar >= ff && w_bar >= ff && h_bar.is_finite() && w_bar.is_finite()) {
        return Err(Error::config(
            "image",
            format!(
                "a {width}x{height} image resizes to {w_bar}x{h_bar} pixels with min_pixels {min_pixels}, \
                 max_pixels {max_pixels} and factor {factor}, which holds no whole {factor}x{factor} block"
            ),
        ));
    }
    Ok((h_bar as usize, w_bar as usize))
}
