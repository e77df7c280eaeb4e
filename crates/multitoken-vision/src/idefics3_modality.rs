//! The `vision_idefics3` modality: Idefics3's and SmolVLM's images (`<image>`,
//! data key `images`) through their SigLIP tower, registered with the core
//! registry.
//!
//! Builder config (the `config` of a `multitoken.json` modality entry; an
//! importer writes it from an Idefics3 / SmolVLM `config.json`):
//!
//! ```json
//! {
//!   "tower_config": { ... },          // Idefics3VisionConfig fields; optional: else the tower
//!                                     // dir's config.json (its `vision_config`, or the file itself)
//!   "tower": ".",                     // dir of the weights, relative to the model dir
//!   "weights_prefix": "model.vision_model",  // optional: found automatically
//!   "image_processor": { ... },       // optional: else preprocessor_config.json or the
//!                                     // `image_processor` of processor_config.json (tower dir,
//!                                     // then model dir); else Idefics3's defaults
//!   "image_seq_len": 169,             // slots per tile; optional: else processor_config.json's,
//!                                     // else (tile patches)² / scale_factor²
//!   "projector": {"kind": "idefics3_connector", "scale_factor": 2},   // required
//!   "patch_rule": "any",              // a patch is real when any (Idefics3) or all of its
//!                                     // pixels are; default "any"
//!   "fake_image_token": "<fake_token_around_image>", "global_image_token": "<global-img>",
//!   "max_pixels": 89478485            // decompression-bomb limit; optional
//! }
//! ```
//!
//! An image's layout is what `Idefics3Processor` writes for it: split into
//! `rows × cols` tiles, for each row and each column
//! `<fake_token_around_image><row_{r}_col_{c}>` + `image_seq_len` slots, a
//! `"\n"` after each row, then `"\n<fake_token_around_image><global-img>"` +
//! slots + `<fake_token_around_image>`; not split,
//! `<fake_token_around_image><global-img>` + slots +
//! `<fake_token_around_image>`. The grid depends on the image's size, so
//! [`Modality::layout`] decodes the image. No text rule applies (unlike
//! Idefics2, adjacent images keep both fake tokens).
//!
//! [`Modality::preprocess`] returns `[tiles, 3, M, M]` f32 on the CPU (`M` =
//! `max_image_size`): every tile is a full square, so the pixel mask is all
//! ones and, under either patch rule, every whole patch is real.
//! [`Modality::encode_item`] gives one piece, the tower's last hidden state of
//! all tiles `[tiles, (M/p)², hidden]`, which the `idefics3_connector` shuffles
//! and projects to `[tiles · image_seq_len, text hidden]` in tile order.
//! RGBA images are composited on white (the image processor's
//! `convert_to_rgb`; `Idefics3Processor` does not pre-convert them).

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use multitoken_core::{Item, ItemLayout, LayoutPart, Modality, ModalityBuilder, ModalityContext, ProjectorSpec};
use serde::Deserialize;

use crate::decode::{decode_item_with, describe_item, DecodeLimits, RgbImage, Transparency};
use crate::idefics3_processor::Idefics3ProcessorConfig;
use crate::modality::{IMAGES_KEY, IMAGE_TOKEN};
use crate::processor::read_json;
use crate::siglip::{SiglipVisionConfig, SiglipVisionTower};
use crate::siglip_modality::{load_tower, read_dir_config, FAKE_IMAGE_TOKEN};
use crate::{Error, Result};

/// The text token before the whole image's slots.
pub const GLOBAL_IMAGE_TOKEN: &str = "<global-img>";

/// Which patches of a padded crop are real.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PatchRule {
    /// Any pixel real (Idefics3 / SmolVLM: `patches_subgrid.sum() > 0`).
    #[default]
    Any,
    /// All pixels real (Idefics2: `sum == p²`).
    All,
}

impl PatchRule {
    /// Whether a patch whose pixel mask is `mask` (1.0 real) counts as real.
    pub fn is_real(self, mask: impl IntoIterator<Item = f32>) -> bool {
        let mut iter = mask.into_iter().map(|m| m > 0.5);
        match self {
            PatchRule::Any => iter.any(|m| m),
            PatchRule::All => iter.all(|m| m),
        }
    }
}

/// Settings of a `vision_idefics3` modality, as in its builder config.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VisionIdefics3Config {
    /// The vision config inline (an importer's `vision_config`).
    #[serde(default)]
    pub tower_config: Option<serde_json::Value>,
    /// Weights directory, relative to the model directory.
    #[serde(default)]
    pub tower: Option<String>,
    /// Key prefix of the `vision_model` level in the weights.
    #[serde(default)]
    pub weights_prefix: Option<String>,
    /// Inline preprocessing settings.
    #[serde(default)]
    pub image_processor: Option<serde_json::Value>,
    /// Slots per tile.
    #[serde(default)]
    pub image_seq_len: Option<usize>,
    /// The connector (`idefics3_connector`).
    #[serde(default)]
    pub projector: Option<ProjectorSpec>,
    /// Which patches of a crop are real.
    #[serde(default)]
    pub patch_rule: PatchRule,
    /// The text token around each image.
    #[serde(default)]
    pub fake_image_token: Option<String>,
    /// The text token before the whole image.
    #[serde(default)]
    pub global_image_token: Option<String>,
    /// Decompression-bomb limit in pixels.
    #[serde(default)]
    pub max_pixels: Option<u64>,
}

/// The Idefics3 / SmolVLM vision modality.
pub struct VisionIdefics3 {
    processor: Idefics3ProcessorConfig,
    tower: SiglipVisionTower,
    image_seq_len: usize,
    projector: ProjectorSpec,
    patch_rule: PatchRule,
    fake_image_token: String,
    global_image_token: String,
    limits: DecodeLimits,
    device: Device,
    dtype: DType,
}

impl std::fmt::Debug for VisionIdefics3 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VisionIdefics3")
            .field("processor", &self.processor)
            .field("image_seq_len", &self.image_seq_len)
            .field("projector", &self.projector)
            .finish_non_exhaustive()
    }
}

impl VisionIdefics3 {
    /// Builds the modality from its config; paths resolve against `context.model_dir`.
    pub fn from_config(config: &VisionIdefics3Config, context: &ModalityContext) -> Result<Self> {
        let tower_dir = context.resolve(config.tower.as_deref().unwrap_or("."));
        let dir_config = read_dir_config(&tower_dir)?;
        let tower_config = resolve_tower_config(config.tower_config.as_ref(), &tower_dir, dir_config.as_ref())?;
        let processor = match &config.image_processor {
            Some(value) => Idefics3ProcessorConfig::from_json(value, "vision_idefics3 image_processor")?,
            None => processor_from_dirs(&tower_dir, &context.model_dir)?,
        };
        let projector = config.projector.ok_or_else(|| {
            Error::config("vision_idefics3", "needs `projector` ({\"kind\": \"idefics3_connector\", \"scale_factor\": n})")
        })?;
        projector.validate()?;
        let image_seq_len = resolve_seq_len(config.image_seq_len, &projector, &tower_config, &processor, &tower_dir, &context.model_dir)?;
        let tower = load_tower(&tower_config, &tower_dir, config.weights_prefix.as_deref(), context)?;
        let mut limits = DecodeLimits::default();
        if let Some(max) = config.max_pixels {
            limits.max_pixels = max;
        }
        let token = |given: &Option<String>, default: &str, what: &str| -> Result<String> {
            let token = given.clone().unwrap_or_else(|| default.to_string());
            if token.is_empty() {
                return Err(Error::config(format!("vision_idefics3 {what}"), "must not be empty"));
            }
            Ok(token)
        };
        Ok(Self {
            processor,
            tower,
            image_seq_len,
            projector,
            patch_rule: config.patch_rule,
            fake_image_token: token(&config.fake_image_token, FAKE_IMAGE_TOKEN, "fake_image_token")?,
            global_image_token: token(&config.global_image_token, GLOBAL_IMAGE_TOKEN, "global_image_token")?,
            limits,
            device: context.device.clone(),
            dtype: context.dtype,
        })
    }

    /// The preprocessing settings.
    pub fn processor(&self) -> &Idefics3ProcessorConfig {
        &self.processor
    }

    /// The SigLIP tower.
    pub fn tower(&self) -> &SiglipVisionTower {
        &self.tower
    }

    /// Slots per tile.
    pub fn image_seq_len(&self) -> usize {
        self.image_seq_len
    }

    /// The layout of an image split into `rows × cols` tiles (`0 × 0`: not
    /// split), as `Idefics3Processor` writes its prompt string.
    pub fn layout_for_grid(&self, rows: usize, cols: usize) -> Result<ItemLayout> {
        let fake = &self.fake_image_token;
        let global = &self.global_image_token;
        let mut parts = LayoutBuilder::default();
        if rows == 0 || cols == 0 {
            parts.text(&format!("{fake}{global}"));
        } else {
            for r in 1..=rows {
                for c in 1..=cols {
                    parts.text(&format!("{fake}<row_{r}_col_{c}>"));
                    parts.slots(self.image_seq_len);
                }
                parts.text("\n");
            }
            parts.text(&format!("\n{fake}{global}"));
        }
        parts.slots(self.image_seq_len);
        parts.text(fake);
        Ok(ItemLayout::new(parts.parts)?)
    }

    fn decode(&self, item: &Item) -> Result<RgbImage> {
        if let Item::Text(_) = item {
            return Err(Error::UnsupportedItem {
                item: describe_item(item),
                reason: "inline text is not an image; give a path or the file's bytes".to_string(),
            });
        }
        decode_item_with(item, &self.limits, Transparency::OverWhite)
    }

    /// Encodes the tiles of one preprocessed item `[tiles, 3, M, M]` in one
    /// batch: `[tiles, patches, hidden]`.
    fn encode_tiles(&self, tiles: &Tensor) -> Result<Tensor> {
        let (n, channels, h, w) = tiles.dims4()?;
        if channels != 3 || n == 0 {
            return Err(Error::config(
                "vision_idefics3",
                format!("a preprocessed item is [tiles, 3, M, M], got {:?}", tiles.dims()),
            ));
        }
        let p = self.tower.config().patch_size;
        // Every pixel of a tile is real: under either rule each whole patch is
        // real, and the convolution drops the pixels past the last whole patch.
        let full = self.patch_rule.is_real(std::iter::repeat_n(1.0, p * p));
        let (rows, cols) = (h / p, w / p);
        if !full || rows == 0 || cols == 0 {
            return Err(Error::config(
                "vision_idefics3",
                format!("a {w}x{h} tile holds no whole {p}x{p} patch"),
            ));
        }
        let batch = tiles
            .narrow(2, 0, rows * p)?
            .narrow(3, 0, cols * p)?
            .to_device(&self.device)?
            .to_dtype(self.dtype)?;
        self.tower.forward(&batch)
    }
}

/// Collects layout parts, joining adjacent text.
#[derive(Default)]
struct LayoutBuilder {
    parts: Vec<LayoutPart>,
}

impl LayoutBuilder {
    fn text(&mut self, text: &str) {
        if let Some(LayoutPart::Text(last)) = self.parts.last_mut() {
            last.push_str(text);
        } else {
            self.parts.push(LayoutPart::Text(text.to_string()));
        }
    }
    fn slots(&mut self, n: usize) {
        self.parts.push(LayoutPart::Slots(n));
    }
}

impl Modality for VisionIdefics3 {
    fn media(&self) -> multitoken_core::ItemMedia {
        multitoken_core::ItemMedia::Image
    }
    fn encoder_weights(&self) -> Option<multitoken_core::EncoderWeights> {
        Some(multitoken_core::EncoderWeights::at("tower").with_default("."))
    }
    fn name(&self) -> &str {
        "vision_idefics3"
    }
    fn token(&self) -> &str {
        IMAGE_TOKEN
    }
    fn data_key(&self) -> &str {
        IMAGES_KEY
    }
    fn token_width(&self) -> usize {
        self.image_seq_len
    }
    fn feature_dim(&self) -> usize {
        self.tower.config().hidden_size
    }
    fn preprocess(&self, item: &Item) -> multitoken_core::Result<Tensor> {
        let image = self.decode(item)?;
        let tiles = self.processor.preprocess(&image).map_err(|e| Error::config(describe_item(item), e.to_string()))?;
        let m = self.processor.max_image_size;
        let n = tiles.crops.len();
        let mut data = Vec::with_capacity(n * 3 * m * m);
        for crop in &tiles.crops {
            data.extend_from_slice(&crop.values);
        }
        Ok(Tensor::from_vec(data, (n, 3, m, m), &Device::Cpu)?)
    }
    /// A batch of preprocessed items of one shape, `[items, tiles, 3, M, M]`:
    /// `[items · tiles, patches, hidden]`.
    fn encode(&self, batch: &Tensor) -> multitoken_core::Result<Tensor> {
        let (items, tiles, c, h, w) = batch.dims5()?;
        Ok(self.encode_tiles(&batch.reshape((items * tiles, c, h, w))?)?)
    }
    fn projector(&self) -> ProjectorSpec {
        self.projector
    }
    fn layout(&self, item: &Item) -> multitoken_core::Result<ItemLayout> {
        let image = self.decode(item)?;
        let (rows, cols) = self.processor.grid(image.width, image.height)?;
        Ok(self.layout_for_grid(rows, cols)?)
    }
    fn encode_item(&self, preprocessed: &Tensor) -> multitoken_core::Result<Vec<Tensor>> {
        Ok(vec![self.encode_tiles(preprocessed)?])
    }
}

fn build(config: &serde_json::Value, context: &ModalityContext) -> multitoken_core::Result<Box<dyn Modality>> {
    let parsed: VisionIdefics3Config = if config.is_null() {
        VisionIdefics3Config::default()
    } else {
        serde_json::from_value(config.clone()).map_err(|e| Error::config("vision_idefics3 config", e.to_string()))?
    };
    Ok(Box::new(VisionIdefics3::from_config(&parsed, context)?))
}

/// Referenced from [`crate::link`] so that the linker keeps this object file.
pub(crate) fn keep_registration() {
    type Build = fn(&serde_json::Value, &ModalityContext) -> multitoken_core::Result<Box<dyn Modality>>;
    std::hint::black_box(build as Build);
}

multitoken_core::inventory::submit! {
    ModalityBuilder { name: "vision_idefics3", build }
}

/// The inline config, else the dir config's `vision_config`, else the dir
/// config itself.
fn resolve_tower_config(
    inline: Option<&serde_json::Value>,
    dir: &Path,
    dir_config: Option<&serde_json::Value>,
) -> Result<SiglipVisionConfig> {
    let (value, what) = match (inline, dir_config) {
        (Some(value), _) => (value.clone(), "vision_idefics3 tower_config".to_string()),
        (None, Some(file)) => (file.get("vision_config").unwrap_or(file).clone(), dir.join("config.json").display().to_string()),
        (None, None) => {
            return Err(Error::config(
                "vision_idefics3",
                format!("needs `tower_config` (no config.json in {})", dir.display()),
            ))
        }
    };
    let parsed: SiglipVisionConfig = serde_json::from_value(value).map_err(|e| Error::config(&what, e.to_string()))?;
    parsed.validate(&what)?;
    if parsed.num_channels != 3 {
        return Err(Error::config(&what, format!("num_channels is {} but images are RGB (3)", parsed.num_channels)));
    }
    Ok(parsed)
}

fn processor_from_dirs(tower_dir: &Path, model_dir: &Path) -> Result<Idefics3ProcessorConfig> {
    for dir in [tower_dir, model_dir] {
        if let Some(config) = Idefics3ProcessorConfig::from_model_dir(dir)? {
            return Ok(config);
        }
    }
    Ok(Idefics3ProcessorConfig::default())
}

/// Slots per tile: given, else processor_config.json's `image_seq_len`, else
/// what the connector makes of one tile; it must equal the latter.
fn resolve_seq_len(
    given: Option<usize>,
    projector: &ProjectorSpec,
    tower: &SiglipVisionConfig,
    processor: &Idefics3ProcessorConfig,
    tower_dir: &Path,
    model_dir: &Path,
) -> Result<usize> {
    let side = processor.max_image_size / tower.patch_size;
    let ProjectorSpec::Idefics3Connector(connector) = projector else {
        return Err(Error::config(
            "vision_idefics3",
            format!("the projector must be idefics3_connector, got {projector}"),
        ));
    };
    let s = connector.scale_factor;
    if side == 0 || !side.is_multiple_of(s) {
        return Err(Error::config(
            "vision_idefics3",
            format!(
                "a {m}x{m} tile (max_image_size) is {side}x{side} patches of {p}, which scale_factor {s} does not divide",
                m = processor.max_image_size,
                p = tower.patch_size
            ),
        ));
    }
    let emitted = projector.output_width(side * side);
    let from_file = || -> Result<Option<(usize, String)>> {
        for dir in [tower_dir, model_dir] {
            let path = dir.join("processor_config.json");
            if path.is_file() {
                if let Some(n) = read_json(&path)?.get("image_seq_len") {
                    let n = n.as_u64().ok_or_else(|| {
                        Error::config(path.display().to_string(), format!("image_seq_len must be an integer, got {n}"))
                    })?;
                    return Ok(Some((n as usize, path.display().to_string())));
                }
            }
        }
        Ok(None)
    };
    let (seq_len, source) = match given {
        Some(n) => (n, "vision_idefics3 image_seq_len".to_string()),
        None => match from_file()? {
            Some(found) => found,
            None => return Ok(emitted),
        },
    };
    if seq_len != emitted {
        return Err(Error::config(
            source,
            format!(
                "image_seq_len is {seq_len} but the connector makes {emitted} positions of a tile \
                 ({side}x{side} patches, scale_factor {s})"
            ),
        ));
    }
    Ok(seq_len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patch_rules_differ_on_partial_patches() {
        assert!(PatchRule::Any.is_real([0.0, 1.0, 0.0]));
        assert!(!PatchRule::All.is_real([0.0, 1.0, 0.0]));
        assert!(PatchRule::All.is_real([1.0, 1.0]));
        assert!(!PatchRule::Any.is_real([0.0, 0.0]));
    }
}
