//! `moe.json`: what makes a model directory a mixture of experts.
//!
//! ```json
//! {
//!   "format": "multitoken-moe",
//!   "k": 1,
//!   "num_expert_models": 3,
//!   "routing": "cephalo",
//!   "base": "/models/base",
//!   "experts": [{"path": "/models/a", "kind": "full"}, {"path": "/models/b-lora", "kind": "lora"}],
//!   "quantize": "q4_1"
//! }
//! ```
//!
//! It sits next to the LM's `config.json`, tokenizer and `model.safetensors`
//! (see [`crate::build`] for the tensor names).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{file_error, io};
use crate::Result;

/// The file that makes an LM directory a mixture of experts.
pub const MOE_CONFIG_FILE: &str = multitoken_lm::loader::MOE_MARKER;

/// How the gate's logits become the weights of the selected experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Routing {
    /// Cephalo: softmax over all logits, top-k, softmax again over the k
    /// selected probabilities (with k = 1 the weight is 1).
    #[default]
    Cephalo,
    /// Mixtral: softmax over all logits, top-k, divided by their sum.
    Renormalize,
}

impl std::str::FromStr for Routing {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "cephalo" => Ok(Routing::Cephalo),
            "renormalize" => Ok(Routing::Renormalize),
            other => Err(format!(
                "unknown routing mode `{other}` (expected cephalo or renormalize)"
            )),
        }
    }
}

/// Where one expert came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExpertSource {
    /// The directory given to `moe build`.
    pub path: String,
    /// `full` (a whole checkpoint) or `lora` (a PEFT adapter merged into the base).
    pub kind: String,
}

/// `moe.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoeConfig {
    /// Always `multitoken-moe`.
    #[serde(default = "format_name")]
    pub format: String,
    /// Experts computed per token.
    pub k: usize,
    /// Number of experts in every layer.
    pub num_expert_models: usize,
    /// How gate logits become expert weights.
    #[serde(default)]
    pub routing: Routing,
    /// The base model the MoE was built from.
    #[serde(default)]
    pub base: Option<String>,
    /// One entry per expert, in gate order.
    #[serde(default)]
    pub experts: Vec<ExpertSource>,
    /// The block format (`q8_0`, `q4_1`, `q4_k`) the decoder's linears, every
    /// expert's included, are quantized to as they are read (`moe build
    /// --quantize`); a loader's own `--quantize` takes precedence. The gates
    /// and the head stay dense. `None`: load in the load dtype.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantize: Option<String>,
}

fn format_name() -> String {
    "multitoken-moe".into()
}

impl MoeConfig {
    /// Check `k` against the number of experts.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.num_expert_models == 0 {
            return Err("num_expert_models is 0: a mixture needs at least one expert".into());
        }
        if self.k == 0 || self.k > self.num_expert_models {
            return Err(format!(
                "k = {} must be between 1 and the number of experts ({})",
                self.k, self.num_expert_models
            ));
        }
        if let Some(q) = &self.quantize {
            q.parse::<multitoken_lm::quantize::Quantization>()
                .map_err(|e| format!("quantize: {e}"))?;
        }
        if !self.experts.is_empty() && self.experts.len() != self.num_expert_models {
            return Err(format!(
                "{} expert sources listed for num_expert_models = {}",
                self.experts.len(),
                self.num_expert_models
            ));
        }
        Ok(())
    }

    /// Read and check `moe.json`.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(io(path))?;
        let cfg: MoeConfig =
            serde_json::from_str(&text).map_err(|e| file_error(path, e.to_string()))?;
        cfg.validate().map_err(|m| file_error(path, m))?;
        Ok(cfg)
    }

    /// Write `moe.json`.
    pub fn write(&self, path: &Path) -> Result<()> {
        let text =
            serde_json::to_string_pretty(self).map_err(|e| file_error(path, e.to_string()))?;
        std::fs::write(path, text + "\n").map_err(io(path))
    }
}
