//! PEFT LoRA adapters as experts: read `adapter_config.json` +
//! `adapter_model.safetensors` and merge `W + scale · B A` into a base weight.
//!
//! Only what an MoE build needs (the MLP linears of the decoder). A stopgap
//! until multitoken-lm's own PEFT reader lands; then this should call it.
//! Scale is `lora_alpha / r` (`lora_alpha / √r` with `use_rslora`), `r` taken
//! from each `lora_A` (so `rank_pattern` is honoured); `alpha_pattern`,
//! DoRA and non-LoRA PEFT types are refused rather than merged wrongly.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use crate::error::{file_error, io};
use crate::Result;

/// Whether `dir` is a PEFT adapter directory.
pub fn is_lora_dir(dir: &Path) -> bool {
    dir.join("adapter_config.json").is_file()
}

#[derive(Deserialize)]
struct AdapterConfig {
    #[serde(default)]
    peft_type: Option<String>,
    lora_alpha: f64,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    fan_in_fan_out: bool,
    #[serde(default)]
    alpha_pattern: HashMap<String, serde_json::Value>,
}

/// A loaded LoRA adapter.
#[derive(Debug)]
pub struct LoraAdapter {
    dir: PathBuf,
    alpha: f64,
    rslora: bool,
    fan_in_fan_out: bool,
    tensors: HashMap<String, Tensor>,
}

impl LoraAdapter {
    /// Read an adapter directory.
    pub fn open(dir: &Path) -> Result<Self> {
        let cfg_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(io(&cfg_path))?;
        let cfg: AdapterConfig =
            serde_json::from_str(&text).map_err(|e| file_error(&cfg_path, e.to_string()))?;
        if let Some(t) = &cfg.peft_type {
            if t != "LORA" {
                return Err(file_error(
                    &cfg_path,
                    format!("peft_type {t} is not supported (only LORA)"),
                ));
            }
        }
        if cfg.use_dora {
            return Err(file_error(&cfg_path, "DoRA adapters are not supported"));
        }
        if !cfg.alpha_pattern.is_empty() {
            return Err(file_error(&cfg_path, "alpha_pattern is not supported"));
        }
        let weights = dir.join("adapter_model.safetensors");
        if !weights.is_file() {
            return Err(file_error(
                dir,
                "the adapter has no adapter_model.safetensors",
            ));
        }
        let tensors = candle_core::safetensors::load(&weights, &Device::Cpu)
            .map_err(|e| file_error(&weights, format!("cannot read: {e}")))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            alpha: cfg.lora_alpha,
            rslora: cfg.use_rslora,
            fan_in_fan_out: cfg.fan_in_fan_out,
            tensors,
        })
    }

    fn find(&self, module: &str, which: &str) -> Option<(&String, &Tensor)> {
        let suffix = format!("{module}.{which}.weight");
        self.tensors.iter().find(|(k, _)| {
            k.strip_suffix(&suffix)
                .is_some_and(|head| head.is_empty() || head.ends_with('.'))
        })
    }

    /// `w + scale · B A` (f32) when the adapter has a LoRA on `module`
    /// (e.g. `model.layers.0.mlp.up_proj`), `None` when it has none.
    pub fn merge(&self, module: &str, w: &Tensor) -> Result<Option<Tensor>> {
        let (a, b) = match (self.find(module, "lora_A"), self.find(module, "lora_B")) {
            (None, None) => return Ok(None),
            (Some((_, a)), Some((_, b))) => (a, b),
            (Some((k, _)), None) | (None, Some((k, _))) => {
                return Err(file_error(
                    &self.dir,
                    format!("`{k}` has no matching lora_A/lora_B partner"),
                ))
            }
        };
        let (r, _) = a.dims2()?;
        let scale = if self.rslora {
            self.alpha / (r as f64).sqrt()
        } else {
            self.alpha / r as f64
        };
        let mut delta = (b.to_dtype(DType::F32)?.matmul(&a.to_dtype(DType::F32)?)? * scale)?;
        if self.fan_in_fan_out {
            delta = delta.t()?.contiguous()?;
        }
        if delta.dims() != w.dims() {
            return Err(file_error(
                &self.dir,
                format!(
                    "the LoRA on `{module}` gives a {:?} update for a {:?} weight",
                    delta.dims(),
                    w.dims()
                ),
            ));
        }
        Ok(Some((w.to_dtype(DType::F32)? + delta)?))
    }
}
