//! The `vision_clip` and `vision_clip_pool` modalities and their registration.
//!
//! Builder config (the `config` of a `multitoken.json` modality entry):
//!
//! ```json
//! {
//!   "tower": "clip",                       // dir with config.json + *.safetensors (default ".")
//!   "tower_config_key": "vision_config",   // CLIP config nested in config.json (llava); optional
//!   "tower_config": { ... },               // the CLIP vision config inline (wins over the file); optional
//!   "tower_kind": "clip",                  // or "siglip" (llava-interleave's SigLIP tower); optional:
//!                                          // else `siglip` when the tower config's model_type says so
//!   "weights_prefix": "vision_model",      // optional; found automatically otherwise
//!   "vision_feature_layer": -2,            // or a list, e.g. [-2, -5]
//!   "vision_feature_select_strategy": "default",   // or "full"
//!   "spatial_pool_stride": 2,              // average s×s patches into one; optional (1)
//!   "image_processor": { ... },            // preprocessor_config.json fields; optional
//!   "projector": "mlp2x_gelu",             // what `Modality::projector` reports
//!   "max_pixels": 89478485                 // decompression-bomb limit; optional
//! }
//! ```
//!
//! Without `image_processor`, the settings are read from `preprocessor_config.json`
//! (or `processor_config.json`) in the tower directory, then the model directory.
//! With `ModalityContext::trainable` set, the tower's weights become trainable
//! variables of that map (a tower directory with `config.json` but no weights
//! starts from random weights).
//! `spatial_pool_stride` is LLaVA-NeXT-Video's `mm_spatial_pool_stride` in its
//! `average` mode, applied to the tower's features before the projector: the
//! patch grid is averaged over s×s blocks, so an image costs (grid/s)² positions
//! of the LM's context instead of grid². It needs the `default` selection (no
//! CLS position) and a grid that s divides.
//! `vision_clip_pool` takes the pooled output (one position per image) and
//! defaults to multi_token's vector projector with `num_tokens` (default 10).
//! A SigLIP tower (`tower_kind: "siglip"`, patches only) is LLaVA's with a
//! `SiglipVisionModel` as the tower, as llava-interleave checkpoints have it:
//! the same hidden-state selection (SigLIP has no CLS, so `default` drops the
//! first patch, as transformers does), no spatial pool.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use multitoken_core::{Item, Modality, ModalityBuilder, ModalityContext, ProjectorSpec};
use serde::Deserialize;

use crate::clip::{resolve_layers, ClipVisionConfig, ClipVisionTower, FeatureSelect};
use crate::decode::{decode_item, DecodeLimits};
use crate::processor::ImageProcessorConfig;
use crate::siglip::{SiglipVisionConfig, SiglipVisionTower};
use crate::{Error, Result};

/// The token that stands for one image.
pub const IMAGE_TOKEN: &str = "<image>";
/// The dataset key listing a row's images.
pub const IMAGES_KEY: &str = "images";

/// Settings of a `vision_clip` modality, as in its builder config.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VisionClipConfig {
    /// Tower directory, relative to the model directory.
    #[serde(default)]
    pub tower: Option<String>,
    /// Key of the CLIP vision config inside the tower's `config.json`.
    #[serde(default)]
    pub tower_config_key: Option<String>,
    /// The CLIP vision config given inline (an importer's translated config);
    /// when set, the tower directory's `config.json` is not read.
    #[serde(default)]
    pub tower_config: Option<serde_json::Value>,
    /// `clip` (the default) or `siglip`; absent, the tower config's
    /// `model_type` decides (`siglip_vision_model` is SigLIP).
    #[serde(default)]
    pub tower_kind: Option<String>,
    /// Key prefix of the `vision_model` level in the tower's weights.
    #[serde(default)]
    pub weights_prefix: Option<String>,
    /// LLaVA's `vision_feature_layer`: one index or a list.
    #[serde(default)]
    pub vision_feature_layer: Option<serde_json::Value>,
    /// LLaVA's `vision_feature_select_strategy`: `default` or `full`.
    #[serde(default)]
    pub vision_feature_select_strategy: Option<String>,
    /// Inline preprocessing settings (preprocessor_config.json fields).
    #[serde(default)]
    pub image_processor: Option<serde_json::Value>,
    /// Average the patch grid over s×s blocks (LLaVA-NeXT-Video's
    /// `mm_spatial_pool_stride`); absent or 1 keeps every patch.
    #[serde(default)]
    pub spatial_pool_stride: Option<usize>,
    /// The projector this modality reports.
    #[serde(default)]
    pub projector: Option<ProjectorSpec>,
    /// Pooled mode: positions the vector projector emits.
    #[serde(default)]
    pub num_tokens: Option<usize>,
    /// Decompression-bomb limit in pixels.
    #[serde(default)]
    pub max_pixels: Option<u64>,
}

/// The tower of a [`VisionClip`] and how its features are picked.
enum PatchTower {
    Clip { tower: ClipVisionTower, select: FeatureSelect },
    /// `layers` index `hidden_states`; `drop_first` is the `default` strategy.
    Siglip { tower: SiglipVisionTower, layers: Vec<usize>, drop_first: bool },
}

impl PatchTower {
    /// Positions per image and feature width, before any spatial pool.
    fn output_shape(&self) -> (usize, usize) {
        match self {
            PatchTower::Clip { tower, select } => select.output_shape(tower.config()),
            PatchTower::Siglip { tower, layers, drop_first } => {
                let side = tower.config().num_patches_per_side();
                (side * side - usize::from(*drop_first), tower.config().hidden_size * layers.len())
            }
        }
    }

    /// Side of the square the tower takes.
    fn image_size(&self) -> usize {
        match self {
            PatchTower::Clip { tower, .. } => tower.config().image_size,
            PatchTower::Siglip { tower, .. } => tower.config().image_size,
        }
    }

    fn features(&self, pixels: &Tensor) -> Result<Tensor> {
        match self {
            PatchTower::Clip { tower, select } => select.features(tower, pixels),
            PatchTower::Siglip { tower, layers, drop_first } => {
                let deepest = layers.iter().copied().max().unwrap_or(0);
                let states = tower.plain_hidden_states(pixels, deepest)?;
                let picked: Vec<Tensor> = layers.iter().map(|&l| states[l].clone()).collect();
                let features = Tensor::cat(&picked, candle_core::D::Minus1)?;
                let n = features.dim(1)?;
                Ok(if *drop_first { features.narrow(1, 1, n - 1)? } else { features })
            }
        }
    }
}

/// The CLIP (or SigLIP) vision modality (`<image>`, `images`).
pub struct VisionClip {
    name: &'static str,
    processor: ImageProcessorConfig,
    tower: PatchTower,
    /// Side of the averaged patch blocks (1: none).
    pool_stride: usize,
    projector: ProjectorSpec,
    limits: DecodeLimits,
    device: Device,
    dtype: DType,
}

impl std::fmt::Debug for VisionClip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VisionClip")
            .field("name", &self.name)
            .field("projector", &self.projector)
            .finish_non_exhaustive()
    }
}

/// Which of the two registered builders.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VisionMode {
    /// `vision_clip`: patch features.
    Patches,
    /// `vision_clip_pool`: the pooled output.
    Pooled,
}

impl VisionClip {
    /// Builds the modality from its config; paths resolve against `context.model_dir`.
    pub fn from_config(config: &VisionClipConfig, mode: VisionMode, context: &ModalityContext) -> Result<Self> {
        let tower_dir = context.resolve(config.tower.as_deref().unwrap_or("."));
        let tower_value = match &config.tower_config {
            Some(value) => value.clone(),
            None => read_tower_config(&tower_dir, config.tower_config_key.as_deref())?,
        };
        let what = match &config.tower_config {
            Some(_) => format!("{} inline tower_config", tower_dir.display()),
            None => format!("{} config.json", tower_dir.display()),
        };
        let siglip = match config.tower_kind.as_deref() {
            Some("clip") => false,
            Some("siglip") => true,
            Some(other) => return Err(Error::config("tower_kind", format!("`{other}` is not `clip` or `siglip`"))),
            None => tower_value.get("model_type").and_then(serde_json::Value::as_str) == Some("siglip_vision_model"),
        };
        if siglip && mode == VisionMode::Pooled {
            return Err(Error::config("tower_kind", "vision_clip_pool takes a CLIP tower's pooled output, not SigLIP"));
        }
        let vb = open_weights(&tower_dir, context)?;
        let fresh = context.trainable.as_ref().is_some_and(|map| map.all_vars().is_empty());
        let probe = if siglip { "embeddings.patch_embedding.weight" } else { "embeddings.class_embedding" };
        let prefix = match &config.weights_prefix {
            Some(prefix) => prefix.clone(),
            // A trainable tower without a checkpoint starts from random weights at the root.
            None if fresh => String::new(),
            None => find_prefix(&vb, &tower_dir, probe)?,
        };
        let tower_vb = if prefix.is_empty() { vb } else { vb.pp(&prefix) };
        let layers = parse_layers(config.vision_feature_layer.as_ref())?;
        let keep_cls = keeps_first_position(config.vision_feature_select_strategy.as_deref())?;
        let load_error = |e: Error| Error::config(tower_dir.display().to_string(), format!("prefix `{prefix}`: {e}"));
        let tower = if siglip {
            let mut value = tower_value;
            fill_siglip_defaults(&mut value);
            let cfg: SiglipVisionConfig = serde_json::from_value(value).map_err(|e| Error::config(what.clone(), e.to_string()))?;
            cfg.validate(&what)?;
            let layers = resolve_layers(&layers, cfg.num_hidden_layers)?;
            let tower = SiglipVisionTower::load(tower_vb, &cfg).map_err(load_error)?;
            PatchTower::Siglip { tower, layers, drop_first: !keep_cls }
        } else {
            let cfg: ClipVisionConfig = serde_json::from_value(tower_value).map_err(|e| Error::config(what.clone(), e.to_string()))?;
            cfg.validate(&what)?;
            let select = match mode {
                VisionMode::Pooled => FeatureSelect::Pooled,
                VisionMode::Patches => FeatureSelect::Layers { layers, keep_cls },
            };
            select.validate(cfg.num_hidden_layers)?;
            let tower = ClipVisionTower::load(&cfg, tower_vb).map_err(load_error)?;
            PatchTower::Clip { tower, select }
        };
        let pool_stride = pool_stride(config.spatial_pool_stride, &tower)?;
        let processor = match &config.image_processor {
            Some(value) => ImageProcessorConfig::from_json(value, "image_processor")?,
            None => processor_from_dirs(&tower_dir, &context.model_dir)?,
        };
        let side = tower.image_size();
        let (out_h, out_w) = processor.output_size(side, side);
        if (out_h, out_w) != (side, side) {
            return Err(Error::config(
                tower_dir.display().to_string(),
                format!("the image processor makes {out_h}x{out_w} images but the tower takes {side}x{side}"),
            ));
        }
        let projector = match (config.projector, mode) {
            (Some(spec), _) => spec,
            (None, VisionMode::Patches) => ProjectorSpec::MlpGelu { depth: 2 },
            (None, VisionMode::Pooled) => ProjectorSpec::VectorMlp {
                num_layers: 2,
                num_tokens: config.num_tokens.unwrap_or(10),
            },
        };
        projector.validate()?;
        let mut limits = DecodeLimits::default();
        if let Some(max) = config.max_pixels {
            limits.max_pixels = max;
        }
        Ok(Self {
            name: match mode {
                VisionMode::Patches => "vision_clip",
                VisionMode::Pooled => "vision_clip_pool",
            },
            processor,
            tower,
            pool_stride,
            projector,
            limits,
            device: context.device.clone(),
            dtype: context.dtype,
        })
    }

    /// The preprocessing settings.
    pub fn processor(&self) -> &ImageProcessorConfig {
        &self.processor
    }

    /// The CLIP tower; `None` for a SigLIP one.
    pub fn tower(&self) -> Option<&ClipVisionTower> {
        match &self.tower {
            PatchTower::Clip { tower, .. } => Some(tower),
            PatchTower::Siglip { .. } => None,
        }
    }

    /// Encoder positions per image, before the projector (after the spatial pool).
    pub fn feature_width(&self) -> usize {
        self.tower.output_shape().0 / (self.pool_stride * self.pool_stride)
    }
}

impl Modality for VisionClip {
    fn media(&self) -> multitoken_core::ItemMedia {
        multitoken_core::ItemMedia::Image
    }
    fn encoder_weights(&self) -> Option<multitoken_core::EncoderWeights> {
        Some(multitoken_core::EncoderWeights::at("tower").with_default("."))
    }
    fn name(&self) -> &str {
        self.name
    }
    fn token(&self) -> &str {
        IMAGE_TOKEN
    }
    fn data_key(&self) -> &str {
        IMAGES_KEY
    }
    fn token_width(&self) -> usize {
        self.projector.output_width(self.feature_width())
    }
    fn feature_dim(&self) -> usize {
        self.tower.output_shape().1
    }
    fn preprocess(&self, item: &Item) -> multitoken_core::Result<Tensor> {
        let image = decode_item(item, &self.limits)?;
        let (values, h, w) = self.processor.preprocess(&image)?;
        Ok(Tensor::from_vec(values, (3, h, w), &Device::Cpu)?)
    }
    fn encode(&self, batch: &Tensor) -> multitoken_core::Result<Tensor> {
        let pixels = batch.to_device(&self.device)?.to_dtype(self.dtype)?;
        let features = self.tower.features(&pixels)?;
        match &self.tower {
            PatchTower::Clip { tower, .. } => Ok(spatial_pool(&features, tower.config().grid(), self.pool_stride)?),
            PatchTower::Siglip { .. } => Ok(features),
        }
    }
    fn projector(&self) -> ProjectorSpec {
        self.projector
    }
}

/// Checks `spatial_pool_stride` against the selection and the tower's patch grid.
fn pool_stride(stride: Option<usize>, tower: &PatchTower) -> Result<usize> {
    let Some(stride) = stride.filter(|&s| s != 1) else {
        return Ok(1);
    };
    let bad = |why: String| Err(Error::config("spatial_pool_stride", why));
    if stride == 0 {
        return bad("must be at least 1".into());
    }
    let PatchTower::Clip { tower, select } = tower else {
        return bad("pools a CLIP tower's patch grid; this tower is SigLIP".into());
    };
    if !matches!(select, FeatureSelect::Layers { keep_cls: false, .. }) {
        return bad("pools the patch grid, so it needs vision_clip with the `default` selection (no CLS)".into());
    }
    let grid = tower.config().grid();
    if grid % stride != 0 {
        return bad(format!("{stride} does not divide the tower's {grid}x{grid} patch grid"));
    }
    Ok(stride)
}

/// Averages `[batch, grid², width]` patch features over `stride`×`stride`
/// blocks of the row-major grid: `[batch, (grid/stride)², width]`.
pub fn spatial_pool(features: &Tensor, grid: usize, stride: usize) -> candle_core::Result<Tensor> {
    if stride == 1 {
        return Ok(features.clone());
    }
    let (batch, _, width) = features.dims3()?;
    let side = grid / stride;
    features
        .reshape((batch, side, stride, side, stride, width))?
        .mean(4)?
        .mean(2)?
        .reshape((batch, side * side, width))
}

fn build(config: &serde_json::Value, context: &ModalityContext, mode: VisionMode) -> Result<Box<dyn Modality>> {
    let parsed: VisionClipConfig = if config.is_null() {
        VisionClipConfig::default()
    } else {
        serde_json::from_value(config.clone()).map_err(|e| Error::config("vision_clip config", e.to_string()))?
    };
    Ok(Box::new(VisionClip::from_config(&parsed, mode, context)?))
}

fn build_patches(config: &serde_json::Value, context: &ModalityContext) -> multitoken_core::Result<Box<dyn Modality>> {
    Ok(build(config, context, VisionMode::Patches)?)
}

fn build_pooled(config: &serde_json::Value, context: &ModalityContext) -> multitoken_core::Result<Box<dyn Modality>> {
    Ok(build(config, context, VisionMode::Pooled)?)
}

/// Referenced from [`crate::link`] so that the linker keeps this object file.
pub(crate) fn keep_registration() {
    type Build = fn(&serde_json::Value, &ModalityContext) -> multitoken_core::Result<Box<dyn Modality>>;
    std::hint::black_box(build_patches as Build);
    std::hint::black_box(build_pooled as Build);
}

multitoken_core::inventory::submit! {
    ModalityBuilder { name: "vision_clip", build: build_patches }
}
multitoken_core::inventory::submit! {
    ModalityBuilder { name: "vision_clip_pool", build: build_pooled }
}

/// `vision_feature_layer`: absent = -2, an int, or a non-empty list of ints.
pub(crate) fn parse_layers(value: Option<&serde_json::Value>) -> Result<Vec<i64>> {
    let bad = || Error::config("vision_feature_layer", "must be an integer or a non-empty list of integers");
    match value {
        None => Ok(vec![-2]),
        Some(v) if v.is_i64() => Ok(vec![v.as_i64().ok_or_else(bad)?]),
        Some(serde_json::Value::Array(items)) if !items.is_empty() => items.iter().map(|i| i.as_i64().ok_or_else(bad)).collect(),
        Some(_) => Err(bad()),
    }
}

/// LLaVA's `vision_feature_select_strategy`: `full` keeps the first position
/// (CLIP's CLS), `default` (or absent) drops it.
pub(crate) fn keeps_first_position(strategy: Option<&str>) -> Result<bool> {
    match strategy {
        None | Some("default") => Ok(false),
        Some("full") => Ok(true),
        Some(other) => Err(Error::config("vision_feature_select_strategy", format!("`{other}` is not `default` or `full`"))),
    }
}

/// transformers' `SiglipVisionConfig` defaults where ours (Idefics2's) differ.
pub(crate) fn fill_siglip_defaults(value: &mut serde_json::Value) {
    if let serde_json::Value::Object(map) = value {
        map.entry("patch_size").or_insert(serde_json::json!(16));
        map.entry("image_size").or_insert(serde_json::json!(224));
    }
}

/// The tower's `config.json`, or its `key` section, unparsed.
fn read_tower_config(dir: &Path, key: Option<&str>) -> Result<serde_json::Value> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|source| Error::Io { path: path.clone(), source })?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::config(path.display().to_string(), e.to_string()))?;
    let section = match key {
        Some(key) => value
            .get(key)
            .ok_or_else(|| Error::config(path.display().to_string(), format!("no `{key}` section")))?,
        // A CLIPModel config nests the vision part; a CLIPVisionModel's is flat.
        None => value.get("vision_config").unwrap_or(&value),
    };
    Ok(section.clone())
}

/// Memory-maps every `*.safetensors` file of `dir`.
pub(crate) fn open_weights(dir: &Path, context: &ModalityContext) -> Result<VarBuilder<'static>> {
    let entries = std::fs::read_dir(dir).map_err(|source| Error::Io { path: dir.to_path_buf(), source })?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    if let Some(map) = &context.trainable {
        // Trainable: the checkpoint's tensors (if any) become variables of `map`;
        // whatever it lacks is created with the layers' random init.
        for file in &files {
            multitoken_core::load_into_varmap(map, file, context.dtype, &context.device)
                .map_err(|e| Error::config(file.display().to_string(), e.to_string()))?;
        }
        return Ok(VarBuilder::from_varmap(map, context.dtype, &context.device));
    }
    if files.is_empty() {
        return Err(Error::config(dir.display().to_string(), "holds no *.safetensors weights"));
    }
    // SAFETY: the files are memory-mapped read-only; like every mmap-based loader we
    // rely on nobody truncating them while the model is alive.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, context.dtype, &context.device) }
        .map_err(|e| Error::config(dir.display().to_string(), e.to_string()))?;
    Ok(vb)
}

/// The prefix of the `vision_model` level: none (transformers 5's
/// CLIPVisionModel), CLIPModel / transformers 4, llava hub layout,
/// transformers-5 llava layouts; found by the tensor `probe` under it.
fn find_prefix(vb: &VarBuilder, dir: &Path, probe: &str) -> Result<String> {
    const CANDIDATES: [&str; 5] = [
        "",
        "vision_model",
        "vision_tower.vision_model",
        "model.vision_tower.vision_model",
        "model.vision_tower",
    ];
    CANDIDATES
        .iter()
        .find(|p| {
            let key = if p.is_empty() { String::new() } else { format!("{p}.") };
            vb.contains_tensor(&format!("{key}{probe}"))
        })
        .map(|p| (*p).to_string())
        .ok_or_else(|| {
            Error::config(
                dir.display().to_string(),
                format!("no vision tower (`{probe}`) found under any of {}", CANDIDATES.join(", ")),
            )
        })
}

/// The processor config of the tower directory, else of the model directory.
fn processor_from_dirs(tower_dir: &Path, model_dir: &Path) -> Result<ImageProcessorConfig> {
    for dir in [tower_dir, model_dir] {
        if dir.join("preprocessor_config.json").is_file() || dir.join("processor_config.json").is_file() {
            return ImageProcessorConfig::from_model_dir(dir);
        }
    }
    Ok(ImageProcessorConfig::default())
}
