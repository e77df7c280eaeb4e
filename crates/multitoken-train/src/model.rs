//! The model being trained: a [`MultimodalModel`] whose trainable parts are
//! candle `Var`s held in named maps (projectors, the LM, each encoder).
//!
//! - Projectors always come from a `VarMap`: loaded from `projectors.safetensors`
//!   (or `--pretrained-projectors`) when present, freshly initialised otherwise.
//! - Full fine-tuning loads the LM's safetensors through [`VarSource`], a
//!   [`WeightSource`] that turns every tensor into a variable.
//! - `--train-encoders` builds each modality with `ModalityContext::trainable`,
//!   so the builder creates its encoder weights as variables (from the
//!   checkpoint, or randomly when the encoder directory holds no weights).
//!
//! [`TrainableModel::loss`] is the causal-LM loss of a batch (shifted labels,
//! `-100` ignored, mean over labelled tokens); [`TrainableModel::save`] writes
//! a loadable model directory.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{VarBuilder, VarMap};
use multitoken_core::{
    build_modality, encode_item, is_text_modality, project_item, span_embeddings, splice_embeddings, Item, ItemsByKey, KvCache,
    EncoderWeights, LogitsSelection, Modality, ModalityContext, PreparedInput, Projector, RopePositions, IGNORE_INDEX,
};
use multitoken_lm::loader::{load_model, LoadOptions};
use multitoken_lm::loader::TowerQuantization;
use multitoken_lm::quantize::{Quantization, QuantizingSource};
use multitoken_lm::lora::{LoraDropout, LoraLayer};
use multitoken_lm::model::CausalLm;
use multitoken_lm::multimodal::{item_slots, 
    load_text_modalities, read_config, ModalityEntry, ModalityRuntime, MultimodalConfig,
    MultimodalModel, MULTIMODAL_CONFIG_FILE, PROJECTORS_FILE,
};
use multitoken_lm::weights::SafetensorsSource;
use multitoken_lm::{Linear, WeightSource};

use crate::data::write_atomic;
use crate::optim::Param;
use crate::{Error, Result};

/// What is trained.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TrainParts {
    /// The projectors.
    pub projectors: bool,
    /// Every LM weight (full fine-tuning).
    pub lm: bool,
    /// Which modality encoders train.
    pub encoders: EncoderChoice,
    /// Start from these projector weights instead of the model's `projectors.safetensors`.
    pub pretrained_projectors: Option<PathBuf>,
    /// LoRA adapters on the LM's linears.
    pub lora: Option<LoraSettings>,
}

/// Which modality encoders train (`--train-encoders`): none, all, or those of
/// the named builders (`vision_clip,audio_whisper`). Naming lets a recipe train
/// the encoders that learn cheaply and keep the rest frozen, so their features
/// are computed once and cached.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum EncoderChoice {
    /// Every encoder frozen.
    #[default]
    None,
    /// Every encoder trains.
    All,
    /// Only the encoders of these modality builders train.
    Only(Vec<String>),
}

impl EncoderChoice {
    /// Whether the encoder of modality `builder` trains.
    pub fn includes(&self, builder: &str) -> bool {
        match self {
            EncoderChoice::None => false,
            EncoderChoice::All => true,
            EncoderChoice::Only(names) => names.iter().any(|n| n == builder),
        }
    }

    /// Builder names in `Only` that are not among `builders` (a typo would
    /// otherwise silently freeze the encoder).
    pub fn unknown<'a>(&'a self, builders: &[&str]) -> Vec<&'a str> {
        match self {
            EncoderChoice::Only(names) => names
                .iter()
                .map(String::as_str)
                .filter(|n| !builders.contains(n))
                .collect(),
            _ => Vec::new(),
        }
    }
}

impl From<bool> for EncoderChoice {
    fn from(all: bool) -> Self {
        if all {
            EncoderChoice::All
        } else {
            EncoderChoice::None
        }
    }
}

impl std::str::FromStr for EncoderChoice {
    type Err = String;

    /// `true`/`all`, `false`/`none`, or comma-separated builder names.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim() {
            "true" | "all" => Ok(EncoderChoice::All),
            "false" | "none" => Ok(EncoderChoice::None),
            list => {
                let names: Vec<String> = list
                    .split(',')
                    .map(|n| n.trim().to_string())
                    .filter(|n| !n.is_empty())
                    .collect();
                if names.is_empty() {
                    Err(format!("expected true, false or builder names, got {s:?}"))
                } else {
                    Ok(EncoderChoice::Only(names))
                }
            }
        }
    }
}

impl serde::Serialize for EncoderChoice {
    /// The TOML forms [`Deserialize`](serde::Deserialize) reads: a bool or a list of names.
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            EncoderChoice::None => s.serialize_bool(false),
            EncoderChoice::All => s.serialize_bool(true),
            EncoderChoice::Only(names) => serde::Serialize::serialize(names, s),
        }
    }
}

impl<'de> serde::Deserialize<'de> for EncoderChoice {
    /// TOML: `train_encoders = true`, `"vision_clip"` or `["vision_clip", "audio_whisper"]`.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Flag(bool),
            Names(Vec<String>),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Flag(all) => Ok(all.into()),
            Raw::Names(names) => Ok(EncoderChoice::Only(names)),
            Raw::Text(text) => text.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// LoRA settings (PEFT's `LoraConfig` fields).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSettings {
    /// Rank.
    pub r: usize,
    /// Alpha (scale = alpha / r).
    pub alpha: f64,
    /// Dropout on the adapter input.
    pub dropout: f32,
    /// Module-name suffixes to adapt (`q_proj`, ...); empty = every decoder linear.
    pub target_modules: Vec<String>,
    /// Recompute each decoder layer in the backward pass instead of keeping its
    /// activations ([`CausalLm::set_gradient_checkpointing`]): the same
    /// gradients for far less memory, one more forward per step.
    pub gradient_checkpointing: bool,
}

/// The default LoRA targets: every decoder linear (multi_token's
/// `find_all_linear_names`, `lm_head` excluded).
pub const ALL_LINEAR: [&str; 9] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "fc1",
    "fc2",
];

/// A model directory loaded for training.
pub struct TrainableModel {
    /// The model (forward, preparation).
    pub mm: MultimodalModel,
    /// The directory it was loaded from.
    pub model_dir: PathBuf,
    /// Its `multitoken.json` (an empty one for a text-only LM).
    pub config: MultimodalConfig,
    /// The resolved LM checkpoint.
    pub lm_path: PathBuf,
    /// Projector variables, keyed as in `projectors.safetensors`.
    pub projectors: VarMap,
    /// LM variables (full fine-tuning), keyed by transformers names.
    pub lm_vars: Option<VarMap>,
    /// Encoder variables per modality (`--train-encoders`), keyed as in the encoder's checkpoint.
    pub encoders: Vec<Option<VarMap>>,
    /// LoRA variables keyed as PEFT saves them
    /// (`base_model.model.{module}.lora_A.weight`).
    pub lora_vars: Option<VarMap>,
    /// The modules that got adapters.
    pub lora_modules: Vec<String>,
    /// LoRA dropout generator (reseeded per micro-batch).
    pub lora_rng: LoraDropout,
    /// What is trained.
    pub parts: TrainParts,
    /// Encoder features of frozen encoders, by modality and item content.
    features: std::sync::Mutex<std::collections::HashMap<(usize, u64), Vec<Tensor>>>,
    /// `multitoken.json`'s text-modality entries (not in `config`), written back on save.
    text_entries: Vec<ModalityEntry>,
    /// Where each modality's encoder weights live ([`Modality::encoder_weights`]).
    weights: Vec<Option<EncoderWeights>>,
    /// The frozen towers' block format (`--quantize-towers`): part of the
    /// feature cache's key, since quantized towers give other features.
    quantize_towers: Option<TowerQuantization>,
    /// LM variables kept as loaded ([`TrainableModel::freeze_lm`]).
    frozen_lm: Vec<String>,
}

impl TrainableModel {
    /// Loads `model_dir` (a multimodal directory with `multitoken.json`, or a
    /// text-only HF directory) for training `parts` on `device` in f32.
    pub fn load(model_dir: &Path, parts: TrainParts, device: &Device) -> Result<Self> {
        Self::load_seeded(model_dir, parts, device, 0)
    }

    /// [`TrainableModel::load`] with fresh weights drawn from a generator seeded
    /// by `seed` (and each weight's name), so that runs are reproducible.
    pub fn load_seeded(
        model_dir: &Path,
        parts: TrainParts,
        device: &Device,
        seed: u64,
    ) -> Result<Self> {
        Self::load_quantized(model_dir, parts, device, seed, None, None)
    }

    /// [`TrainableModel::load_seeded`] with the frozen LM's linears quantized to
    /// `quantize` as they are read (an HF directory; `--quantize`). A GGUF base
    /// keeps its own blocks and refuses `quantize`. Either way LoRA adapters train
    /// over the quantized base (QLoRA); full fine-tuning needs a dense base.
    /// `quantize_towers` keeps the frozen encoders' linears as blocks too
    /// (`--quantize-towers`); an encoder that trains is refused with it.
    pub fn load_quantized(
        model_dir: &Path,
        parts: TrainParts,
        device: &Device,
        seed: u64,
        quantize: Option<Quantization>,
        quantize_towers: Option<TowerQuantization>,
    ) -> Result<Self> {
        // A checkpoint of an imported family (Idefics2, Cephalo's MoE) trains in
        // our own layout: it is rewritten once as a `multitoken.json` directory.
        let imported = if model_dir.join(MULTIMODAL_CONFIG_FILE).is_file() {
            None
        } else {
            multitoken_lm::multimodal::export_imported(model_dir, &multitoken_lm::multimodal::imports_dir())?
        };
        let model_dir = imported.as_deref().unwrap_or(model_dir);
        let config_path = model_dir.join(MULTIMODAL_CONFIG_FILE);
        let mut config = if config_path.is_file() {
            read_config(&config_path)?
        } else {
            MultimodalConfig {
                base_model: None,
                chat_template: None,
                modalities: Vec::new(),
                chat_adds_bos: false,
            }
        };
        // Text modalities (`<transcript>`) have no encoder or projector to train:
        // they are kept aside, so that `config.modalities` indexes the spans'
        // modalities as everywhere else, and written back on save.
        let text_entries: Vec<ModalityEntry> =
            config.modalities.iter().filter(|e| is_text_modality(&e.builder)).cloned().collect();
        config.modalities.retain(|e| !is_text_modality(&e.builder));
        let lm_path = match &config.base_model {
            Some(base) => resolve(model_dir, base),
            None => model_dir.to_path_buf(),
        };
        let opts = LoadOptions {
            dtype: DType::F32,
            device: device.clone(),
            quantize,
            quantize_towers,
        };
        let is_gguf = lm_path.is_file()
            && lm_path
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
        if parts.lm && (quantize.is_some() || is_gguf) {
            return Err(Error::Config(format!(
                "{}: full fine-tuning needs a dense HF base; a quantized base (GGUF or --quantize) trains LoRA adapters (--stage lora)",
                lm_path.display()
            )));
        }
        let mut lm = load_model(&lm_path, &opts)?;
        let lora_rng = LoraDropout::new(seed);
        let mut lora_modules = Vec::new();
        let lora_vars = match &parts.lora {
            None => None,
            Some(settings) => {
                if parts.lm {
                    return Err(Error::Config(
                        "LoRA and full fine-tuning exclude each other".into(),
                    ));
                }
                let mut model = load_lora_base(&lm_path, is_gguf, quantize, device)?;
                let map = VarMap::new();
                lora_modules = attach_lora(&mut model, settings, &map, &lora_rng, seed)?;
                model.set_gradient_checkpointing(settings.gradient_checkpointing);
                lm.model = Arc::new(model);
                Some(map)
            }
        };
        let lm_vars = if parts.lm {
            if !lm_path.is_dir() {
                return Err(Error::Config(format!(
                    "{}: full fine-tuning needs an HF model directory (safetensors), not a GGUF file",
                    lm_path.display()
                )));
            }
            let hf = multitoken_lm::hf::parse_config(&lm_path.join("config.json"))?;
            let source = SafetensorsSource::from_dir(&lm_path, DType::F32, device)?;
            let vars = VarSource::new(&source);
            let mut model = CausalLm::load(&hf.model, &vars)?;
            if let Some(windows) = &hf.layer_sliding_windows {
                model.set_layer_sliding_windows(windows)?;
            }
            lm.model = Arc::new(model);
            Some(vars.map)
        } else {
            None
        };
        let hidden = lm.model.hidden_size();

        let projectors = VarMap::new();
        let projector_file = match &parts.pretrained_projectors {
            Some(path) => Some(path.clone()),
            None => Some(model_dir.join(PROJECTORS_FILE)).filter(|p| p.is_file()),
        };
        if let Some(path) = &projector_file {
            preload(&projectors, path, device)?;
        }
        let preloaded: std::collections::HashSet<String> =
            named(&projectors, "").into_iter().map(|p| p.name).collect();
        let builders: Vec<&str> = config.modalities.iter().map(|m| m.builder.as_str()).collect();
        let unknown = parts.encoders.unknown(&builders);
        if !unknown.is_empty() {
            return Err(Error::Config(format!(
                "--train-encoders names {unknown:?}, but the model's modalities are {builders:?}"
            )));
        }
        let mut runtimes = Vec::with_capacity(config.modalities.len());
        let mut encoders = Vec::with_capacity(config.modalities.len());
        let mut weights = Vec::with_capacity(config.modalities.len());
        for entry in &config.modalities {
            let mut context = opts.modality_context(model_dir);
            let encoder_vars = parts.encoders.includes(&entry.builder).then(VarMap::new);
            if encoder_vars.is_some() && quantize_towers.is_some() {
                return Err(Error::Config(format!(
                    "--quantize-towers keeps frozen encoders' linears as blocks, but `{}` trains (--train-encoders)",
                    entry.builder
                )));
            }
            context.trainable = encoder_vars.clone();
            let modality =
                build_modality(&entry.builder, &entry.config, &context).map_err(|e| {
                    Error::Config(format!(
                        "{}: modality `{}`: {e}",
                        config_path.display(),
                        entry.builder
                    ))
                })?;
            if let Some(map) = &encoder_vars {
                // Checked before any step runs, so that a run is never lost at save time.
                check_trainable_encoder(modality.as_ref(), map, model_dir, &entry.config)?;
                randomize_zero_weights(map, seed)?;
            }
            weights.push(modality.encoder_weights());
            let vb = VarBuilder::from_varmap(&projectors, DType::F32, device).pp(entry.prefix());
            let spec = entry.projector_for(modality.as_ref()).map_err(|e| Error::Config(format!("{}: {e}", config_path.display())))?;
            let projector = Projector::load(spec, modality.feature_dim(), hidden, vb)
                .map_err(|e| {
                    Error::Config(format!(
                        "projector `{}` of `{}`: {e}",
                        entry.prefix(),
                        entry.builder
                    ))
                })?;
            runtimes.push(ModalityRuntime {
                modality: modality.into(),
                projector,
            });
            encoders.push(encoder_vars);
        }
        for param in named(&projectors, "") {
            if !preloaded.contains(&param.name) {
                seeded_init(&param, seed)?;
            }
        }
        let template = match &config.chat_template {
            Some(name) if lm.chat_template.is_none() => {
                Some(multitoken_lm::multimodal::builtin_template(name, &lm)?)
            }
            _ => None,
        };
        let mut mm = MultimodalModel::from_parts(lm, runtimes, template)?;
        if config.chat_adds_bos {
            // Idefics2's processor tokenises the rendered chat like any text, so
            // its rows start with the BOS (the export records it).
            mm.set_chat_leading_special_tokens(
                multitoken_core::LeadingSpecialTokens::AddOnceIfMissing,
            )?;
        }
        let context = ModalityContext::new(device.clone(), DType::F32, model_dir);
        for modality in load_text_modalities(model_dir, &text_entries, &context)? {
            mm.add_text_modality(modality)?;
        }
        Ok(Self {
            mm,
            text_entries,
            model_dir: model_dir.to_path_buf(),
            config,
            lm_path,
            projectors,
            lm_vars,
            encoders,
            lora_vars,
            lora_modules,
            lora_rng,
            parts,
            features: Default::default(),
            weights,
            quantize_towers,
            frozen_lm: Vec::new(),
        })
    }

    /// Keeps the LM variables named by `names` (transformers names, or prefixes
    /// ending before a `.`: `model.embed_tokens`, `model.layers.0`) as loaded:
    /// they leave [`TrainableModel::params`], and are saved unchanged. A name
    /// that matches no variable is an error (a typo would otherwise train it).
    pub fn freeze_lm(&mut self, names: &[String]) -> Result<()> {
        if names.is_empty() {
            return Ok(());
        }
        let Some(map) = &self.lm_vars else {
            return Err(Error::Config("freeze_lm: the LM is not being trained (it needs --stage full)".into()));
        };
        let all: Vec<String> = named(map, "").into_iter().map(|p| p.name).collect();
        let mut frozen = Vec::new();
        for name in names {
            let matches: Vec<&String> = all
                .iter()
                .filter(|v| *v == name || v.strip_prefix(name.as_str()).is_some_and(|rest| rest.starts_with('.')))
                .collect();
            if matches.is_empty() {
                return Err(Error::Config(format!(
                    "freeze_lm: `{name}` names no LM parameter (they are named as in transformers, e.g. `{}`)",
                    all.first().map(String::as_str).unwrap_or("model.embed_tokens.weight")
                )));
            }
            frozen.extend(matches.into_iter().cloned());
        }
        frozen.sort();
        frozen.dedup();
        self.frozen_lm = frozen;
        Ok(())
    }

    /// The trainable parameters, named `projectors/…`, `lm/…`, `encoder{i}/…`, sorted.
    pub fn params(&self) -> Vec<Param> {
        let mut out = Vec::new();
        if self.parts.projectors {
            out.extend(named(&self.projectors, "projectors/"));
        }
        if let Some(map) = &self.lm_vars {
            let frozen = |p: &Param| self.frozen_lm.iter().any(|k| p.name.strip_prefix("lm/") == Some(k.as_str()));
            out.extend(named(map, "lm/").into_iter().filter(|p| !frozen(p)));
        }
        if let Some(map) = &self.lora_vars {
            out.extend(named(map, "lora/"));
        }
        for (i, map) in self.encoders.iter().enumerate() {
            if let Some(map) = map {
                out.extend(named(map, &format!("encoder{i}/")));
            }
        }
        out
    }

    /// Input embeddings `[1, len, hidden]` of one prepared row.
    ///
    /// Frozen encoders run once per distinct item: their features are kept in
    /// memory, keyed by the item's content, so later epochs only re-project them.
    pub fn embed(&self, prepared: &PreparedInput, items: &ItemsByKey) -> Result<Tensor> {
        let lm = self.mm.language_model();
        let ids = Tensor::new(prepared.input_ids.as_slice(), lm.device())?.unsqueeze(0)?;
        let token_embeds = lm.embed_tokens(&ids)?;
        if prepared.spans.is_empty() {
            return Ok(token_embeds);
        }
        let mut projected = Vec::with_capacity(self.mm.modalities.len());
        for (index, runtime) in self.mm.modalities.iter().enumerate() {
            let modality = runtime.modality.as_ref();
            let given = items
                .get(modality.data_key())
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            let slots = item_slots(prepared, index, given.len());
            let frozen = self.encoders.get(index).is_none_or(Option::is_none);
            let mut rows = Vec::with_capacity(slots.len());
            for (k, (item, &slots)) in given.iter().zip(&slots).enumerate() {
                let describe = || format!("{} item {} (modality `{}`)", modality.data_key(), k + 1, modality.name());
                let key = (index, item_hash(item));
                let cached = if frozen {
                    self.cached_features(&key)
                } else {
                    None
                };
                let pieces = match cached {
                    Some(f) => f,
                    None => {
                        let f = encode_item(modality, item)
                            .map_err(|e| Error::Config(format!("{}: {e}", describe())))?;
                        // A wrong feature width would surface as an opaque matmul error.
                        if let Some(piece) = f.iter().find(|p| p.dims().last() != Some(&modality.feature_dim())) {
                            return Err(Error::Config(format!(
                                "{}: the encoder gave features of shape {:?}, expected a last dimension of {} (feature_dim)",
                                describe(),
                                piece.dims(),
                                modality.feature_dim()
                            )));
                        }
                        if frozen {
                            if let Ok(mut cache) = self.features.lock() {
                                cache.insert(key, f.clone());
                            }
                        }
                        f
                    }
                };
                let embeds = project_item(&runtime.projector, &pieces, lm.dtype(), slots)
                    .map_err(|e| Error::Config(format!("{}: {e}", describe())))?;
                rows.push(embeds);
            }
            projected.push(rows);
        }
        let spans = span_embeddings(&prepared.spans, &projected)?;
        Ok(splice_embeddings(&token_embeds, &[spans])?)
    }

    /// File of the on-disk feature cache of modality `index` under `dir`:
    /// `{builder}-{identity}.safetensors`, the identity hashing the builder, its
    /// config, the encoder's files and the model directory's processor
    /// configs; keys are item content hashes.
    fn cache_file(&self, dir: &Path, index: usize) -> Option<PathBuf> {
        use std::hash::{Hash, Hasher};
        let entry = self.config.modalities.get(index)?;
        let mut h = std::collections::hash_map::DefaultHasher::new();
        entry.builder.hash(&mut h);
        entry.config.to_string().hash(&mut h);
        if let Some(format) = self.quantize_towers {
            // Only when set, so that f32 towers' existing caches keep their names.
            format!("{format:?}").hash(&mut h);
        }
        // The encoder's files and the model directory's processor configs by
        // content, not by path: rewritten weights at the same path must not be
        // served stale features, and a copy of the same encoder (stage 2
        // starting from stage 1's output) should hit.
        hash_files(&self.model_dir, &mut h, |p| {
            p.file_name()
                .is_some_and(|n| n == "preprocessor_config.json" || n == "processor_config.json")
        });
        let encoder_dir = self
            .weights
            .get(index)
            .and_then(Option::as_ref)
            .and_then(|w| w.dir_in(&self.model_dir, &entry.config))
            .unwrap_or_else(|| self.model_dir.clone());
        hash_files(&encoder_dir, &mut h, |_| true);
        Some(dir.join(format!("{}-{:016x}.safetensors", entry.builder, h.finish())))
    }

    /// Loads the cached features of frozen encoders from `dir` (missing files are
    /// fine; an unreadable one is an error naming it). Returns the entries loaded.
    pub fn load_feature_cache(&self, dir: &Path) -> Result<usize> {
        let mut loaded = 0;
        for index in 0..self.config.modalities.len() {
            if self.encoders.get(index).is_some_and(Option::is_some) {
                continue;
            }
            let Some(file) = self.cache_file(dir, index).filter(|f| f.is_file()) else {
                continue;
            };
            let tensors = candle_core::safetensors::load(&file, &Device::Cpu).map_err(|e| {
                Error::Config(format!(
                    "{}: corrupt feature cache ({e}); delete it",
                    file.display()
                ))
            })?;
            let mut cache = self
                .features
                .lock()
                .map_err(|_| Error::Config("feature cache poisoned".into()))?;
            // `{hash}` holds a one-piece item's features, `{hash}.{i}` piece i
            // of an item encoded in several pieces (crops).
            let mut pieces: HashMap<u64, Vec<(usize, Tensor)>> = HashMap::new();
            for (key, t) in tensors {
                let (hash, piece) = match key.split_once('.') {
                    Some((hash, piece)) => (hash, piece.parse::<usize>().ok()),
                    None => (key.as_str(), Some(0)),
                };
                if let (Ok(hash), Some(piece)) = (u64::from_str_radix(hash, 16), piece) {
                    pieces.entry(hash).or_default().push((piece, t));
                }
            }
            for (hash, mut parts) in pieces {
                parts.sort_by_key(|(piece, _)| *piece);
                if parts.iter().enumerate().any(|(i, (piece, _))| i != *piece) {
                    continue;
                }
                cache.insert((index, hash), parts.into_iter().map(|(_, t)| t).collect());
                loaded += 1;
            }
        }
        Ok(loaded)
    }

    /// Writes the cached features of frozen encoders to `dir` (one file per
    /// modality, temporary file + rename).
    pub fn save_feature_cache(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let cache = self
            .features
            .lock()
            .map_err(|_| Error::Config("feature cache poisoned".into()))?;
        for index in 0..self.config.modalities.len() {
            let mut tensors: HashMap<String, Tensor> = HashMap::new();
            for ((_, h), pieces) in cache.iter().filter(|((m, _), _)| *m == index) {
                if let [one] = pieces.as_slice() {
                    tensors.insert(format!("{h:016x}"), one.clone());
                } else {
                    for (i, t) in pieces.iter().enumerate() {
                        tensors.insert(format!("{h:016x}.{i}"), t.clone());
                    }
                }
            }
            let Some(file) = self.cache_file(dir, index) else {
                continue;
            };
            if tensors.is_empty() {
                continue;
            }
            let tmp = crate::data::temp_path(&file);
            crate::data::save_safetensors(&tensors, &tmp)?;
            std::fs::rename(&tmp, &file).map_err(|e| Error::io(&file, e))?;
        }
        Ok(())
    }

    fn cached_features(&self, key: &(usize, u64)) -> Option<Vec<Tensor>> {
        self.features
            .lock()
            .ok()
            .and_then(|cache| cache.get(key).cloned())
    }

    /// Mean cross-entropy over the labelled next-token predictions of a batch
    /// (right-padded; padding is never attended to by real positions in a causal
    /// model), and the number of labelled tokens.
    pub fn loss(&self, rows: &[(&PreparedInput, &ItemsByKey)]) -> Result<(Tensor, usize)> {
        let embeds = rows
            .iter()
            .map(|(p, items)| self.embed(p, items))
            .collect::<Result<Vec<_>>>()?;
        let labels: Vec<&[i64]> = rows.iter().map(|(p, _)| p.labels.as_slice()).collect();
        // Qwen2-VL: rows with position grids train at their M-RoPE positions, as
        // transformers' forward computes them (get_rope_index) from the grids.
        let lm = self.mm.language_model();
        let positions: Option<Vec<RopePositions>> = (lm.takes_positions() && rows.iter().any(|(p, _)| p.has_position_grids()))
            .then(|| rows.iter().map(|(p, _)| p.rope_positions()).collect());
        self.loss_from_embeds_at(&embeds, &labels, positions.as_deref())
    }

    /// The loss of [`TrainableModel::loss`] from per-row input embeddings
    /// `[1, len, hidden]` and their unshifted labels.
    pub fn loss_from_embeds(&self, rows: &[Tensor], labels: &[&[i64]]) -> Result<(Tensor, usize)> {
        self.loss_from_embeds_at(rows, labels, None)
    }

    /// [`TrainableModel::loss_from_embeds`] with each row's M-RoPE positions
    /// (one per row, for an LM that reads them; padding after each row).
    pub fn loss_from_embeds_at(
        &self,
        rows: &[Tensor],
        labels: &[&[i64]],
        positions: Option<&[RopePositions]>,
    ) -> Result<(Tensor, usize)> {
        let lm = self.mm.language_model();
        let lens = rows
            .iter()
            .map(|e| e.dim(1))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let max_len = lens.iter().copied().max().unwrap_or(0);
        if max_len < 2 || rows.len() != labels.len() {
            return Err(Error::Config(
                "a batch needs sequences of at least 2 tokens, each with labels".into(),
            ));
        }
        let hidden = lm.hidden_size();
        let labelled = |label: i64| label != IGNORE_INDEX && label >= 0;
        // Logits only from the first position whose next token carries a label (over
        // the batch): the prompt's positions never reach the loss.
        let first = labels
            .iter()
            .filter_map(|l| l.iter().skip(1).position(|&x| labelled(x)))
            .min()
            .unwrap_or(0)
            .min(max_len - 2);
        let predicted = max_len - 1 - first;
        let mut embeds = Vec::with_capacity(rows.len());
        let mut targets = Vec::with_capacity(rows.len() * predicted);
        let mut mask = Vec::with_capacity(rows.len() * predicted);
        for ((e, len), row_labels) in rows.iter().zip(&lens).zip(labels) {
            let pad = max_len - len;
            let e = if pad > 0 {
                Tensor::cat(
                    &[e, &Tensor::zeros((1, pad, hidden), e.dtype(), e.device())?],
                    1,
                )?
            } else {
                e.clone()
            };
            embeds.push(e);
            for t in first + 1..max_len {
                let label = row_labels.get(t).copied().unwrap_or(IGNORE_INDEX);
                if labelled(label) {
                    targets.push(label as u32);
                    mask.push(1f32);
                } else {
                    targets.push(0u32);
                    mask.push(0f32);
                }
            }
        }
        let count = mask.iter().filter(|m| **m > 0.0).count();
        let embeds = Tensor::cat(&embeds, 0)?;
        let mut cache = KvCache::new(lm.num_layers());
        // Positions first..max_len; the last predicts nothing.
        let positions = match positions {
            Some(rows_positions) => Some(right_padded_positions(rows_positions, max_len, embeds.device())?),
            None => None,
        };
        let logits =
            lm.forward_embeds_at(&embeds, None, &mut cache, LogitsSelection::Tail(predicted + 1), positions.as_ref())?;
        let (b, _, vocab) = logits.dims3()?;
        let logits = logits
            .narrow(1, 0, predicted)?
            .reshape((b * predicted, vocab))?
            .to_dtype(DType::F32)?;
        let device = logits.device();
        let targets = Tensor::from_vec(targets, (b * predicted, 1), device)?;
        let mask = Tensor::from_vec(mask, b * predicted, device)?;
        let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let picked = log_probs.gather(&targets, 1)?.squeeze(1)?;
        let total = (picked * mask)?.sum_all()?;
        let loss = (total.neg()? / count.max(1) as f64)?;
        Ok((loss, count))
    }

    /// Writes a loadable model directory: `multitoken.json`, `projectors.safetensors`,
    /// the LM under `lm/` when it was trained (else `base_model` points at the
    /// original), trained encoders under `encoder-{i}/` (frozen ones keep
    /// pointing at the originals). Same as [`Self::save_in_run`] with `out` as the run.
    pub fn save(&self, out: &Path) -> Result<()> {
        self.save_in_run(out, out)
    }

    /// [`Self::save`] into `out`, a directory inside the run directory `root`
    /// (`root` itself, or a checkpoint in it): every path the config names
    /// (the original LM, frozen encoders, other config paths, the adapter's
    /// base) is written relative to `out` when it lies inside `root`, so that
    /// the run directory can be moved, and absolute otherwise.
    pub fn save_in_run(&self, out: &Path, root: &Path) -> Result<()> {
        std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
        let refer = |p: &Path| crate::run::reference(p, out, root);
        let mut config = self.config.clone();
        if let Some(map) = &self.lm_vars {
            let lm_dir = out.join("lm");
            copy_non_weights(&self.lm_path, &lm_dir, false)?;
            save_varmap(map, &lm_dir.join("model.safetensors"))?;
            config.base_model = Some("lm".into());
        } else {
            config.base_model = Some(refer(&self.lm_path));
        }
        for (i, entry) in config.modalities.iter_mut().enumerate() {
            // Paths in the config, relative to the old directory, stay valid from the new one.
            rewrite_paths(&self.model_dir, &mut entry.config, &refer);
            let Some(weights) = self.weights.get(i).and_then(Option::as_ref) else {
                if self.encoders.get(i).is_some_and(Option::is_some) {
                    return Err(Error::Config(format!(
                        "cannot save the trained encoder of `{}`: the modality does not say where its weights live (Modality::encoder_weights)",
                        entry.builder
                    )));
                }
                continue;
            };
            let key = weights.config_key.as_str();
            let Some(source_dir) = weights.dir_in(&self.model_dir, &self.config.modalities[i].config) else {
                if self.encoders.get(i).is_some_and(Option::is_some) {
                    return Err(Error::Config(format!(
                        "cannot save the trained encoder of `{}`: its config names no `{key}` directory",
                        entry.builder
                    )));
                }
                continue;
            };
            let new_value = match self.encoders.get(i).and_then(Option::as_ref) {
                Some(map) => {
                    let name = format!("encoder-{i}");
                    let dir = out.join(&name);
                    copy_non_weights(&source_dir, &dir, true)?;
                    save_varmap(map, &dir.join(&weights.weights_file))?;
                    name
                }
                None => refer(&source_dir),
            };
            if let serde_json::Value::Object(obj) = &mut entry.config {
                obj.insert(key.to_string(), serde_json::Value::String(new_value));
            } else if entry.config.is_null() {
                entry.config = serde_json::json!({ key: new_value });
            }
        }
        // Preprocessing configs some builders read from the model directory itself.
        for name in ["preprocessor_config.json", "processor_config.json"] {
            let from = self.model_dir.join(name);
            if from.is_file() {
                std::fs::copy(&from, out.join(name)).map_err(|e| Error::io(&from, e))?;
            }
        }
        if !config.modalities.is_empty() {
            save_varmap(&self.projectors, &out.join(PROJECTORS_FILE))?;
        }
        for entry in &self.text_entries {
            let mut entry = entry.clone();
            // Paths in its config resolved against the old directory stay valid from the new one.
            rewrite_paths(&self.model_dir, &mut entry.config, &refer);
            config.modalities.push(entry);
        }
        if let (Some(map), Some(settings)) = (&self.lora_vars, &self.parts.lora) {
            save_varmap(map, &out.join(ADAPTER_WEIGHTS_FILE))?;
            let adapter = adapter_config(settings, &self.lora_modules, Path::new(&refer(&self.lm_path)));
            let text =
                serde_json::to_string_pretty(&adapter).map_err(|e| Error::Config(e.to_string()))?;
            write_atomic(&out.join(ADAPTER_CONFIG_FILE), text.as_bytes())?;
        }
        let text =
            serde_json::to_string_pretty(&config).map_err(|e| Error::Config(e.to_string()))?;
        write_atomic(&out.join(MULTIMODAL_CONFIG_FILE), text.as_bytes())
    }
}

/// Feeds the names and bytes of the regular files directly in `dir` (sorted)
/// that `keep` accepts to `h`; unreadable entries are skipped (loading the
/// encoder reports them).
/// `[3, rows, len]` positions with each row's padding after it (position 0:
/// right padding is never attended to by real positions).
fn right_padded_positions(rows: &[RopePositions], len: usize, device: &Device) -> Result<Tensor> {
    let mut data = Vec::with_capacity(3 * rows.len() * len);
    for stream in 0..3 {
        for row in rows {
            let have = &row.streams[stream];
            if have.len() > len {
                return Err(Error::Config(format!("a row has {} positions for {len} tokens", have.len())));
            }
            data.extend_from_slice(have);
            data.extend(std::iter::repeat_n(0u32, len - have.len()));
        }
    }
    Ok(Tensor::from_vec(data, (3, rows.len(), len), device)?)
}

fn hash_files(dir: &Path, h: &mut impl std::hash::Hasher, keep: impl Fn(&Path) -> bool) {
    use std::hash::Hash;
    use std::io::Read;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && keep(p))
        .collect();
    files.sort();
    let mut buf = vec![0u8; 1 << 20];
    for path in files {
        path.file_name().hash(h);
        let Ok(mut file) = std::fs::File::open(&path) else {
            continue;
        };
        while let Ok(n) = file.read(&mut buf) {
            if n == 0 {
                break;
            }
            h.write(&buf[..n]);
        }
    }
}

/// A content hash of an item (a file's bytes, not its name).
fn item_hash(item: &Item) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    match item {
        Item::Path(p) => match std::fs::read(p) {
            Ok(bytes) => bytes.hash(&mut h),
            // Unreadable: hash the path; encoding will report the error.
            Err(_) => p.hash(&mut h),
        },
        Item::Bytes(b) => b.hash(&mut h),
        Item::Text(t) => t.hash(&mut h),
    }
    h.finish()
}

/// PEFT's adapter weights file.
pub const ADAPTER_WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// PEFT's adapter config file.
pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";

/// `adapter_config.json` as PEFT writes it for a LoRA on a causal LM.
pub fn adapter_config(
    settings: &LoraSettings,
    modules: &[String],
    base: &Path,
) -> serde_json::Value {
    let mut targets: Vec<String> = modules
        .iter()
        .filter_map(|m| m.rsplit('.').next().map(str::to_string))
        .collect();
    targets.sort();
    targets.dedup();
    serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base.display().to_string(),
        "r": settings.r,
        "lora_alpha": settings.alpha,
        "lora_dropout": settings.dropout,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "use_rslora": false,
        "use_dora": false,
        "modules_to_save": null,
        "rank_pattern": {},
        "alpha_pattern": {}
    })
}

/// The LM that LoRA adapters attach to: an HF directory (dense, or quantized at
/// load), or a GGUF file kept in its blocks with llama's `q_proj`/`k_proj` rows
/// in transformers' order, so that the saved adapter fits the HF base as PEFT
/// expects ([`multitoken_lm::gguf::GgufSource::with_transformers_rows`]).
fn load_lora_base(
    lm_path: &Path,
    is_gguf: bool,
    quantize: Option<Quantization>,
    device: &Device,
) -> Result<CausalLm> {
    if is_gguf {
        let opts = LoadOptions {
            dtype: DType::F32,
            device: device.clone(),
            quantize: None,
            quantize_towers: None,
        };
        let source = multitoken_lm::gguf::GgufSource::open(
            lm_path,
            &opts,
            multitoken_lm::gguf::GgufWeights::Quantized,
        )?
        .with_transformers_rows();
        return Ok(CausalLm::load(&source.config()?, &source)?);
    }
    if !lm_path.is_dir() {
        return Err(Error::Config(format!(
            "{}: LoRA training needs an HF model directory or a .gguf file",
            lm_path.display()
        )));
    }
    let hf = multitoken_lm::hf::parse_config(&lm_path.join("config.json"))?;
    let source = SafetensorsSource::from_dir(lm_path, DType::F32, device)?;
    let mut model = match quantize {
        Some(format) => CausalLm::load(&hf.model, &QuantizingSource::new(&source, format))?,
        None => CausalLm::load(&hf.model, &source)?,
    };
    if let Some(windows) = &hf.layer_sliding_windows {
        model.set_layer_sliding_windows(windows)?;
    }
    Ok(model)
}

/// Attaches a LoRA adapter to every targeted decoder linear: `A` drawn
/// U(±1/√in) (PEFT's kaiming-uniform with a=√5), `B` zero. Returns the module names.
fn attach_lora(
    model: &mut CausalLm,
    settings: &LoraSettings,
    map: &VarMap,
    rng: &LoraDropout,
    seed: u64,
) -> Result<Vec<String>> {
    use rand::Rng;
    if settings.r == 0 {
        return Err(Error::Config("lora_r must be at least 1".into()));
    }
    if !(0.0..1.0).contains(&settings.dropout) {
        return Err(Error::Config("lora_dropout must be in [0, 1)".into()));
    }
    let targets: Vec<&str> = if settings.target_modules.is_empty() {
        ALL_LINEAR.to_vec()
    } else {
        settings.target_modules.iter().map(String::as_str).collect()
    };
    let mut modules = Vec::new();
    let mut data = map
        .data()
        .lock()
        .map_err(|_| Error::Config("variable map poisoned".into()))?;
    for (name, linear) in model.decoder_linears_mut() {
        let short = name.rsplit('.').next().unwrap_or(&name).to_string();
        if !targets
            .iter()
            .any(|t| *t == short || name.ends_with(&format!(".{t}")))
        {
            continue;
        }
        let (in_dim, out_dim) = (linear.in_dim(), linear.out_dim());
        // A rank above min(in, out) adds nothing to the product, and a huge one
        // (`--lora-r 100000000`) would abort on allocation: refused before it.
        if settings.r > in_dim.min(out_dim) {
            return Err(Error::Config(format!(
                "lora_r {} is larger than {name}'s smaller dimension ({}): the rank can be at most min(in, out)",
                settings.r,
                in_dim.min(out_dim)
            )));
        }
        let key_a = format!("base_model.model.{name}.lora_A.weight");
        let key_b = format!("base_model.model.{name}.lora_B.weight");
        let bound = 1.0 / (in_dim as f32).sqrt();
        let mut gen = name_rng(seed, &key_a);
        let values: Vec<f32> = (0..settings.r * in_dim)
            .map(|_| gen.random_range(-bound..bound))
            .collect();
        let a = Var::from_tensor(&Tensor::from_vec(
            values,
            (settings.r, in_dim),
            &Device::Cpu,
        )?)?;
        let b = Var::from_tensor(&Tensor::zeros(
            (out_dim, settings.r),
            DType::F32,
            &Device::Cpu,
        )?)?;
        linear.set_lora(Some(LoraLayer {
            a: a.as_tensor().clone(),
            b: b.as_tensor().clone(),
            scale: settings.alpha / settings.r as f64,
            dropout: settings.dropout,
            rng: rng.clone(),
        }))?;
        data.insert(key_a, a);
        data.insert(key_b, b);
        modules.push(name);
    }
    if modules.is_empty() {
        return Err(Error::Config(format!(
            "no LM linear matches the LoRA target modules {targets:?}"
        )));
    }
    Ok(modules)
}

/// Before any training step: a trained encoder must have a known save
/// location ([`Modality::encoder_weights`] naming a directory) and its builder
/// must have honoured [`ModalityContext::trainable`] (created variables).
fn check_trainable_encoder(modality: &dyn Modality, map: &VarMap, model_dir: &Path, config: &serde_json::Value) -> Result<()> {
    let name = modality.name();
    let Some(weights) = modality.encoder_weights() else {
        return Err(Error::Config(format!(
            "--train-encoders {name}: the modality does not say where its encoder weights live \
             (implement Modality::encoder_weights), so a trained encoder could not be saved"
        )));
    };
    let file = Path::new(&weights.weights_file);
    if file.file_name().is_none_or(|f| f != file.as_os_str()) || !weights.weights_file.ends_with(".safetensors") {
        return Err(Error::Config(format!(
            "--train-encoders {name}: its encoder weights file `{}` must be a plain `*.safetensors` file name",
            weights.weights_file
        )));
    }
    if weights.dir_in(model_dir, config).is_none() {
        return Err(Error::Config(format!(
            "--train-encoders {name}: its config names no `{}` directory for the encoder weights",
            weights.config_key
        )));
    }
    if map.all_vars().is_empty() {
        return Err(Error::Config(format!(
            "--train-encoders {name}: the builder created no trainable variables \
             (load the encoder through ModalityContext::var_builder to honour ModalityContext::trainable)"
        )));
    }
    Ok(())
}

/// Rewrites the string values of a modality config that name an existing
/// path relative to `model_dir` as `refer` writes them (absolute, or relative
/// to the new directory), so that the config keeps working from there.
pub(crate) fn rewrite_paths(model_dir: &Path, config: &mut serde_json::Value, refer: &dyn Fn(&Path) -> String) {
    if let serde_json::Value::Object(obj) = config {
        for value in obj.values_mut() {
            if let Some(path) = value.as_str().filter(|p| !p.is_empty()).map(|p| resolve(model_dir, p)) {
                if path.exists() {
                    *value = serde_json::Value::String(refer(&path));
                }
            }
        }
    }
}

fn resolve(dir: &Path, relative: &str) -> PathBuf {
    let p = Path::new(relative);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        dir.join(p)
    }
}

fn absolute(path: &Path) -> PathBuf {
    path.canonicalize()
        .or_else(|_| std::path::absolute(path))
        .unwrap_or_else(|_| path.to_path_buf())
}

/// Copies the files of `from` (not `*.safetensors` / index files, not GGUF)
/// into `to`, and with `subdirectories` those of its folders too (an
/// encoder's: not an LM's, whose folders are other formats of its weights).
fn copy_non_weights(from: &Path, to: &Path, subdirectories: bool) -> Result<()> {
    std::fs::create_dir_all(to).map_err(|e| Error::io(to, e))?;
    if !from.is_dir() {
        return Ok(());
    }
    let entries = std::fs::read_dir(from).map_err(|e| Error::io(from, e))?;
    for entry in entries {
        let path = entry.map_err(|e| Error::io(from, e))?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        // A sentence-transformers encoder keeps its pooling settings in
        // `1_Pooling/config.json`, which loading it needs (hidden folders and
        // links are not the encoder's).
        let is_link = path
            .symlink_metadata()
            .is_ok_and(|m| m.file_type().is_symlink());
        if subdirectories && path.is_dir() && !is_link && !name.starts_with('.') {
            copy_non_weights(&path, &to.join(&name), true)?;
            continue;
        }
        if !path.is_file()
            || name.ends_with(".safetensors")
            || name.ends_with(".safetensors.index.json")
            || name == MULTIMODAL_CONFIG_FILE
            || name.ends_with(".gguf")
        {
            continue;
        }
        let dest = to.join(&name);
        if absolute(&path) != absolute(&dest) {
            std::fs::copy(&path, &dest).map_err(|e| Error::io(&path, e))?;
        }
    }
    Ok(())
}

/// The variables of `map` with `prefix` prepended to their names, sorted by name.
fn named(map: &VarMap, prefix: &str) -> Vec<Param> {
    let mut out: Vec<Param> = match map.data().lock() {
        Ok(data) => data
            .iter()
            .map(|(k, v)| Param {
                name: format!("{prefix}{k}"),
                var: v.clone(),
            })
            .collect(),
        Err(poisoned) => poisoned
            .into_inner()
            .iter()
            .map(|(k, v)| Param {
                name: format!("{prefix}{k}"),
                var: v.clone(),
            })
            .collect(),
    };
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Every tensor of a safetensors file as a variable of `map`.
pub fn preload(map: &VarMap, path: &Path, device: &Device) -> Result<()> {
    let tensors = candle_core::safetensors::load(path, device)
        .map_err(|e| Error::Config(format!("{}: cannot read: {e}", path.display())))?;
    let mut data = map
        .data()
        .lock()
        .map_err(|_| Error::Config("variable map poisoned".into()))?;
    for (name, tensor) in tensors {
        data.insert(name, Var::from_tensor(&tensor.to_dtype(DType::F32)?)?);
    }
    Ok(())
}

/// Saves a variable map as safetensors through a temporary file.
pub fn save_varmap(map: &VarMap, path: &Path) -> Result<()> {
    let tmp = crate::data::temp_path(path);
    map.save(&tmp)
        .map_err(|e| Error::Config(format!("{}: cannot write: {e}", tmp.display())))?;
    crate::data::respect_umask(&tmp)?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Weights a fresh encoder got from `VarBuilder::get` are zeros (candle's default
/// init); embeddings and the like get N(0, 0.02) instead (seeded), as
/// transformers' `_init_weights`. Biases stay zero.
fn randomize_zero_weights(map: &VarMap, seed: u64) -> Result<()> {
    use rand_distr_free::normal;
    for param in named(map, "") {
        let t = param.var.as_tensor();
        if param.name.ends_with("bias") || t.elem_count() == 0 {
            continue;
        }
        let max = t
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_dtype(DType::F32)?
            .to_scalar::<f32>()?;
        if max == 0.0 {
            let mut rng = name_rng(seed, &param.name);
            let values: Vec<f32> = (0..t.elem_count())
                .map(|_| 0.02 * normal(&mut rng))
                .collect();
            let fresh = Tensor::from_vec(values, t.shape(), t.device())?.to_dtype(t.dtype())?;
            param.var.set(&fresh)?;
        }
    }
    Ok(())
}

/// A generator seeded by the run seed and a weight's name (FNV-1a).
fn name_rng(seed: u64, name: &str) -> rand::rngs::StdRng {
    use rand::SeedableRng;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    rand::rngs::StdRng::seed_from_u64(seed ^ h)
}

/// Re-draws a fresh projector weight from the seeded generator: matrices
/// U(±1/√fan_in) (torch's `nn.Linear` default bound), biases zero, other
/// vectors (norm scales) kept.
fn seeded_init(param: &Param, seed: u64) -> Result<()> {
    use rand::Rng;
    let t = param.var.as_tensor();
    let dims = t.dims().to_vec();
    let fresh = if dims.len() >= 2 {
        let fan_in: usize = dims[1..].iter().product();
        let bound = 1.0 / (fan_in.max(1) as f32).sqrt();
        let mut rng = name_rng(seed, &param.name);
        let values: Vec<f32> = (0..t.elem_count())
            .map(|_| rng.random_range(-bound..bound))
            .collect();
        Tensor::from_vec(values, dims, t.device())?
    } else if param.name.ends_with("bias") {
        t.zeros_like()?
    } else {
        return Ok(());
    };
    param.var.set(&fresh.to_dtype(t.dtype())?)?;
    Ok(())
}

/// A standard normal sample by Box–Muller (keeps the dependency list short).
mod rand_distr_free {
    use rand::Rng;

    /// One N(0, 1) draw.
    pub fn normal(rng: &mut impl Rng) -> f32 {
        let u1: f64 = rng.random_range(f64::MIN_POSITIVE..1.0);
        let u2: f64 = rng.random::<f64>();
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }
}

/// A [`WeightSource`] that reads an inner source and registers every tensor it
/// hands out as a variable (full fine-tuning). A tensor asked for twice (tied
/// embeddings) is one variable.
pub struct VarSource<'a> {
    inner: &'a dyn WeightSource,
    /// The variables, by transformers name.
    pub map: VarMap,
}

impl<'a> VarSource<'a> {
    /// Wraps `inner`.
    pub fn new(inner: &'a dyn WeightSource) -> Self {
        Self {
            inner,
            map: VarMap::new(),
        }
    }
}

impl WeightSource for VarSource<'_> {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn contains(&self, name: &str) -> bool {
        self.inner.contains(name)
    }
    fn tensor(&self, name: &str, shape: &[usize]) -> multitoken_lm::Result<Tensor> {
        let mut data = self
            .map
            .data()
            .lock()
            .map_err(|_| multitoken_lm::Error::Msg("variable map poisoned".into()))?;
        if let Some(var) = data.get(name) {
            return Ok(var.as_tensor().clone());
        }
        let t = self.inner.tensor(name, shape)?;
        let var = Var::from_tensor(&t)?;
        let out = var.as_tensor().clone();
        data.insert(name.to_string(), var);
        Ok(out)
    }
    fn linear(
        &self,
        prefix: &str,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
    ) -> multitoken_lm::Result<Linear> {
        let weight = self.tensor(&format!("{prefix}.weight"), &[out_dim, in_dim])?;
        let bias = if bias {
            Some(self.tensor(&format!("{prefix}.bias"), &[out_dim])?)
        } else {
            None
        };
        Linear::dense(weight, bias)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::EncoderChoice;

    fn check(text: &str, expect: Result<EncoderChoice, ()>) {
        assert_eq!(text.parse::<EncoderChoice>().map_err(|_| ()), expect, "{text:?}");
    }

    /// A trained encoder's folder keeps the source's settings in subfolders
    /// (sentence-transformers' `1_Pooling/config.json`, without which the
    /// saved document encoder did not load) but not its weights.
    #[test]
    fn an_encoder_copy_keeps_subfolders_and_leaves_weights() {
        let root = std::env::temp_dir().join(format!("mt-copy-{}", std::process::id()));
        let (from, to) = (root.join("from"), root.join("to"));
        std::fs::create_dir_all(from.join("1_Pooling")).unwrap();
        std::fs::write(from.join("config.json"), "{}").unwrap();
        std::fs::write(from.join("model.safetensors"), "w").unwrap();
        std::fs::write(from.join("1_Pooling/config.json"), "{}").unwrap();
        std::fs::write(from.join("1_Pooling/extra.safetensors"), "w").unwrap();
        super::copy_non_weights(&from, &to, true).unwrap();
        assert!(to.join("config.json").is_file() && to.join("1_Pooling/config.json").is_file());
        assert!(!to.join("model.safetensors").exists());
        assert!(!to.join("1_Pooling/extra.safetensors").exists());
        let lm = root.join("lm");
        super::copy_non_weights(&from, &lm, false).unwrap();
        assert!(lm.join("config.json").is_file() && !lm.join("1_Pooling").exists());
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn encoder_choice_parses_flags_and_names() {
        let only = |n: &[&str]| Ok(EncoderChoice::Only(n.iter().map(|s| s.to_string()).collect()));
        check("true", Ok(EncoderChoice::All));
        check("false", Ok(EncoderChoice::None));
        check("vision_clip", only(&["vision_clip"]));
        check("vision_clip, audio_whisper", only(&["vision_clip", "audio_whisper"]));
        check(" , ", Err(()));
        let choice: EncoderChoice = "vision_clip".parse().unwrap();
        assert!(choice.includes("vision_clip") && !choice.includes("audio_whisper"));
        assert_eq!(choice.unknown(&["vision_clip", "audio_whisper"]), Vec::<&str>::new());
        assert_eq!(EncoderChoice::from(true).unknown(&[]), Vec::<&str>::new());
        let typo: EncoderChoice = "vision_clipp".parse().unwrap();
        assert_eq!(typo.unknown(&["vision_clip"]), vec!["vision_clipp"]);
    }

    #[test]
    fn encoder_choice_reads_toml_forms() {
        #[derive(serde::Deserialize)]
        struct T {
            e: EncoderChoice,
        }
        let read = |s: &str| toml::from_str::<T>(s).map(|t| t.e).ok();
        assert_eq!(read("e = true"), Some(EncoderChoice::All));
        assert_eq!(read("e = [\"vision_clip\"]"), Some(EncoderChoice::Only(vec!["vision_clip".into()])));
        assert_eq!(read("e = \"audio_whisper\""), Some(EncoderChoice::Only(vec!["audio_whisper".into()])));
        assert_eq!(read("e = 3"), None);
    }
}
