//! Idefics2 (Laurençon et al. 2024, "What matters when building vision-language
//! models?"; transformers' `modeling_idefics2.py`) and Cephalo's mixture of
//! experts built on it (lamm-mit's `moe_idefics2.py`, `model_type:
//! idefics2_moe`), loaded from the directories their libraries write.
//!
//! An Idefics2 model is a SigLIP tower with NaViT positions (`vision_siglip`,
//! built through the registry), the connector (a SwiGLU modality projection and
//! a perceiver resampler: core's `idefics2_connector` projector) and a Mistral
//! LM. Keys: `model.text_model.*`, `model.vision_model.*`, `model.connector.*`,
//! `lm_head.weight`. Cephalo's MoE nests the whole model one level deeper
//! (`model.model.text_model.*`, head `model.lm_head.weight`; an outer
//! `lm_head.weight` is inherited and unused) and replaces every decoder MLP by
//! `mlp.experts.{e}.*` behind `mlp.gating_layer.gate.{weight,bias}`, routed per
//! token softmax → top-k → softmax over the k values (multitoken-moe's
//! `Routing::Cephalo`), dispatched sparsely.
//!
//! - [`config`]: `config.json` to our runtime configs (transformers' defaults
//!   for what the file leaves out);
//! - [`weights`]: the key mapping from the checkpoint to our LM's names;
//! - [`export`]: the checkpoint rewritten as a `multitoken.json` directory (for
//!   training and `moe build`).

pub mod config;
pub mod export;
pub mod weights;

use std::path::Path;
use std::sync::Arc;

use candle_nn::VarBuilder;
use multitoken_core::{build_modality, ChatTemplate, LeadingSpecialTokens, Projector, ProjectorSpec};
use multitoken_lm::hf::{load_hf_dir_with, parse_config_value};
use multitoken_lm::loader::LoadOptions;
use multitoken_lm::model::{CausalLm, Mlp};
use multitoken_lm::multimodal::{builtin_template, ImportedModel, ModalityRuntime, MultimodalImporter};
use multitoken_lm::weights::SafetensorsSource;
use multitoken_lm::WeightSource;
use multitoken_moe::{Dispatch, MoeFeedForward, Routing};
use serde_json::{json, Value};

use crate::{Error, Result};
use config::{Idefics2Config, MoeSettings};
use weights::{KeyLayout, LmKeys};

/// The registry name of the tower the importer builds.
pub const VISION_BUILDER: &str = "vision_siglip";
/// Idefics2's text token around each crop's slots.
pub const FAKE_IMAGE_TOKEN: &str = "<fake_token_around_image>";
/// The token that marks an image in Idefics2 prompts.
pub const IMAGE_TOKEN: &str = "<image>";

multitoken_core::inventory::submit! {
    MultimodalImporter { name: "idefics2", detect: is_idefics2_dir, load: load_for_registry, export: export_for_registry }
}

/// Whether `dir` holds an Idefics2 or Cephalo MoE checkpoint (by `config.json`'s
/// `model_type` or `architectures`).
pub fn is_idefics2_dir(dir: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(dir.join("config.json")) else {
        return false;
    };
    let Ok(value) = serde_json::from_str::<Value>(&text) else {
        return false;
    };
    config::is_idefics2_config(&value)
}

fn load_for_registry(dir: &Path, opts: &LoadOptions) -> multitoken_lm::Result<ImportedModel> {
    load_idefics2(dir, opts).map_err(Into::into)
}

fn export_for_registry(dir: &Path, out: &Path) -> multitoken_lm::Result<()> {
    export::export_idefics2(dir, out).map_err(Into::into)
}

/// Loads an Idefics2 (or Cephalo MoE) directory: the LM (with its mixtures of
/// experts), the `<image>` modality with its connector, and the chat template
/// (the processor's, else the tokenizer config's, else the built-in `idefics2`).
pub fn load_idefics2(dir: &Path, opts: &LoadOptions) -> Result<ImportedModel> {
    let config_path = dir.join("config.json");
    let cfg = Idefics2Config::read(&config_path)?;
    // f32 under `--dtype bf16` on the CPU, whose LM linears alone go bf16.
    let weights = SafetensorsSource::from_dir(dir, opts.tensor_dtype(), &opts.device)?;
    let layout = KeyLayout::detect(&weights, cfg.moe.is_some())?;

    let mut hf = parse_config_value(cfg.text_config.clone(), &config_path.join("text_config"))?;
    hf.model.tie_word_embeddings = !weights.contains(&layout.head_weight());
    let keys = LmKeys::new(&weights, &layout, cfg.moe.is_some());
    let lm = match cfg.moe {
        None => opts.with_lm_weights(&keys, |source| load_hf_dir_with(dir, &hf, source))?,
        Some(moe) => load_moe_lm(dir, &hf, &keys, &weights, &layout, moe, opts)?,
    };
    for token in [FAKE_IMAGE_TOKEN, IMAGE_TOKEN] {
        if lm.tokenizer.token_to_id(token).is_none() {
            return Err(Error::Config {
                path: dir.join("tokenizer.json"),
                message: format!("the tokenizer has no `{token}` token, which Idefics2 prompts need"),
            });
        }
    }

    let spec = cfg.connector_spec()?;
    let text_hidden = lm.model.hidden_size();
    let vision_hidden = cfg.vision_hidden_size()?;
    let builder_config = json!({
        "tower": ".",
        "tower_config": cfg.vision_config,
        "weights_prefix": layout.vision_prefix(),
        "image_seq_len": cfg.image_seq_len(dir)?,
        "fake_image_token": FAKE_IMAGE_TOKEN,
        "projector": spec,
    });
    let context = opts.modality_context(dir);
    let modality = build_modality(VISION_BUILDER, &builder_config, &context).map_err(|e| Error::Config {
        path: config_path.clone(),
        message: format!("the Idefics2 vision tower (`{VISION_BUILDER}`): {e}"),
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
        message: format!("the Idefics2 connector (`{}`): {e}", layout.connector_prefix()),
    })?;
    let template: Option<ChatTemplate> = match lm.chat_template {
        Some(_) => None,
        None => Some(builtin_template("idefics2", &lm)?),
    };
    Ok(ImportedModel {
        lm,
        modalities: vec![ModalityRuntime { modality: Arc::from(modality), projector }],
        template,
        // Idefics2's processor tokenises the rendered chat with the BOS.
        chat_leading_special_tokens: LeadingSpecialTokens::AddOnceIfMissing,
    })
}

/// The connector's weights (every tensor under the connector prefix) loaded as
/// an `idefics2_connector` projector.
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

/// The LM of a Cephalo MoE: expert 0 in each MLP slot while loading, then each
/// layer's MLP replaced by a sparse mixture of all experts. The decoder's and
/// the experts' linears follow `opts` (`--quantize`, `--dtype bf16`); the gates
/// stay dense, as in `multitoken_moe::load`.
fn load_moe_lm(
    dir: &Path,
    hf: &multitoken_lm::hf::HfConfig,
    keys: &LmKeys<'_>,
    weights: &SafetensorsSource,
    layout: &KeyLayout,
    moe: MoeSettings,
    opts: &LoadOptions,
) -> Result<multitoken_lm::LoadedModel> {
    let mut model = opts.with_lm_weights(keys, |source| CausalLm::load(&hf.model, source))?;
    if let Some(windows) = &hf.layer_sliding_windows {
        model.set_layer_sliding_windows(windows)?;
    }
    let cfg = &hf.model;
    for layer in 0..cfg.num_layers {
        let prefix = format!("{}layers.{layer}.mlp", layout.text_prefix());
        let mut experts = Vec::with_capacity(moe.num_expert_models);
        for expert in 0..moe.num_expert_models {
            let expert_prefix = format!("{prefix}.experts.{expert}");
            experts.push(opts.with_lm_weights(weights, |source| multitoken_moe::load::load_mlp(cfg, source, &expert_prefix))?);
        }
        let gate = weights.linear(&format!("{prefix}.gating_layer.gate"), cfg.hidden_size, moe.num_expert_models, true)?;
        let mixture = MoeFeedForward::new(gate, experts, moe.k, Routing::Cephalo)?.with_dispatch(Dispatch::Sparse);
        model.replace_mlp(layer, Mlp::Custom(Arc::new(mixture)))?;
    }
    // Tokenizer and generation files through the usual path, with a zero-layer
    // stand-in so no decoder weight is read twice.
    let mut shell = hf.clone();
    shell.model.num_layers = 0;
    shell.layer_sliding_windows = None;
    let mut loaded = load_hf_dir_with(dir, &shell, keys)?;
    loaded.model = Arc::new(model);
    Ok(loaded)
}
