//! Idefics3 (Laurençon et al. 2024, "Building and better understanding
//! vision-language models"; transformers' `modeling_idefics3.py`) and SmolVLM
//! (Marafioti et al. 2025; `modeling_smolvlm.py`, the same model under another
//! name), loaded from the directories transformers writes.
//!
//! An Idefics3 model is a SigLIP tower with NaViT positions run on
//! `max_image_size` tiles (`vision_idefics3`, built through the registry), the
//! connector (pixel shuffle by `scale_factor` + `modality_projection.proj`:
//! core's `idefics3_connector` projector) and a Llama LM. Keys:
//! `model.text_model.*`, `model.vision_model.*`, `model.connector.*`,
//! `lm_head.weight` (the layout Idefics2 uses: its [`KeyLayout`] and
//! [`LmKeys`] serve it).
//!
//! - [`config`]: `config.json` to our runtime configs (transformers' defaults);
//! - [`export`]: the checkpoint rewritten as a `multitoken.json` directory (for
//!   training).

pub mod config;
pub mod export;

use std::path::Path;
use std::sync::Arc;

use candle_nn::VarBuilder;
use multitoken_core::{build_modality, ChatTemplate, LeadingSpecialTokens, Projector, ProjectorSpec};
use multitoken_lm::hf::{load_hf_dir_with, parse_config_value};
use multitoken_lm::loader::LoadOptions;
use multitoken_lm::multimodal::{builtin_template, ImportedModel, ModalityRuntime, MultimodalImporter};
use multitoken_lm::weights::SafetensorsSource;
use multitoken_lm::WeightSource;
use serde_json::{json, Value};

use crate::idefics2::weights::{KeyLayout, LmKeys};
use crate::{Error, Result};
use config::Idefics3Config;

/// The registry name of the tower the importer builds.
pub const VISION_BUILDER: &str = "vision_idefics3";
/// The tokens `Idefics3Processor` adds to its tokenizer, which every image
/// prompt uses (`<global-img>` and `<row_r_col_c>` are plain text to a
/// tokenizer without them, for transformers as for us).
pub const REQUIRED_TOKENS: [&str; 2] = ["<fake_token_around_image>", "<image>"];

multitoken_core::inventory::submit! {
    MultimodalImporter { name: "idefics3", detect: is_idefics3_dir, load: load_for_registry, export: export_for_registry }
}

/// Whether `dir` holds an Idefics3 or SmolVLM checkpoint (by `config.json`'s
/// `model_type` or `architectures`).
pub fn is_idefics3_dir(dir: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(dir.join("config.json")) else {
        return false;
    };
    let Ok(value) = serde_json::from_str::<Value>(&text) else {
        return false;
    };
    config::is_idefics3_config(&value)
}

fn load_for_registry(dir: &Path, opts: &LoadOptions) -> multitoken_lm::Result<ImportedModel> {
    load_idefics3(dir, opts).map_err(Into::into)
}

fn export_for_registry(dir: &Path, out: &Path) -> multitoken_lm::Result<()> {
    export::export_idefics3(dir, out).map_err(Into::into)
}

/// The `vision_idefics3` builder config of a checkpoint whose tower weights are
/// in `tower` (relative to the model dir) under `weights_prefix`.
pub(crate) fn builder_config(cfg: &Idefics3Config, tower: &str, weights_prefix: &str) -> Value {
    json!({
        "tower": tower,
        "tower_config": cfg.vision_config,
        "weights_prefix": weights_prefix,
        "projector": cfg.connector_spec(),
        "patch_rule": "any",
    })
}

/// SmolVLM's processor takes its fake-image and global-image tokens from the
/// tokenizer's named special tokens when it has them (`extra_special_tokens`
/// of `tokenizer_config.json`, transformers 5; or top-level keys), else the
/// defaults: copy them into the builder config.
pub(crate) fn add_tokenizer_tokens(builder: &mut Value, dir: &Path) {
    let Ok(text) = std::fs::read_to_string(dir.join("tokenizer_config.json")) else {
        return;
    };
    let Ok(config) = serde_json::from_str::<Value>(&text) else {
        return;
    };
    for key in ["fake_image_token", "global_image_token"] {
        let named = config.get("extra_special_tokens").and_then(|extra| extra.get(key)).or_else(|| config.get(key));
        if let (Some(Value::String(token)), Value::Object(map)) = (named, &mut *builder) {
            map.insert(key.to_string(), Value::String(token.clone()));
        }
    }
}

/// Loads an Idefics3 / SmolVLM directory: the Llama LM, the `<image>`
/// modality with its connector, and the chat template (the checkpoint's, else
/// the built-in `idefics2` one, which Idefics3 shares).
pub fn load_idefics3(dir: &Path, opts: &LoadOptions) -> Result<ImportedModel> {
    let config_path = dir.join("config.json");
    let cfg = Idefics3Config::read(&config_path)?;
    // f32 under `--dtype bf16` on the CPU, whose LM linears alone go bf16.
    let weights = SafetensorsSource::from_dir(dir, opts.tensor_dtype(), &opts.device)?;
    let layout = KeyLayout::detect(&weights, false)?;

    let mut hf = parse_config_value(cfg.text_config.clone(), &config_path.join("text_config"))?;
    hf.model.tie_word_embeddings = !weights.contains(&layout.head_weight());
    let keys = LmKeys::new(&weights, &layout, false);
    let lm = opts.with_lm_weights(&keys, |source| load_hf_dir_with(dir, &hf, source))?;
    for token in REQUIRED_TOKENS {
        if lm.tokenizer.token_to_id(token).is_none() {
            return Err(Error::Config {
                path: dir.join("tokenizer.json"),
                message: format!("the tokenizer has no `{token}` token, which Idefics3 prompts need"),
            });
        }
    }

    let spec = cfg.connector_spec();
    let text_hidden = lm.model.hidden_size();
    let vision_hidden = cfg.vision_hidden_size()?;
    let context = opts.modality_context(dir);
    let mut builder = builder_config(&cfg, ".", &layout.vision_prefix());
    add_tokenizer_tokens(&mut builder, dir);
    let modality = build_modality(VISION_BUILDER, &builder, &context)
        .map_err(|e| Error::Config {
            path: config_path.clone(),
            message: format!("the Idefics3 vision tower (`{VISION_BUILDER}`): {e}"),
        })?;
    if modality.feature_dim() != vision_hidden {
        return Err(Error::Config {
            path: config_path.clone(),
            message: format!(
                "the vision tower gives width {} but vision_config.hidden_size is {vision_hidden}",
                modality.feature_dim()
            ),
        });
    }
    let projector = load_connector(&weights, &layout, spec, vision_hidden, text_hidden, opts).map_err(|e| Error::Config {
        path: dir.to_path_buf(),
        message: format!("the Idefics3 connector (`{}`): {e}", layout.connector_prefix()),
    })?;
    let template: Option<ChatTemplate> = match lm.chat_template {
        Some(_) => None,
        None => Some(builtin_template("idefics2", &lm)?),
    };
    Ok(ImportedModel {
        lm,
        modalities: vec![ModalityRuntime { modality: Arc::from(modality), projector }],
        template,
        // `Idefics3Processor(text=rendered)` tokenises the rendered chat with
        // the tokenizer's own leading tokens (Idefics3's BOS; SmolVLM's
        // tokenizer adds none), even after a template that wrote the BOS
        // itself, as Idefics3-8B's does: then the prompt has two.
        chat_leading_special_tokens: LeadingSpecialTokens::AddOnce,
    })
}

/// The connector's weights (every tensor under the connector prefix).
fn load_connector(
    weights: &SafetensorsSource,
    layout: &KeyLayout,
    spec: ProjectorSpec,
    vision_hidden: usize,
    text_hidden: usize,
    opts: &LoadOptions,
) -> Result<Projector> {
    let prefix = layout.connector_prefix();
    let mut tensors = std::collections::HashMap::new();
    for name in weights.names() {
        if let Some(rest) = name.strip_prefix(&prefix) {
            tensors.insert(rest.to_string(), weights.get(name)?);
        }
    }
    let vb = VarBuilder::from_tensors(tensors, opts.tensor_dtype(), &opts.device);
    Ok(Projector::load(spec, vision_hidden, text_hidden, vb)?)
}
