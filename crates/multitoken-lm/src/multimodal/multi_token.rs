//! Import of sshh12/multi_token training outputs (`vision_clip`, `vision_clip_pool`).
//!
//! multi_token's trainer leaves, in its output directory:
//!
//! - `config.json`: the LMM config (`model_type: mistral-lmm`, `model_cls`,
//!   `modality_builder`, `modalities`, the LM's own fields, `_name_or_path`);
//! - `adapter_config.json` + `adapter_model.safetensors|bin`: the PEFT LoRA
//!   adapter over the LM (absent after a projector-only run);
//! - `non_lora_trainables.bin`: `torch.save` of every trainable that is not LoRA,
//!   i.e. the projectors under `base_model.model.model.{modality}_lmm_projector.*`
//!   (`model.{modality}_lmm_projector.*` without PEFT), plus any LM weight that was
//!   trained in full (it replaces the base's, before the LoRA merge, as in
//!   multi_token).
//!
//! The base LM is named by `adapter_config.json`'s `base_model_name_or_path`
//! (else `config.json`'s `_name_or_path`); the CLIP tower by the builder, which
//! hard-codes `openai/clip-vit-large-patch14-336`. A name resolves to a local
//! directory: the name as a path (relative to the output directory, then to the
//! working directory), else its snapshot in the local Hugging Face cache
//! (`$HF_HUB_CACHE`, `$HF_HOME/hub`, `~/.cache/huggingface/hub`). Nothing is
//! downloaded. `multitoken_import.json` in the output directory (ours, optional)
//! names local directories instead, relative to the output directory:
//!
//! ```json
//! {"base_model": "../mistral-7b-instruct", "towers": {"vision_clip": "../clip-vit-large-patch14-336"}}
//! ```
//!
//! The LM is loaded with the output's `config.json` (as multi_token passes it to
//! `from_pretrained`), the base's weights and tokenizer, the adapter merged at
//! load ([`crate::peft`]); each modality is built through the core registry and
//! its projector is read from the pickle with candle's pickle reader.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use multitoken_core::{build_modality, Projector, ProjectorSpec};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::hf::{load_hf_dir_with, parse_config_value};
use crate::linear::Linear;
use crate::loader::{LoadOptions, LoadedModel};
use crate::peft::{LoraAdapter, MergedWeights};
use crate::weights::{SafetensorsSource, WeightSource};
use crate::{Error, Result};

use super::ModalityRuntime;

/// multi_token's pickled non-LoRA trainables (the projectors).
pub const NON_LORA_TRAINABLES_FILE: &str = "non_lora_trainables.bin";
/// Our optional file of local paths for the names a multi_token output records.
pub const IMPORT_FILE: &str = "multitoken_import.json";
/// The hub name of the tower multi_token's CLIP modalities load.
pub const CLIP_HUB_NAME: &str = "openai/clip-vit-large-patch14-336";
/// The suffix of a projector module (`{modality}_lmm_projector`).
const PROJECTOR_SUFFIX: &str = "_lmm_projector";
/// PEFT's prefix over the wrapped causal LM's names.
const PEFT_PREFIX: &str = "base_model.model.";

/// Whether a parsed `config.json` is a multi_token LMM config (it names a
/// `modality_builder`, or its `model_type` is `*-lmm`).
pub fn is_multi_token_config(config: &Value) -> bool {
    let by_builder = config.get("modality_builder").is_some_and(Value::is_string);
    let by_type = config
        .get("model_type")
        .and_then(Value::as_str)
        .is_some_and(|t| t.ends_with("-lmm"));
    by_builder || by_type
}

/// Whether `dir` is a multi_token output: it holds `non_lora_trainables.bin`, or
/// a `config.json` that [`is_multi_token_config`].
pub fn is_multi_token_dir(dir: &Path) -> bool {
    if dir.join(NON_LORA_TRAINABLES_FILE).is_file() {
        return true;
    }
    std::fs::read_to_string(dir.join("config.json"))
        .ok()
        .and_then(|text| serde_json::from_str::<Value>(&text).ok())
        .is_some_and(|value| is_multi_token_config(&value))
}

/// `multitoken_import.json`: local directories for what the output names.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportPaths {
    /// The base LM directory, relative to the output directory.
    #[serde(default)]
    pub base_model: Option<String>,
    /// The encoder directory of each modality (`vision_clip`), relative to the
    /// output directory.
    #[serde(default)]
    pub towers: BTreeMap<String, String>,
}

/// One modality a multi_token builder makes, as data.
#[derive(Debug, Clone, PartialEq)]
struct Recipe {
    /// multi_token's modality name (the projector is `{name}_lmm_projector`).
    name: &'static str,
    /// Our registry builder.
    builder: &'static str,
    /// The encoder's hub name.
    hub_name: &'static str,
    /// The builder's settings besides the tower path.
    config: Value,
    /// The projector multi_token builds for it.
    projector: ProjectorSpec,
}

/// The builders of multi_token's `MODALITY_BUILDERS` this importer supports.
const SUPPORTED_BUILDERS: [&str; 2] = ["vision_clip", "vision_clip_pool"];

/// multi_token's modality builders: `vision_clip` (hidden state -2, CLS dropped,
/// 2-layer GELU MLP per patch) and `vision_clip_pool` (pooled output, 10 tokens
/// from 2-layer MLPs). Both name their modality `vision_clip`.
fn recipes(builder: &str) -> Option<Vec<Recipe>> {
    match builder {
        "vision_clip" => {
            let projector = ProjectorSpec::MlpGelu { depth: 2 };
            Some(vec![Recipe {
                name: "vision_clip",
                builder: "vision_clip",
                hub_name: CLIP_HUB_NAME,
                config: json!({"vision_feature_layer": -2, "vision_feature_select_strategy": "default",
                               "projector": projector}),
                projector,
            }])
        }
        "vision_clip_pool" => {
            let projector = ProjectorSpec::VectorMlp {
                num_layers: 2,
                num_tokens: 10,
            };
            Some(vec![Recipe {
                name: "vision_clip",
                builder: "vision_clip_pool",
                hub_name: CLIP_HUB_NAME,
                config: json!({"num_tokens": 10, "projector": projector}),
                projector,
            }])
        }
        _ => None,
    }
}

/// Loads a multi_token output directory: the LM with its adapter merged and the
/// modalities with their projectors.
pub(super) fn load_multi_token(
    dir: &Path,
    opts: &LoadOptions,
) -> Result<(LoadedModel, Vec<ModalityRuntime>)> {
    let config_path = dir.join("config.json");
    let config = read_json(&config_path)?;
    let cfg_err = |message: String| Error::Config {
        path: config_path.clone(),
        message,
    };
    let builder = config
        .get("modality_builder")
        .and_then(Value::as_str)
        .ok_or_else(|| cfg_err("no `modality_builder`: not a multi_token output config".into()))?;
    let recipes = recipes(builder).ok_or_else(|| {
        cfg_err(format!(
            "modality_builder `{builder}` is not supported by the multi_token import (supported: {})",
            SUPPORTED_BUILDERS.join(", ")
        ))
    })?;
    check_modality_names(&config, &recipes).map_err(cfg_err)?;
    let paths = read_import_paths(dir)?;

    let pickle_path = dir.join(NON_LORA_TRAINABLES_FILE);
    if !pickle_path.is_file() {
        return Err(Error::Io {
            path: pickle_path,
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "multi_token's projector weights (non_lora_trainables.bin) are missing from the output directory",
            ),
        });
    }
    let trainables = split_trainables(read_pickle(&pickle_path)?, &recipes, &pickle_path)?;

    let lm = load_lm(dir, &config, &paths, &trainables.lm, &pickle_path, opts)?;
    let context = opts.modality_context(dir);
    let hidden = lm.model.hidden_size();
    let modalities = recipes
        .iter()
        .map(|recipe| {
            let tower = resolve_name(
                dir,
                recipe.hub_name,
                paths.towers.get(recipe.name),
                &format!("towers.{}", recipe.name),
            )
            .map_err(|e| {
                Error::Msg(format!(
                    "{}: the `{builder}` vision tower: {e}",
                    dir.display()
                ))
            })?;
            // The builder resolves a relative tower against the model directory,
            // which `tower` already starts with (a relative `--model` joined it twice).
            let tower = std::path::absolute(&tower).unwrap_or(tower);
            let mut builder_config = recipe.config.clone();
            if let Value::Object(map) = &mut builder_config {
                map.insert("tower".into(), Value::String(tower.display().to_string()));
            }
            let modality =
                build_modality(recipe.builder, &builder_config, &context).map_err(|e| {
                    Error::Msg(format!(
                        "{}: modality `{}` (tower {}): {e}",
                        dir.display(),
                        recipe.name,
                        tower.display()
                    ))
                })?;
            let projector = load_projector(
                recipe,
                &trainables.projectors,
                modality.feature_dim(),
                hidden,
                &pickle_path,
                opts,
            )?;
            Ok(ModalityRuntime {
                modality: modality.into(),
                projector,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((lm, modalities))
}

/// `config.json`'s `modalities`, when given, must be the builder's.
fn check_modality_names(config: &Value, recipes: &[Recipe]) -> std::result::Result<(), String> {
    let Some(listed) = config.get("modalities") else {
        return Ok(());
    };
    let names: Option<Vec<&str>> = listed
        .as_array()
        .and_then(|a| a.iter().map(Value::as_str).collect());
    let expected: Vec<&str> = recipes.iter().map(|r| r.name).collect();
    match names {
        Some(names) if names == expected => Ok(()),
        Some(names) => Err(format!(
            "modalities {names:?} are not the builder's {expected:?}"
        )),
        None => Err(format!("modalities must be a list of names, got {listed}")),
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| Error::Config {
        path: path.to_path_buf(),
        message: format!("malformed JSON: {e}"),
    })
}

fn read_import_paths(dir: &Path) -> Result<ImportPaths> {
    let path = dir.join(IMPORT_FILE);
    if !path.is_file() {
        return Ok(ImportPaths::default());
    }
    let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
        path: path.clone(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| Error::Config {
        path,
        message: e.to_string(),
    })
}

/// The pickle's tensors by role.
struct Trainables {
    /// `{modality}_lmm_projector` -> its tensors, keyed `{modality}_lmm_projector.{rest}`.
    projectors: HashMap<String, HashMap<String, Tensor>>,
    /// Fully trained LM weights under the causal LM's names (`model.layers.0...`).
    lm: HashMap<String, Tensor>,
}

/// Sorts the pickled names: `[base_model.model.][model.]{m}_lmm_projector.*` are
/// projectors (of a modality of this output), the rest LM weights.
fn split_trainables(
    tensors: Vec<(String, Tensor)>,
    recipes: &[Recipe],
    path: &Path,
) -> Result<Trainables> {
    let mut projectors: HashMap<String, HashMap<String, Tensor>> = HashMap::new();
    let mut lm = HashMap::new();
    for (name, tensor) in tensors {
        let inner = name.strip_prefix(PEFT_PREFIX).unwrap_or(&name);
        let body = inner.strip_prefix("model.").unwrap_or(inner);
        let module = body.split('.').next().unwrap_or_default();
        if !module.ends_with(PROJECTOR_SUFFIX) {
            lm.insert(inner.to_string(), tensor);
            continue;
        }
        if !recipes
            .iter()
            .any(|r| format!("{}{PROJECTOR_SUFFIX}", r.name) == module)
        {
            let known: Vec<String> = recipes
                .iter()
                .map(|r| format!("{}{PROJECTOR_SUFFIX}", r.name))
                .collect();
            return Err(Error::Tensor {
                name,
                message: format!(
                    "in {}: a projector of no modality of this output (expected {})",
                    path.display(),
                    known.join(", ")
                ),
            });
        }
        projectors
            .entry(module.to_string())
            .or_default()
            .insert(body.to_string(), tensor);
    }
    Ok(Trainables { projectors, lm })
}

/// The base LM: the output's config (family from `*-lmm`), the base's weights
/// with the pickle's LM tensors in place and the adapter merged, the base's tokenizer.
fn load_lm(
    dir: &Path,
    config: &Value,
    paths: &ImportPaths,
    overrides: &HashMap<String, Tensor>,
    pickle_path: &Path,
    opts: &LoadOptions,
) -> Result<LoadedModel> {
    let adapter_config_path = dir.join("adapter_config.json");
    let adapter_config = if adapter_config_path.is_file() {
        Some(read_json(&adapter_config_path)?)
    } else {
        None
    };
    let recorded = adapter_config
        .as_ref()
        .and_then(|c| c.get("base_model_name_or_path"))
        .and_then(Value::as_str)
        .map(|n| (n, "adapter_config.json base_model_name_or_path"))
        .or_else(|| {
            config
                .get("_name_or_path")
                .and_then(Value::as_str)
                .map(|n| (n, "config.json _name_or_path"))
        });
    let base_dir = match (&paths.base_model, recorded) {
        (Some(local), _) => resolve_name(dir, local, Some(local), "base_model"),
        (None, Some((name, _))) => resolve_name(dir, name, None, "base_model"),
        (None, None) => Err(format!("no base model is named (no {IMPORT_FILE} base_model, adapter base_model_name_or_path or _name_or_path)")),
    }
    .map_err(|e| {
        let from = recorded.map(|(_, from)| format!(" (from {from})")).unwrap_or_default();
        Error::Msg(format!("{}: the multi_token base model{from}: {e}", dir.display()))
    })?;

    let config_path = dir.join("config.json");
    let mut lm_config = config.clone();
    if let Some(Value::String(kind)) = lm_config.get_mut("model_type") {
        if let Some(family) = kind.strip_suffix("-lmm") {
            *kind = family.to_string();
        }
    }
    let hf_config = parse_config_value(lm_config, &config_path)?;
    let base = SafetensorsSource::from_dir(&base_dir, opts.tensor_dtype(), &opts.device)?;
    if let Some(unknown) = overrides.keys().find(|name| !base.contains(name)) {
        return Err(Error::Tensor {
            name: unknown.clone(),
            message: format!(
                "in {}: neither a projector (`*{PROJECTOR_SUFFIX}.*`) nor a weight of the base LM {}",
                pickle_path.display(),
                base_dir.display()
            ),
        });
    }
    let with_trained = OverriddenWeights {
        base: &base,
        overrides,
        source: pickle_path.display().to_string(),
        dtype: opts.tensor_dtype(),
        device: opts.device.clone(),
    };
    let mut lm = if adapter_config.is_some() {
        let adapter = LoraAdapter::load(dir, opts.tensor_dtype(), &opts.device)?;
        if let Some(module) = adapter
            .modules()
            .into_iter()
            .find(|m| !base.contains(&format!("{m}.weight")))
        {
            return Err(Error::Tensor {
                name: module.to_string(),
                message: format!(
                    "the LoRA adapter in {} adapts a module the base LM {} does not have",
                    dir.display(),
                    base_dir.display()
                ),
            });
        }
        // A LoRA adapter is merged into the dense weights first, then quantized.
        let merged = MergedWeights::new(&with_trained, &adapter);
        opts.with_lm_weights(&merged, |source| load_hf_dir_with(&base_dir, &hf_config, source))?
    } else {
        opts.with_lm_weights(&with_trained, |source| load_hf_dir_with(&base_dir, &hf_config, source))?
    };
    lm.name = dir.file_name().map_or_else(
        || dir.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    Ok(lm)
}

/// The projector of `recipe` from its pickled tensors; every tensor of the
/// module must be one the projector has.
fn load_projector(
    recipe: &Recipe,
    projectors: &HashMap<String, HashMap<String, Tensor>>,
    feature_dim: usize,
    hidden: usize,
    path: &Path,
    opts: &LoadOptions,
) -> Result<Projector> {
    let module = format!("{}{PROJECTOR_SUFFIX}", recipe.name);
    let tensors = projectors.get(&module).ok_or_else(|| Error::Tensor {
        name: format!("{module}.*"),
        message: format!(
            "missing from {} (the `{}` projector)",
            path.display(),
            recipe.name
        ),
    })?;
    let expected = projector_keys(recipe.projector, &module);
    if let Some(unexpected) = tensors.keys().find(|k| !expected.contains(k)) {
        return Err(Error::Tensor {
            name: unexpected.clone(),
            message: format!(
                "in {}: not a tensor of a {} projector",
                path.display(),
                recipe.projector.kind_name()
            ),
        });
    }
    if let Some(missing) = expected.iter().find(|k| !tensors.contains_key(*k)) {
        return Err(Error::Tensor {
            name: missing.clone(),
            message: format!(
                "missing from {} (the `{}` {} projector)",
                path.display(),
                recipe.name,
                recipe.projector.kind_name()
            ),
        });
    }
    let converted = tensors
        .iter()
        .map(|(k, t)| Ok((k.clone(), t.to_device(&opts.device)?.to_dtype(opts.tensor_dtype())?)))
        .collect::<Result<HashMap<_, _>>>()?;
    let vb = candle_nn::VarBuilder::from_tensors(converted, opts.tensor_dtype(), &opts.device);
    Projector::load(recipe.projector, feature_dim, hidden, vb.pp(&module))
        .map_err(|e| Error::Msg(format!("{}: projector `{module}`: {e}", path.display())))
}

/// Every tensor name multi_token's projector of `spec` has under `module`.
fn projector_keys(spec: ProjectorSpec, module: &str) -> Vec<String> {
    let mlp = |prefix: &str, depth: usize| -> Vec<String> {
        (0..depth)
            .flat_map(|i| ["weight", "bias"].map(|w| format!("{prefix}.{}.{w}", 2 * i)))
            .collect()
    };
    match spec {
        ProjectorSpec::MlpGelu { depth } => mlp(module, depth),
        ProjectorSpec::VectorMlp {
            num_layers,
            num_tokens,
        } => (0..num_tokens)
            .flat_map(|t| mlp(&format!("{module}.mlps.{t}"), num_layers))
            .collect(),
        // multi_token's CLIP builders make only the two kinds above.
        _ => Vec::new(),
    }
}

/// A name (hub id or path) as a local directory: `local` (from
/// `multitoken_import.json`, relative to `dir`) when given; else the name as a
/// path relative to `dir`, then to the working directory, then its snapshot in
/// the local Hugging Face cache. The error lists every place looked at.
fn resolve_name(
    dir: &Path,
    name: &str,
    local: Option<&String>,
    import_key: &str,
) -> std::result::Result<PathBuf, String> {
    if let Some(local) = local {
        let path = dir.join(local);
        return if path.is_dir() {
            Ok(path)
        } else {
            Err(format!(
                "{} (given as `{import_key}` in {IMPORT_FILE}) is not a directory",
                path.display()
            ))
        };
    }
    let mut tried = vec![dir.join(name)];
    if Path::new(name).is_relative() {
        tried.push(PathBuf::from(name));
    }
    if let Some(found) = tried.iter().find(|p| p.is_dir()) {
        return Ok(found.clone());
    }
    if is_hub_id(name) {
        for root in hub_cache_roots() {
            match hub_snapshot(&root, name) {
                Some(snapshot) => return Ok(snapshot),
                None => tried.push(root.join(hub_repo_dir(name))),
            }
        }
    }
    let tried: Vec<String> = tried.iter().map(|p| p.display().to_string()).collect();
    Err(format!(
        "`{name}` is not a local directory (looked at {}); download it, or name a local directory as `{import_key}` in {}",
        tried.join(", "),
        dir.join(IMPORT_FILE).display()
    ))
}

/// The local Hugging Face hub caches, in the order the hub client uses them.
fn hub_cache_roots() -> Vec<PathBuf> {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(cache) = var("HF_HUB_CACHE") {
        return vec![cache];
    }
    if let Some(home) = var("HF_HOME") {
        return vec![home.join("hub")];
    }
    var("HOME")
        .map(|h| vec![h.join(".cache").join("huggingface").join("hub")])
        .unwrap_or_default()
}

/// `org/name` -> `models--org--name`.
fn hub_repo_dir(name: &str) -> String {
    format!("models--{}", name.replace('/', "--"))
}

/// Whether `name` reads as a hub repo id `org/name` (not a path).
fn is_hub_id(name: &str) -> bool {
    let parts: Vec<&str> = name.split('/').collect();
    let plain = |p: &&str| !p.is_empty() && *p != "." && *p != "..";
    parts.len() == 2 && parts.iter().all(plain)
}

/// The snapshot of hub repo `name` in cache `root`: the one `refs/main` points
/// at, else the only one.
fn hub_snapshot(root: &Path, name: &str) -> Option<PathBuf> {
    if !is_hub_id(name) {
        return None;
    }
    let repo = root.join(hub_repo_dir(name));
    let snapshots = repo.join("snapshots");
    if let Ok(reference) = std::fs::read_to_string(repo.join("refs").join("main")) {
        let reference = reference.trim();
        if !reference.is_empty() && reference.chars().all(|c| c.is_ascii_alphanumeric()) {
            let snapshot = snapshots.join(reference);
            if snapshot.is_dir() {
                return Some(snapshot);
            }
        }
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(&snapshots)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    (found.len() == 1).then(|| found.remove(0))
}

/// Reads a `torch.save` state dict (zip format) with candle's pickle reader.
/// Every tensor's claimed size is checked against the file's before it is
/// read, and a panic of the reader on malformed data is an error.
pub fn read_pickle(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let len = std::fs::metadata(path)
        .map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    let outcome = std::panic::catch_unwind(|| read_pickle_checked(path, len));
    let tensors = match outcome {
        Ok(result) => result?,
        Err(_) => {
            return Err(Error::Msg(format!(
                "{}: malformed pickle (the reader gave up on it)",
                path.display()
            )))
        }
    };
    if tensors.is_empty() {
        return Err(Error::Msg(format!(
            "{}: holds no tensors (expected a torch.save state dict)",
            path.display()
        )));
    }
    Ok(tensors)
}

fn read_pickle_checked(path: &Path, file_len: u64) -> Result<Vec<(String, Tensor)>> {
    let unreadable = |e: candle_core::Error| {
        Error::Msg(format!(
            "{}: not a readable torch.save state dict (zip format): {e}",
            path.display()
        ))
    };
    let pth = candle_core::pickle::PthTensors::new(path, None).map_err(unreadable)?;
    let mut names: Vec<&String> = pth.tensor_infos().keys().collect();
    names.sort();
    let mut tensors = Vec::with_capacity(names.len());
    for name in names {
        let info = &pth.tensor_infos()[name];
        let bytes = info
            .layout
            .shape()
            .dims()
            .iter()
            .try_fold(info.dtype.size_in_bytes() as u64, |acc, d| {
                acc.checked_mul(*d as u64)
            });
        if bytes.is_none_or(|b| b > file_len) {
            return Err(Error::Tensor {
                name: name.clone(),
                message: format!(
                    "claims shape {:?} of {:?}, more data than {} holds",
                    info.layout.dims(),
                    info.dtype,
                    path.display()
                ),
            });
        }
        let tensor = pth
            .get(name)
            .map_err(|e| Error::Tensor {
                name: name.clone(),
                message: format!("in {}: {e}", path.display()),
            })?
            .ok_or_else(|| Error::Tensor {
                name: name.clone(),
                message: format!("unreadable in {}", path.display()),
            })?;
        tensors.push((name.clone(), tensor));
    }
    Ok(tensors)
}

/// The base's weights with the pickle's fully trained LM tensors in their place.
struct OverriddenWeights<'a> {
    base: &'a dyn WeightSource,
    overrides: &'a HashMap<String, Tensor>,
    source: String,
    dtype: DType,
    device: Device,
}

impl WeightSource for OverriddenWeights<'_> {
    fn describe(&self) -> String {
        if self.overrides.is_empty() {
            self.base.describe()
        } else {
            format!("{} + {}", self.base.describe(), self.source)
        }
    }
    fn contains(&self, name: &str) -> bool {
        self.overrides.contains_key(name) || self.base.contains(name)
    }
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let Some(tensor) = self.overrides.get(name) else {
            return self.base.tensor(name, shape);
        };
        if tensor.dims() != shape {
            return Err(Error::Tensor {
                name: name.to_string(),
                message: format!(
                    "expected shape {shape:?}, found {:?} in {}",
                    tensor.dims(),
                    self.source
                ),
            });
        }
        Ok(tensor.to_device(&self.device)?.to_dtype(self.dtype)?)
    }
    fn linear(&self, prefix: &str, in_dim: usize, out_dim: usize, bias: bool) -> Result<Linear> {
        let weight_name = format!("{prefix}.weight");
        let bias_name = format!("{prefix}.bias");
        let overridden = self.overrides.contains_key(&weight_name)
            || (bias && self.overrides.contains_key(&bias_name));
        if !overridden {
            return self.base.linear(prefix, in_dim, out_dim, bias);
        }
        let weight = self.tensor(&weight_name, &[out_dim, in_dim])?;
        let bias = if bias {
            Some(self.tensor(&bias_name, &[out_dim])?)
        } else {
            None
        };
        Linear::dense(weight, bias)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_multi_token_configs() {
        assert!(is_multi_token_config(&json!({"model_type": "mistral-lmm"})));
        assert!(is_multi_token_config(
            &json!({"model_type": "mistral", "modality_builder": "vision_clip"})
        ));
        assert!(!is_multi_token_config(&json!({"model_type": "mistral"})));
    }

    #[test]
    fn projector_key_names() {
        assert_eq!(
            projector_keys(
                ProjectorSpec::MlpGelu { depth: 2 },
                "vision_clip_lmm_projector"
            ),
            ["0.weight", "0.bias", "2.weight", "2.bias"]
                .map(|k| format!("vision_clip_lmm_projector.{k}"))
        );
        let vector = projector_keys(
            ProjectorSpec::VectorMlp {
                num_layers: 2,
                num_tokens: 10,
            },
            "p",
        );
        assert_eq!(vector.len(), 40);
        assert_eq!(vector[39], "p.mlps.9.2.bias");
    }

    #[test]
    fn modality_names_must_be_the_builders() -> std::result::Result<(), String> {
        let recipes = recipes("vision_clip").ok_or("no recipe")?;
        check_modality_names(&json!({}), &recipes)?;
        check_modality_names(&json!({"modalities": ["vision_clip"]}), &recipes)?;
        assert!(check_modality_names(&json!({"modalities": ["audio_whisper"]}), &recipes).is_err());
        assert!(check_modality_names(&json!({"modalities": "vision_clip"}), &recipes).is_err());
        Ok(())
    }

    #[test]
    fn hub_cache_snapshots() -> std::result::Result<(), Box<dyn std::error::Error>> {
        let root =
            std::env::temp_dir().join(format!("multitoken-hub-cache-{}", std::process::id()));
        let repo = root.join("models--openai--clip-vit-large-patch14-336");
        std::fs::create_dir_all(repo.join("snapshots").join("abc123"))?;
        assert_eq!(
            hub_snapshot(&root, CLIP_HUB_NAME),
            Some(repo.join("snapshots").join("abc123"))
        );
        std::fs::create_dir_all(repo.join("snapshots").join("def456"))?;
        assert_eq!(
            hub_snapshot(&root, CLIP_HUB_NAME),
            None,
            "two snapshots and no refs/main"
        );
        std::fs::create_dir_all(repo.join("refs"))?;
        std::fs::write(repo.join("refs").join("main"), "def456\n")?;
        assert_eq!(
            hub_snapshot(&root, CLIP_HUB_NAME),
            Some(repo.join("snapshots").join("def456"))
        );
        std::fs::write(repo.join("refs").join("main"), "../../x")?;
        assert_eq!(hub_snapshot(&root, CLIP_HUB_NAME), None);
        assert_eq!(hub_snapshot(&root, "../etc"), None);
        assert_eq!(hub_snapshot(&root, "a/b/c"), None);
        std::fs::remove_dir_all(&root)?;
        Ok(())
    }

    #[test]
    fn trained_lm_weights_replace_the_bases() -> Result<()> {
        let dev = Device::Cpu;
        let path = std::env::temp_dir().join(format!(
            "multitoken-override-{}.safetensors",
            std::process::id()
        ));
        let base_tensors = HashMap::from([
            (
                "l.weight".to_string(),
                Tensor::zeros((2, 3), DType::F32, &dev)?,
            ),
            (
                "m.weight".to_string(),
                Tensor::zeros((2, 3), DType::F32, &dev)?,
            ),
        ]);
        candle_core::safetensors::save(&base_tensors, &path)?;
        let base = SafetensorsSource::open(std::slice::from_ref(&path), DType::F32, &dev)?;
        let overrides = HashMap::from([(
            "l.weight".to_string(),
            Tensor::ones((2, 3), DType::BF16, &dev)?,
        )]);
        let weights = OverriddenWeights {
            base: &base,
            overrides: &overrides,
            source: "x.bin".into(),
            dtype: DType::F32,
            device: dev,
        };
        let sum = |t: Tensor| -> Result<f32> { Ok(t.sum_all()?.to_scalar::<f32>()?) };
        assert_eq!(sum(weights.tensor("l.weight", &[2, 3])?)?, 6.0);
        assert_eq!(sum(weights.tensor("m.weight", &[2, 3])?)?, 0.0);
        assert!(weights
            .tensor("l.weight", &[3, 2])
            .is_err_and(|e| e.to_string().contains("x.bin")));
        assert!(weights.linear("l", 3, 2, false).is_ok());
        std::fs::remove_file(&path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        Ok(())
    }

    #[test]
    fn trainables_are_sorted_by_role() -> Result<()> {
        let t = Tensor::zeros(2, DType::F32, &Device::Cpu)?;
        let recipes = recipes("vision_clip").ok_or_else(|| Error::Msg("no recipe".into()))?;
        let split = split_trainables(
            vec![
                (
                    "base_model.model.model.vision_clip_lmm_projector.0.bias".into(),
                    t.clone(),
                ),
                ("model.vision_clip_lmm_projector.2.bias".into(), t.clone()),
                (
                    "base_model.model.model.embed_tokens.weight".into(),
                    t.clone(),
                ),
            ],
            &recipes,
            Path::new("x.bin"),
        )?;
        let projector = &split.projectors["vision_clip_lmm_projector"];
        assert!(projector.contains_key("vision_clip_lmm_projector.0.bias"));
        assert!(projector.contains_key("vision_clip_lmm_projector.2.bias"));
        assert!(split.lm.contains_key("model.embed_tokens.weight"));
        let other = split_trainables(
            vec![(
                "base_model.model.model.audio_whisper_lmm_projector.0.bias".into(),
                t,
            )],
            &recipes,
            Path::new("x.bin"),
        );
        assert!(other.is_err_and(|e| e.to_string().contains("audio_whisper_lmm_projector.0.bias")));
        Ok(())
    }
}
