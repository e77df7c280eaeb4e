//! Import of transformers' `LlavaForConditionalGeneration` directories
//! (llava-hf checkpoints and what `save_pretrained` writes).
//!
//! The LM is the checkpoint's `text_config` (any family [`crate::hf`] loads),
//! read from the model's safetensors under its llava prefix; the vision side is
//! the `vision_clip` modality, built through the core registry from a config
//! translated here (inline CLIP `vision_config`, weights prefix,
//! `vision_feature_layer`, `vision_feature_select_strategy`), so this crate
//! still names no concrete encoder crate. The projector (`linear_1`, GELU,
//! `linear_2`) becomes a `mlp2x_gelu` [`Projector`].
//!
//! Key layouts accepted (each checked by the `llava` parity fixtures):
//!
//! | part | hub (llava-hf) | transformers 5 `save_pretrained` | in-memory modules |
//! |---|---|---|---|
//! | LM body | `language_model.model.*` | `language_model.model.*` | `model.language_model.*` |
//! | LM head | `language_model.lm_head.*` | `language_model.lm_head.*` | `lm_head.*` |
//! | tower | `vision_tower.vision_model.*` | `vision_tower.*` | `model.vision_tower[.vision_model].*` |
//! | projector | `multi_modal_projector.*` | `multi_modal_projector.*` | `model.multi_modal_projector.*` |
//!
//! A tied LM head (`tie_word_embeddings`) is simply absent from the checkpoint.

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;
use multitoken_core::{build_modality, Modality, Projector, ProjectorSpec};
use serde_json::{json, Value};

use crate::hf::{load_hf_dir_with, parse_config_value};
use crate::linear::Linear;
use crate::loader::{LoadOptions, LoadedModel};
use crate::weights::{SafetensorsSource, WeightSource};
use crate::{Error, Result};

use super::ModalityRuntime;

/// The `model_type` of a llava `config.json`.
pub const LLAVA_MODEL_TYPE: &str = "llava";
/// The modality builder the vision tower is built with.
const VISION_BUILDER: &str = "vision_clip";
/// The token the `vision_clip` modality stands for.
const IMAGE_TOKEN: &str = "<image>";

/// Whether a parsed `config.json` describes a `LlavaForConditionalGeneration`.
pub fn is_llava_config(config: &Value) -> bool {
    let by_type = config.get("model_type").and_then(Value::as_str) == Some(LLAVA_MODEL_TYPE);
    let by_arch = config
        .get("architectures")
        .and_then(Value::as_array)
        .is_some_and(|a| {
            a.iter()
                .any(|v| v.as_str() == Some("LlavaForConditionalGeneration"))
        });
    by_type || by_arch
}

/// Whether `dir` holds a llava checkpoint (a `config.json` that [`is_llava_config`]).
pub fn is_llava_dir(dir: &Path) -> bool {
    let path = dir.join("config.json");
    std::fs::read_to_string(path)
        .ok()
        .and_then(|text| serde_json::from_str::<Value>(&text).ok())
        .is_some_and(|value| is_llava_config(&value))
}

/// Where each part's tensors live in one checkpoint.
#[derive(Debug, Clone, PartialEq)]
struct Layout {
    /// Replaces the LM's `model.` prefix.
    lm_body: &'static str,
    /// Replaces the LM's `lm_head.` prefix.
    lm_head: &'static str,
    /// The tower's `vision_model` level (no trailing dot).
    tower: &'static str,
    /// The projector module (no trailing dot).
    projector: &'static str,
}

fn detect_layout(weights: &SafetensorsSource) -> Result<Layout> {
    const BODIES: [(&str, &str); 2] = [
        ("language_model.model.", "language_model.lm_head."),
        ("model.language_model.", "lm_head."),
    ];
    const TOWERS: [&str; 4] = [
        "vision_tower.vision_model",
        "vision_tower",
        "model.vision_tower.vision_model",
        "model.vision_tower",
    ];
    const PROJECTORS: [&str; 2] = ["multi_modal_projector", "model.multi_modal_projector"];
    let missing = |what: &str, tried: Vec<String>| {
        Error::Msg(format!(
            "{}: no llava {what} found (looked for {})",
            weights.describe(),
            tried.join(", ")
        ))
    };
    let (lm_body, lm_head) = BODIES
        .into_iter()
        .find(|(body, _)| weights.contains(&format!("{body}embed_tokens.weight")))
        .ok_or_else(|| {
            missing(
                "language model",
                BODIES
                    .iter()
                    .map(|(b, _)| format!("{b}embed_tokens.weight"))
                    .collect(),
            )
        })?;
    // CLIP's class embedding, or the patch embedding of a SigLIP tower (which has
    // no class embedding: llava-interleave).
    const TOWER_PROBES: [&str; 2] = ["embeddings.class_embedding", "embeddings.patch_embedding.weight"];
    let tower = TOWERS
        .into_iter()
        .find(|t| TOWER_PROBES.iter().any(|probe| weights.contains(&format!("{t}.{probe}"))))
        .ok_or_else(|| {
            missing(
                "vision tower",
                TOWERS
                    .iter()
                    .flat_map(|t| TOWER_PROBES.iter().map(move |probe| format!("{t}.{probe}")))
                    .collect(),
            )
        })?;
    let projector = PROJECTORS
        .into_iter()
        .find(|p| weights.contains(&format!("{p}.linear_1.weight")))
        .ok_or_else(|| {
            missing(
                "projector",
                PROJECTORS
                    .iter()
                    .map(|p| format!("{p}.linear_1.weight"))
                    .collect(),
            )
        })?;
    Ok(Layout {
        lm_body,
        lm_head,
        tower,
        projector,
    })
}

/// The LM's tensors under their plain causal-LM names, read from the llava keys.
struct LmWeights<'a> {
    inner: &'a SafetensorsSource,
    layout: &'a Layout,
    dtype: candle_core::DType,
    device: candle_core::Device,
}

impl LmWeights<'_> {
    /// `model.X` -> body prefix + `X`; `lm_head[.X]` -> head prefix + `X`
    /// (a bare `lm_head` is the prefix given to `linear`).
    fn rename(&self, name: &str) -> String {
        if let Some(rest) = name.strip_prefix("model.") {
            format!("{}{rest}", self.layout.lm_body)
        } else if let Some(rest) = name.strip_prefix("lm_head") {
            let head = self.layout.lm_head.trim_end_matches('.');
            format!("{head}{rest}")
        } else {
            name.to_string()
        }
    }
}

impl WeightSource for LmWeights<'_> {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn contains(&self, name: &str) -> bool {
        self.inner.contains(&self.rename(name))
    }
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let renamed = self.rename(name);
        // Llava's own `lm_head` has no bias even over an LM family whose head has one (phi).
        if name == "lm_head.bias" && !self.inner.contains(&renamed) {
            return Ok(Tensor::zeros(shape, self.dtype, &self.device)?);
        }
        self.inner.tensor(&renamed, shape)
    }
    fn linear(&self, prefix: &str, in_dim: usize, out_dim: usize, bias: bool) -> Result<Linear> {
        if prefix == "lm_head" && bias {
            let weight = self.tensor("lm_head.weight", &[out_dim, in_dim])?;
            return Linear::dense(weight, Some(self.tensor("lm_head.bias", &[out_dim])?));
        }
        self.inner
            .linear(&self.rename(prefix), in_dim, out_dim, bias)
    }
}

/// Loads a llava directory: the LM and the image modality with its projector.
pub(super) fn load_llava(
    dir: &Path,
    opts: &LoadOptions,
) -> Result<(LoadedModel, Vec<ModalityRuntime>)> {
    let config_path = dir.join("config.json");
    let text = std::fs::read_to_string(&config_path).map_err(|source| Error::Io {
        path: config_path.clone(),
        source,
    })?;
    let config: Value = serde_json::from_str(&text).map_err(|e| Error::Config {
        path: config_path.clone(),
        message: format!("malformed JSON: {e}"),
    })?;
    let cfg_err = |message: String| Error::Config {
        path: config_path.clone(),
        message,
    };

    // f32 under `--dtype bf16` on the CPU, whose LM linears alone go bf16.
    let weights = SafetensorsSource::from_dir(dir, opts.tensor_dtype(), &opts.device)?;
    let layout = detect_layout(&weights)?;

    // The LM: text_config with its family's defaults, head tied when the checkpoint has none.
    let text_config = text_config_with_defaults(config.get("text_config")).map_err(cfg_err)?;
    let mut hf_config = parse_config_value(text_config, &config_path.join("text_config"))?;
    hf_config.model.tie_word_embeddings = !weights.contains(&format!("{}weight", layout.lm_head));
    let lm_weights = LmWeights {
        inner: &weights,
        layout: &layout,
        dtype: opts.tensor_dtype(),
        device: opts.device.clone(),
    };
    let lm = opts.with_lm_weights(&lm_weights, |source| load_hf_dir_with(dir, &hf_config, source))?;
    check_image_token(&config, &lm).map_err(cfg_err)?;

    // The vision tower, through the registry.
    let vision_config = match config.get("vision_config") {
        Some(Value::Object(map)) => Value::Object(map.clone()),
        Some(Value::Null) | None => default_vision_config(),
        Some(other) => {
            return Err(cfg_err(format!(
                "vision_config must be an object, got {other}"
            )))
        }
    };
    let strategy = config
        .get("vision_feature_select_strategy")
        .cloned()
        .unwrap_or_else(|| json!("default"));
    let builder_config = json!({
        "tower": ".",
        "tower_config": vision_config,
        "weights_prefix": layout.tower,
        "vision_feature_layer": config.get("vision_feature_layer").cloned().unwrap_or_else(|| json!(-2)),
        "vision_feature_select_strategy": strategy,
        "projector": "mlp2x_gelu",
    });
    let context = opts.modality_context(dir);
    let modality = build_modality(VISION_BUILDER, &builder_config, &context).map_err(|e| {
        Error::Msg(format!(
            "{}: the llava vision tower (`{VISION_BUILDER}`): {e}",
            dir.display()
        ))
    })?;
    check_token_count(dir, modality.as_ref())?;

    // The projector: linear_1, act, linear_2.
    let projector = load_projector(
        &config,
        &weights,
        &layout,
        modality.feature_dim(),
        lm.model.hidden_size(),
        opts,
    )
    .map_err(|e| {
        Error::Msg(format!(
            "{}: llava projector `{}`: {e}",
            weights.describe(),
            layout.projector
        ))
    })?;
    Ok((
        lm,
        vec![ModalityRuntime {
            modality: modality.into(),
            projector,
        }],
    ))
}

/// transformers' defaults for the required fields of each LM family's config.
fn family_defaults(model_type: &str) -> Option<Value> {
    Some(match model_type {
        "llama" => json!({"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
                          "num_hidden_layers": 32, "num_attention_heads": 32}),
        "mistral" => json!({"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
                            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                            "max_position_embeddings": 131072}),
        "qwen2" => json!({"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016,
                          "num_hidden_layers": 32, "num_attention_heads": 32, "max_position_embeddings": 32768}),
        "phi" => json!({"vocab_size": 51200, "hidden_size": 2048, "intermediate_size": 8192,
                        "num_hidden_layers": 24, "num_attention_heads": 32}),
        _ => return None,
    })
}

/// `text_config` as transformers' `LlavaConfig` completes it: absent = a default
/// `LlamaConfig`; a partial object keeps its family's defaults for what it omits.
fn text_config_with_defaults(text: Option<&Value>) -> std::result::Result<Value, String> {
    let mut map = match text {
        None | Some(Value::Null) => serde_json::Map::new(),
        Some(Value::Object(map)) => map.clone(),
        Some(other) => return Err(format!("text_config must be an object, got {other}")),
    };
    let model_type = match map.get("model_type") {
        None => "llama".to_string(),
        Some(Value::String(t)) => t.clone(),
        Some(other) => {
            return Err(format!(
                "text_config.model_type must be a string, got {other}"
            ))
        }
    };
    map.insert("model_type".into(), Value::String(model_type.clone()));
    if let Some(Value::Object(defaults)) = family_defaults(&model_type) {
        for (key, value) in defaults {
            map.entry(key).or_insert(value);
        }
    }
    Ok(Value::Object(map))
}

/// LlavaConfig's vision tower when `vision_config` is absent (CLIP ViT-L/14-336).
fn default_vision_config() -> Value {
    json!({"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
           "num_attention_heads": 16, "image_size": 336, "patch_size": 14, "hidden_act": "quick_gelu"})
}

/// The tokenizer must know the config's image token id as `<image>`.
fn check_image_token(config: &Value, lm: &LoadedModel) -> std::result::Result<(), String> {
    let id = config
        .get("image_token_index")
        .or_else(|| config.get("image_token_id"));
    let id = match id {
        None | Some(Value::Null) => 32000,
        Some(v) => v
            .as_u64()
            .ok_or_else(|| format!("image_token_index must be a token id, got {v}"))?,
    };
    let id = u32::try_from(id).map_err(|_| format!("image_token_index {id} is out of range"))?;
    match lm.tokenizer.id_to_token(id) {
        Some(token) if token == IMAGE_TOKEN => Ok(()),
        Some(token) => Err(format!(
            "image_token_index {id} is `{token}` in the tokenizer, expected `{IMAGE_TOKEN}`"
        )),
        None => Err(format!("image_token_index {id} is not in the tokenizer")),
    }
}

/// The processor's image token count (`patch_size`, `num_additional_image_tokens`,
/// strategy) must equal the positions the modality splices per image.
fn check_token_count(dir: &Path, modality: &dyn Modality) -> Result<()> {
    let path = dir.join("processor_config.json");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(());
    };
    let value: Value = serde_json::from_str(&text).map_err(|e| Error::Config {
        path: path.clone(),
        message: format!("malformed JSON: {e}"),
    })?;
    let Some(patch) = value
        .get("patch_size")
        .and_then(Value::as_u64)
        .filter(|p| *p > 0)
    else {
        return Ok(());
    };
    let extra = value
        .get("num_additional_image_tokens")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    let default = value
        .get("vision_feature_select_strategy")
        .and_then(Value::as_str)
        != Some("full");
    let size = image_side(&value).unwrap_or(0);
    let grid = size / patch;
    let count = (grid * grid + extra).saturating_sub(u64::from(default));
    if size > 0 && count != modality.token_width() as u64 {
        return Err(Error::Config {
            path,
            message: format!(
                "the processor expands <image> to {count} tokens ({size} px / patch {patch}, {extra} extra) \
                 but the vision tower gives {} positions per image",
                modality.token_width()
            ),
        });
    }
    Ok(())
}

/// The processed image side of a processor config (`crop_size`, else `size`).
fn image_side(processor: &Value) -> Option<u64> {
    let image = processor.get("image_processor").unwrap_or(processor);
    let side = |v: &Value| {
        v.as_u64()
            .or_else(|| v.get("height").and_then(Value::as_u64))
            .or_else(|| v.get("shortest_edge").and_then(Value::as_u64))
    };
    let crop = image
        .get("do_center_crop")
        .and_then(Value::as_bool)
        .unwrap_or(true);
    let from_crop = if crop {
        image.get("crop_size").and_then(side)
    } else {
        None
    };
    from_crop.or_else(|| image.get("size").and_then(side))
}

/// `multi_modal_projector.linear_{1,2}` as an `mlp2x_gelu` projector (keys `0`, `2`).
fn load_projector(
    config: &Value,
    weights: &SafetensorsSource,
    layout: &Layout,
    feature_dim: usize,
    hidden: usize,
    opts: &LoadOptions,
) -> Result<Projector> {
    let act = config
        .get("projector_hidden_act")
        .and_then(Value::as_str)
        .unwrap_or("gelu");
    if act != "gelu" {
        return Err(Error::Msg(format!(
            "projector_hidden_act `{act}` is not supported (supported: gelu)"
        )));
    }
    let bias = config
        .get("multimodal_projector_bias")
        .and_then(Value::as_bool)
        .unwrap_or(true);
    let mut tensors = HashMap::new();
    for (index, (name, in_dim)) in [("linear_1", feature_dim), ("linear_2", hidden)]
        .into_iter()
        .enumerate()
    {
        let key = format!("{}.{name}", layout.projector);
        let weight = weights.tensor(&format!("{key}.weight"), &[hidden, in_dim])?;
        let b = if bias {
            weights.tensor(&format!("{key}.bias"), &[hidden])?
        } else {
            Tensor::zeros(hidden, opts.tensor_dtype(), &opts.device)?
        };
        tensors.insert(format!("{}.weight", 2 * index), weight);
        tensors.insert(format!("{}.bias", 2 * index), b);
    }
    let vb = candle_nn::VarBuilder::from_tensors(tensors, opts.tensor_dtype(), &opts.device);
    Ok(Projector::load(
        ProjectorSpec::MlpGelu { depth: 2 },
        feature_dim,
        hidden,
        vb,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_llava_configs() {
        assert!(is_llava_config(&json!({"model_type": "llava"})));
        assert!(is_llava_config(
            &json!({"architectures": ["LlavaForConditionalGeneration"]})
        ));
        assert!(!is_llava_config(
            &json!({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
        ));
    }

    #[test]
    fn text_config_gets_family_defaults() -> std::result::Result<(), String> {
        let filled =
            text_config_with_defaults(Some(&json!({"vocab_size": 32064, "rms_norm_eps": 1e-5})))?;
        assert_eq!(filled["model_type"], "llama");
        assert_eq!(filled["vocab_size"], 32064);
        assert_eq!(filled["hidden_size"], 4096);
        let qwen =
            text_config_with_defaults(Some(&json!({"model_type": "qwen2", "hidden_size": 8})))?;
        assert_eq!(qwen["hidden_size"], 8);
        assert_eq!(qwen["intermediate_size"], 22016);
        assert!(text_config_with_defaults(Some(&json!([1]))).is_err());
        Ok(())
    }

    #[test]
    fn processor_image_side() {
        let clip = json!({"image_processor": {"crop_size": {"height": 336, "width": 336}, "size": {"shortest_edge": 400}}});
        assert_eq!(image_side(&clip), Some(336));
        let no_crop = json!({"do_center_crop": false, "size": {"height": 224, "width": 224}});
        assert_eq!(image_side(&no_crop), Some(224));
    }
}
