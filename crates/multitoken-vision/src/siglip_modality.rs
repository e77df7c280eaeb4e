//! The `vision_siglip` modality: Idefics2's images (`<image>`, data key
//! `images`) through its SigLIP tower, registered with the core registry.
//!
//! Builder config (the `config` of a `multitoken.json` modality entry; an
//! importer writes it from an Idefics2 `config.json`):
//!
//! ```json
//! {
//!   "tower_config": { ... },          // Idefics2VisionConfig fields; optional: else the tower
//!                                     // dir's config.json (its `vision_config`, or the file itself)
//!   "tower": ".",                     // dir of the weights, relative to the model dir (default ".")
//!   "weights_prefix": "model.vision_model",  // key prefix of the `vision_model` level; optional:
//!                                     // found automatically (`model.vision_model`, `vision_model`,
//!                                     // Cephalo's `model.model.vision_model`, ...)
//!   "image_processor": { ... },       // preprocessor fields (size, do_image_splitting, ...);
//!                                     // optional: else preprocessor_config.json, or the
//!                                     // `image_processor` of processor_config.json, in the tower
//!                                     // dir, then the model dir; else Idefics2's defaults
//!   "image_seq_len": 64,              // slots per crop; optional: else processor_config.json's
//!                                     // `image_seq_len`, else the projector's latents, else 64
//!   "fake_image_token": "<fake_token_around_image>",   // optional
//!   "projector": {"kind": "idefics2_connector", ...},  // what `Modality::projector` reports;
//!                                     // optional: else built from the tower dir's config.json
//!                                     // (`perceiver_config` + `text_config.intermediate_size`)
//!   "max_pixels": 89478485,           // decompression-bomb limit; optional
//!   "patch_rule": "all"               // a patch is real when all (Idefics2, default) or any
//!                                     // (Idefics3) of its pixels are
//! }
//! ```
//!
//! The weights are every `*.safetensors` file of the tower dir (shards
//! included), memory-mapped; only the tower's tensors are read. With
//! `ModalityContext::trainable` set they become variables of that map (only
//! the keys under the prefix); a tower dir without weights then starts from
//! random weights at the prefix (default none).
//!
//! An image's layout is `<fake>` + `image_seq_len` slots + `<fake>` per crop,
//! 5 crops (4 quarters + the whole image) with `do_image_splitting`, else 1,
//! the `<fake>`s between crops written once, as `Idefics2Processor` writes
//! the prompt; its two text rules go with it for the preparer to apply to the
//! row's text: doubled `<fake>`s where two images meet become one
//! ([`TextRule::CollapseRepeats`]) and a space goes after a `<fake>` followed
//! by neither whitespace nor `<` ([`TextRule::SpaceAfter`]). It needs no pixel.
//!
//! [`Modality::preprocess`] returns `[crops, 4, H, W]` f32 on the CPU: each
//! crop's normalised RGB padded bottom/right with 0.0 to the largest crop,
//! and in channel 3 its pixel mask (1.0 real, 0.0 padding).
//! [`Modality::encode_item`] gives one `[1, patches, hidden]` piece per crop:
//! the tower's last hidden state for that crop's whole patches alone, which is
//! what transformers' padded, masked batch gives at the real patches (a patch
//! is real when **all** its pixels are, so a crop of `h × w` pixels has
//! `⌊h/p⌋ × ⌊w/p⌋` patches and no padding pixel ever reaches the tower; with
//! `patch_rule: "any"` a patch touching one real pixel counts, up to the
//! padded crop's whole patches, and its padding pixels enter as 0.0, as they do
//! in transformers).
//! Crops whose RGB values are all 0.0 are dropped, as transformers drops them
//! as padding images.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use multitoken_core::{Item, ItemLayout, LayoutPart, Modality, ModalityBuilder, ModalityContext, ProjectorSpec, TextRule};
use serde::Deserialize;

use crate::decode::{decode_item_with, describe_item, DecodeLimits, Transparency};
use crate::idefics2_processor::{pack_crops, Idefics2ProcessorConfig};
use crate::idefics3_modality::PatchRule;
use crate::modality::{IMAGES_KEY, IMAGE_TOKEN};
use crate::processor::read_json;
use crate::siglip::{SiglipVisionConfig, SiglipVisionTower};
use crate::{Error, Result};

/// Idefics2's text token around each crop's slots.
pub const FAKE_IMAGE_TOKEN: &str = "<fake_token_around_image>";

/// Settings of a `vision_siglip` modality, as in its builder config.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VisionSiglipConfig {
    /// The vision config inline (an importer's `vision_config`).
    #[serde(default)]
    pub tower_config: Option<serde_json::Value>,
    /// Weights directory, relative to the model directory.
    #[serde(default)]
    pub tower: Option<String>,
    /// Key prefix of the `vision_model` level in the weights.
    #[serde(default)]
    pub weights_prefix: Option<String>,
    /// Inline preprocessing settings (preprocessor_config.json fields).
    #[serde(default)]
    pub image_processor: Option<serde_json::Value>,
    /// Slots per crop.
    #[serde(default)]
    pub image_seq_len: Option<usize>,
    /// The text token around each crop's slots.
    #[serde(default)]
    pub fake_image_token: Option<String>,
    /// The projector this modality reports.
    #[serde(default)]
    pub projector: Option<ProjectorSpec>,
    /// Decompression-bomb limit in pixels.
    #[serde(default)]
    pub max_pixels: Option<u64>,
    /// Which patches of a padded crop are real: `"all"` of their pixels
    /// (Idefics2, the default) or `"any"` (Idefics3's rule).
    #[serde(default)]
    pub patch_rule: Option<PatchRule>,
}

/// The Idefics2 SigLIP vision modality.
pub struct VisionSiglip {
    processor: Idefics2ProcessorConfig,
    tower: SiglipVisionTower,
    image_seq_len: usize,
    fake_image_token: String,
    projector: ProjectorSpec,
    limits: DecodeLimits,
    patch_rule: PatchRule,
    device: Device,
    dtype: DType,
}

impl std::fmt::Debug for VisionSiglip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VisionSiglip")
            .field("processor", &self.processor)
            .field("image_seq_len", &self.image_seq_len)
            .field("projector", &self.projector)
            .finish_non_exhaustive()
    }
}

impl VisionSiglip {
    /// Builds the modality from its config; paths resolve against `context.model_dir`.
    pub fn from_config(config: &VisionSiglipConfig, context: &ModalityContext) -> Result<Self> {
        let tower_dir = context.resolve(config.tower.as_deref().unwrap_or("."));
        let dir_config = read_dir_config(&tower_dir)?;
        let tower_config = resolve_tower_config(config, &tower_dir, dir_config.as_ref())?;
        let processor = match &config.image_processor {
            Some(value) => Idefics2ProcessorConfig::from_json(value, "vision_siglip image_processor")?,
            None => processor_from_dirs(&tower_dir, &context.model_dir)?,
        };
        let projector = match config.projector {
            Some(spec) => spec,
            None => projector_from_config(dir_config.as_ref(), &tower_dir)?,
        };
        projector.validate()?;
        let image_seq_len = resolve_seq_len(config.image_seq_len, &projector, &tower_dir, &context.model_dir)?;
        let fake_image_token = config.fake_image_token.clone().unwrap_or_else(|| FAKE_IMAGE_TOKEN.to_string());
        if fake_image_token.is_empty() {
            return Err(Error::config("vision_siglip fake_image_token", "must not be empty"));
        }
        let tower = load_tower(&tower_config, &tower_dir, config.weights_prefix.as_deref(), context)?;
        let mut limits = DecodeLimits::default();
        if let Some(max) = config.max_pixels {
            limits.max_pixels = max;
        }
        Ok(Self {
            processor,
            tower,
            image_seq_len,
            fake_image_token,
            projector,
            limits,
            patch_rule: config.patch_rule.unwrap_or(PatchRule::All),
            device: context.device.clone(),
            dtype: context.dtype,
        })
    }

    /// The preprocessing settings.
    pub fn processor(&self) -> &Idefics2ProcessorConfig {
        &self.processor
    }

    /// The SigLIP tower.
    pub fn tower(&self) -> &SiglipVisionTower {
        &self.tower
    }

    /// Slots per crop.
    pub fn image_seq_len(&self) -> usize {
        self.image_seq_len
    }

    /// The layout of any image: it depends on the settings alone.
    pub fn image_layout(&self) -> Result<ItemLayout> {
        let fake = || LayoutPart::Text(self.fake_image_token.clone());
        let mut parts = vec![fake()];
        for _ in 0..self.processor.crops_per_image() {
            parts.push(LayoutPart::Slots(self.image_seq_len));
            parts.push(fake());
        }
        Ok(ItemLayout::new(parts)?
            .with_text_rule(TextRule::CollapseRepeats(self.fake_image_token.clone()))
            .with_text_rule(TextRule::SpaceAfter(self.fake_image_token.clone())))
    }

    /// Encodes every real crop of one preprocessed item (`[crops, 4, H, W]`),
    /// crops of one patch grid in one batch: `[1, patches, hidden]` per crop.
    fn encode_crops(&self, preprocessed: &Tensor) -> Result<Vec<Tensor>> {
        let (n, channels, h, w) = preprocessed.dims4()?;
        if channels != 4 {
            return Err(Error::config(
                "vision_siglip",
                format!("a preprocessed item is [crops, 4, H, W], got {:?}", preprocessed.dims()),
            ));
        }
        let cpu = preprocessed.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
        let mut grids = Vec::with_capacity(n);
        for i in 0..n {
            let crop = cpu.get(i)?;
            let mask = crop.get(3)?.to_vec2::<f32>()?;
            let all_zero = crop.narrow(0, 0, 3)?.abs()?.max_keepdim(0)?.flatten_all()?.max(0)?.to_scalar::<f32>()? == 0.0;
            grids.push(if all_zero { None } else { Some(self.real_patches(i, &mask, h, w)?) });
        }
        // One forward per patch grid, in first-seen order; pieces in crop order.
        let mut pieces: Vec<Option<Tensor>> = vec![None; n];
        let mut done = vec![false; n];
        for i in 0..n {
            let Some(grid) = grids[i] else { continue };
            if done[i] {
                continue;
            }
            let same: Vec<usize> = (i..n).filter(|&j| grids[j] == Some(grid)).collect();
            let p = self.tower.config().patch_size;
            let crops = same
                .iter()
                .map(|&j| preprocessed.get(j)?.narrow(0, 0, 3)?.narrow(1, 0, grid.0 * p)?.narrow(2, 0, grid.1 * p))
                .collect::<candle_core::Result<Vec<_>>>()?;
            let batch = Tensor::stack(&crops, 0)?.to_device(&self.device)?.to_dtype(self.dtype)?;
            let out = self.tower.forward(&batch)?;
            for (k, &j) in same.iter().enumerate() {
                pieces[j] = Some(out.narrow(0, k, 1)?);
                done[j] = true;
            }
        }
        let pieces: Vec<Tensor> = pieces.into_iter().flatten().collect();
        if pieces.is_empty() {
            return Err(Error::config("vision_siglip", "the item has no real crop (all are padding)"));
        }
        Ok(pieces)
    }

    /// The `(rows, cols)` of crop `index`'s real patches: a patch is real when
    /// all its pixels are (transformers' `patch_attention_mask`); they must
    /// form a top-left block.
    fn real_patches(&self, index: usize, mask: &[Vec<f32>], h: usize, w: usize) -> Result<(usize, usize)> {
        let p = self.tower.config().patch_size;
        let (grid_h, grid_w) = (h / p, w / p);
        let rule = self.patch_rule;
        let real = |r: usize, c: usize| rule.is_real((r * p..(r + 1) * p).flat_map(|y| mask[y][c * p..(c + 1) * p].iter().copied()));
        let rows = (0..grid_h).take_while(|&r| grid_w > 0 && real(r, 0)).count();
        let cols = (0..grid_w).take_while(|&c| grid_h > 0 && real(0, c)).count();
        if rows == 0 || cols == 0 {
            let (mh, mw) = real_extent(mask);
            return Err(Error::config(
                "vision_siglip",
                format!("crop {} is {mw}x{mh} pixels, smaller than one {p}x{p} patch", index + 1),
            ));
        }
        for r in 0..grid_h {
            for c in 0..grid_w {
                if real(r, c) != (r < rows && c < cols) {
                    return Err(Error::config(
                        "vision_siglip",
                        format!("crop {}: the pixel mask is not a top-left rectangle", index + 1),
                    ));
                }
            }
        }
        Ok((rows, cols))
    }
}

/// Rows and columns of the mask's real pixels along its first column and row.
fn real_extent(mask: &[Vec<f32>]) -> (usize, usize) {
    let rows = mask.iter().take_while(|row| row.first().is_some_and(|&m| m > 0.5)).count();
    let cols = mask.first().map_or(0, |row| row.iter().take_while(|&&m| m > 0.5).count());
    (rows, cols)
}

impl Modality for VisionSiglip {
    fn media(&self) -> multitoken_core::ItemMedia {
        multitoken_core::ItemMedia::Image
    }
    fn encoder_weights(&self) -> Option<multitoken_core::EncoderWeights> {
        Some(multitoken_core::EncoderWeights::at("tower").with_default("."))
    }
    fn name(&self) -> &str {
        "vision_siglip"
    }
    fn token(&self) -> &str {
        IMAGE_TOKEN
    }
    fn data_key(&self) -> &str {
        IMAGES_KEY
    }
    fn token_width(&self) -> usize {
        self.image_seq_len * self.processor.crops_per_image()
    }
    fn feature_dim(&self) -> usize {
        self.tower.config().hidden_size
    }
    fn preprocess(&self, item: &Item) -> multitoken_core::Result<Tensor> {
        // Idefics2Processor loads every image with transformers' `load_image`,
        // which is Pillow's `convert("RGB")`: transparency is dropped, not
        // composited on white as the image processor alone would.
        let image = decode_item_with(item, &self.limits, Transparency::Dropped)?;
        let crops = self.processor.preprocess(&image)?;
        let p = self.tower.config().patch_size;
        for (i, crop) in crops.iter().enumerate() {
            if crop.height < p || crop.width < p {
                return Err(Error::config(
                    describe_item(item),
                    format!(
                        "crop {} of the {}x{} image is {}x{} after resizing, smaller than one {p}x{p} patch",
                        i + 1,
                        image.width,
                        image.height,
                        crop.width,
                        crop.height
                    ),
                )
                .into());
            }
            if crop.values.iter().all(|&v| v == 0.0) {
                return Err(Error::config(
                    describe_item(item),
                    format!(
                        "crop {} is all 0.0 after normalisation, which transformers drops as a padding image \
                         (its image tokens would get no features)",
                        i + 1
                    ),
                )
                .into());
            }
        }
        let (data, n, h, w) = pack_crops(&crops);
        Ok(Tensor::from_vec(data, (n, 4, h, w), &Device::Cpu)?)
    }
    /// A batch of preprocessed items of one shape, `[items, crops, 4, H, W]`:
    /// every real crop's features, `[real crops, patches, hidden]`, when they
    /// all have one patch grid (else an error: use `encode_item`).
    fn encode(&self, batch: &Tensor) -> multitoken_core::Result<Tensor> {
        let items = batch.dim(0)?;
        let mut pieces = Vec::new();
        for i in 0..items {
            pieces.extend(self.encode_crops(&batch.get(i)?)?);
        }
        let first = pieces.first().map(|t| t.dims().to_vec());
        if pieces.iter().any(|t| Some(t.dims().to_vec()) != first) {
            return Err(Error::config(
                "vision_siglip",
                "crops of different patch grids cannot share one tensor; encode items one at a time (encode_item)",
            )
            .into());
        }
        Ok(Tensor::cat(&pieces, 0)?)
    }
    fn projector(&self) -> ProjectorSpec {
        self.projector
    }
    fn layout(&self, item: &Item) -> multitoken_core::Result<ItemLayout> {
        if let Item::Text(_) = item {
            return Err(Error::UnsupportedItem {
                item: describe_item(item),
                reason: "inline text is not an image; give a path or the file's bytes".to_string(),
            }
            .into());
        }
        Ok(self.image_layout()?)
    }
    fn encode_item(&self, preprocessed: &Tensor) -> multitoken_core::Result<Vec<Tensor>> {
        Ok(self.encode_crops(preprocessed)?)
    }
}

fn build(config: &serde_json::Value, context: &ModalityContext) -> multitoken_core::Result<Box<dyn Modality>> {
    let parsed: VisionSiglipConfig = if config.is_null() {
        VisionSiglipConfig::default()
    } else {
        serde_json::from_value(config.clone()).map_err(|e| Error::config("vision_siglip config", e.to_string()))?
    };
    Ok(Box::new(VisionSiglip::from_config(&parsed, context)?))
}

/// Referenced from [`crate::link`] so that the linker keeps this object file.
pub(crate) fn keep_registration() {
    type Build = fn(&serde_json::Value, &ModalityContext) -> multitoken_core::Result<Box<dyn Modality>>;
    std::hint::black_box(build as Build);
}

multitoken_core::inventory::submit! {
    ModalityBuilder { name: "vision_siglip", build }
}

/// The tower dir's `config.json`, if it has one.
pub(crate) fn read_dir_config(dir: &Path) -> Result<Option<serde_json::Value>> {
    let path = dir.join("config.json");
    if path.is_file() {
        read_json(&path).map(Some)
    } else {
        Ok(None)
    }
}

/// The inline `tower_config`, else the dir config's `vision_config`, else the
/// dir config itself (a bare vision config).
fn resolve_tower_config(
    config: &VisionSiglipConfig,
    dir: &Path,
    dir_config: Option<&serde_json::Value>,
) -> Result<SiglipVisionConfig> {
    let (value, what) = match (&config.tower_config, dir_config) {
        (Some(value), _) => (value.clone(), "vision_siglip tower_config".to_string()),
        (None, Some(file)) => (
            file.get("vision_config").unwrap_or(file).clone(),
            format!("{}", dir.join("config.json").display()),
        ),
        (None, None) => {
            return Err(Error::config(
                "vision_siglip",
                format!("needs `tower_config` (no config.json in {})", dir.display()),
            ))
        }
    };
    let parsed: SiglipVisionConfig = serde_json::from_value(value).map_err(|e| Error::config(&what, e.to_string()))?;
    parsed.validate(&what)?;
    if parsed.num_channels != 3 {
        return Err(Error::config(
            &what,
            format!("num_channels is {} but images are RGB (3)", parsed.num_channels),
        ));
    }
    Ok(parsed)
}

/// The processor config of the tower directory, else of the model directory,
/// else Idefics2's defaults.
fn processor_from_dirs(tower_dir: &Path, model_dir: &Path) -> Result<Idefics2ProcessorConfig> {
    for dir in [tower_dir, model_dir] {
        if let Some(config) = Idefics2ProcessorConfig::from_model_dir(dir)? {
            return Ok(config);
        }
    }
    Ok(Idefics2ProcessorConfig::default())
}

/// An `idefics2_connector` spec from an Idefics2 `config.json`.
fn projector_from_config(dir_config: Option<&serde_json::Value>, dir: &Path) -> Result<ProjectorSpec> {
    let what = dir.join("config.json").display().to_string();
    let missing = || {
        Error::config(
            "vision_siglip",
            format!(
                "needs `projector` (no Idefics2 config.json with perceiver_config and text_config in {})",
                dir.display()
            ),
        )
    };
    let file = dir_config.ok_or_else(missing)?;
    let perceiver = file.get("perceiver_config").ok_or_else(missing)?;
    let intermediate = file
        .get("text_config")
        .and_then(|t| t.get("intermediate_size"))
        .cloned()
        .ok_or_else(missing)?;
    // Idefics2PerceiverConfig's defaults for fields a config may leave out.
    let field = |key: &str, default: serde_json::Value| perceiver.get(key).cloned().unwrap_or(default);
    let spec = serde_json::json!({
        "kind": "idefics2_connector",
        "resampler_n_latents": field("resampler_n_latents", 64.into()),
        "resampler_depth": field("resampler_depth", 3.into()),
        "resampler_n_heads": field("resampler_n_heads", 16.into()),
        "resampler_head_dim": field("resampler_head_dim", 96.into()),
        "num_key_value_heads": field("num_key_value_heads", 4.into()),
        "intermediate_size": intermediate,
        "rms_norm_eps": field("rms_norm_eps", serde_json::json!(1e-6)),
    });
    serde_json::from_value(spec).map_err(|e| Error::config(what, format!("perceiver_config: {e}")))
}

/// `image_seq_len`: given, else processor_config.json's, else the projector's
/// fixed output width, else 64; it must equal what the projector emits per crop.
fn resolve_seq_len(given: Option<usize>, projector: &ProjectorSpec, tower_dir: &Path, model_dir: &Path) -> Result<usize> {
    // A projector whose output width does not depend on its input emits a fixed
    // number of rows per crop; one per patch cannot fill a fixed layout.
    let fixed = (projector.output_width(1) == projector.output_width(2)).then(|| projector.output_width(1));
    let from_file = || -> Result<Option<usize>> {
        for dir in [tower_dir, model_dir] {
            let path = dir.join("processor_config.json");
            if path.is_file() {
                if let Some(n) = read_json(&path)?.get("image_seq_len") {
                    let n = n.as_u64().ok_or_else(|| {
                        Error::config(path.display().to_string(), format!("image_seq_len must be an integer, got {n}"))
                    })?;
                    return Ok(Some(n as usize));
                }
            }
        }
        Ok(None)
    };
    let seq_len = match given {
        Some(n) => n,
        None => from_file()?.or(fixed).unwrap_or(64),
    };
    if seq_len == 0 {
        return Err(Error::config("vision_siglip image_seq_len", "must be at least 1"));
    }
    match fixed {
        Some(width) if width == seq_len => Ok(seq_len),
        Some(width) => Err(Error::config(
            "vision_siglip",
            format!("image_seq_len is {seq_len} but the projector {projector} emits {width} positions per crop"),
        )),
        None => Err(Error::config(
            "vision_siglip",
            format!(
                "the projector {projector} emits one position per patch, so a crop's width would depend on its size; \
                 vision_siglip needs a projector with a fixed output (idefics2_connector, vector_mlp)"
            ),
        )),
    }
}

/// Candidate key prefixes of the `vision_model` level, most likely first.
const PREFIXES: [&str; 6] = [
    "model.vision_model",
    "vision_model",
    "model.model.vision_model",
    "",
    "vision_tower.vision_model",
    "model.vision_tower.vision_model",
];

/// The tensors a tower of `config` reads, relative to its prefix.
fn tower_keys(config: &SiglipVisionConfig) -> Vec<String> {
    let mut keys = vec![
        "embeddings.patch_embedding.weight".to_string(),
        "embeddings.patch_embedding.bias".to_string(),
        "embeddings.position_embedding.weight".to_string(),
        "post_layernorm.weight".to_string(),
        "post_layernorm.bias".to_string(),
    ];
    for i in 0..config.num_hidden_layers {
        for module in [
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.out_proj",
            "layer_norm1",
            "layer_norm2",
            "mlp.fc1",
            "mlp.fc2",
        ] {
            for param in ["weight", "bias"] {
                keys.push(format!("encoder.layers.{i}.{module}.{param}"));
            }
        }
    }
    keys
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

/// The `*.safetensors` files of `dir`, sorted.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    Ok(files)
}

/// The prefix under which `names` hold a SigLIP tower (a patch embedding with
/// a bias and no CLIP class embedding).
fn find_prefix(names: &BTreeSet<String>, dir: &Path) -> Result<String> {
    let is_tower = |prefix: &str| {
        names.contains(&join(prefix, "embeddings.patch_embedding.bias"))
            && names.contains(&join(prefix, "embeddings.position_embedding.weight"))
            && !names.contains(&join(prefix, "embeddings.class_embedding"))
    };
    if let Some(prefix) = PREFIXES.iter().find(|p| is_tower(p)) {
        return Ok((*prefix).to_string());
    }
    // Anything else: the one prefix whose keys look like a tower.
    let found: Vec<String> = names
        .iter()
        .filter_map(|n| n.strip_suffix(".embeddings.patch_embedding.bias"))
        .filter(|p| is_tower(p))
        .map(str::to_string)
        .collect();
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(Error::config(
            dir.display().to_string(),
            format!(
                "no SigLIP vision tower in the weights (looked for `<prefix>.embeddings.patch_embedding.bias` under {} and any other prefix)",
                PREFIXES.map(|p| if p.is_empty() { "<none>" } else { p }).join(", ")
            ),
        )),
        many => Err(Error::config(
            dir.display().to_string(),
            format!("several vision towers in the weights ({}); set weights_prefix", many.join(", ")),
        )),
    }
}

/// Opens the tower's weights and loads it.
pub(crate) fn load_tower(
    config: &SiglipVisionConfig,
    dir: &Path,
    prefix: Option<&str>,
    context: &ModalityContext,
) -> Result<SiglipVisionTower> {
    let files = weight_files(dir)?;
    let where_ = |e: &dyn std::fmt::Display| Error::config(dir.display().to_string(), e.to_string());
    if files.is_empty() {
        return match &context.trainable {
            // A fresh trainable tower: random weights at the given prefix.
            Some(map) => {
                let vb = VarBuilder::from_varmap(map, context.dtype, &context.device);
                let vb = match prefix {
                    Some(p) if !p.is_empty() => vb.pp(p),
                    _ => vb,
                };
                SiglipVisionTower::load(vb, config)
            }
            None => Err(Error::config(dir.display().to_string(), "holds no *.safetensors weights")),
        };
    }
    // SAFETY: the files are memory-mapped read-only; like every mmap-based loader we
    // rely on nobody truncating them while the model is alive.
    let mapped = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&files) }.map_err(|e| where_(&e))?;
    let names: BTreeSet<String> = mapped.tensors().into_iter().map(|(name, _)| name).collect();
    let prefix = match prefix {
        Some(p) => p.trim_end_matches('.').to_string(),
        None => find_prefix(&names, dir)?,
    };
    // Every tensor must be there: never a silent random init.
    if let Some(key) = tower_keys(config).into_iter().map(|k| join(&prefix, &k)).find(|k| !names.contains(k)) {
        return Err(Error::config(dir.display().to_string(), format!("the vision tower has no tensor `{key}`")));
    }
    let vb = match &context.trainable {
        Some(map) => {
            // Only the tower's own tensors become variables (an Idefics2 checkpoint
            // also holds the connector and the LM).
            let mut vars = map
                .data()
                .lock()
                .map_err(|_| Error::config(dir.display().to_string(), "the trainable variable map is poisoned"))?;
            for key in tower_keys(config).into_iter().map(|k| join(&prefix, &k)) {
                let tensor = mapped
                    .load(&key, &context.device)
                    .and_then(|t| t.to_dtype(context.dtype))
                    .map_err(|e| where_(&format!("{key}: {e}")))?;
                let var = candle_core::Var::from_tensor(&tensor).map_err(|e| where_(&format!("{key}: {e}")))?;
                vars.insert(key, var);
            }
            drop(vars);
            VarBuilder::from_varmap(map, context.dtype, &context.device)
        }
        None => {
            // SAFETY: as above.
            unsafe { VarBuilder::from_mmaped_safetensors(&files, context.dtype, &context.device) }.map_err(|e| where_(&e))?
        }
    };
    let vb = if prefix.is_empty() { vb } else { vb.pp(&prefix) };
    SiglipVisionTower::load(vb, config).map_err(|e| where_(&format!("prefix `{prefix}`: {e}")))
}
