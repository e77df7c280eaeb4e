//! `multitoken moe build`: one MoE checkpoint from a base and fine-tuned experts.
//!
//! The base supplies everything but the MLPs; layer `i`'s expert `j` is model
//! `j`'s own MLP of layer `i` (a full checkpoint of the same architecture, or a
//! PEFT LoRA adapter on the base, merged). The output LM directory holds the
//! base's `config.json`, tokenizer and generation files, [`crate::config`]'s
//! `moe.json`, and one `model.safetensors` with the base tensors minus its MLPs
//! plus, per layer `i`:
//!
//! - `model.layers.{i}.mlp.experts.{j}.{gate_proj,up_proj,down_proj}.weight`
//!   (phi-2: `fc1`, `fc2`, with biases), one set per expert `j`;
//! - `model.layers.{i}.mlp.gate.weight` `[num_experts, hidden]` and
//!   `model.layers.{i}.mlp.gate.bias` `[num_experts]`, initialised like
//!   `nn.Linear` (uniform in ±1/√hidden, seeded) until `train-gate`/`set-gate`.
//!
//! A multimodal base (a `multitoken.json` directory) is copied whole, with its
//! LM part (`base_model`, or the directory itself) replaced by the MoE.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use multitoken_lm::hf::{parse_config, HfConfig};
use multitoken_lm::multimodal::{export_imported, imports_dir, read_config, MULTIMODAL_CONFIG_FILE};
use multitoken_lm::weights::SafetensorsSource;
use multitoken_lm::{Family, ModelConfig};

use crate::config::{ExpertSource, MoeConfig, Routing, MOE_CONFIG_FILE};
use crate::error::{file_error, io};
use crate::lora::{is_lora_dir, LoraAdapter};
use crate::{Error, Result};

/// What `moe build` needs.
#[derive(Debug, Clone)]
pub struct BuildConfig {
    /// The base model directory (HF LM or multitoken.json multimodal).
    pub base: PathBuf,
    /// One directory per expert: full checkpoints or PEFT LoRA adapters.
    pub experts: Vec<PathBuf>,
    /// Experts computed per token.
    pub k: usize,
    /// Routing mode.
    pub routing: Routing,
    /// The new model directory (must not exist or be empty).
    pub out: PathBuf,
    /// Seed of the initial gate weights.
    pub seed: u64,
    /// Quantize the decoder's linears (experts included) to this format
    /// whenever the MoE is loaded (recorded in `moe.json`; the files stay in
    /// the base's dtype). Checked against the model's row lengths here.
    pub quantize: Option<multitoken_lm::quantize::Quantization>,
}

/// What `moe build` wrote.
#[derive(Debug, Clone)]
pub struct BuildReport {
    /// The directory holding the MoE LM (`out`, or `out/<base_model>`).
    pub lm_dir: PathBuf,
    /// Decoder layers that got a mixture.
    pub layers: usize,
    /// Experts per layer.
    pub experts: usize,
}

/// Where a model directory keeps its LM: itself, or `base_model` of its
/// `multitoken.json`. Returns the LM directory and, for a multimodal
/// directory, the LM's path relative to it.
pub fn lm_dir_of(dir: &Path) -> Result<(PathBuf, Option<String>)> {
    let mm = dir.join(MULTIMODAL_CONFIG_FILE);
    if !mm.is_file() {
        return Ok((dir.to_path_buf(), None));
    }
    let cfg = read_config(&mm)?;
    match cfg.base_model {
        Some(rel) => {
            let p = Path::new(&rel);
            if p.is_absolute()
                || p.components()
                    .any(|c| matches!(c, std::path::Component::ParentDir))
            {
                return Err(file_error(
                    &mm,
                    format!("base_model `{rel}` must be a path inside the model directory"),
                ));
            }
            Ok((dir.join(p), Some(rel)))
        }
        None => Ok((dir.to_path_buf(), Some(String::new()))),
    }
}

/// The MLP tensors of one layer for `cfg`'s family: `(suffix, shape)`, e.g.
/// `("gate_proj.weight", [intermediate, hidden])`.
pub fn mlp_tensors(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    let mut out = Vec::new();
    let linears: &[(&str, usize, usize)] = match cfg.family {
        Family::Phi2 => &[("fc1", h, i), ("fc2", i, h)],
        _ => &[("gate_proj", h, i), ("up_proj", h, i), ("down_proj", i, h)],
    };
    for &(name, inp, outp) in linears {
        out.push((format!("{name}.weight"), vec![outp, inp]));
        if cfg.mlp_bias {
            out.push((format!("{name}.bias"), vec![outp]));
        }
    }
    out
}

/// Every decoder linear's row length (its input width: the hidden size, the
/// attention output's width, the MLP's intermediate size) must be a multiple
/// of `format`'s block: refused here, at build, rather than at every load.
fn check_quantizable(model: &multitoken_lm::ModelConfig, format: multitoken_lm::quantize::Quantization) -> Result<()> {
    let block = format.block_size();
    let widths = [
        ("hidden_size", model.hidden_size),
        ("num_attention_heads x head_dim", model.num_heads * model.head_dim),
        ("intermediate_size", model.intermediate_size),
    ];
    for (what, width) in widths {
        if width % block != 0 {
            return Err(Error::Msg(format!(
                "--quantize {}: the base's {what} is {width}, not a multiple of the format's block of {block} weights (choose {})",
                format.name(),
                if block == 32 { "another model" } else { "q8_0 or q4_1" }
            )));
        }
    }
    Ok(())
}

/// Build the MoE described by `cfg`.
pub fn build(cfg: &BuildConfig) -> Result<BuildReport> {
    // Checkpoints of imported families (Idefics2: Cephalo's own bases and
    // experts) take part in our layout, rewritten once.
    let imported = |dir: &PathBuf| -> Result<PathBuf> {
        Ok(export_imported(dir, &imports_dir())?.unwrap_or_else(|| dir.clone()))
    };
    let cfg = &BuildConfig {
        base: imported(&cfg.base)?,
        experts: cfg.experts.iter().map(imported).collect::<Result<_>>()?,
        ..cfg.clone()
    };
    let n = cfg.experts.len();
    if n == 0 {
        return Err(Error::Msg(
            "no experts given (--experts DIR1 DIR2 ...)".into(),
        ));
    }
    if cfg.k == 0 || cfg.k > n {
        return Err(Error::Msg(format!(
            "--k {} must be between 1 and the number of experts ({n})",
            cfg.k
        )));
    }
    if cfg.out.exists()
        && std::fs::read_dir(&cfg.out)
            .map_err(io(&cfg.out))?
            .next()
            .is_some()
    {
        return Err(file_error(
            &cfg.out,
            "the output directory exists and is not empty",
        ));
    }
    let (base_lm, base_rel) = lm_dir_of(&cfg.base)?;
    let base_cfg = read_hf(&base_lm, "base")?;
    let dtype = stored_dtype(&base_lm)?;
    let base = open(&base_lm, dtype)?;
    let model = &base_cfg.model;
    if let Some(format) = cfg.quantize {
        check_quantizable(model, format)?;
    }
    let mlp = mlp_tensors(model);

    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let is_mlp = |name: &str| {
        (0..model.num_layers).any(|l| {
            mlp.iter()
                .any(|(s, _)| name == format!("model.layers.{l}.mlp.{s}"))
        })
    };
    for name in base.names() {
        if !is_mlp(name) {
            tensors.insert(name.to_string(), base.get(name)?);
        }
    }
    let mut sources = Vec::with_capacity(n);
    for (j, expert) in cfg.experts.iter().enumerate() {
        let (kind, layers) = expert_mlps(expert, &base_lm, &base, &base_cfg, &mlp, dtype)?;
        for (l, layer) in layers.into_iter().enumerate() {
            for ((suffix, _), t) in mlp.iter().zip(layer) {
                tensors.insert(format!("model.layers.{l}.mlp.experts.{j}.{suffix}"), t);
            }
        }
        sources.push(ExpertSource {
            path: expert.display().to_string(),
            kind: kind.into(),
        });
    }
    let mut rng = SplitMix(cfg.seed);
    let bound = 1.0 / (model.hidden_size as f32).sqrt();
    for l in 0..model.num_layers {
        let w: Vec<f32> = (0..n * model.hidden_size)
            .map(|_| rng.uniform(bound))
            .collect();
        let b: Vec<f32> = (0..n).map(|_| rng.uniform(bound)).collect();
        let w = Tensor::from_vec(w, (n, model.hidden_size), &Device::Cpu)?.to_dtype(dtype)?;
        let b = Tensor::from_vec(b, n, &Device::Cpu)?.to_dtype(dtype)?;
        tensors.insert(format!("model.layers.{l}.mlp.gate.weight"), w);
        tensors.insert(format!("model.layers.{l}.mlp.gate.bias"), b);
    }

    // Write: the multimodal shell first (everything but the LM's weights), then the LM.
    let out_lm = match &base_rel {
        Some(rel) if !rel.is_empty() => {
            copy_tree(&cfg.base, &cfg.out, Some(&base_lm))?;
            cfg.out.join(rel)
        }
        Some(_) => {
            copy_tree(&cfg.base, &cfg.out, Some(&base_lm))?;
            cfg.out.clone()
        }
        None => cfg.out.clone(),
    };
    std::fs::create_dir_all(&out_lm).map_err(io(&out_lm))?;
    copy_lm_files(&base_lm, &out_lm)?;
    let weights_path = out_lm.join("model.safetensors");
    candle_core::safetensors::save(&tensors, &weights_path)?;
    let moe = MoeConfig {
        format: "multitoken-moe".into(),
        k: cfg.k,
        num_expert_models: n,
        routing: cfg.routing,
        base: Some(cfg.base.display().to_string()),
        experts: sources,
        quantize: cfg.quantize.map(|q| q.name().to_string()),
    };
    moe.write(&out_lm.join(MOE_CONFIG_FILE))?;
    Ok(BuildReport {
        lm_dir: out_lm,
        layers: model.num_layers,
        experts: n,
    })
}

/// One expert's MLP tensors, per layer in [`mlp_tensors`] order, in `dtype`.
fn expert_mlps(
    dir: &Path,
    base_lm: &Path,
    base: &SafetensorsSource,
    base_cfg: &HfConfig,
    mlp: &[(String, Vec<usize>)],
    dtype: DType,
) -> Result<(&'static str, Vec<Vec<Tensor>>)> {
    let model = &base_cfg.model;
    if is_lora_dir(dir) {
        let adapter = LoraAdapter::open(dir)?;
        let mut layers = Vec::with_capacity(model.num_layers);
        let mut touched = 0;
        for l in 0..model.num_layers {
            let mut layer = Vec::with_capacity(mlp.len());
            for (suffix, shape) in mlp {
                let name = format!("model.layers.{l}.mlp.{suffix}");
                let w = base.tensor_checked(&name, shape, base_lm)?;
                let merged = match suffix.strip_suffix(".weight") {
                    Some(module) => adapter.merge(&format!("model.layers.{l}.mlp.{module}"), &w)?,
                    None => None,
                };
                if merged.is_some() {
                    touched += 1;
                }
                layer.push(merged.unwrap_or(w).to_dtype(dtype)?);
            }
            layers.push(layer);
        }
        if touched == 0 {
            return Err(file_error(
                dir,
                "this LoRA adapter changes no MLP weight (no lora_A/lora_B on gate_proj/up_proj/down_proj/fc1/fc2): its expert would be the base MLP",
            ));
        }
        return Ok(("lora", layers));
    }
    if dir.is_file() {
        return Err(file_error(dir, "an expert must be an HF model directory or a PEFT adapter directory (GGUF files cannot be experts)"));
    }
    let (lm, _) = lm_dir_of(dir)?;
    let cfg = read_hf(&lm, "expert")?;
    check_same_architecture(&lm, &cfg.model, model)?;
    let src = open(&lm, dtype)?;
    let mut layers = Vec::with_capacity(model.num_layers);
    for l in 0..model.num_layers {
        let mut layer = Vec::with_capacity(mlp.len());
        for (suffix, shape) in mlp {
            layer.push(src.tensor_checked(
                &format!("model.layers.{l}.mlp.{suffix}"),
                shape,
                &lm,
            )?);
        }
        layers.push(layer);
    }
    Ok(("full", layers))
}

/// An expert must match the base wherever its MLP meets the rest of the model.
fn check_same_architecture(dir: &Path, got: &ModelConfig, base: &ModelConfig) -> Result<()> {
    let fields: [(&str, String, String); 6] = [
        (
            "architecture",
            format!("{:?}", got.family),
            format!("{:?}", base.family),
        ),
        (
            "hidden_size",
            got.hidden_size.to_string(),
            base.hidden_size.to_string(),
        ),
        (
            "intermediate_size",
            got.intermediate_size.to_string(),
            base.intermediate_size.to_string(),
        ),
        (
            "num_hidden_layers",
            got.num_layers.to_string(),
            base.num_layers.to_string(),
        ),
        (
            "mlp_bias",
            got.mlp_bias.to_string(),
            base.mlp_bias.to_string(),
        ),
        (
            "hidden_act",
            format!("{:?}", got.hidden_act),
            format!("{:?}", base.hidden_act),
        ),
    ];
    for (name, g, b) in fields {
        if g != b {
            return Err(file_error(
                &dir.join("config.json"),
                format!("expert {name} is {g}, the base's is {b}: experts must share the base's architecture and shape"),
            ));
        }
    }
    Ok(())
}

fn read_hf(dir: &Path, what: &str) -> Result<HfConfig> {
    let path = dir.join("config.json");
    if !path.is_file() {
        return Err(file_error(
            dir,
            format!("the {what} is not an HF model directory (no config.json)"),
        ));
    }
    Ok(parse_config(&path)?)
}

/// Checked reads from a safetensors source.
trait CheckedRead {
    fn tensor_checked(&self, name: &str, shape: &[usize], dir: &Path) -> Result<Tensor>;
}

impl CheckedRead for SafetensorsSource {
    fn tensor_checked(&self, name: &str, shape: &[usize], dir: &Path) -> Result<Tensor> {
        match self.shape_of(name) {
            None => Err(file_error(
                dir,
                format!("MLP tensor `{name}` is missing from the checkpoint"),
            )),
            Some(s) if s != shape => Err(file_error(
                dir,
                format!("MLP tensor `{name}` has shape {s:?}, the base needs {shape:?}"),
            )),
            Some(_) => Ok(self.get(name)?),
        }
    }
}

/// The safetensors of an HF directory, converted to `dtype` on the CPU.
pub(crate) fn open(dir: &Path, dtype: DType) -> Result<SafetensorsSource> {
    Ok(SafetensorsSource::from_dir(dir, dtype, &Device::Cpu)?)
}

/// The dtype a directory's weights are stored in (that of its first tensor).
pub(crate) fn stored_dtype(dir: &Path) -> Result<DType> {
    let single = dir.join("model.safetensors");
    let file = if single.is_file() {
        single
    } else {
        let index = dir.join("model.safetensors.index.json");
        let text = std::fs::read_to_string(&index).map_err(io(&index))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| file_error(&index, e.to_string()))?;
        let first = v["weight_map"]
            .as_object()
            .and_then(|m| m.values().filter_map(|f| f.as_str()).min())
            .ok_or_else(|| file_error(&index, "no weight_map"))?;
        dir.join(first)
    };
    use std::io::Read;
    let mut f = std::fs::File::open(&file).map_err(io(&file))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(io(&file))?;
    let len = u64::from_le_bytes(len);
    if len > 100_000_000 {
        return Err(file_error(
            &file,
            "not a safetensors file (header too long)",
        ));
    }
    let mut header = vec![0u8; len as usize];
    f.read_exact(&mut header).map_err(io(&file))?;
    let v: serde_json::Value = serde_json::from_slice(&header)
        .map_err(|e| file_error(&file, format!("bad safetensors header: {e}")))?;
    let dtype = v
        .as_object()
        .and_then(|m| {
            m.iter()
                .filter(|(k, _)| *k != "__metadata__")
                .find_map(|(_, t)| t["dtype"].as_str())
        })
        .unwrap_or("F32");
    Ok(match dtype {
        "BF16" => DType::BF16,
        "F16" => DType::F16,
        _ => DType::F32,
    })
}

/// Files that are weights, not to be copied from the base LM.
fn is_weight_file(name: &str) -> bool {
    name.ends_with(".safetensors")
        || name.ends_with(".safetensors.index.json")
        || name.ends_with(".bin")
        || name.ends_with(".gguf")
}

/// The base LM's config, tokenizer and generation files.
fn copy_lm_files(from: &Path, to: &Path) -> Result<()> {
    for entry in std::fs::read_dir(from).map_err(io(from))? {
        let entry = entry.map_err(io(from))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if path.is_file() && !is_weight_file(&name) && name != MOE_CONFIG_FILE {
            let dest = to.join(&name);
            std::fs::copy(&path, &dest).map_err(io(&dest))?;
        }
    }
    Ok(())
}

/// Copy `from` to `to` recursively, leaving out the LM directory `lm` when it
/// is a subdirectory, and the LM's weights when `from` is the LM directory.
fn copy_tree(from: &Path, to: &Path, lm: Option<&Path>) -> Result<()> {
    std::fs::create_dir_all(to).map_err(io(to))?;
    let skip_lm = lm.map(|l| l.canonicalize().unwrap_or_else(|_| l.to_path_buf()));
    let is_lm = |p: &Path| {
        skip_lm
            .as_ref()
            .is_some_and(|l| p.canonicalize().map(|c| &c == l).unwrap_or(false))
    };
    let this_is_lm = is_lm(from);
    for entry in std::fs::read_dir(from).map_err(io(from))? {
        let entry = entry.map_err(io(from))?;
        let path = entry.path();
        let dest = to.join(entry.file_name());
        if path.is_dir() {
            if !is_lm(&path) {
                copy_tree(&path, &dest, lm)?;
            }
        } else {
            let name = entry.file_name().to_string_lossy().into_owned();
            let lm_weights = name.starts_with("model") && is_weight_file(&name)
                || name.starts_with("pytorch_model");
            if !(this_is_lm && (lm_weights || name == MOE_CONFIG_FILE)) {
                std::fs::copy(&path, &dest).map_err(io(&dest))?;
            }
        }
    }
    Ok(())
}

/// A tiny seeded generator for the initial gates (SplitMix64).
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[-bound, bound)`.
    fn uniform(&mut self, bound: f32) -> f32 {
        let unit = (self.next() >> 40) as f32 / (1u64 << 24) as f32;
        (unit * 2.0 - 1.0) * bound
    }
}
