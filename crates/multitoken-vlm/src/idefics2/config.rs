//! `config.json` of an Idefics2 or Cephalo MoE checkpoint, read as
//! transformers' `Idefics2Config` reads it (its defaults for what is left out).

use std::path::{Path, PathBuf};

use multitoken_core::projector::Idefics2ConnectorConfig;
use multitoken_core::ProjectorSpec;
use serde_json::{json, Map, Value};

use crate::{Error, Result};

/// Mixture-of-experts settings of a Cephalo checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MoeSettings {
    /// Experts per token.
    pub k: usize,
    /// Experts per layer.
    pub num_expert_models: usize,
}

/// The parts of the config the importer uses, completed with defaults.
#[derive(Debug, Clone)]
pub struct Idefics2Config {
    /// The file, for messages.
    pub path: PathBuf,
    /// The Mistral `text_config`.
    pub text_config: Value,
    /// The SigLIP `vision_config`.
    pub vision_config: Value,
    /// The `perceiver_config`.
    pub perceiver_config: Value,
    /// Cephalo's MoE settings, for `idefics2_moe`.
    pub moe: Option<MoeSettings>,
}

/// Whether a parsed `config.json` is Idefics2's or Cephalo's MoE's.
pub fn is_idefics2_config(value: &Value) -> bool {
    let model_type = value.get("model_type").and_then(Value::as_str);
    let architectures = value.get("architectures").and_then(Value::as_array);
    matches!(model_type, Some("idefics2" | "idefics2_moe"))
        || architectures.is_some_and(|list| {
            list.iter().filter_map(Value::as_str).any(|a| {
                matches!(a, "Idefics2ForConditionalGeneration" | "Idefics2ForCausalLMMoE" | "Idefics2Model")
            })
        })
}

impl Idefics2Config {
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
        if !is_idefics2_config(value) {
            return Err(fail("not an Idefics2 config (model_type idefics2 or idefics2_moe)".into()));
        }
        let text_config = with_defaults(value.get("text_config"), mistral_defaults(), "text_config").map_err(&fail)?;
        let text_type = text_config.get("model_type").and_then(Value::as_str).unwrap_or("mistral");
        if text_type != "mistral" && text_type != "llama" {
            return Err(fail(format!("text_config.model_type `{text_type}` is not supported (Idefics2 uses mistral)")));
        }
        let vision_config = with_defaults(value.get("vision_config"), vision_defaults(), "vision_config").map_err(&fail)?;
        let mut perceiver_config =
            with_defaults(value.get("perceiver_config"), perceiver_defaults(), "perceiver_config").map_err(&fail)?;
        // transformers: a perceiver config whose hidden size differs from the
        // text model's was left at its defaults; it takes the text model's
        // hidden size and RMSNorm epsilon.
        let text_hidden = text_config.get("hidden_size").cloned().unwrap_or(json!(4096));
        if perceiver_config.get("hidden_size") != Some(&text_hidden) {
            if let Value::Object(map) = &mut perceiver_config {
                map.insert("hidden_size".into(), text_hidden);
                map.insert("rms_norm_eps".into(), text_config.get("rms_norm_eps").cloned().unwrap_or(json!(1e-5)));
            }
        }
        for (what, config) in [("text_config", &text_config), ("perceiver_config", &perceiver_config)] {
            let act = config.get("hidden_act").and_then(Value::as_str).unwrap_or("silu");
            if act != "silu" {
                return Err(fail(format!(
                    "{what}.hidden_act `{act}` is not supported: Idefics2's connector is SwiGLU (silu)"
                )));
            }
        }
        let moe = if value.get("model_type").and_then(Value::as_str) == Some("idefics2_moe")
            || value.get("num_expert_models").is_some()
        {
            let count = |key: &str| -> Result<usize> {
                value
                    .get(key)
                    .and_then(Value::as_u64)
                    .map(|n| n as usize)
                    .ok_or_else(|| fail(format!("an idefics2_moe config needs `{key}`, a positive integer")))
            };
            let (k, num_expert_models) = (count("k")?, count("num_expert_models")?);
            if num_expert_models == 0 || k == 0 {
                return Err(fail(format!("k ({k}) and num_expert_models ({num_expert_models}) must be at least 1")));
            }
            if k > num_expert_models {
                return Err(fail(format!("k is {k} but the model has only {num_expert_models} experts")));
            }
            Some(MoeSettings { k, num_expert_models })
        } else {
            None
        };
        Ok(Self { path: path.to_path_buf(), text_config, vision_config, perceiver_config, moe })
    }

    /// The connector as core's projector spec.
    pub fn connector_spec(&self) -> Result<ProjectorSpec> {
        let p = &self.perceiver_config;
        let spec = ProjectorSpec::Idefics2Connector(Idefics2ConnectorConfig {
            resampler_n_latents: self.count(p, "perceiver_config", "resampler_n_latents")?,
            resampler_depth: self.count(p, "perceiver_config", "resampler_depth")?,
            resampler_n_heads: self.count(p, "perceiver_config", "resampler_n_heads")?,
            resampler_head_dim: self.count(p, "perceiver_config", "resampler_head_dim")?,
            num_key_value_heads: self.count(p, "perceiver_config", "num_key_value_heads")?,
            intermediate_size: self.count(&self.text_config, "text_config", "intermediate_size")?,
            rms_norm_eps: p.get("rms_norm_eps").and_then(Value::as_f64).unwrap_or(1e-6),
        });
        spec.validate().map_err(|e| config_error(&self.path, format!("perceiver_config: {e}")))?;
        Ok(spec)
    }

    /// The tower's output width.
    pub fn vision_hidden_size(&self) -> Result<usize> {
        self.count(&self.vision_config, "vision_config", "hidden_size")
    }

    /// Slots per crop: `image_seq_len` of `processor_config.json`, else the
    /// perceiver's latents (what the connector emits per crop).
    pub fn image_seq_len(&self, dir: &Path) -> Result<usize> {
        let latents = self.count(&self.perceiver_config, "perceiver_config", "resampler_n_latents")?;
        let path = dir.join("processor_config.json");
        let from_file = std::fs::read_to_string(&path)
            .ok()
            .and_then(|text| serde_json::from_str::<Value>(&text).ok())
            .and_then(|value| value.get("image_seq_len").and_then(Value::as_u64));
        match from_file {
            Some(n) if n as usize != latents => Err(config_error(
                &path,
                format!("image_seq_len is {n} but the perceiver emits {latents} latents per image"),
            )),
            _ => Ok(latents),
        }
    }

    fn count(&self, config: &Value, what: &str, key: &str) -> Result<usize> {
        match config.get(key).and_then(Value::as_u64) {
            Some(n) if n > 0 => Ok(n as usize),
            _ => Err(config_error(&self.path, format!("{what}.{key} must be a positive integer"))),
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

/// transformers' `Idefics2Config` text defaults (a `MistralConfig`).
fn mistral_defaults() -> Value {
    json!({"model_type": "mistral", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
           "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
           "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "hidden_act": "silu",
           "rope_theta": 10000.0, "tie_word_embeddings": false, "pad_token_id": 0})
}

/// transformers' `Idefics2VisionConfig` defaults.
fn vision_defaults() -> Value {
    json!({"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
           "num_channels": 3, "image_size": 224, "patch_size": 32, "hidden_act": "gelu_pytorch_tanh",
           "layer_norm_eps": 1e-6})
}

/// transformers' `Idefics2PerceiverConfig` defaults.
fn perceiver_defaults() -> Value {
    json!({"hidden_act": "silu", "hidden_size": 4096, "rms_norm_eps": 1e-6, "resampler_n_latents": 64,
           "resampler_depth": 3, "resampler_n_heads": 16, "resampler_head_dim": 96, "num_key_value_heads": 4})
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]

    use super::*;

    fn check(config: Value, expect: &str) {
        let got = match Idefics2Config::from_value(&config, Path::new("config.json")) {
            Ok(cfg) => format!("ok moe={:?} latents={}", cfg.moe, cfg.perceiver_config["resampler_n_latents"]),
            Err(e) => e.to_string(),
        };
        assert!(got.contains(expect), "{got} does not contain {expect}");
    }

    #[test]
    fn configs_are_completed_and_checked() {
        check(json!({"model_type": "idefics2"}), "ok moe=None latents=64");
        check(json!({"model_type": "idefics2_moe", "k": 2, "num_expert_models": 3}), "k: 2, num_expert_models: 3");
        check(json!({"model_type": "idefics2_moe", "k": 4, "num_expert_models": 3}), "k is 4 but the model has only 3 experts");
        check(json!({"model_type": "idefics2_moe", "num_expert_models": 3}), "needs `k`");
        check(json!({"model_type": "idefics2", "text_config": {"model_type": "gpt2"}}), "not supported");
        check(json!({"model_type": "idefics2", "vision_config": 3}), "vision_config must be an object");
        check(json!({"model_type": "llava"}), "not an Idefics2 config");
        check(json!({"model_type": "idefics2", "perceiver_config": {"hidden_act": "gelu", "hidden_size": 4096}}), "hidden_act `gelu`");
    }

    #[test]
    fn a_default_perceiver_takes_the_text_models_width_and_epsilon() {
        let cfg = Idefics2Config::from_value(
            &json!({"model_type": "idefics2", "text_config": {"hidden_size": 64, "rms_norm_eps": 1e-3}}),
            Path::new("c"),
        )
        .unwrap();
        assert_eq!(cfg.perceiver_config["hidden_size"], json!(64));
        match cfg.connector_spec().unwrap() {
            ProjectorSpec::Idefics2Connector(c) => assert_eq!(c.rms_norm_eps, 1e-3),
            other => panic!("{other:?}"),
        }
    }
}
