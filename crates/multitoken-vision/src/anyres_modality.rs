//! The `vision_anyres` modality: LLaVA-NeXT's and LLaVA-OneVision's `<image>`,
//! a CLIP or plain SigLIP tower over AnyRes tiles ([`crate::anyres`]).
//!
//! Builder config (importers write it; every field as the checkpoint's
//! `config.json` / `processor_config.json` says):
//!
//! ```json
//! {
//!   "tower": ".",                         // directory of the weights
//!   "tower_kind": "clip",                 // or "siglip" (OneVision)
//!   "tower_config": { ... },              // the vision_config, inline
//!   "weights_prefix": "vision_tower",     // the vision_model level
//!   "vision_feature_layer": -2,           // or a list
//!   "vision_feature_select_strategy": "default",
//!   "image_grid_pinpoints": [[336, 672], ...],
//!   "image_processor": { ... },           // the image processor's settings, defaults filled in
//!   "vision_aspect_ratio": "anyres_max_9",// OneVision; optional
//!   "projector": {"kind": "llava_next", "tile_grid": 24},
//!   "max_pixels": 89478485
//! }
//! ```
//!
//! An item's layout is one run of slots, as many as the processor writes
//! `<image>` tokens (base features + unpadded rows with their newline).
//! `preprocess` gives `[tiles, 4, S, S]`: the base image then the tiles, and
//! in channel 3 of the first tile the image's height and width (base-256
//! digits, exact in any float type), which `encode_item` needs to unpad.
//! `encode_item` encodes all tiles in one batch and returns two pieces: the
//! base image's features `[1, grid², D]` and the unpadded grid `[1, rows,
//! cols, D]` (the `llava_next` projector packs it).

use candle_core::{DType, Device, Tensor};
use multitoken_core::{Item, ItemLayout, Modality, ModalityBuilder, ModalityContext, ProjectorSpec};
use serde::Deserialize;

use crate::anyres::{anyres_tiles, AnyResGeometry, TileSettings};
use crate::clip::{resolve_layers, ClipVisionConfig, ClipVisionTower, FeatureSelect};
use crate::decode::{decode_item, describe_item, DecodeLimits};
use crate::modality::{fill_siglip_defaults, keeps_first_position, open_weights, parse_layers, IMAGES_KEY, IMAGE_TOKEN};
use crate::processor::{ImageProcessorConfig, ResizeTo};
use crate::resample::ResampleFilter;
use crate::siglip::{SiglipVisionConfig, SiglipVisionTower};
use crate::{Error, Result};

/// The builder's config ([module docs](self)).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VisionAnyResConfig {
    /// Weights directory, relative to the model directory.
    #[serde(default)]
    pub tower: Option<String>,
    /// `clip` or `siglip`.
    pub tower_kind: String,
    /// The vision config.
    pub tower_config: serde_json::Value,
    /// Key prefix of the `vision_model` level.
    #[serde(default)]
    pub weights_prefix: Option<String>,
    /// One layer index or a list.
    #[serde(default)]
    pub vision_feature_layer: Option<serde_json::Value>,
    /// `default` (drop the first position) or `full`.
    #[serde(default)]
    pub vision_feature_select_strategy: Option<String>,
    /// `(height, width)` resolutions.
    pub image_grid_pinpoints: Vec<[usize; 2]>,
    /// The image processor's settings.
    #[serde(default)]
    pub image_processor: Option<serde_json::Value>,
    /// OneVision's `anyres_max_N`.
    #[serde(default)]
    pub vision_aspect_ratio: Option<String>,
    /// The projector this modality reports.
    #[serde(default)]
    pub projector: Option<ProjectorSpec>,
    /// Decompression-bomb limit in pixels.
    #[serde(default)]
    pub max_pixels: Option<u64>,
}

enum Tower {
    Clip { tower: ClipVisionTower, select: FeatureSelect },
    Siglip { tower: SiglipVisionTower, layers: Vec<usize>, drop_first: bool },
}

/// The AnyRes image modality.
pub struct VisionAnyRes {
    tower: Tower,
    geometry: AnyResGeometry,
    tiles: TileSettings,
    processor: ImageProcessorConfig,
    projector: ProjectorSpec,
    feature_dim: usize,
    limits: DecodeLimits,
    device: Device,
    dtype: DType,
}

impl std::fmt::Debug for VisionAnyRes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VisionAnyRes").field("geometry", &self.geometry).field("projector", &self.projector).finish_non_exhaustive()
    }
}

impl VisionAnyRes {
    /// Builds the modality; paths resolve against `context.model_dir`.
    pub fn from_config(config: &VisionAnyResConfig, context: &ModalityContext) -> Result<Self> {
        let tower_dir = context.resolve(config.tower.as_deref().unwrap_or("."));
        let what = format!("{} vision tower", tower_dir.display());
        let vb = open_weights(&tower_dir, context)?;
        let prefix = config.weights_prefix.clone().unwrap_or_default();
        let vb = if prefix.is_empty() { vb } else { vb.pp(&prefix) };
        let layers = parse_layers(config.vision_feature_layer.as_ref())?;
        let full = keeps_first_position(config.vision_feature_select_strategy.as_deref())?;
        let (tower, image_size, patch_size, width) = match config.tower_kind.as_str() {
            "clip" => {
                let cfg: ClipVisionConfig = serde_json::from_value(config.tower_config.clone())
                    .map_err(|e| Error::config(what.clone(), e.to_string()))?;
                cfg.validate(&what)?;
                if full {
                    // transformers' view of the tiles into a patch grid fails with the CLS position kept.
                    return Err(Error::config(
                        "vision_feature_select_strategy",
                        "`full` keeps CLIP's CLS position, which AnyRes tiles cannot be laid out with (use `default`)",
                    ));
                }
                let tower = ClipVisionTower::load(&cfg, vb).map_err(|e| Error::config(what.clone(), format!("prefix `{prefix}`: {e}")))?;
                let select = FeatureSelect::Layers { layers: layers.clone(), keep_cls: false };
                select.validate(cfg.num_hidden_layers)?;
                (Tower::Clip { tower, select }, cfg.image_size, cfg.patch_size, cfg.hidden_size)
            }
            "siglip" => {
                let mut value = config.tower_config.clone();
                fill_siglip_defaults(&mut value);
                let cfg: SiglipVisionConfig = serde_json::from_value(value).map_err(|e| Error::config(what.clone(), e.to_string()))?;
                cfg.validate(&what)?;
                if !full {
                    return Err(Error::config(
                        "vision_feature_select_strategy",
                        "`default` drops a position SigLIP does not have, which AnyRes tiles cannot be laid out with (use `full`)",
                    ));
                }
                let resolved = resolve_layers(&layers, cfg.num_hidden_layers)?;
                let tower = SiglipVisionTower::load(vb, &cfg).map_err(|e| Error::config(what.clone(), format!("prefix `{prefix}`: {e}")))?;
                (Tower::Siglip { tower, layers: resolved, drop_first: false }, cfg.image_size, cfg.patch_size, cfg.hidden_size)
            }
            other => return Err(Error::config("tower_kind", format!("`{other}` is not `clip` or `siglip`"))),
        };
        let grid = image_size / patch_size;
        let max_num_patches = config.vision_aspect_ratio.as_deref().map(parse_anyres_max).transpose()?;
        let geometry = AnyResGeometry {
            pinpoints: config.image_grid_pinpoints.iter().map(|&[h, w]| (h, w)).collect(),
            tile: image_size,
            grid,
            base_positions: grid * grid,
            max_num_patches,
        };
        geometry.validate()?;
        let raw = config.image_processor.clone().unwrap_or_else(|| serde_json::json!({}));
        let mut processor = ImageProcessorConfig::from_json(&raw, "image_processor")?;
        // `do_pad` means batch padding of tiles here, never LLaVA-1.5's square pad.
        processor.pad_to_square = false;
        let tiles = tile_settings(&raw, &processor)?;
        let out = processor.output_size(tiles.patch_size, tiles.patch_size);
        let base_out = processor.output_size(tiles.base_size.1, tiles.base_size.0);
        if out != (image_size, image_size) || base_out != (image_size, image_size) {
            return Err(Error::config(
                "image_processor",
                format!("tiles come out {}x{} but the tower takes {image_size}x{image_size}", out.1, out.0),
            ));
        }
        let projector = config.projector.unwrap_or(ProjectorSpec::LlavaNext(multitoken_core::projector::LlavaNextProjectorConfig {
            tile_grid: grid,
            max_num_patches,
            bias: true,
        }));
        projector.validate()?;
        let mut limits = DecodeLimits::default();
        if let Some(max) = config.max_pixels {
            limits.max_pixels = max;
        }
        Ok(Self {
            tower,
            geometry,
            tiles,
            processor,
            projector,
            feature_dim: width * layers.len(),
            limits,
            device: context.device.clone(),
            dtype: context.dtype,
        })
    }

    /// The tiling numbers.
    pub fn geometry(&self) -> &AnyResGeometry {
        &self.geometry
    }

    /// Selected features of a batch of tiles `[n, 3, S, S]`: `[n, grid², feature_dim]`.
    pub fn tile_features(&self, pixels: &Tensor) -> Result<Tensor> {
        let pixels = pixels.to_device(&self.device)?.to_dtype(self.dtype)?;
        match &self.tower {
            Tower::Clip { tower, select } => select.features(tower, &pixels),
            Tower::Siglip { tower, layers, drop_first } => {
                let deepest = layers.iter().copied().max().unwrap_or(0);
                let states = tower.plain_hidden_states(&pixels, deepest)?;
                let picked: Vec<Tensor> = layers.iter().map(|&l| states[l].clone()).collect();
                let features = Tensor::cat(&picked, candle_core::D::Minus1)?;
                if *drop_first {
                    let n = features.dim(1)?;
                    Ok(features.narrow(1, 1, n - 1)?)
                } else {
                    Ok(features)
                }
            }
        }
    }

    fn image_size_of(&self, item: &Item) -> Result<(usize, usize)> {
        let image = decode_item(item, &self.limits)?;
        Ok((image.height, image.width))
    }
}

impl Modality for VisionAnyRes {
    fn media(&self) -> multitoken_core::ItemMedia {
        multitoken_core::ItemMedia::Image
    }
    fn encoder_weights(&self) -> Option<multitoken_core::EncoderWeights> {
        Some(multitoken_core::EncoderWeights::at("tower").with_default("."))
    }
    fn name(&self) -> &str {
        "vision_anyres"
    }
    fn token(&self) -> &str {
        IMAGE_TOKEN
    }
    fn data_key(&self) -> &str {
        IMAGES_KEY
    }
    fn token_width(&self) -> usize {
        self.geometry.slots(self.geometry.tile, self.geometry.tile)
    }
    fn feature_dim(&self) -> usize {
        self.feature_dim
    }
    fn preprocess(&self, item: &Item) -> multitoken_core::Result<Tensor> {
        let image = decode_item(item, &self.limits)?;
        let tiles = anyres_tiles(&image, &self.geometry, &self.tiles).map_err(|e| Error::config(describe_item(item), e.to_string()))?;
        let s = self.geometry.tile;
        let mut data = Vec::with_capacity(tiles.len() * 4 * s * s);
        for (i, tile) in tiles.iter().enumerate() {
            let (values, h, w) = self.processor.preprocess(tile)?;
            if (h, w) != (s, s) {
                return Err(Error::config(describe_item(item), format!("tile {} came out {w}x{h}, not {s}x{s}", i + 1)).into());
            }
            data.extend_from_slice(&values);
            let mut meta = vec![0f32; s * s];
            if i == 0 {
                let (hh, ww) = (image.height, image.width);
                if hh >= 1 << 16 || ww >= 1 << 16 || s < 4 {
                    return Err(Error::config(describe_item(item), "the image is too large to record its size").into());
                }
                meta[..4].copy_from_slice(&[(hh >> 8) as f32, (hh & 255) as f32, (ww >> 8) as f32, (ww & 255) as f32]);
            }
            data.extend_from_slice(&meta);
        }
        Ok(Tensor::from_vec(data, (tiles.len(), 4, s, s), &Device::Cpu)?)
    }
    fn encode(&self, _batch: &Tensor) -> multitoken_core::Result<Tensor> {
        Err(multitoken_core::Error::msg(
            "vision_anyres: images have different numbers of tiles and positions; encode them one at a time (encode_item)",
        ))
    }
    fn projector(&self) -> ProjectorSpec {
        self.projector
    }
    fn layout(&self, item: &Item) -> multitoken_core::Result<ItemLayout> {
        let (h, w) = self.image_size_of(item)?;
        Ok(ItemLayout::fixed(self.geometry.slots(h, w)))
    }
    fn encode_item(&self, preprocessed: &Tensor) -> multitoken_core::Result<Vec<Tensor>> {
        let s = self.geometry.tile;
        let bad = |why: String| multitoken_core::Error::from(Error::config("vision_anyres", why));
        let (n, c, h, w) = preprocessed.dims4()?;
        if c != 4 || h != s || w != s || n < 2 {
            return Err(bad(format!("a preprocessed image is [tiles >= 2, 4, {s}, {s}], got {:?}", preprocessed.dims())));
        }
        let meta = preprocessed.get(0)?.get(3)?.get(0)?.narrow(0, 0, 4)?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let height = meta[0] as usize * 256 + meta[1] as usize;
        let width = meta[2] as usize * 256 + meta[3] as usize;
        let (tile_rows, tile_cols) = self.geometry.tile_grid(height, width);
        if n != 1 + tile_rows * tile_cols || height == 0 || width == 0 {
            return Err(bad(format!("{n} tiles do not fit a {width}x{height} image's {tile_rows}x{tile_cols} grid")));
        }
        let features = self.tile_features(&preprocessed.narrow(1, 0, 3)?)?;
        let (_, positions, dim) = features.dims3()?;
        let g = self.geometry.grid;
        if positions != g * g {
            return Err(bad(format!("the tower gave {positions} positions per tile, expected {g}x{g}")));
        }
        let base = features.narrow(0, 0, 1)?;
        let grid = features
            .narrow(0, 1, n - 1)?
            .reshape((tile_rows, tile_cols, g, g, dim))?
            .permute((0, 2, 1, 3, 4))?
            .reshape((tile_rows * g, tile_cols * g, dim))?;
        let (top, left, rows, cols) = self.geometry.unpadded(height, width);
        if rows == 0 {
            // An extremely wide image: transformers keeps no grid row (and no newline).
            return Ok(vec![base]);
        }
        let grid = grid.narrow(0, top, rows)?.narrow(1, left, cols)?.unsqueeze(0)?;
        Ok(vec![base, grid])
    }
}

/// The tile cutting settings from the image processor's raw settings
/// (`size`, `crop_size`, `resample`), as `_preprocess` reads them.
fn tile_settings(raw: &serde_json::Value, processor: &ImageProcessorConfig) -> Result<TileSettings> {
    let side = |v: Option<&serde_json::Value>, key: &str| v.and_then(|v| v.get(key)).and_then(serde_json::Value::as_u64).map(|n| n as usize);
    let size = raw.get("size");
    let crop = raw.get("crop_size");
    let base_size = match (side(size, "height"), side(size, "width"), side(size, "shortest_edge")) {
        (Some(h), Some(w), _) => (h, w),
        (_, _, Some(e)) => (e, e),
        _ => match processor.resize {
            Some(ResizeTo::Exact { height, width }) => (height, width),
            Some(ResizeTo::ShortestEdge(e)) => (e, e),
            None => return Err(Error::config("image_processor", "needs a `size`")),
        },
    };
    let patch_size = side(crop, "height").or(side(size, "height")).or(side(size, "shortest_edge")).unwrap_or(base_size.0);
    if patch_size == 0 || base_size.0 == 0 || base_size.1 == 0 {
        return Err(Error::config("image_processor", "sizes must be positive"));
    }
    let filter = match raw.get("resample").and_then(serde_json::Value::as_u64) {
        Some(code) => ResampleFilter::from_pil_code(code)?,
        None => ResampleFilter::Bicubic,
    };
    Ok(TileSettings { base_size, patch_size, filter })
}

/// `anyres_max_N` → `N`, as transformers' `int(s.strip("anyres_max_"))`.
fn parse_anyres_max(value: &str) -> Result<usize> {
    let digits = value.trim_matches(|c: char| "anyres_max_".contains(c));
    digits
        .parse::<usize>()
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| Error::config("vision_aspect_ratio", format!("`{value}` is not `anyres_max_N` with N >= 1")))
}

fn build(config: &serde_json::Value, context: &ModalityContext) -> multitoken_core::Result<Box<dyn Modality>> {
    let parsed: VisionAnyResConfig =
        serde_json::from_value(config.clone()).map_err(|e| Error::config("vision_anyres config", e.to_string()))?;
    Ok(Box::new(VisionAnyRes::from_config(&parsed, context)?))
}

/// Referenced from [`crate::link`] so that the linker keeps this object file.
pub(crate) fn keep_registration() {
    type Build = fn(&serde_json::Value, &ModalityContext) -> multitoken_core::Result<Box<dyn Modality>>;
    std::hint::black_box(build as Build);
}

multitoken_core::inventory::submit! {
    ModalityBuilder { name: "vision_anyres", build }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anyres_max_parses_as_python_strips() {
        assert_eq!(parse_anyres_max("anyres_max_9").unwrap(), 9);
        assert_eq!(parse_anyres_max("anyres_max_12").unwrap(), 12);
        assert!(parse_anyres_max("anyres").is_err());
    }
}
