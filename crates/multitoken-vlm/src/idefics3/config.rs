//! `config.json` of an Idefics3 or SmolVLM checkpoint, read as transformers'
//! `Idefics3Config` / `SmolVLMConfig` read it (their defaults for what is left
//! out; the two classes differ only in name).

use std::path::{Path, PathBuf};

use multitoken_core::projector::Idefics3ConnectorConfig;
use multitoken_core::ProjectorSpec;
use serde_json::{json, Map, Value};

use crate::{Error, Result};

/// The parts of the config the importer uses, completed with defaults.
#[derive(Debug, Clone)]
pub struct Idefics3Config {
    /// The file, for messages.
    pub path: PathBuf,
    /// The Llama `text_config`.
    pub text_config: Value,
    /// The SigLIP `vision_config`.
    pub vision_config: Value,
    /// The connector's pixel-shuffle factor.
    pub scale_factor: usize,
}

/// Whether a parsed `config.json` is Idefics3's or SmolVLM's.
pub fn is_idefics3_config(value: &Value) -> bool {
    let model_type = value.get("model_type").and_then(Value::as_str);
    let architectures = value.get("architectures").and_then(Value::as_array);
    matches!(model_type, Some("idefics3" | "smolvlm"))
        || architectures.is_some_and(|list| {
            list.iter().filter_map(Value::as_str).any(|a| {
                matches!(
                    a,
                    "Idefics3ForConditionalGeneration" | "Idefics3Model" | "SmolVLMForConditionalGeneration" | "SmolVLMModel"
                )
            })
        })
}

impl Idefics3Config {
    /// Reads and completes `config.json`.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| config_error(path, format!("cannot read: {e}")))?;
        let value: Value =
            serde_json::from_str(&text).map_err(|e| config_error(path, format!("malformed JSON: {e}")))?;
        Self::from_value(&value, path)
    }

    /// Completes a parsed `config.json`; `path` names it in errors.
    pub fn from_value(value: &Value, path: &Path) -> Result<Self> {
        let fail = |message: String| config_error(path, message);
        if !is_idefics3_config(value) {
            return Err(fail("not an Idefics3 / SmolVLM config (model_type idefics3 or smolvlm)".into()));
        }
        let text_config = with_defaults(value.get("text_config"), llama_defaults(), "text_config").map_err(&fail)?;
        let text_type = text_config.get("model_type").and_then(Value::as_str).unwrap_or("llama");
        if !matches!(text_type, "llama" | "mistral" | "qwen2") {
            return Err(fail(format!(
                "text_config.model_type `{text_type}` is not supported (llama, mistral, qwen2)"
            )));
        }
        let vision_config = with_defaults(value.get("vision_config"), vision_defaults(), "vision_config").map_err(&fail)?;
        let scale_factor = match value.get("scale_factor") {
            None | Some(Value::Null) => 2,
            Some(v) => match v.as_u64() {
                Some(n) if n > 0 => n as usize,
                _ => return Err(fail(format!("scale_factor must be a positive integer, got {v}"))),
            },
        };
        Ok(Self { path: path.to_path_buf(), text_config, vision_config, scale_factor })
    }

    /// The connector as core's projector spec.
    pub fn connector_spec(&self) -> ProjectorSpec {
        ProjectorSpec::Idefics3Connector(Idefics3ConnectorConfig { scale_factor: self.scale_factor })
    }

    /// The tower's output width.
    pub fn vision_hidden_size(&self) -> Result<usize> {
        match self.vision_config.get("hidden_size").and_then(Value::as_u64) {
            Some(n) if n > 0 => Ok(n as usize),
            _ => Err(config_error(&self.path, "vision_config.hidden_size must be a positive integer".into())),
        }
    }
}

fn config_error(path: &Path, message: String) -> Error {
    Error::Config { path: path.to_path_buf(), message }
}

/// `given` (an object, or absent/null for all defaults) over `defaults`.
fn with_defaults(given: Option<&Value>, defaults: Value, what: &str) -> std::result::Result<Value, String> {
    let mut out: Map<String, Value> = match defaults {
        Value::Object(map) => map,
        _ => Map::new(),
    };
    match given {
        None | Some(Value::Null) => {}
        Some(Value::Object(map)) => {
            for (key, value) in map {
                out.insert(key.clone(), value.clone());
            }
        }
        Some(other) => return Err(format!("{what} must be an object, got {other}")),
    }
    Ok(Value::Object(out))
}

/// transformers' `Idefics3Config` text defaults: a `LlamaConfig` with
/// `rms_norm_eps` 1e-5.
fn llama_defaults() -> Value {
    json!({"model_type": "llama", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
           "num_hidden_layers": 32, "num_attention_heads": 32, "max_position_embeddings": 2048,
           "rms_norm_eps": 1e-5, "hidden_act": "silu", "rope_theta": 10000.0, "tie_word_embeddings": false})
}

/// transformers' `Idefics3VisionConfig` (= `SmolVLMVisionConfig`) defaults.
fn vision_defaults() -> Value {
    json!({"hidden_size": 1152, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 16,
           "num_channels": 3, "image_size": 224, "patch_size": 32, "hidden_act": "gelu_pytorch_tanh",
           "layer_norm_eps": 1e-6})
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]

    use super::*;

    fn check(config: Value, expect: &str) {
        let got = match Idefics3Config::from_value(&config, Path::new("config.json")) {
            Ok(cfg) => format!("ok scale={} patch={}", cfg.scale_factor, cfg.vision_config["patch_size"]),
            Err(e) => e.to_string(),
        };
        assert!(got.contains(expect), "{got} does not contain {expect}");
    }

    #[test]
    fn configs_are_completed_and_checked() {
        check(json!({"model_type": "idefics3"}), "ok scale=2 patch=32");
        check(json!({"model_type": "smolvlm", "scale_factor": 4, "vision_config": {"patch_size": 16}}), "ok scale=4 patch=16");
        check(json!({"architectures": ["SmolVLMForConditionalGeneration"]}), "ok scale=2");
        check(json!({"model_type": "idefics3", "scale_factor": 0}), "scale_factor must be a positive integer");
        check(json!({"model_type": "idefics3", "text_config": {"model_type": "gpt2"}}), "not supported");
        // transformers builds any text model under Idefics3; qwen2 / mistral load as the plain LMs.
        check(json!({"model_type": "idefics3", "text_config": {"model_type": "qwen2"}}), "ok scale=2");
        check(json!({"model_type": "idefics3", "text_config": {"model_type": "mistral"}}), "ok scale=2");
        check(json!({"model_type": "idefics3", "vision_config": 3}), "vision_config must be an object");
        check(json!({"model_type": "idefics2"}), "not an Idefics3");
    }
}
