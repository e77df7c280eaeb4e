//! Gates: loading them from a file (`set-gate`) and Cephalo's training (`train-gate`).
//!
//! Gate files hold `layers.{i}.gate.weight` `[num_experts, hidden]` and
//! `layers.{i}.gate.bias` `[num_experts]` for every decoder layer `i`.
//!
//! Training follows Cephalo's `train_gating_layer_params_from_hidden_states`:
//! run the MoE model on each expert's prompts, take hidden state
//! `layer + layer_offset` (transformers' `output_hidden_states` numbering: 0 =
//! embeddings) mean-pooled over the sequence, average per expert, and fit each
//! layer's gate (starting from its current weights) with cross-entropy towards
//! the expert's index using Adam.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::optim::{AdamW, Optimizer, ParamsAdamW};
use multitoken_core::{Item, ItemsByKey};
use multitoken_lm::loader::LoadOptions;
use multitoken_lm::multimodal::MultimodalModel;
use serde::Deserialize;

use crate::build::{lm_dir_of, stored_dtype};
use crate::config::{MoeConfig, MOE_CONFIG_FILE};
use crate::error::{file_error, io};
use crate::layer::Dispatch;
use crate::load::load_moe_lm;
use crate::{Error, Result};

/// One gate per layer: `(weight [num_experts, hidden], bias [num_experts])`, f32.
pub type Gates = Vec<(Tensor, Tensor)>;

/// The MoE LM directory of `dir` and its `moe.json` and model config.
fn open_moe(dir: &Path) -> Result<(PathBuf, MoeConfig, multitoken_lm::hf::HfConfig)> {
    let (lm, _) = lm_dir_of(dir)?;
    let marker = lm.join(MOE_CONFIG_FILE);
    if !marker.is_file() {
        return Err(file_error(&lm, format!("not a mixture-of-experts model (no {MOE_CONFIG_FILE}); make one with `multitoken moe build`")));
    }
    let moe = MoeConfig::read(&marker)?;
    let hf = multitoken_lm::hf::parse_config(&lm.join("config.json"))?;
    Ok((lm, moe, hf))
}

/// Read and check a gate file for a model of `layers` layers, `experts` experts, width `hidden`.
pub fn read_gates(path: &Path, layers: usize, experts: usize, hidden: usize) -> Result<Gates> {
    if !path.is_file() {
        return Err(Error::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such gate file"),
        });
    }
    let mut tensors = candle_core::safetensors::load(path, &Device::Cpu)
        .map_err(|e| file_error(path, format!("not a safetensors file: {e}")))?;
    let mut gates = Vec::with_capacity(layers);
    for l in 0..layers {
        let mut take = |name: String, shape: &[usize]| -> Result<Tensor> {
            let t = tensors.remove(&name).ok_or_else(|| {
                file_error(
                    path,
                    format!("no tensor `{name}` (one gate per layer, {layers} layers)"),
                )
            })?;
            if t.dims() != shape {
                return Err(file_error(
                    path,
                    format!(
                        "`{name}` has shape {:?}, expected {shape:?} (experts, hidden)",
                        t.dims()
                    ),
                ));
            }
            Ok(t.to_dtype(DType::F32)?)
        };
        let w = take(format!("layers.{l}.gate.weight"), &[experts, hidden])?;
        let b = take(format!("layers.{l}.gate.bias"), &[experts])?;
        gates.push((w, b));
    }
    if let Some(extra) = tensors.keys().next() {
        return Err(file_error(
            path,
            format!("unexpected tensor `{extra}` (the model has {layers} layers)"),
        ));
    }
    Ok(gates)
}

/// Write `gates` to a gate file.
pub fn save_gates(gates: &Gates, path: &Path) -> Result<()> {
    let mut map = std::collections::HashMap::new();
    for (l, (w, b)) in gates.iter().enumerate() {
        map.insert(format!("layers.{l}.gate.weight"), w.clone());
        map.insert(format!("layers.{l}.gate.bias"), b.clone());
    }
    candle_core::safetensors::save(&map, path).map_err(|e| file_error(path, e.to_string()))
}

/// `multitoken moe set-gate DIR --gates FILE`: replace the gates of an MoE directory.
pub fn set_gate(dir: &Path, gates_path: &Path) -> Result<()> {
    let (lm, moe, hf) = open_moe(dir)?;
    let gates = read_gates(
        gates_path,
        hf.model.num_layers,
        moe.num_expert_models,
        hf.model.hidden_size,
    )?;
    write_gates(&lm, &gates)
}

/// Store `gates` in the MoE LM directory's `model.safetensors`.
pub fn write_gates(lm: &Path, gates: &Gates) -> Result<()> {
    let path = lm.join("model.safetensors");
    let dtype = stored_dtype(lm)?;
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu)
        .map_err(|e| file_error(&path, e.to_string()))?;
    for (l, (w, b)) in gates.iter().enumerate() {
        for (name, t) in [
            (format!("model.layers.{l}.mlp.gate.weight"), w),
            (format!("model.layers.{l}.mlp.gate.bias"), b),
        ] {
            if !tensors.contains_key(&name) {
                return Err(file_error(
                    &path,
                    format!("no `{name}`: not written by `multitoken moe build`?"),
                ));
            }
            tensors.insert(name, t.to_dtype(dtype)?);
        }
    }
    let tmp = lm.join("model.safetensors.tmp");
    candle_core::safetensors::save(&tensors, &tmp).map_err(|e| file_error(&tmp, e.to_string()))?;
    drop(tensors);
    std::fs::rename(&tmp, &path).map_err(io(&path))
}

/// Settings of `train-gate` (Cephalo's defaults).
#[derive(Debug, Clone)]
pub struct TrainGateConfig {
    /// Adam steps per layer.
    pub epochs: usize,
    /// Learning rate.
    pub lr: f64,
    /// Print the loss every this many epochs (0 = never).
    pub loss_steps: usize,
    /// Gate `l` learns from hidden state `l + layer_offset`.
    pub layer_offset: usize,
}

impl Default for TrainGateConfig {
    fn default() -> Self {
        Self {
            epochs: 1000,
            lr: 5e-5,
            loss_steps: 100,
            layer_offset: 0,
        }
    }
}

/// One training prompt: text (with modality tokens) and items, labelled with its expert.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatePrompt {
    /// The prompt text, used as is (no chat template), e.g. `<image>What is shown?`.
    pub text: String,
    /// Items by modality data key, e.g. `{"images": ["cat.png"]}` (paths relative to the JSONL file).
    #[serde(default)]
    pub items: BTreeMap<String, Vec<String>>,
    /// Index of the expert this prompt belongs to.
    pub expert: Option<usize>,
}

/// Read a prompts JSONL file; every row needs an `expert` label below `experts`
/// and every expert needs at least one prompt.
pub fn read_prompts(path: &Path, experts: usize) -> Result<Vec<GatePrompt>> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    let mut rows = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = |m: String| file_error(path, format!("line {}: {m}", n + 1));
        let row: GatePrompt = serde_json::from_str(line).map_err(|e| at(e.to_string()))?;
        match row.expert {
            None => return Err(at(
                "no `expert` label (the index of the expert this prompt trains the gate towards)"
                    .into(),
            )),
            Some(e) if e >= experts => {
                return Err(at(format!(
                    "expert {e} does not exist (the model has {experts}: 0..{})",
                    experts - 1
                )))
            }
            Some(_) => rows.push(row),
        }
    }
    for e in 0..experts {
        if !rows.iter().any(|r| r.expert == Some(e)) {
            return Err(file_error(
                path,
                format!("no prompt for expert {e}: every expert needs at least one"),
            ));
        }
    }
    Ok(rows)
}

/// Cephalo's gate training on an MoE directory; returns the new gates (not yet written).
pub fn train_gates(dir: &Path, prompts_path: &Path, cfg: &TrainGateConfig) -> Result<Gates> {
    let (lm, moe, hf) = open_moe(dir)?;
    let n = moe.num_expert_models;
    let prompts = read_prompts(prompts_path, n)?;
    let layers = hf.model.num_layers;
    if layers + cfg.layer_offset > layers + 1 || layers == 0 {
        return Err(Error::Msg(format!(
            "layer offset {} is too large: gate {} would read hidden state {} of {} (0 = embeddings)",
            cfg.layer_offset,
            layers.saturating_sub(1),
            layers - 1 + cfg.layer_offset,
            layers + 1
        )));
    }
    let opts = LoadOptions::default();
    let mm = MultimodalModel::load(dir, &opts)?;
    let model = load_moe_lm(&lm, &opts, Dispatch::Sparse)?.model;
    let base_dir = prompts_path.parent().unwrap_or(Path::new("."));

    // sums[e][idx]: sum over expert e's prompts of the mean-pooled hidden state idx.
    let mut sums: Vec<Option<Vec<Tensor>>> = vec![None; n];
    let mut counts = vec![0usize; n];
    for row in &prompts {
        let e = row.expert.unwrap_or(0);
        let items: ItemsByKey = row
            .items
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    v.iter().map(|p| Item::Path(base_dir.join(p))).collect(),
                )
            })
            .collect();
        let prepared = mm.prepare_raw(&row.text, &items)?;
        let embeds = mm.embed(&prepared, &items)?;
        // Qwen2-VL prompts with images run at their M-RoPE positions.
        let positions = mm.positions(&prepared)?;
        let (_, hidden) = model.forward_embeds_with_hidden_states_at(&embeds, None, positions.as_ref())?;
        let pooled: Vec<Tensor> = hidden
            .iter()
            .map(|h| h.to_dtype(DType::F32)?.mean(1)?.squeeze(0))
            .collect::<candle_core::Result<_>>()?;
        sums[e] = Some(match sums[e].take() {
            None => pooled,
            Some(prev) => prev
                .iter()
                .zip(&pooled)
                .map(|(a, b)| a + b)
                .collect::<candle_core::Result<_>>()?,
        });
        counts[e] += 1;
    }
    let weights =
        multitoken_lm::weights::SafetensorsSource::from_dir(&lm, DType::F32, &Device::Cpu)?;
    let labels = Tensor::arange(0u32, n as u32, &Device::Cpu)?;
    let mut gates = Vec::with_capacity(layers);
    for l in 0..layers {
        let idx = l + cfg.layer_offset;
        let rows = (0..n)
            .map(|e| match &sums[e] {
                Some(s) => Ok((&s[idx] / counts[e] as f64)?),
                None => Err(Error::Msg(format!("no prompt for expert {e}"))),
            })
            .collect::<Result<Vec<_>>>()?;
        let x = Tensor::stack(&rows, 0)?;
        let w = Var::from_tensor(&weights.get(&format!("model.layers.{l}.mlp.gate.weight"))?)?;
        let b = Var::from_tensor(&weights.get(&format!("model.layers.{l}.mlp.gate.bias"))?)?;
        let params = ParamsAdamW {
            lr: cfg.lr,
            weight_decay: 0.0,
            ..Default::default()
        };
        let mut opt = AdamW::new(vec![w.clone(), b.clone()], params)?;
        for epoch in 0..cfg.epochs {
            let logits = x
                .matmul(&w.as_tensor().t()?)?
                .broadcast_add(b.as_tensor())?;
            let loss = candle_nn::loss::cross_entropy(&logits, &labels)?;
            opt.backward_step(&loss)?;
            if cfg.loss_steps > 0 && epoch % cfg.loss_steps == 0 {
                println!(
                    "layer {l} epoch {epoch}: loss {:.6}",
                    loss.to_scalar::<f32>()?
                );
            }
        }
        let logits = x
            .matmul(&w.as_tensor().t()?)?
            .broadcast_add(b.as_tensor())?;
        let picked: Vec<u32> = logits.argmax(D::Minus1)?.to_vec1()?;
        let right = picked
            .iter()
            .enumerate()
            .filter(|(e, p)| *e as u32 == **p)
            .count();
        println!("layer {l}: gate picks the labelled expert for {right}/{n} expert averages");
        gates.push((w.as_tensor().detach(), b.as_tensor().detach()));
    }
    Ok(gates)
}

/// `multitoken moe train-gate`: train and store the gates; also save them to `save_to` if given.
pub fn train_gate(
    dir: &Path,
    prompts: &Path,
    cfg: &TrainGateConfig,
    save_to: Option<&Path>,
) -> Result<()> {
    let gates = train_gates(dir, prompts, cfg)?;
    if let Some(path) = save_to {
        save_gates(&gates, path)?;
    }
    let (lm, _) = lm_dir_of(dir)?;
    write_gates(&lm, &gates)
}
