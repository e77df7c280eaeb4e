//! The `vision_qwen2_vl` modality: Qwen2-VL's (and Qwen2.5-VL's) images
//! (`<|image_pad|>`, data key `images`) through its vision tower, registered
//! with the core registry.
//!
//! Builder config (the `config` of a `multitoken.json` modality entry; an
//! importer writes it from a Qwen2-VL `config.json`):
//!
//! ```json
//! {
//!   "tower_config": { ... },          // Qwen2VLVisionConfig fields; optional: else the tower
//!                                     // dir's config.json (its `vision_config`, or the file itself)
//!   "tower": ".",                     // dir of the weights, relative to the model dir (default ".")
//!   "weights_prefix": "visual",       // key prefix of the tower; optional: found automatically
//!                                     // (`visual` as transformers 5 saves it, `model.visual`, none)
//!   "image_processor": { ... },       // preprocessor fields (min_pixels, size, patch_size, ...);
//!                                     // optional: else preprocessor_config.json, or the
//!                                     // `image_processor` of processor_config.json, in the tower
//!                                     // dir, then the model dir; else Qwen2-VL's defaults
//!   "image_token": "<|image_pad|>",   // the text token of one image; optional
//!   "projector": {"kind": "qwen2_vl_merger", "spatial_merge_size": 2},  // optional: else the
//!                                     // merger with the tower config's spatial_merge_size
//!                                     // (and `"norm": "rms_norm"` for a Qwen2.5-VL tower)
//!   "max_pixels": 89478485            // decompression-bomb limit of the decoder; optional
//! }
//! ```
//!
//! The weights are every `*.safetensors` file of the tower dir (shards
//! included), memory-mapped; only the tower's tensors are read (the merger's
//! are the projector's, loaded by whoever builds it, e.g. from
//! `visual.merger`). With `ModalityContext::trainable` set they become
//! variables of that map; a tower dir without weights then starts from random
//! weights at the prefix (default none).
//!
//! An image's layout is one run of `t·h·w / m²` slots (`t·h·w` patches of the
//! resized image, `m = spatial_merge_size`: what the merger leaves), with the
//! position grid `[t, h/m, w/m]` for the LM's multimodal rotary positions;
//! Qwen2-VL's `<|vision_start|>` / `<|vision_end|>` are prompt text around the
//! token, not part of the layout. The layout needs the image's size, so it
//! decodes the image.
//!
//! [`Modality::preprocess`] returns `[t, h, w, C·T·P·P]` f32 on the CPU: the
//! processor's `pixel_values` rows of the image, whose leading axes carry the
//! patch grid (`image_grid_thw`); flattened over them the rows are in
//! transformers' merge-window order, not raster order.
//! [`Modality::encode_item`] gives one `[1, t·h·w, width]` piece: the
//! tower's output before the merger, which the `qwen2_vl_merger` projector
//! maps to `t·h·w / m²` LM positions.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use multitoken_core::{Item, ItemLayout, Modality, ModalityBuilder, ModalityContext, ProjectorSpec};
use serde::Deserialize;

use crate::decode::{decode_item, describe_item, DecodeLimits};
use crate::modality::IMAGES_KEY;
use crate::processor::read_json;
use crate::qwen2_vl::{Qwen2VisionConfig, Qwen2VisionTower};
use crate::qwen2_vl_processor::Qwen2VlProcessorConfig;
use crate::qwen2_vl_weights::FrozenF32Weights;
use crate::{Error, Result};

/// Qwen2-VL's image token: the processor repeats it once per merged patch.
pub const QWEN2_VL_IMAGE_TOKEN: &str = "<|image_pad|>";

/// The modality's builder name.
const NAME: &str = "vision_qwen2_vl";

/// Settings of a `vision_qwen2_vl` modality, as in its builder config.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VisionQwen2VlConfig {
    /// The vision config inline (an importer's `vision_config`).
    #[serde(default)]
    pub tower_config: Option<serde_json::Value>,
    /// Weights directory, relative to the model directory.
    #[serde(default)]
    pub tower: Option<String>,
    /// Key prefix of the tower in the weights.
    #[serde(default)]
    pub weights_prefix: Option<String>,
    /// Inline preprocessing settings (preprocessor_config.json fields).
    #[serde(default)]
    pub image_processor: Option<serde_json::Value>,
    /// The text token of one image.
    #[serde(default)]
    pub image_token: Option<String>,
    /// The projector this modality reports.
    #[serde(default)]
    pub projector: Option<ProjectorSpec>,
    /// Decompression-bomb limit in pixels.
    #[serde(default)]
    pub max_pixels: Option<u64>,
}

/// The Qwen2-VL vision modality.
pub struct VisionQwen2Vl {
    processor: Qwen2VlProcessorConfig,
    tower: Qwen2VisionTower,
    image_token: String,
    projector: ProjectorSpec,
    limits: DecodeLimits,
}

impl std::fmt::Debug for VisionQwen2Vl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VisionQwen2Vl")
            .field("processor", &self.processor)
            .field("tower", self.tower.config())
            .field("projector", &self.projector)
            .finish_non_exhaustive()
    }
}

impl VisionQwen2Vl {
    /// Builds the modality from its config; paths resolve against `context.model_dir`.
    pub fn from_config(config: &VisionQwen2VlConfig, context: &ModalityContext) -> Result<Self> {
        let tower_dir = context.resolve(config.tower.as_deref().unwrap_or("."));
        let tower_config = resolve_tower_config(config, &tower_dir)?;
        let processor = match &config.image_processor {
            Some(value) => Qwen2VlProcessorConfig::from_json(value, "vision_qwen2_vl image_processor")?,
            None => processor_from_dirs(&tower_dir, &context.model_dir)?,
        };
        check_processor_fits(&processor, &tower_config)?;
        let projector = match config.projector {
            Some(spec) => spec,
            None => merger_spec(&tower_config)?,
        };
        projector.validate()?;
        if let ProjectorSpec::Qwen2VlMerger(merger) = projector {
            if merger.spatial_merge_size != tower_config.spatial_merge_size {
                return Err(Error::config(
                    NAME,
                    format!(
                        "the projector merges {0}x{0} windows but the tower's spatial_merge_size is {1}",
                        merger.spatial_merge_size, tower_config.spatial_merge_size
                    ),
                ));
            }
        }
        let image_token = config.image_token.clone().unwrap_or_else(|| QWEN2_VL_IMAGE_TOKEN.to_string());
        if image_token.is_empty() {
            return Err(Error::config("vision_qwen2_vl image_token", "must not be empty"));
        }
        let tower = load_tower(&tower_config, &tower_dir, config.weights_prefix.as_deref(), context)?;
        let mut limits = DecodeLimits::default();
        if let Some(max) = config.max_pixels {
            limits.max_pixels = max;
        }
        Ok(Self {
            processor,
            tower,
            image_token,
            projector,
            limits,
        })
    }

    /// The preprocessing settings.
    pub fn processor(&self) -> &Qwen2VlProcessorConfig {
        &self.processor
    }

    /// The vision tower (merger excluded).
    pub fn tower(&self) -> &Qwen2VisionTower {
        &self.tower
    }

    /// The layout of an image of `width × height` pixels: one run of the
    /// projector's output rows for its patches, with the position grid of
    /// the merged patches (of the patches themselves for a per-patch projector).
    pub fn image_layout(&self, width: usize, height: usize) -> Result<ItemLayout> {
        let [t, h, w] = self.processor.grid(width, height)?;
        let patches = t * h * w;
        let slots = self.projector.output_width(patches);
        let m = self.tower.config().spatial_merge_size;
        let layout = ItemLayout::fixed(slots);
        if slots == patches / (m * m) && h.is_multiple_of(m) && w.is_multiple_of(m) {
            Ok(layout.with_grid([t, h / m, w / m])?)
        } else if slots == patches {
            Ok(layout.with_grid([t, h, w])?)
        } else {
            Ok(layout)
        }
    }

    /// Encodes one preprocessed item `[t, h, w, row]`: `[1, t·h·w, width]`.
    fn encode_one(&self, preprocessed: &Tensor) -> Result<Tensor> {
        let dims = preprocessed.dims();
        let &[t, h, w, width] = dims else {
            return Err(Error::config(
                NAME,
                format!("a preprocessed item is [t, h, w, row], got {dims:?}"),
            ));
        };
        let rows = preprocessed.reshape((t * h * w, width))?;
        Ok(self.tower.forward(&rows, [t, h, w])?.unsqueeze(0)?)
    }
}

impl Modality for VisionQwen2Vl {
    fn media(&self) -> multitoken_core::ItemMedia {
        multitoken_core::ItemMedia::Image
    }
    fn encoder_weights(&self) -> Option<multitoken_core::EncoderWeights> {
        Some(multitoken_core::EncoderWeights::at("tower").with_default("."))
    }
    fn name(&self) -> &str {
        NAME
    }
    fn token(&self) -> &str {
        &self.image_token
    }
    fn data_key(&self) -> &str {
        IMAGES_KEY
    }
    /// The slots of a 448×448 image (a typical item; reports only).
    fn token_width(&self) -> usize {
        match self.processor.grid(448, 448) {
            Ok([t, h, w]) => self.projector.output_width(t * h * w),
            Err(_) => 1,
        }
    }
    fn feature_dim(&self) -> usize {
        self.tower.config().width()
    }
    fn preprocess(&self, item: &Item) -> multitoken_core::Result<Tensor> {
        // Qwen2VLImageProcessor's convert_to_rgb composites transparency on white.
        let image = decode_item(item, &self.limits)?;
        let patches = self
            .processor
            .preprocess(&image)
            .map_err(|e| Error::config(describe_item(item), e.to_string()))?;
        let [t, h, w] = patches.grid;
        Ok(Tensor::from_vec(patches.values, (t, h, w, patches.row_width), &Device::Cpu)?)
    }
    /// A batch of preprocessed items of one grid, `[items, t, h, w, row]`:
    /// `[items, t·h·w, width]`, each image attending to itself only.
    fn encode(&self, batch: &Tensor) -> multitoken_core::Result<Tensor> {
        if batch.rank() != 5 {
            return Err(Error::config(
                NAME,
                format!("a batch is [items, t, h, w, row], got {:?}", batch.dims()),
            )
            .into());
        }
        let pieces = (0..batch.dim(0)?)
            .map(|i| self.encode_one(&batch.get(i)?))
            .collect::<Result<Vec<_>>>()?;
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
        let image = decode_item(item, &self.limits)?;
        Ok(self
            .image_layout(image.width, image.height)
            .map_err(|e| Error::config(describe_item(item), e.to_string()))?)
    }
    fn encode_item(&self, preprocessed: &Tensor) -> multitoken_core::Result<Vec<Tensor>> {
        Ok(vec![self.encode_one(preprocessed)?])
    }
}

fn build(config: &serde_json::Value, context: &ModalityContext) -> multitoken_core::Result<Box<dyn Modality>> {
    let parsed: VisionQwen2VlConfig = if config.is_null() {
        VisionQwen2VlConfig::default()
    } else {
        serde_json::from_value(config.clone()).map_err(|e| Error::config("vision_qwen2_vl config", e.to_string()))?
    };
    Ok(Box::new(VisionQwen2Vl::from_config(&parsed, context)?))
}

/// Referenced from [`crate::link`] so that the linker keeps this object file.
pub(crate) fn keep_registration() {
    type Build = fn(&serde_json::Value, &ModalityContext) -> multitoken_core::Result<Box<dyn Modality>>;
    std::hint::black_box(build as Build);
}

multitoken_core::inventory::submit! {
    ModalityBuilder { name: NAME, build }
}

/// `{"kind": "qwen2_vl_merger", "spatial_merge_size": m}`, with `"norm":
/// "rms_norm"` for Qwen2.5-VL.
fn merger_spec(tower: &Qwen2VisionConfig) -> Result<ProjectorSpec> {
    let mut spec = serde_json::json!({"kind": "qwen2_vl_merger", "spatial_merge_size": tower.spatial_merge_size});
    if tower.is_qwen2_5() {
        spec["norm"] = "rms_norm".into();
    }
    serde_json::from_value(spec).map_err(|e| Error::config(NAME, format!("projector: {e}")))
}

/// The inline `tower_config`, else the dir config's `vision_config`, else the
/// dir config itself (a bare vision config).
fn resolve_tower_config(config: &VisionQwen2VlConfig, dir: &Path) -> Result<Qwen2VisionConfig> {
    let path = dir.join("config.json");
    let (value, what) = match &config.tower_config {
        Some(value) => (value.clone(), "vision_qwen2_vl tower_config".to_string()),
        None if path.is_file() => {
            let file = read_json(&path)?;
            (file.get("vision_config").unwrap_or(&file).clone(), path.display().to_string())
        }
        None => {
            return Err(Error::config(
                NAME,
                format!("needs `tower_config` (no config.json in {})", dir.display()),
            ))
        }
    };
    let parsed: Qwen2VisionConfig = serde_json::from_value(value).map_err(|e| Error::config(&what, e.to_string()))?;
    parsed.validate(&what)?;
    if parsed.in_channels != 3 {
        return Err(Error::config(
            &what,
            format!("in_channels is {} but images are RGB (3)", parsed.in_channels),
        ));
    }
    Ok(parsed)
}

/// The processor config of the tower directory, else of the model directory,
/// else Qwen2-VL's defaults.
fn processor_from_dirs(tower_dir: &Path, model_dir: &Path) -> Result<Qwen2VlProcessorConfig> {
    for dir in [tower_dir, model_dir] {
        if let Some(config) = Qwen2VlProcessorConfig::from_model_dir(dir)? {
            return Ok(config);
        }
    }
    Ok(Qwen2VlProcessorConfig::default())
}

/// The processor must cut the patches the tower embeds and merges.
fn check_processor_fits(processor: &Qwen2VlProcessorConfig, tower: &Qwen2VisionConfig) -> Result<()> {
    let pairs = [
        ("patch_size", processor.patch_size, tower.patch_size),
        ("temporal_patch_size", processor.temporal_patch_size, tower.temporal_patch_size),
        ("merge_size", processor.merge_size, tower.spatial_merge_size),
    ];
    for (name, ours, theirs) in pairs {
        if ours != theirs {
            return Err(Error::config(
                NAME,
                format!("the image processor's {name} is {ours} but the vision tower's is {theirs}"),
            ));
        }
    }
    Ok(())
}

/// Candidate key prefixes of the tower, most likely first.
const PREFIXES: [&str; 4] = ["visual", "model.visual", "", "model.model.visual"];

/// The tensors a tower of `config` reads, relative to its prefix.
fn tower_keys(config: &Qwen2VisionConfig) -> Vec<String> {
    let mut keys = vec!["patch_embed.proj.weight".to_string()];
    let (norms, mlp): (&[&str], &[&str]) = if config.is_qwen2_5() {
        (&["norm1.weight", "norm2.weight"], &["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"])
    } else {
        (&["norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias"], &["mlp.fc1", "mlp.fc2"])
    };
    for i in 0..config.depth {
        keys.extend(norms.iter().map(|n| format!("blocks.{i}.{n}")));
        for module in ["attn.qkv", "attn.proj"].iter().chain(mlp) {
            for param in ["weight", "bias"] {
                keys.push(format!("blocks.{i}.{module}.{param}"));
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

/// The prefix under which `names` hold a Qwen2-VL tower.
fn find_prefix(names: &BTreeSet<String>, dir: &Path) -> Result<String> {
    const MARKER: &str = "patch_embed.proj.weight";
    let is_tower = |prefix: &str| names.contains(&join(prefix, MARKER)) && names.contains(&join(prefix, "blocks.0.attn.qkv.weight"));
    if let Some(prefix) = PREFIXES.iter().find(|p| is_tower(p)) {
        return Ok((*prefix).to_string());
    }
    let found: Vec<String> = names
        .iter()
        .filter_map(|n| n.strip_suffix(&format!(".{MARKER}")))
        .filter(|p| is_tower(p))
        .map(str::to_string)
        .collect();
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(Error::config(
            dir.display().to_string(),
            format!(
                "no Qwen2-VL vision tower in the weights (looked for `<prefix>.{MARKER}` under {} and any other prefix)",
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
fn load_tower(
    config: &Qwen2VisionConfig,
    dir: &Path,
    prefix: Option<&str>,
    context: &ModalityContext,
) -> Result<Qwen2VisionTower> {
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
                Qwen2VisionTower::load(vb, config)
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
            // Only the tower's own tensors become variables (a Qwen2-VL
            // checkpoint also holds the merger and the LM).
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
            drop(mapped);
            frozen_f32(config, &files, &prefix, context)?.map_or_else(
                // SAFETY: as above.
                || unsafe { VarBuilder::from_mmaped_safetensors(&files, context.dtype, &context.device) }.map_err(|e| where_(&e)),
                Ok,
            )?
        }
    };
    let vb = if prefix.is_empty() { vb } else { vb.pp(&prefix) };
    Qwen2VisionTower::load(vb, config).map_err(|e| where_(&format!("prefix `{prefix}`: {e}")))
}

/// A frozen f32 CPU tower whose tensors are all stored as f32 reads them with
/// [`FrozenF32Weights`] (one copy each, 2-D weights pre-transposed for the
/// kernels' `Linear`); `None` sends anything else through candle's mmap'd builder.
fn frozen_f32<'a>(config: &Qwen2VisionConfig, files: &[PathBuf], prefix: &str, context: &ModalityContext) -> Result<Option<VarBuilder<'a>>> {
    if !context.device.is_cpu() || context.dtype != DType::F32 {
        return Ok(None);
    }
    let weights = FrozenF32Weights::open(files)?;
    let keys: Vec<String> = tower_keys(config).into_iter().map(|k| join(prefix, &k)).collect();
    if !weights.covers(keys.iter().map(String::as_str)) {
        return Ok(None);
    }
    Ok(Some(VarBuilder::from_backend(Box::new(weights), DType::F32, Device::Cpu)))
}
