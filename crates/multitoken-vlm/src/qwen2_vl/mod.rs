//! Qwen2-VL (Wang et al. 2024, "Qwen2-VL: Enhancing Vision-Language Model's
//! Perception of the World at Any Resolution"; transformers'
//! `modeling_qwen2_vl.py`) and Qwen2.5-VL (Bai et al. 2025;
//! `modeling_qwen2_5_vl.py`), loaded from the directory transformers writes.
//!
//! The two families share this importer ([`Family`]): Qwen2.5-VL's text model,
//! config nesting, key layouts, processor, chat template and still-image
//! `get_rope_index` are Qwen2-VL's; only the tower differs (window attention,
//! RMSNorm, gated SiLU MLP, `fullatt_block_indexes`, `out_hidden_size`) and its
//! merger normalises with RMSNorm. Both live in `vision_qwen2_vl`, which tells
//! them apart by the vision config's `model_type`, set here from the family.
//!
//! A Qwen2-VL model is a ViT with 2-D rotary positions over dynamically sized
//! images (`vision_qwen2_vl`, built through the registry), the patch merger
//! (core's `qwen2_vl_merger` projector) and a Qwen2 LM with multimodal rotary
//! positions (M-RoPE: `mrope_section` of the text config). Each image is one
//! run of `<|image_pad|>` slots with a `[t, h, w]` position grid
//! ([`multitoken_core::ItemLayout::with_grid`]); the LM gets the three position
//! streams of [`multitoken_core::PreparedInput::rope_positions`].
//!
//! Layouts read:
//! - config: transformers 5's nested `text_config` / `vision_config`, or the
//!   hub's flat file (text fields at the top level, `rope_scaling: {type:
//!   mrope, mrope_section}`);
//! - keys: the hub's `model.*` (LM), `visual.*` (tower and merger),
//!   `lm_head.weight` — what transformers 5's `save_pretrained` writes — or
//!   transformers 4.5x's `model.language_model.*`, `model.visual.*`; no
//!   `lm_head.weight` means tied embeddings.
//!
//! - [`export`]: the checkpoint rewritten as a `multitoken.json` directory
//!   (for `train --stage projectors|lora`).

pub mod export;

use std::path::Path;
use std::sync::Arc;

use candle_core::Tensor;
use candle_nn::VarBuilder;
use multitoken_core::{build_modality, LeadingSpecialTokens, Projector};
use multitoken_lm::hf::{load_hf_dir_with, parse_config_value};
use multitoken_lm::loader::LoadOptions;
use multitoken_lm::multimodal::{ImportedModel, ModalityRuntime, MultimodalImporter};
use multitoken_lm::weights::SafetensorsSource;
use multitoken_lm::{Linear, WeightSource};
use serde_json::{json, Value};

use crate::{Error, Result};

/// The registry name of the tower the importer builds.
pub const VISION_BUILDER: &str = "vision_qwen2_vl";
/// The token that marks an image in Qwen2-VL prompts (inside
/// `<|vision_start|>…<|vision_end|>`).
pub const IMAGE_TOKEN: &str = "<|image_pad|>";
/// The text around each image's token in Qwen2-VL prompts.
pub const VISION_START: &str = "<|vision_start|>";
/// See [`VISION_START`].
pub const VISION_END: &str = "<|vision_end|>";

multitoken_core::inventory::submit! {
    MultimodalImporter { name: "qwen2_vl", detect: is_qwen2_vl_dir, load: load_for_registry, export: export_for_registry }
}

/// Which of the two model families a checkpoint is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `Qwen2VLForConditionalGeneration`, model_type `qwen2_vl`.
    Qwen2Vl,
    /// `Qwen2_5_VLForConditionalGeneration`, model_type `qwen2_5_vl`.
    Qwen2_5Vl,
}

impl Family {
    /// The family of a parsed `config.json`: its `model_type`, else its
    /// `architectures`.
    pub fn of_config(value: &Value) -> Option<Self> {
        match value.get("model_type").and_then(Value::as_str) {
            Some("qwen2_vl") => return Some(Self::Qwen2Vl),
            Some("qwen2_5_vl") => return Some(Self::Qwen2_5Vl),
            _ => {}
        }
        let architectures = value.get("architectures").and_then(Value::as_array)?;
        architectures.iter().find_map(|a| match a.as_str() {
            Some("Qwen2VLForConditionalGeneration") => Some(Self::Qwen2Vl),
            Some("Qwen2_5_VLForConditionalGeneration") => Some(Self::Qwen2_5Vl),
            _ => None,
        })
    }

    /// The name messages use.
    pub fn name(self) -> &'static str {
        match self {
            Self::Qwen2Vl => "Qwen2-VL",
            Self::Qwen2_5Vl => "Qwen2.5-VL",
        }
    }

    /// The `model_type` of the family's vision config, which selects the
    /// tower in `vision_qwen2_vl`.
    pub fn vision_model_type(self) -> &'static str {
        match self {
            Self::Qwen2Vl => "qwen2_vl_vision",
            Self::Qwen2_5Vl => "qwen2_5_vl_vision",
        }
    }

    /// The checkpoint's `vision_config` as the family's config class reads it:
    /// transformers builds the family's vision config from the dict whatever
    /// `model_type` it carries (the hub's Qwen2.5-VL files have none, or the
    /// top-level `qwen2_5_vl`), so the tower is chosen by the family here.
    pub fn vision_config(self, root: &Value) -> Option<Value> {
        let mut vision = root.get("vision_config").filter(|v| v.is_object())?.clone();
        if let Some(map) = vision.as_object_mut() {
            map.insert("model_type".into(), json!(self.vision_model_type()));
        }
        Some(vision)
    }

    /// The patch merger's projector spec: Qwen2.5-VL's `ln_q` is an RMSNorm.
    pub fn merger_spec(self, vision_config: &Value) -> Value {
        let merge = vision_config.get("spatial_merge_size").and_then(Value::as_u64).unwrap_or(2);
        let mut spec = json!({"kind": "qwen2_vl_merger", "spatial_merge_size": merge});
        if self == Self::Qwen2_5Vl {
            spec["norm"] = json!("rms_norm");
        }
        spec
    }
}

/// Whether `dir` holds a Qwen2-VL or Qwen2.5-VL checkpoint (see
/// [`Family::of_config`]).
pub fn is_qwen2_vl_dir(dir: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(dir.join("config.json")) else {
        return false;
    };
    serde_json::from_str::<Value>(&text).is_ok_and(|value| is_qwen2_vl_config(&value))
}

/// Whether a parsed `config.json` is Qwen2-VL's or Qwen2.5-VL's.
pub fn is_qwen2_vl_config(value: &Value) -> bool {
    Family::of_config(value).is_some()
}

fn load_for_registry(dir: &Path, opts: &LoadOptions) -> multitoken_lm::Result<ImportedModel> {
    load_qwen2_vl(dir, opts).map_err(Into::into)
}

fn export_for_registry(dir: &Path, out: &Path) -> multitoken_lm::Result<()> {
    export::export_qwen2_vl(dir, out).map_err(Into::into)
}

/// The text model's config as `Qwen2VLTextConfig` reads it: the nested
/// `text_config`, or the flat file's own fields (less the vision ones).
pub fn text_config(root: &Value) -> Value {
    let mut text = match root.get("text_config") {
        Some(nested) if nested.is_object() => nested.clone(),
        _ => {
            let mut flat = root.clone();
            if let Some(map) = flat.as_object_mut() {
                map.remove("vision_config");
                map.remove("text_config");
            }
            flat
        }
    };
    if let Some(map) = text.as_object_mut() {
        map.insert("model_type".into(), json!("qwen2_vl_text"));
    }
    text
}

/// Where the checkpoint keeps the LM and the vision model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyLayout {
    /// Prefix of the LM's `embed_tokens.`, `layers.`, `norm.`.
    pub text: String,
    /// Prefix of the tower and merger (no trailing dot).
    pub vision: String,
}

impl KeyLayout {
    /// Finds the layout from the token embeddings' key (`family` names the
    /// model in the error).
    pub fn detect(weights: &SafetensorsSource, family: Family) -> Result<Self> {
        for (text, vision) in [("model.", "visual"), ("model.language_model.", "model.visual")] {
            if weights.contains(&format!("{text}embed_tokens.weight")) {
                return Ok(Self { text: text.into(), vision: vision.into() });
            }
        }
        Err(Error::Lm(multitoken_lm::Error::Msg(format!(
            "{}: no {} language model: expected `model.embed_tokens.weight` (or \
             `model.language_model.embed_tokens.weight`)",
            weights.describe(),
            family.name()
        ))))
    }

    /// The merger's prefix (`visual.merger.`).
    pub fn merger_prefix(&self) -> String {
        format!("{}.merger.", self.vision)
    }
}

/// The LM's tensors under plain causal-LM names.
struct LmKeys<'a> {
    inner: &'a SafetensorsSource,
    layout: &'a KeyLayout,
}

impl LmKeys<'_> {
    fn rename(&self, name: &str) -> String {
        match name.strip_prefix("model.") {
            Some(rest) => format!("{}{rest}", self.layout.text),
            None => name.to_string(),
        }
    }
}

impl WeightSource for LmKeys<'_> {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn contains(&self, name: &str) -> bool {
        self.inner.contains(&self.rename(name))
    }
    fn tensor(&self, name: &str, shape: &[usize]) -> multitoken_lm::Result<Tensor> {
        self.inner.tensor(&self.rename(name), shape)
    }
    fn linear(&self, prefix: &str, in_dim: usize, out_dim: usize, bias: bool) -> multitoken_lm::Result<Linear> {
        self.inner.linear(&self.rename(prefix), in_dim, out_dim, bias)
    }
}

/// Loads a Qwen2-VL or Qwen2.5-VL directory: the LM (with M-RoPE), the
/// `<|image_pad|>` modality with its patch merger, and the checkpoint's chat
/// template.
pub fn load_qwen2_vl(dir: &Path, opts: &LoadOptions) -> Result<ImportedModel> {
    let config_path = dir.join("config.json");
    let root = read_config(&config_path)?;
    let family = family_of(&root, &config_path)?;
    // f32 under `--dtype bf16` on the CPU, whose LM linears alone go bf16.
    let weights = SafetensorsSource::from_dir(dir, opts.tensor_dtype(), &opts.device)?;
    let layout = KeyLayout::detect(&weights, family)?;

    let mut hf = parse_config_value(text_config(&root), &config_path.join("text_config"))?;
    hf.model.tie_word_embeddings = !weights.contains("lm_head.weight");
    let keys = LmKeys { inner: &weights, layout: &layout };
    let lm = opts.with_lm_weights(&keys, |source| load_hf_dir_with(dir, &hf, source))?;
    for token in [IMAGE_TOKEN, VISION_START, VISION_END] {
        if lm.tokenizer.token_to_id(token).is_none() {
            return Err(Error::Config {
                path: dir.join("tokenizer.json"),
                message: format!("the tokenizer has no `{token}` token, which {} prompts need", family.name()),
            });
        }
    }

    let vision_config = family.vision_config(&root).ok_or_else(|| Error::Config {
        path: config_path.clone(),
        message: "no `vision_config` object".into(),
    })?;
    let builder_config = json!({
        "tower": ".",
        "projector": family.merger_spec(&vision_config),
        "tower_config": vision_config,
        "weights_prefix": layout.vision,
        "image_token": IMAGE_TOKEN,
    });
    let context = opts.modality_context(dir);
    let modality = build_modality(VISION_BUILDER, &builder_config, &context).map_err(|e| Error::Config {
        path: config_path.clone(),
        message: format!("the {} vision tower (`{VISION_BUILDER}`): {e}", family.name()),
    })?;
    let text_hidden = lm.model.hidden_size();
    let projector = load_merger(&weights, &layout, modality.as_ref(), text_hidden, opts).map_err(|e| Error::Config {
        path: dir.to_path_buf(),
        message: format!("the {} patch merger (`{}`): {e}", family.name(), layout.merger_prefix()),
    })?;
    Ok(ImportedModel {
        lm,
        modalities: vec![ModalityRuntime { modality: Arc::from(modality), projector }],
        template: None,
        // Qwen2VLProcessor tokenises the rendered chat; Qwen2's tokenizer adds no BOS.
        chat_leading_special_tokens: LeadingSpecialTokens::TemplateOnly,
    })
}

/// The family `config.json` names, or a clear error.
fn family_of(root: &Value, path: &Path) -> Result<Family> {
    Family::of_config(root).ok_or_else(|| Error::Config {
        path: path.to_path_buf(),
        message: "neither Qwen2-VL nor Qwen2.5-VL: expected `model_type` `qwen2_vl` / `qwen2_5_vl` or the \
                  `Qwen2VLForConditionalGeneration` / `Qwen2_5_VLForConditionalGeneration` architecture"
            .into(),
    })
}

/// `config.json` as JSON.
fn read_config(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::Config {
        path: path.to_path_buf(),
        message: format!("cannot read: {e}"),
    })?;
    serde_json::from_str(&text).map_err(|e| Error::Config { path: path.to_path_buf(), message: format!("malformed JSON: {e}") })
}

/// The merger's weights (every tensor under `visual.merger.`) as the
/// modality's `qwen2_vl_merger` projector.
fn load_merger(
    weights: &SafetensorsSource,
    layout: &KeyLayout,
    modality: &dyn multitoken_core::Modality,
    text_hidden: usize,
    opts: &LoadOptions,
) -> Result<Projector> {
    let prefix = layout.merger_prefix();
    let mut tensors = std::collections::HashMap::new();
    for name in weights.names() {
        if let Some(rest) = name.strip_prefix(&prefix) {
            tensors.insert(rest.to_string(), weights.get(name)?);
        }
    }
    let vb = VarBuilder::from_tensors(tensors, opts.tensor_dtype(), &opts.device);
    Ok(Projector::load(modality.projector(), modality.feature_dim(), text_hidden, vb)?)
}
