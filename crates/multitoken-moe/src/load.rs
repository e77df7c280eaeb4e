//! Loading an MoE directory (one with `moe.json`, written by [`crate::build`]).
//!
//! [`load_moe_lm`] builds the base [`CausalLm`] with expert 0 in each MLP slot,
//! then replaces every layer's MLP by a [`MoeFeedForward`] over all experts.
//! The crate registers [`load_moe_dir`] with multitoken-lm's loader (an
//! `inventory` [`DirLoader`] keyed on `moe.json`), so `multitoken generate`,
//! `chat` and `serve`, which go through `load_model`, load an MoE like any
//! model, multimodal ones included (their `base_model` is an MoE directory).

use std::path::Path;
use std::sync::Arc;

use candle_core::Tensor;
use multitoken_lm::hf::{load_hf_dir_with, parse_config, HfConfig};
use multitoken_lm::loader::{DirLoader, LoadOptions, LoadedModel};
use multitoken_lm::model::{CausalLm, Mlp};
use multitoken_lm::weights::SafetensorsSource;
use multitoken_lm::{Family, Linear, WeightSource};

use crate::config::{MoeConfig, MOE_CONFIG_FILE};
use crate::layer::{Dispatch, MoeFeedForward};
use crate::Result;

multitoken_core::inventory::submit! {
    DirLoader { marker: MOE_CONFIG_FILE, load: load_moe_dir }
}

/// An MoE LM directory loaded for running.
#[derive(Debug)]
pub struct MoeModel {
    /// The decoder with every MLP replaced by a mixture.
    pub model: CausalLm,
    /// `config.json`.
    pub hf: HfConfig,
    /// `moe.json`.
    pub moe: MoeConfig,
}

/// Load an MoE LM directory as a [`LoadedModel`] (the [`DirLoader`] hook).
pub fn load_moe_dir(dir: &Path, opts: &LoadOptions) -> multitoken_lm::Result<LoadedModel> {
    let moe = load_moe_lm(dir, opts, Dispatch::Sparse)?;
    // Tokenizer and generation files through the usual HF path, with a
    // zero-layer stand-in model so no decoder weight is read twice.
    let mut shell = moe.hf.clone();
    shell.model.num_layers = 0;
    shell.layer_sliding_windows = None;
    let weights = SafetensorsSource::from_dir(dir, opts.tensor_dtype(), &opts.device)?;
    let mut loaded = load_hf_dir_with(dir, &shell, &weights)?;
    loaded.model = Arc::new(moe.model);
    Ok(loaded)
}

/// Load an MoE LM directory as a [`CausalLm`] whose MLPs are mixtures.
pub fn load_moe_lm(dir: &Path, opts: &LoadOptions, dispatch: Dispatch) -> Result<MoeModel> {
    let moe = MoeConfig::read(&dir.join(MOE_CONFIG_FILE))?;
    let hf = parse_config(&dir.join("config.json"))?;
    // f32 under `--dtype bf16` on the CPU, whose decoder and expert linears alone go bf16.
    let dense = SafetensorsSource::from_dir(dir, opts.tensor_dtype(), &opts.device)?;
    // The caller's `--quantize` first, then the one `moe build` recorded.
    let format = match (opts.quantize, &moe.quantize) {
        (Some(format), _) => Some(format),
        (None, Some(name)) => Some(name.parse().map_err(|e| crate::Error::Msg(format!("{}: quantize: {e}", dir.join(MOE_CONFIG_FILE).display())))?),
        (None, None) => None,
    };
    // Experts' linears come quantized (or bf16) when asked; the gates always dense.
    let lm_opts = LoadOptions { quantize: format, ..opts.clone() };
    let model = lm_opts.with_lm_weights(&dense, |weights| mixture_model(&hf, &moe, &dense, weights, dispatch))?;
    Ok(MoeModel { model, hf, moe })
}

/// The base model with expert 0 in each MLP slot (its linears from `weights`),
/// then each layer's MLP replaced by a mixture of all experts gated by `dense`'s
/// gate.
fn mixture_model(
    hf: &HfConfig,
    moe: &MoeConfig,
    dense: &SafetensorsSource,
    weights: &dyn WeightSource,
    dispatch: Dispatch,
) -> Result<CausalLm> {
    let mut model = CausalLm::load(&hf.model, &ExpertZero(weights))?;
    if let Some(windows) = &hf.layer_sliding_windows {
        model.set_layer_sliding_windows(windows)?;
    }
    let cfg = &hf.model;
    for layer in 0..cfg.num_layers {
        let prefix = format!("model.layers.{layer}.mlp");
        let first = model
            .mlp(layer)
            .cloned()
            .ok_or_else(|| crate::Error::Msg(format!("layer {layer} does not exist")))?;
        let mut experts = vec![first];
        for j in 1..moe.num_expert_models {
            experts.push(load_mlp(cfg, weights, &format!("{prefix}.experts.{j}"))?);
        }
        let gate = dense.linear(
            &format!("{prefix}.gate"),
            cfg.hidden_size,
            moe.num_expert_models,
            true,
        )?;
        let ff = MoeFeedForward::new(gate, experts, moe.k, moe.routing)?.with_dispatch(dispatch);
        model.replace_mlp(layer, Mlp::Custom(Arc::new(ff)))?;
    }
    Ok(model)
}

/// One MLP of `cfg`'s family under `prefix` (`...mlp.experts.3`).
pub fn load_mlp(
    cfg: &multitoken_lm::ModelConfig,
    w: &dyn WeightSource,
    prefix: &str,
) -> Result<Mlp> {
    let (h, i, b, act) = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.mlp_bias,
        cfg.hidden_act,
    );
    let lin = |name: &str, inp: usize, out: usize| -> Result<Linear> {
        Ok(w.linear(&format!("{prefix}.{name}"), inp, out, b)?)
    };
    Ok(match cfg.family {
        Family::Phi2 => Mlp::Plain {
            fc1: lin("fc1", h, i)?,
            fc2: lin("fc2", i, h)?,
            act,
        },
        _ => Mlp::Gated {
            gate_proj: lin("gate_proj", h, i)?,
            up_proj: lin("up_proj", h, i)?,
            down_proj: lin("down_proj", i, h)?,
            act,
        },
    })
}

/// Serves `model.layers.{i}.mlp.X` from `model.layers.{i}.mlp.experts.0.X`, so
/// the base model loads with expert 0 in its MLP slots.
struct ExpertZero<'a>(&'a dyn WeightSource);

impl ExpertZero<'_> {
    fn map(name: &str) -> String {
        if let Some((head, tail)) = name.split_once(".mlp.") {
            if head.starts_with("model.layers.")
                && !tail.starts_with("experts.")
                && !tail.starts_with("gate.")
            {
                return format!("{head}.mlp.experts.0.{tail}");
            }
        }
        name.to_string()
    }
}

impl WeightSource for ExpertZero<'_> {
    fn describe(&self) -> String {
        self.0.describe()
    }
    fn contains(&self, name: &str) -> bool {
        self.0.contains(&Self::map(name))
    }
    fn tensor(&self, name: &str, shape: &[usize]) -> multitoken_lm::Result<Tensor> {
        self.0.tensor(&Self::map(name), shape)
    }
    fn linear(
        &self,
        prefix: &str,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
    ) -> multitoken_lm::Result<Linear> {
        self.0.linear(&Self::map(prefix), in_dim, out_dim, bias)
    }
}
