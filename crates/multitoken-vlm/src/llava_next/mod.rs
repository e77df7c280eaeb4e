//! LLaVA-NeXT (Liu et al. 2024, "LLaVA-NeXT: Improved reasoning, OCR, and
//! world knowledge"; transformers' `modeling_llava_next.py`) and LLaVA-OneVision
//! (Li et al. 2024, "LLaVA-OneVision: Easy Visual Task Transfer";
//! `modeling_llava_onevision.py`), loaded from the directories transformers
//! writes.
//!
//! Both are a vision tower over AnyRes tiles (CLIP for NeXT, a plain SigLIP for
//! OneVision: multitoken-vision's `vision_anyres`, built through the registry),
//! the two-linear GELU projector with `image_newline` and the grid packing
//! (core's `llava_next` projector; OneVision's `anyres_max_N` interpolation
//! happens there, after the projection as in the reference) and a decoder LM
//! (llama / mistral / qwen2).
//!
//! Key layouts accepted:
//!
//! | part | hub / `save_pretrained` | in-memory modules |
//! |---|---|---|
//! | LM body | `language_model.model.*` | `model.language_model.*` |
//! | LM head | `language_model.lm_head.*` | `lm_head.*` |
//! | tower | `vision_tower[.vision_model].*` | `model.vision_tower[.vision_model].*` |
//! | projector | `multi_modal_projector.*` | `model.multi_modal_projector.*` |
//! | newline | `image_newline` | `model.image_newline` |
//!
//! Not supported: OneVision's multi-image mode of a *nested* image list
//! (`images=[[a, b]]`, base image only per image); a flat list, what a prompt
//! with several `<image>` tokens passes, tiles every image as here.

pub mod config;
pub mod export;

use std::collections::HashMap;
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
use config::{Family, LlavaNextConfig, ProcessorSettings};

/// The registry name of the tower the importer builds.
pub const VISION_BUILDER: &str = "vision_anyres";
/// The token that marks an image.
pub const IMAGE_TOKEN: &str = "<image>";

multitoken_core::inventory::submit! {
    MultimodalImporter { name: "llava_next", detect: is_llava_next_dir, load: load_for_registry, export: export_for_registry }
}

/// Whether `dir` holds a LLaVA-NeXT or LLaVA-OneVision checkpoint.
pub fn is_llava_next_dir(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("config.json"))
        .ok()
        .and_then(|text| serde_json::from_str::<Value>(&text).ok())
        .is_some_and(|value| Family::of(&value).is_some())
}

fn load_for_registry(dir: &Path, opts: &LoadOptions) -> multitoken_lm::Result<ImportedModel> {
    load_llava_next(dir, opts).map_err(Into::into)
}

fn export_for_registry(dir: &Path, out: &Path) -> multitoken_lm::Result<()> {
    export::export_llava_next(dir, out).map_err(Into::into)
}

/// Where each part's tensors live in one checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyLayout {
    /// Replaces the LM's `model.`.
    pub lm_body: &'static str,
    /// Replaces the LM's `lm_head`.
    pub lm_head: &'static str,
    /// The tower's `vision_model` level (no trailing dot).
    pub tower: &'static str,
    /// The projector module (no trailing dot).
    pub projector: &'static str,
    /// The `image_newline` key.
    pub newline: &'static str,
}

impl KeyLayout {
    /// Finds the layout from the names present (`contains`).
    pub fn detect(contains: &dyn Fn(&str) -> bool, what: &str) -> Result<Self> {
        const BODIES: [(&str, &str); 2] = [("language_model.model.", "language_model.lm_head"), ("model.language_model.", "lm_head")];
        const TOWERS: [&str; 4] = ["vision_tower.vision_model", "vision_tower", "model.vision_tower.vision_model", "model.vision_tower"];
        const PROJECTORS: [&str; 2] = ["multi_modal_projector", "model.multi_modal_projector"];
        const NEWLINES: [&str; 2] = ["image_newline", "model.image_newline"];
        let missing = |part: &str, tried: String| {
            Error::Lm(multitoken_lm::Error::Msg(format!("{what}: no LLaVA-NeXT {part} found (looked for {tried})")))
        };
        let (lm_body, lm_head) = BODIES
            .into_iter()
            .find(|(body, _)| contains(&format!("{body}embed_tokens.weight")))
            .ok_or_else(|| missing("language model", "language_model.model.embed_tokens.weight, model.language_model.…".into()))?;
        let tower = TOWERS
            .into_iter()
            .find(|t| contains(&format!("{t}.embeddings.patch_embedding.weight")))
            .ok_or_else(|| missing("vision tower", "vision_tower[.vision_model].embeddings.patch_embedding.weight".into()))?;
        let projector = PROJECTORS
            .into_iter()
            .find(|p| contains(&format!("{p}.linear_1.weight")))
            .ok_or_else(|| missing("projector", "multi_modal_projector.linear_1.weight".into()))?;
        let newline = NEWLINES.into_iter().find(|n| contains(n)).ok_or_else(|| missing("image_newline", "image_newline".into()))?;
        Ok(Self { lm_body, lm_head, tower, projector, newline })
    }

    /// A checkpoint name under our LM's plain names (`model.*`, `lm_head*`).
    pub fn lm_name(&self, name: &str) -> String {
        if let Some(rest) = name.strip_prefix("model.") {
            format!("{}{rest}", self.lm_body)
        } else if let Some(rest) = name.strip_prefix("lm_head") {
            format!("{}{rest}", self.lm_head)
        } else {
            name.to_string()
        }
    }
}

/// The LM's tensors under plain causal-LM names.
struct LmKeys<'a> {
    inner: &'a SafetensorsSource,
    layout: &'a KeyLayout,
    dtype: candle_core::DType,
    device: candle_core::Device,
}

impl WeightSource for LmKeys<'_> {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn contains(&self, name: &str) -> bool {
        self.inner.contains(&self.layout.lm_name(name))
    }
    fn tensor(&self, name: &str, shape: &[usize]) -> multitoken_lm::Result<Tensor> {
        let renamed = self.layout.lm_name(name);
        // The model's own `lm_head` has no bias, even over a family whose head has one (phi).
        if name == "lm_head.bias" && !self.inner.contains(&renamed) {
            return Ok(Tensor::zeros(shape, self.dtype, &self.device)?);
        }
        self.inner.tensor(&renamed, shape)
    }
    fn linear(&self, prefix: &str, in_dim: usize, out_dim: usize, bias: bool) -> multitoken_lm::Result<Linear> {
        if prefix == "lm_head" && bias {
            let weight = self.tensor("lm_head.weight", &[out_dim, in_dim])?;
            return Linear::dense(weight, Some(self.tensor("lm_head.bias", &[out_dim])?));
        }
        self.inner.linear(&self.layout.lm_name(prefix), in_dim, out_dim, bias)
    }
}

/// The `vision_anyres` builder config for this checkpoint (`tower` and
/// `weights_prefix` say where the tower's weights are).
pub fn builder_config(
    cfg: &LlavaNextConfig,
    processor: &ProcessorSettings,
    tower: &str,
    weights_prefix: &str,
) -> Result<Value> {
    if let Some(pins) = processor.pinpoints() {
        let pins = pins?;
        if pins != cfg.image_grid_pinpoints {
            return Err(Error::Config {
                path: processor.path.clone(),
                message: format!(
                    "the image processor's image_grid_pinpoints {pins:?} differ from config.json's {:?}",
                    cfg.image_grid_pinpoints
                ),
            });
        }
    }
    Ok(json!({
        "tower": tower,
        "tower_kind": cfg.tower_kind,
        "tower_config": cfg.vision_config,
        "weights_prefix": weights_prefix,
        "vision_feature_layer": cfg.vision_feature_layer,
        "vision_feature_select_strategy": cfg.vision_feature_select_strategy,
        "image_grid_pinpoints": cfg.image_grid_pinpoints,
        "image_processor": processor.image_processor,
        "vision_aspect_ratio": cfg.vision_aspect_ratio,
        "projector": cfg.projector_spec()?,
    }))
}

/// Checks the processor's own token arithmetic against the model's: a
/// processor that counts other positions than the model fills would give
/// transformers a mismatch error; say so at load time.
pub fn check_processor(cfg: &LlavaNextConfig, processor: &ProcessorSettings) -> Result<()> {
    let grid = cfg.vision_count("image_size")? / cfg.vision_count("patch_size")?;
    let p = &processor.processor;
    let fail = |message: String| Err(Error::Config { path: processor.path.clone(), message });
    let base = match cfg.family {
        Family::Next => match p.get("patch_size").and_then(Value::as_u64) {
            Some(patch) if patch > 0 => {
                let side = processor
                    .image_processor
                    .get("crop_size")
                    .and_then(|c| c.get("height"))
                    .and_then(Value::as_u64)
                    .unwrap_or(cfg.vision_count("image_size")? as u64);
                let extra = p.get("num_additional_image_tokens").and_then(Value::as_u64).unwrap_or(0);
                // LlavaNextProcessor subtracts one only for an explicit `default`.
                let default = p.get("vision_feature_select_strategy").and_then(Value::as_str) == Some("default");
                Some(((side / patch).pow(2) + extra).saturating_sub(u64::from(default)))
            }
            _ => None,
        },
        Family::OneVision => {
            let tokens = p.get("num_image_tokens").and_then(Value::as_u64);
            let full = p.get("vision_feature_select_strategy").and_then(Value::as_str) != Some("default");
            if let (Some(ratio), Some(own)) = (&cfg.vision_aspect_ratio, p.get("vision_aspect_ratio").and_then(Value::as_str)) {
                if config::parse_anyres_max(ratio) != config::parse_anyres_max(own) {
                    return fail(format!("the processor's vision_aspect_ratio `{own}` differs from config.json's `{ratio}`"));
                }
            }
            tokens.map(|t| t.saturating_sub(u64::from(!full)))
        }
    };
    match base {
        Some(n) if n != (grid * grid) as u64 => fail(format!(
            "the processor counts {n} base-image tokens but the vision tower gives {grid}x{grid} = {} per image",
            grid * grid
        )),
        _ => Ok(()),
    }
}

/// Loads a LLaVA-NeXT / OneVision directory: the LM, the `<image>` modality
/// and its projector, the checkpoint's chat template.
pub fn load_llava_next(dir: &Path, opts: &LoadOptions) -> Result<ImportedModel> {
    let config_path = dir.join("config.json");
    let cfg = LlavaNextConfig::read(&config_path)?;
    let processor = ProcessorSettings::read(dir, cfg.family)?;
    check_processor(&cfg, &processor)?;
    // f32 under `--dtype bf16` on the CPU, whose LM linears alone go bf16.
    let weights = SafetensorsSource::from_dir(dir, opts.tensor_dtype(), &opts.device)?;
    let layout = KeyLayout::detect(&|name| weights.contains(name), &weights.describe())?;

    let mut hf = parse_config_value(cfg.text_config.clone(), &config_path.join("text_config"))?;
    hf.model.tie_word_embeddings = !weights.contains(&format!("{}.weight", layout.lm_head));
    let keys = LmKeys { inner: &weights, layout: &layout, dtype: opts.tensor_dtype(), device: opts.device.clone() };
    let lm = opts.with_lm_weights(&keys, |source| load_hf_dir_with(dir, &hf, source))?;
    match lm.tokenizer.id_to_token(cfg.image_token_id) {
        Some(token) if token == IMAGE_TOKEN => {}
        other => {
            return Err(Error::Config {
                path: config_path,
                message: format!(
                    "image_token_index {} is {} in the tokenizer, expected `{IMAGE_TOKEN}`",
                    cfg.image_token_id,
                    other.map_or("missing".to_string(), |t| format!("`{t}`"))
                ),
            })
        }
    }

    let builder = builder_config(&cfg, &processor, ".", layout.tower)?;
    let context = opts.modality_context(dir);
    let modality = build_modality(VISION_BUILDER, &builder, &context).map_err(|e| Error::Config {
        path: config_path.clone(),
        message: format!("the vision tower (`{VISION_BUILDER}`): {e}"),
    })?;
    let spec = cfg.projector_spec()?;
    let hidden = lm.model.hidden_size();
    let mut tensors = HashMap::new();
    for name in ["linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"] {
        let key = format!("{}.{name}", layout.projector);
        if weights.contains(&key) {
            tensors.insert(name.to_string(), weights.get(&key)?);
        }
    }
    tensors.insert("image_newline".to_string(), weights.get(layout.newline)?);
    let vb = VarBuilder::from_tensors(tensors, opts.tensor_dtype(), &opts.device);
    let projector = Projector::load(spec, modality.feature_dim(), hidden, vb).map_err(|e| Error::Config {
        path: dir.to_path_buf(),
        message: format!("the projector (`{}`, `{}`): {e}", layout.projector, layout.newline),
    })?;
    Ok(ImportedModel {
        lm,
        modalities: vec![ModalityRuntime { modality: Arc::from(modality), projector }],
        template: None,
        // The processors tokenise the rendered chat with the tokenizer's BOS.
        chat_leading_special_tokens: LeadingSpecialTokens::AddOnceIfMissing,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn check(family: &str, processor: Value) -> std::result::Result<(), String> {
        let cfg = LlavaNextConfig::from_value(&json!({"model_type": family}), Path::new("config.json")).unwrap();
        let settings = ProcessorSettings {
            image_processor: json!({"crop_size": {"height": 336, "width": 336}}),
            processor,
            path: "processor_config.json".into(),
        };
        check_processor(&cfg, &settings).map_err(|e| e.to_string())
    }

    #[test]
    fn the_processors_token_arithmetic_must_match_the_tower() {
        // CLIP 336 / 14: 576 base features.
        assert!(check("llava_next", json!({"patch_size": 14})).is_ok());
        assert!(check("llava_next", json!({"patch_size": 14, "num_additional_image_tokens": 1,
                                           "vision_feature_select_strategy": "default"})).is_ok());
        let err = check("llava_next", json!({"patch_size": 14, "vision_feature_select_strategy": "default"})).unwrap_err();
        assert!(err.contains("575") && err.contains("576"), "{err}");
        assert!(check("llava_next", Value::Null).is_ok());
        // SigLIP 384 / 14: 27 x 27.
        assert!(check("llava_onevision", json!({"num_image_tokens": 729, "vision_aspect_ratio": "anyres_max_9"})).is_ok());
        assert!(check("llava_onevision", json!({"num_image_tokens": 576})).is_err());
        assert!(check("llava_onevision", json!({"num_image_tokens": 729, "vision_aspect_ratio": "anyres_max_4"})).is_err());
    }
}
