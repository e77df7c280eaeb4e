//! `CLIPImageProcessor`-equal preprocessing: RGB image to normalized `[3, H, W]` floats.
//!
//! The steps and their arithmetic follow transformers' PIL backend
//! (`CLIPImageProcessorPil`, `LlavaImageProcessorPil`): optional pad to square
//! with the mean colour (LLaVA-1.5's `expand2square`, the llava-hf `do_pad`),
//! resize of the shortest edge (`int(size * long / short)` for the other) or to a
//! fixed height x width with Pillow's resampling, center crop (zero padded when
//! the crop is larger, offsets `(h - crop_h) // 2`), rescale, normalize.
//! Settings come from `preprocessor_config.json` or from the `image_processor`
//! section of `processor_config.json`.

use std::path::Path;

use serde::Deserialize;

use crate::decode::RgbImage;
use crate::resample::{resize_window_rows, ResampleFilter, Window};
use crate::{Error, Result};

/// Target size of the resize step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResizeTo {
    /// Scale so that the shorter side equals this (aspect ratio kept).
    ShortestEdge(usize),
    /// Exactly this height and width.
    Exact {
        /// Output height.
        height: usize,
        /// Output width.
        width: usize,
    },
}

/// Every preprocessing setting, resolved from a processor config.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageProcessorConfig {
    /// Pad to a square with the mean colour before resizing (LLaVA-1.5).
    pub pad_to_square: bool,
    /// The resize target, or `None` to skip resizing.
    pub resize: Option<ResizeTo>,
    /// Pillow's resampling filter.
    pub filter: ResampleFilter,
    /// `(height, width)` of the center crop, or `None` to skip it.
    pub crop: Option<(usize, usize)>,
    /// Multiplier applied to the 0-255 values (`1/255`), or `None` to skip.
    pub rescale_factor: Option<f64>,
    /// Per-channel `(mean, std)` of the normalization, or `None` to skip it.
    pub normalize: Option<([f32; 3], [f32; 3])>,
}

/// OpenAI CLIP's normalization mean.
pub const OPENAI_CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// OpenAI CLIP's normalization std. Written as published (transformers'
/// `OPENAI_CLIP_STD`), one digit past what an f32 holds.
#[allow(clippy::excessive_precision)]
pub const OPENAI_CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];

impl Default for ImageProcessorConfig {
    /// `CLIPImageProcessor()`'s defaults: shortest edge 224, crop 224, bicubic,
    /// OpenAI mean/std.
    fn default() -> Self {
        Self {
            pad_to_square: false,
            resize: Some(ResizeTo::ShortestEdge(224)),
            filter: ResampleFilter::Bicubic,
            crop: Some((224, 224)),
            rescale_factor: Some(1.0 / 255.0),
            normalize: Some((OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)),
        }
    }
}

/// The JSON as transformers writes it (old and new spellings).
#[derive(Debug, Deserialize)]
struct RawConfig {
    image_processor_type: Option<String>,
    do_resize: Option<bool>,
    size: Option<serde_json::Value>,
    resample: Option<u64>,
    do_center_crop: Option<bool>,
    crop_size: Option<serde_json::Value>,
    do_rescale: Option<bool>,
    rescale_factor: Option<f64>,
    do_normalize: Option<bool>,
    image_mean: Option<serde_json::Value>,
    image_std: Option<serde_json::Value>,
    do_pad: Option<bool>,
    /// multitoken's own spelling, for presets that are not llava-hf processors.
    pad_to_square: Option<bool>,
}

impl ImageProcessorConfig {
    /// Reads `dir/preprocessor_config.json`, else the `image_processor` section
    /// of `dir/processor_config.json`; defaults when neither exists.
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        let pre = dir.join("preprocessor_config.json");
        if pre.is_file() {
            let value = read_json(&pre)?;
            return Self::from_json(&value, &pre.display().to_string());
        }
        let proc = dir.join("processor_config.json");
        if proc.is_file() {
            let value = read_json(&proc)?;
            if let Some(section) = value.get("image_processor") {
                return Self::from_json(section, &format!("{} image_processor", proc.display()));
            }
        }
        Ok(Self::default())
    }

    /// Parses a processor config object; `what` names it in errors.
    pub fn from_json(value: &serde_json::Value, what: &str) -> Result<Self> {
        let raw: RawConfig = serde_json::from_value(value.clone())
            .map_err(|e| Error::config(what, e.to_string()))?;
        let defaults = Self::default();
        let llava = raw
            .image_processor_type
            .as_deref()
            .is_some_and(|t| t.starts_with("Llava"));
        let pad_to_square = raw.pad_to_square.unwrap_or(false) || (llava && raw.do_pad == Some(true));
        let resize = if raw.do_resize.unwrap_or(true) {
            match &raw.size {
                None => defaults.resize,
                Some(size) => Some(parse_size(size, what)?),
            }
        } else {
            None
        };
        let filter = match raw.resample {
            Some(code) => ResampleFilter::from_pil_code(code)
                .map_err(|e| Error::config(what, e.to_string()))?,
            None => defaults.filter,
        };
        // SigLIP's processor resizes straight to `size` and has no crop step.
        let siglip = raw.image_processor_type.as_deref().is_some_and(|t| t.starts_with("Siglip"));
        let crop = if raw.do_center_crop.unwrap_or(!siglip) {
            match &raw.crop_size {
                None => defaults.crop,
                Some(crop) => match parse_size(crop, what)? {
                    ResizeTo::Exact { height, width } => Some((height, width)),
                    ResizeTo::ShortestEdge(n) => Some((n, n)),
                },
            }
        } else {
            None
        };
        let rescale_factor = if raw.do_rescale.unwrap_or(true) {
            Some(raw.rescale_factor.unwrap_or(1.0 / 255.0))
        } else {
            None
        };
        let normalize = if raw.do_normalize.unwrap_or(true) {
            let mean = parse_triple(raw.image_mean.as_ref(), OPENAI_CLIP_MEAN, what, "image_mean")?;
            let std = parse_triple(raw.image_std.as_ref(), OPENAI_CLIP_STD, what, "image_std")?;
            if std.iter().any(|s| *s == 0.0 || !s.is_finite()) {
                return Err(Error::config(what, "image_std must be finite and non-zero"));
            }
            Some((mean, std))
        } else {
            None
        };
        Ok(Self {
            pad_to_square,
            resize,
            filter,
            crop,
            rescale_factor,
            normalize,
        })
    }

    /// `(height, width)` of the output for an input of `width x height`.
    pub fn output_size(&self, width: usize, height: usize) -> (usize, usize) {
        let (mut w, mut h) = if self.pad_to_square {
            let side = width.max(height);
            (side, side)
        } else {
            (width, height)
        };
        if let Some(resize) = self.resize {
            (w, h) = resize_target(resize, w, h);
        }
        match self.crop {
            Some((ch, cw)) => (ch, cw),
            None => (h, w),
        }
    }

    /// Preprocesses one RGB image to `[3, H, W]` floats (channel-major).
    pub fn preprocess(&self, image: &RgbImage) -> Result<(Vec<f32>, usize, usize)> {
        if image.width == 0 || image.height == 0 {
            return Err(Error::config("image", "an image needs at least one pixel"));
        }
        let padded;
        let mut current = image;
        if self.pad_to_square && image.width != image.height {
            padded = pad_to_square(image, self.pad_colour());
            current = &padded;
        }
        let (rw, rh) = match self.resize {
            Some(resize) => resize_target(resize, current.width, current.height),
            None => (current.width, current.height),
        };
        if rw == 0 || rh == 0 {
            return Err(Error::config(
                "image",
                format!("{}x{} resizes to an empty {rw}x{rh} image", image.width, image.height),
            ));
        }
        let (ch, cw) = self.crop.unwrap_or((rh, rw));
        // Python's floor division: negative when the crop is larger (zero padding).
        let top = (rh as i64 - ch as i64).div_euclid(2);
        let left = (rw as i64 - cw as i64).div_euclid(2);
        // The part of the crop that lies inside the resized image.
        let y0 = top.max(0) as usize;
        let x0 = left.max(0) as usize;
        let y1 = ((top + ch as i64).min(rh as i64)).max(y0 as i64) as usize;
        let x1 = ((left + cw as i64).min(rw as i64)).max(x0 as i64) as usize;
        let window = Window {
            x0,
            y0,
            width: x1 - x0,
            height: y1 - y0,
        };
        let mut out = vec![0f32; 3 * ch * cw];
        let scale = self.rescale_factor;
        let (mean, std) = self.normalize.unwrap_or(([0.0; 3], [1.0; 3]));
        let value = |v: u8, c: usize| -> f32 {
            let v = match scale {
                Some(s) => (f64::from(v) * s) as f32,
                None => f32::from(v),
            };
            match self.normalize {
                Some(_) => (v - mean[c]) / std[c],
                None => v,
            }
        };
        // Every output value is one of 256 per channel: look them up rather than
        // rescale and normalise each of the 3·H·W pixels (same arithmetic, done once).
        let table: [[f32; 256]; 3] = std::array::from_fn(|c| std::array::from_fn(|v| value(v as u8, c)));
        let zero = [table[0][0], table[1][0], table[2][0]];
        for c in 0..3 {
            out[c * ch * cw..(c + 1) * ch * cw].fill(zero[c]);
        }
        let off_y = (y0 as i64 - top) as usize;
        let off_x = (x0 as i64 - left) as usize;
        let plane = ch * cw;
        resize_window_rows(current, rw, rh, window, self.filter, &mut |y, row| {
            let dst = (y + off_y) * cw + off_x;
            for (x, px) in row.chunks_exact(3).enumerate() {
                for c in 0..3 {
                    out[c * plane + dst + x] = table[c][usize::from(px[c])];
                }
            }
        });
        Ok((out, ch, cw))
    }

    /// LLaVA's pad colour: `int(mean * 255)` per channel (black without a mean).
    fn pad_colour(&self) -> [u8; 3] {
        match self.normalize {
            Some((mean, _)) => mean.map(|m| (m * 255.0).clamp(0.0, 255.0) as u8),
            None => [0; 3],
        }
    }
}

/// `(width, height)` after the resize step.
fn resize_target(resize: ResizeTo, width: usize, height: usize) -> (usize, usize) {
    match resize {
        ResizeTo::Exact { height, width } => (width, height),
        ResizeTo::ShortestEdge(size) => {
            let (short, long) = if width <= height { (width, height) } else { (height, width) };
            // transformers: int(size * long / short), in doubles.
            let new_long = (size as f64 * long as f64 / short as f64) as usize;
            if width <= height {
                (size, new_long)
            } else {
                (new_long, size)
            }
        }
    }
}

/// Pads to a square of the longer side, the image centred (`(max - h) // 2`).
pub fn pad_to_square(image: &RgbImage, colour: [u8; 3]) -> RgbImage {
    let side = image.width.max(image.height);
    let mut out = RgbImage::filled(side, side, colour);
    let top = (side - image.height) / 2;
    let left = (side - image.width) / 2;
    for y in 0..image.height {
        let src = &image.pixels[y * image.width * 3..(y + 1) * image.width * 3];
        let start = ((y + top) * side + left) * 3;
        out.pixels[start..start + image.width * 3].copy_from_slice(src);
    }
    out
}

pub(crate) fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| Error::config(path.display().to_string(), e.to_string()))
}

/// `size`/`crop_size`: an int, `{"shortest_edge": n}` or `{"height": h, "width": w}`.
fn parse_size(value: &serde_json::Value, what: &str) -> Result<ResizeTo> {
    let positive = |v: &serde_json::Value, key: &str| -> Result<usize> {
        match v.as_u64() {
            Some(n) if n > 0 && n <= 1 << 16 => Ok(n as usize),
            _ => Err(Error::config(what, format!("`{key}` must be a positive integer, got {v}"))),
        }
    };
    if value.is_number() {
        return Ok(ResizeTo::ShortestEdge(positive(value, "size")?));
    }
    if let Some(n) = value.get("shortest_edge") {
        return Ok(ResizeTo::ShortestEdge(positive(n, "shortest_edge")?));
    }
    match (value.get("height"), value.get("width")) {
        (Some(h), Some(w)) => Ok(ResizeTo::Exact {
            height: positive(h, "height")?,
            width: positive(w, "width")?,
        }),
        _ => Err(Error::config(
            what,
            format!("size {value} needs `shortest_edge` or `height` and `width`"),
        )),
    }
}

/// `image_mean`/`image_std`: three numbers or one for all channels.
pub(crate) fn parse_triple(
    value: Option<&serde_json::Value>,
    default: [f32; 3],
    what: &str,
    key: &str,
) -> Result<[f32; 3]> {
    let Some(value) = value else {
        return Ok(default);
    };
    if let Some(x) = value.as_f64() {
        return Ok([x as f32; 3]);
    }
    let numbers: Option<Vec<f32>> = value
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_f64().map(|x| x as f32)).collect());
    match numbers.as_deref() {
        Some([a, b, c]) if value.as_array().map(Vec::len) == Some(3) => Ok([*a, *b, *c]),
        _ => Err(Error::config(what, format!("`{key}` must be 3 numbers, got {value}"))),
    }
}
