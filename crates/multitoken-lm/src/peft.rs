//! PEFT LoRA adapters, merged into the base weights as they load.
//!
//! A PEFT adapter directory holds `adapter_config.json` (`r`, `lora_alpha`,
//! `use_rslora`, `fan_in_fan_out`, `rank_pattern`, `alpha_pattern`,
//! `target_modules`) and `adapter_model.safetensors` (or a pickled
//! `adapter_model.bin`, read with candle's pickle support). Tensors are named
//! as PEFT saves them:
//! `base_model.model.{module}.lora_A[.{adapter}].weight` (`[r, in]`) and
//! `...lora_B...weight` (`[out, r]`), where `{module}` is the base model's
//! module path (e.g. `model.layers.0.self_attn.q_proj`).
//!
//! Merging is PEFT's `merge_and_unload`: `W += scale · B·A` with
//! `scale = alpha / r` (`alpha / sqrt(r)` with rsLoRA), transposed for
//! `fan_in_fan_out` (Conv1D) layers.
//!
//! ```no_run
//! # fn main() -> multitoken_lm::Result<()> {
//! use multitoken_lm::peft::{LoraAdapter, MergedWeights};
//! use multitoken_lm::weights::SafetensorsSource;
//! let device = candle_core::Device::Cpu;
//! let adapter = LoraAdapter::load(std::path::Path::new("out/adapter"), candle_core::DType::F32, &device)?;
//! let base = SafetensorsSource::from_dir(std::path::Path::new("base"), candle_core::DType::F32, &device)?;
//! let merged = MergedWeights::new(&base, &adapter); // a WeightSource: load any model from it
//! # let _ = merged; Ok(())
//! # }
//! ```

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use crate::linear::Linear;
use crate::weights::WeightSource;
use crate::{Error, Result};

/// `adapter_config.json`: the fields that change the merged weights.
#[derive(Debug, Clone, Deserialize)]
pub struct AdapterConfig {
    /// Default rank.
    pub r: usize,
    /// Default alpha.
    #[serde(default = "default_alpha")]
    pub lora_alpha: f64,
    /// rsLoRA: scale by `alpha / sqrt(r)`.
    #[serde(default)]
    pub use_rslora: bool,
    /// The base layer stores `[in, out]` (GPT-2 `Conv1D`).
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// Per-module rank overrides, keyed by a module-name suffix.
    #[serde(default)]
    pub rank_pattern: HashMap<String, usize>,
    /// Per-module alpha overrides, keyed by a module-name suffix.
    #[serde(default)]
    pub alpha_pattern: HashMap<String, f64>,
    /// DoRA adapters are not mergeable here.
    #[serde(default)]
    pub use_dora: bool,
    /// Must be `LORA` when given.
    #[serde(default)]
    pub peft_type: Option<String>,
}

fn default_alpha() -> f64 {
    8.0
}

/// One adapted module's factors.
#[derive(Debug, Clone)]
struct LoraPair {
    a: Option<Tensor>,
    b: Option<Tensor>,
}

/// A LoRA adapter read from a PEFT directory.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    config: AdapterConfig,
    modules: HashMap<String, LoraPair>,
    source: String,
}

impl LoraAdapter {
    /// Reads `dir/adapter_config.json` and `dir/adapter_model.safetensors`
    /// (else `adapter_model.bin`); factors are kept in `dtype` on `device`.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let config_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|source| Error::Io {
            path: config_path.clone(),
            source,
        })?;
        let config: AdapterConfig = serde_json::from_str(&text).map_err(|e| Error::Config {
            path: config_path.clone(),
            message: e.to_string(),
        })?;
        let bad = |message: String| Error::Config {
            path: config_path.clone(),
            message,
        };
        if let Some(kind) = config.peft_type.as_deref().filter(|k| *k != "LORA") {
            return Err(bad(format!("peft_type `{kind}` is not a LoRA adapter")));
        }
        if config.use_dora {
            return Err(bad(
                "DoRA adapters (use_dora) cannot be merged as plain LoRA".into(),
            ));
        }
        if config.r == 0 {
            return Err(bad("r is 0".into()));
        }
        let safetensors = dir.join("adapter_model.safetensors");
        let bin = dir.join("adapter_model.bin");
        let (path, tensors) = if safetensors.is_file() {
            let t = candle_core::safetensors::load(&safetensors, device)
                .map_err(|e| Error::Msg(format!("{}: {e}", safetensors.display())))?;
            (safetensors, t.into_iter().collect::<Vec<_>>())
        } else if bin.is_file() {
            let t = candle_core::pickle::read_all(&bin)
                .map_err(|e| Error::Msg(format!("{}: {e}", bin.display())))?;
            (bin, t)
        } else {
            return Err(Error::Io {
                path: safetensors,
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no adapter_model.safetensors or adapter_model.bin",
                ),
            });
        };
        Self::from_tensors(config, tensors, dtype, device, &path.display().to_string())
    }

    /// An adapter from its config and PEFT-named tensors; `source` names them in errors.
    pub fn from_tensors(
        config: AdapterConfig,
        tensors: Vec<(String, Tensor)>,
        dtype: DType,
        device: &Device,
        source: &str,
    ) -> Result<Self> {
        let mut modules: HashMap<String, LoraPair> = HashMap::new();
        for (name, tensor) in tensors {
            let Some((module, is_a)) = split_lora_name(&name) else {
                continue;
            };
            let tensor = tensor.to_device(device)?.to_dtype(dtype)?;
            let entry = modules
                .entry(module)
                .or_insert(LoraPair { a: None, b: None });
            if is_a {
                entry.a = Some(tensor);
            } else {
                entry.b = Some(tensor);
            }
        }
        if modules.is_empty() {
            return Err(Error::Msg(format!("{source}: no lora_A/lora_B tensors")));
        }
        let adapter = Self {
            config,
            modules,
            source: source.to_string(),
        };
        for module in adapter.modules.keys() {
            adapter.delta(module)?;
        }
        Ok(adapter)
    }

    /// The parsed `adapter_config.json`.
    pub fn config(&self) -> &AdapterConfig {
        &self.config
    }

    /// Base-model module paths this adapter changes, sorted.
    pub fn modules(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.modules.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    /// `scale · B·A` for `module` (`[out, in]`, transposed for `fan_in_fan_out`),
    /// or `None` when the adapter does not touch it.
    pub fn delta(&self, module: &str) -> Result<Option<Tensor>> {
        let Some(pair) = self.modules.get(module) else {
            return Ok(None);
        };
        let what = |m: &str| Error::Tensor {
            name: format!("{module}.lora_{m}"),
            message: format!("missing from {}", self.source),
        };
        let a = pair.a.as_ref().ok_or_else(|| what("A"))?;
        let b = pair.b.as_ref().ok_or_else(|| what("B"))?;
        let (rank_a, _) = a.dims2()?;
        let (_, rank_b) = b.dims2()?;
        let r = pattern(&self.config.rank_pattern, module).unwrap_or(self.config.r);
        if rank_a != rank_b || rank_a != r {
            return Err(Error::Tensor {
                name: module.to_string(),
                message: format!(
                    "lora_A {:?} and lora_B {:?} do not have rank r = {r} (in {})",
                    a.dims(),
                    b.dims(),
                    self.source
                ),
            });
        }
        let alpha = pattern(&self.config.alpha_pattern, module).unwrap_or(self.config.lora_alpha);
        let scale = if self.config.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        };
        let delta = (b.matmul(a)? * scale)?;
        Ok(Some(if self.config.fan_in_fan_out {
            delta.t()?.contiguous()?
        } else {
            delta
        }))
    }

    /// `weight + delta` when `name` is `{module}.weight` of an adapted module;
    /// `weight` unchanged otherwise. Fails when the shapes disagree.
    pub fn merge(&self, name: &str, weight: &Tensor) -> Result<Tensor> {
        let Some(module) = name.strip_suffix(".weight") else {
            return Ok(weight.clone());
        };
        match self.delta(module)? {
            None => Ok(weight.clone()),
            Some(delta) if delta.dims() == weight.dims() => {
                Ok((weight + delta.to_dtype(weight.dtype())?)?)
            }
            Some(delta) => Err(Error::Tensor {
                name: name.to_string(),
                message: format!(
                    "base weight {:?} but the LoRA update is {:?} ({})",
                    weight.dims(),
                    delta.dims(),
                    self.source
                ),
            }),
        }
    }
}

/// `rank_pattern` / `alpha_pattern`: the value of the longest key that is the
/// module's name or a `.`-separated suffix of it.
fn pattern<T: Copy>(map: &HashMap<String, T>, module: &str) -> Option<T> {
    map.iter()
        .filter(|(key, _)| module == key.as_str() || module.ends_with(&format!(".{key}")))
        .max_by_key(|(key, _)| key.len())
        .map(|(_, v)| *v)
}

/// `base_model.model.{module}.lora_{A,B}[.{adapter}].weight` -> (module, is_a).
fn split_lora_name(name: &str) -> Option<(String, bool)> {
    let name = name.strip_prefix("base_model.model.").unwrap_or(name);
    let (module, rest) = name.split_once(".lora_")?;
    let is_a = match rest.split('.').next()? {
        "A" => true,
        "B" => false,
        _ => return None,
    };
    rest.ends_with("weight").then(|| (module.to_string(), is_a))
}

/// A [`WeightSource`] whose adapted weights have the LoRA update merged in.
pub struct MergedWeights<'a> {
    base: &'a dyn WeightSource,
    adapter: &'a LoraAdapter,
}

impl<'a> MergedWeights<'a> {
    /// Merges `adapter` into what `base` serves.
    pub fn new(base: &'a dyn WeightSource, adapter: &'a LoraAdapter) -> Self {
        Self { base, adapter }
    }
}

impl WeightSource for MergedWeights<'_> {
    fn describe(&self) -> String {
        format!("{} + LoRA {}", self.base.describe(), self.adapter.source)
    }
    fn contains(&self, name: &str) -> bool {
        self.base.contains(name)
    }
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let weight = self.base.tensor(name, shape)?;
        self.adapter.merge(name, &weight)
    }
    fn linear(&self, prefix: &str, in_dim: usize, out_dim: usize, bias: bool) -> Result<Linear> {
        if !self.adapter.modules.contains_key(prefix) {
            return self.base.linear(prefix, in_dim, out_dim, bias);
        }
        let weight = self.tensor(&format!("{prefix}.weight"), &[out_dim, in_dim])?;
        let bias = if bias {
            Some(self.base.tensor(&format!("{prefix}.bias"), &[out_dim])?)
        } else {
            None
        };
        Linear::dense(weight, bias)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(r: usize, alpha: f64) -> AdapterConfig {
        serde_json::from_value(serde_json::json!({"r": r, "lora_alpha": alpha}))
            .unwrap_or_else(|_| unreachable!())
    }

    #[test]
    fn names_as_peft_writes_them() {
        assert_eq!(
            split_lora_name("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"),
            Some(("model.layers.0.self_attn.q_proj".to_string(), true))
        );
        assert_eq!(
            split_lora_name("base_model.model.model.layers.1.mlp.fc1.lora_B.default.weight"),
            Some(("model.layers.1.mlp.fc1".to_string(), false))
        );
        assert_eq!(
            split_lora_name("base_model.model.model.embed_tokens.weight"),
            None
        );
    }

    #[test]
    fn merge_adds_scaled_product() -> Result<()> {
        let dev = Device::Cpu;
        let a = Tensor::new(&[[1f32, 0., 2.]], &dev)?; // [r=1, in=3]
        let b = Tensor::new(&[[1f32], [3.]], &dev)?; // [out=2, r=1]
        let adapter = LoraAdapter::from_tensors(
            config(1, 2.0),
            vec![
                ("base_model.model.l.lora_A.weight".into(), a),
                ("base_model.model.l.lora_B.weight".into(), b),
            ],
            DType::F32,
            &dev,
            "test",
        )?;
        let w = Tensor::zeros((2, 3), DType::F32, &dev)?;
        let merged = adapter.merge("l.weight", &w)?.to_vec2::<f32>()?;
        assert_eq!(merged, vec![vec![2., 0., 4.], vec![6., 0., 12.]]);
        let other = adapter.merge("m.weight", &w)?.to_vec2::<f32>()?;
        assert_eq!(other, vec![vec![0.; 3]; 2]);
        let wrong = Tensor::zeros((3, 2), DType::F32, &dev)?;
        assert!(adapter.merge("l.weight", &wrong).is_err());
        Ok(())
    }

    #[test]
    fn rank_mismatch_is_an_error() -> Result<()> {
        let dev = Device::Cpu;
        let a = Tensor::zeros((2, 3), DType::F32, &dev)?;
        let b = Tensor::zeros((2, 2), DType::F32, &dev)?;
        let result = LoraAdapter::from_tensors(
            config(4, 8.0),
            vec![("l.lora_A.weight".into(), a), ("l.lora_B.weight".into(), b)],
            DType::F32,
            &dev,
            "test",
        );
        assert!(result.is_err_and(|e| e.to_string().contains("rank r = 4")));
        Ok(())
    }
}
