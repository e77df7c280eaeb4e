//! `config.json` and the processor settings of a LLaVA-NeXT or LLaVA-OneVision
//! checkpoint, completed with transformers' defaults (`LlavaNextConfig`,
//! `LlavaOnevisionConfig`, their image processors and processors).

use std::path::{Path, PathBuf};

use multitoken_core::projector::LlavaNextProjectorConfig;
use multitoken_core::ProjectorSpec;
use serde_json::{json, Map, Value};

use crate::{Error, Result};

/// Which of the two families.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `LlavaNextForConditionalGeneration` (CLIP tower).
    Next,
    /// `LlavaOnevisionForConditionalGeneration` (SigLIP tower, `anyres_max_N`).
    OneVision,
}

impl Family {
    /// The family of a parsed `config.json`, if it is one of the two.
    pub fn of(value: &Value) -> Option<Self> {
        let model_type = value.get("model_type").and_then(Value::as_str);
        let arch = |name: &str| {
            value
                .get("architectures")
                .and_then(Value::as_array)
                .is_some_and(|list| list.iter().any(|a| a.as_str() == Some(name)))
        };
        if model_type == Some("llava_next") || arch("LlavaNextForConditionalGeneration") {
            Some(Family::Next)
        } else if model_type == Some("llava_onevision") || arch("LlavaOnevisionForConditionalGeneration") {
            Some(Family::OneVision)
        } else {
            None
        }
    }

    /// The registry name of the tower kind the modality builds.
    pub fn tower_kind(self) -> &'static str {
        match self {
            Family::Next => "clip",
            Family::OneVision => "siglip",
        }
    }
}

/// The parts of the config the importer uses, completed with defaults.
#[derive(Debug, Clone)]
pub struct LlavaNextConfig {
    /// The file, for messages.
    pub path: PathBuf,
    /// Which family.
    pub family: Family,
    /// The LM's config (its family's defaults filled in).
    pub text_config: Value,
    /// The vision tower's config.
    pub vision_config: Value,
    /// The tower kind the modality builds (`clip` / `siglip`): from
    /// `vision_config.model_type` (transformers builds whatever tower it names),
    /// else the family's.
    pub tower_kind: &'static str,
    /// `image_token_index`.
    pub image_token_id: u32,
    /// `vision_feature_layer` (an int or a list).
    pub vision_feature_layer: Value,
    /// `default` or `full`.
    pub vision_feature_select_strategy: String,
    /// `(height, width)` resolutions.
    pub image_grid_pinpoints: Vec<[usize; 2]>,
    /// OneVision's `vision_aspect_ratio`.
    pub vision_aspect_ratio: Option<String>,
    /// `multimodal_projector_bias`.
    pub projector_bias: bool,
}

impl LlavaNextConfig {
    /// Reads and completes `config.json`.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| config_error(path, format!("cannot read: {e}")))?;
        let value: Value = serde_json::from_str(&text).map_err(|e| config_error(path, format!("malformed JSON: {e}")))?;
        Self::from_value(&value, path)
    }

    /// Completes a parsed `config.json`; `path` names it in errors.
    pub fn from_value(value: &Value, path: &Path) -> Result<Self> {
        let fail = |message: String| config_error(path, message);
        let family = Family::of(value).ok_or_else(|| fail("not a LLaVA-NeXT or LLaVA-OneVision config".into()))?;
        let text_default_type = match family {
            Family::Next => "llama",
            Family::OneVision => "qwen2",
        };
        let mut text_config = object(value.get("text_config"), "text_config").map_err(&fail)?;
        let text_type = match text_config.get("model_type") {
            None => text_default_type.to_string(),
            Some(Value::String(t)) => t.clone(),
            Some(other) => return Err(fail(format!("text_config.model_type must be a string, got {other}"))),
        };
        text_config.insert("model_type".into(), json!(text_type));
        let defaults = lm_defaults(&text_type).ok_or_else(|| {
            fail(format!("text_config.model_type `{text_type}` is not supported (llama, mistral, qwen2, phi)"))
        })?;
        fill(&mut text_config, defaults);
        let mut vision_config = object(value.get("vision_config"), "vision_config").map_err(&fail)?;
        let vision_type = vision_config.get("model_type").and_then(Value::as_str).map(str::to_string);
        let tower_kind = match vision_type.as_deref() {
            None => family.tower_kind(),
            Some("clip_vision_model") => "clip",
            Some("siglip_vision_model") => "siglip",
            Some(other) => {
                return Err(fail(format!(
                    "vision_config.model_type `{other}` is not supported here (clip_vision_model, siglip_vision_model)"
                )))
            }
        };
        fill(&mut vision_config, if tower_kind == "clip" { clip_defaults() } else { siglip_defaults() });
        let (image_token_default, layer_default, strategy_default) = match family {
            Family::Next => (32000, json!(-2), "default"),
            Family::OneVision => (151646, json!(-1), "full"),
        };
        let image_token_id = match value.get("image_token_index").or_else(|| value.get("image_token_id")) {
            None | Some(Value::Null) => image_token_default,
            Some(v) => v
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| fail(format!("image_token_index must be a token id, got {v}")))?,
        };
        let act = value.get("projector_hidden_act").and_then(Value::as_str).unwrap_or("gelu");
        if act != "gelu" {
            return Err(fail(format!("projector_hidden_act `{act}` is not supported (gelu)")));
        }
        let strategy = value
            .get("vision_feature_select_strategy")
            .and_then(Value::as_str)
            .unwrap_or(strategy_default)
            .to_string();
        let image_grid_pinpoints = match value.get("image_grid_pinpoints") {
            None | Some(Value::Null) => default_pinpoints(family),
            Some(v) => parse_pinpoints(v).map_err(|m| fail(format!("image_grid_pinpoints: {m}")))?,
        };
        let vision_aspect_ratio = match family {
            Family::Next => None,
            Family::OneVision => {
                Some(value.get("vision_aspect_ratio").and_then(Value::as_str).unwrap_or("anyres_max_9").to_string())
            }
        };
        Ok(Self {
            path: path.to_path_buf(),
            family,
            text_config: Value::Object(text_config),
            vision_config: Value::Object(vision_config),
            tower_kind,
            image_token_id,
            vision_feature_layer: value.get("vision_feature_layer").cloned().filter(|v| !v.is_null()).unwrap_or(layer_default),
            vision_feature_select_strategy: strategy,
            image_grid_pinpoints,
            vision_aspect_ratio,
            projector_bias: value.get("multimodal_projector_bias").and_then(Value::as_bool).unwrap_or(true),
        })
    }

    /// A positive integer field of the vision config.
    pub fn vision_count(&self, key: &str) -> Result<usize> {
        match self.vision_config.get(key).and_then(Value::as_u64) {
            Some(n) if n > 0 => Ok(n as usize),
            _ => Err(config_error(&self.path, format!("vision_config.{key} must be a positive integer"))),
        }
    }

    /// The projector spec (`llava_next`, the tile grid, `anyres_max_N`).
    pub fn projector_spec(&self) -> Result<ProjectorSpec> {
        let grid = self.vision_count("image_size")? / self.vision_count("patch_size")?;
        let max_num_patches = match &self.vision_aspect_ratio {
            None => None,
            Some(text) => Some(parse_anyres_max(text).ok_or_else(|| {
                config_error(&self.path, format!("vision_aspect_ratio `{text}` is not `anyres_max_N`"))
            })?),
        };
        let spec = ProjectorSpec::LlavaNext(LlavaNextProjectorConfig { tile_grid: grid, max_num_patches, bias: self.projector_bias });
        spec.validate().map_err(|e| config_error(&self.path, e.to_string()))?;
        Ok(spec)
    }

    /// The number of feature layers concatenated.
    pub fn feature_layers(&self) -> usize {
        self.vision_feature_layer.as_array().map_or(1, Vec::len)
    }
}

/// The image processor's settings from `processor_config.json` (its
/// `image_processor` section) or `preprocessor_config.json`, with the family's
/// class defaults for what is left out, and the processor's own fields.
#[derive(Debug, Clone)]
pub struct ProcessorSettings {
    /// The image processor's settings (defaults filled in).
    pub image_processor: Value,
    /// The processor's fields (`patch_size`, `num_image_tokens`, ...), or null.
    pub processor: Value,
    /// The file they came from, for messages.
    pub path: PathBuf,
}

impl ProcessorSettings {
    /// Reads the processor files of `dir`.
    pub fn read(dir: &Path, family: Family) -> Result<Self> {
        let read = |path: &Path| -> Result<Option<Value>> {
            match std::fs::read_to_string(path) {
                Ok(text) => serde_json::from_str(&text)
                    .map(Some)
                    .map_err(|e| config_error(path, format!("malformed JSON: {e}"))),
                Err(_) => Ok(None),
            }
        };
        let proc_path = dir.join("processor_config.json");
        let pre_path = dir.join("preprocessor_config.json");
        let processor = read(&proc_path)?.unwrap_or(Value::Null);
        let (mut image, path) = match (read(&pre_path)?, processor.get("image_processor")) {
            (Some(pre), _) => (pre, pre_path),
            (None, Some(section)) => (section.clone(), proc_path),
            (None, None) => (json!({}), proc_path),
        };
        if let Value::Object(map) = &mut image {
            // transformers writes unset settings as null (or leaves them out): the class default.
            map.retain(|_, value| !value.is_null());
            let defaults = match family {
                Family::Next => json!({"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224},
                                        "do_center_crop": true, "resample": 3}),
                Family::OneVision => json!({"size": {"height": 384, "width": 384}, "do_center_crop": false, "resample": 3}),
            };
            fill(map, defaults);
            // The processor class default, whatever the class name says.
            map.remove("image_processor_type");
        } else {
            return Err(config_error(&path, "the image processor settings must be an object".into()));
        }
        Ok(Self { image_processor: image, processor, path })
    }

    /// The image processor's pinpoints, if it lists its own.
    pub fn pinpoints(&self) -> Option<Result<Vec<[usize; 2]>>> {
        self.image_processor
            .get("image_grid_pinpoints")
            .filter(|v| !v.is_null())
            .map(|v| parse_pinpoints(v).map_err(|m| config_error(&self.path, format!("image_grid_pinpoints: {m}"))))
    }
}

/// `anyres_max_N` → `N` (transformers: `int(s.strip("anyres_max_"))`).
pub fn parse_anyres_max(text: &str) -> Option<usize> {
    text.trim_matches(|c: char| "anyres_max_".contains(c)).parse::<usize>().ok().filter(|&n| n > 0)
}

fn parse_pinpoints(value: &Value) -> std::result::Result<Vec<[usize; 2]>, String> {
    let list = value.as_array().ok_or_else(|| format!("must be a list of [height, width], got {value}"))?;
    let out: Vec<[usize; 2]> = list
        .iter()
        .map(|pair| match pair.as_array().map(|p| p.iter().map(Value::as_u64).collect::<Vec<_>>()) {
            Some(v) if v.len() == 2 && v.iter().all(|n| n.is_some_and(|n| n > 0)) => {
                Ok([v[0].unwrap_or(1) as usize, v[1].unwrap_or(1) as usize])
            }
            _ => Err(format!("{pair} is not [height, width]")),
        })
        .collect::<std::result::Result<_, _>>()?;
    if out.is_empty() {
        return Err("needs at least one resolution".into());
    }
    Ok(out)
}

fn default_pinpoints(family: Family) -> Vec<[usize; 2]> {
    match family {
        Family::Next => vec![[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
        Family::OneVision => (1..=6).flat_map(|i| (1..=6).map(move |j| [384 * i, 384 * j])).collect(),
    }
}

fn object(value: Option<&Value>, what: &str) -> std::result::Result<Map<String, Value>, String> {
    match value {
        None | Some(Value::Null) => Ok(Map::new()),
        Some(Value::Object(map)) => Ok(map.clone()),
        Some(other) => Err(format!("{what} must be an object, got {other}")),
    }
}

fn fill(map: &mut Map<String, Value>, defaults: Value) {
    if let Value::Object(defaults) = defaults {
        for (key, value) in defaults {
            map.entry(key).or_insert(value);
        }
    }
}

/// transformers' defaults for the required fields of each LM family's config.
fn lm_defaults(model_type: &str) -> Option<Value> {
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

/// `LlavaNextConfig`'s CLIP tower defaults (its `init_kwargs` over `CLIPVisionConfig`).
fn clip_defaults() -> Value {
    json!({"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
           "image_size": 336, "patch_size": 14, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "num_channels": 3})
}

/// `LlavaOnevisionConfig`'s SigLIP tower defaults.
fn siglip_defaults() -> Value {
    json!({"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 26, "num_attention_heads": 16,
           "image_size": 384, "patch_size": 14, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
           "num_channels": 3})
}

fn config_error(path: &Path, message: String) -> Error {
    Error::Config { path: path.to_path_buf(), message }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn configs_are_completed_with_the_family_defaults() {
        let next = LlavaNextConfig::from_value(&json!({"model_type": "llava_next"}), Path::new("c")).unwrap();
        assert_eq!(next.family, Family::Next);
        assert_eq!(next.text_config["model_type"], "llama");
        assert_eq!(next.vision_config["image_size"], 336);
        assert_eq!(next.image_grid_pinpoints.len(), 5);
        let ov = LlavaNextConfig::from_value(&json!({"model_type": "llava_onevision"}), Path::new("c")).unwrap();
        assert_eq!(ov.text_config["model_type"], "qwen2");
        assert_eq!(ov.vision_feature_select_strategy, "full");
        assert_eq!(ov.image_grid_pinpoints.len(), 36);
        assert_eq!(parse_anyres_max("anyres_max_9"), Some(9));
        let bad = LlavaNextConfig::from_value(&json!({"model_type": "llava_next", "image_grid_pinpoints": [[1]]}), Path::new("c"));
        assert!(bad.unwrap_err().to_string().contains("image_grid_pinpoints"));
        let bad = LlavaNextConfig::from_value(&json!({"model_type": "llava_next", "text_config": {"model_type": "gpt2"}}), Path::new("c"));
        assert!(bad.unwrap_err().to_string().contains("gpt2"));
    }

    /// transformers builds the tower `vision_config.model_type` names, whichever family.
    #[test]
    fn the_tower_kind_follows_the_vision_model_type() {
        let read = |v: Value| LlavaNextConfig::from_value(&v, Path::new("c"));
        assert_eq!(read(json!({"model_type": "llava_next"})).unwrap().tower_kind, "clip");
        assert_eq!(read(json!({"model_type": "llava_onevision"})).unwrap().tower_kind, "siglip");
        let siglip_next = read(json!({"model_type": "llava_next", "vision_config": {"model_type": "siglip_vision_model"}}));
        assert_eq!(siglip_next.unwrap().tower_kind, "siglip");
        let clip_ov = read(json!({"model_type": "llava_onevision", "vision_config": {"model_type": "clip_vision_model"}}));
        assert_eq!(clip_ov.unwrap().tower_kind, "clip");
        let other = read(json!({"model_type": "llava_next", "vision_config": {"model_type": "dinov2"}}));
        assert!(other.unwrap_err().to_string().contains("dinov2"));
    }
}
