//! A multimodal model: a decoder LM plus modalities, each with its projector.
//!
//! A model directory is multimodal when it holds a `multitoken.json`:
//!
//! ```json
//! {
//!   "base_model": "lm",
//!   "modalities": [
//!     {"builder": "vision_clip", "config": {"tower": "clip"}, "projector": "mlp2x_gelu"}
//!   ]
//! }
//! ```
//!
//! `base_model` (an HF directory or a `.gguf`, relative to the model directory;
//! default: the model directory itself) is loaded with [`load_model`]. Each
//! modality is built by name through the core registry (so this crate names no
//! concrete encoder), and its projector's weights are read from
//! `projectors.safetensors` under `{projector_prefix}.` (default
//! `{builder}_lmm_projector`, multi_token's module name). A directory without
//! `multitoken.json` is a llava-hf `LlavaForConditionalGeneration` checkpoint
//! when its `config.json` says so ([`llava`]), a sshh12/multi_token training
//! output when it holds `non_lora_trainables.bin` or an LMM `config.json`
//! ([`multi_token`]), else a text-only model.
//!
//! An entry whose builder is a registered *text* modality
//! ([`multitoken_core::TextModalityBuilder`], e.g. `audio_whisper_transcript`)
//! has no projector: each of its tokens is replaced by the text of its k-th
//! item before tokenising ([`MultimodalModel::prepare_chat`] and friends).
//!
//! [`MultimodalModel::generate`] is the whole data flow of DESIGN.md: prepare ids
//! and spans, preprocess + encode + project every item, splice, then decode.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Tensor;
use multitoken_core::{
    build_modality, build_text_modality, encode_item, is_text_modality, project_item, span_embeddings, splice_embeddings,
    substitute_text_items, ChatTemplate, InputPreparer, Item, ItemsByKey, LanguageModel,
    LayoutSource, LeadingSpecialTokens, Message, Modality, ModalityContext, ModalityToken, PreparedInput,
    PreparerConfig, Projector, ProjectorSpec, TextModality,
};
use serde::{Deserialize, Serialize};

use crate::generate::{generate_at, GenerationOutput, GenerationParams};
use crate::loader::{load_model, LoadOptions, LoadedModel};
use crate::{Error, Result};

pub mod llava;
pub mod multi_token;

/// The file that makes a directory a multimodal model.
pub const MULTIMODAL_CONFIG_FILE: &str = "multitoken.json";
/// The file holding every projector's weights.
pub const PROJECTORS_FILE: &str = "projectors.safetensors";

/// `multitoken.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MultimodalConfig {
    /// The LM checkpoint, relative to the model directory; `None` = the directory itself.
    #[serde(default)]
    pub base_model: Option<String>,
    /// Built-in chat template to use when the LM ships none (e.g. `idefics2`).
    #[serde(default)]
    pub chat_template: Option<String>,
    /// The modalities, in the order their spans are indexed.
    #[serde(default)]
    pub modalities: Vec<ModalityEntry>,
    /// Chat prompts start with the tokenizer's BOS (added once if the template
    /// does not write it), as processors that tokenise the rendered chat like
    /// any text do (Idefics2); by default only what the template writes.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub chat_adds_bos: bool,
}

/// One modality of `multitoken.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModalityEntry {
    /// Registry name of the builder (`vision_clip`, `audio_whisper`, ...).
    pub builder: String,
    /// The builder's own settings.
    #[serde(default)]
    pub config: serde_json::Value,
    /// The projector from encoder features to LM embeddings. Left out, it is
    /// the modality's own [`Modality::projector`]; given, it must equal that
    /// (a text modality has none: the field is ignored there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub projector: Option<ProjectorSpec>,
    /// Key prefix of this projector in `projectors.safetensors`.
    #[serde(default)]
    pub projector_prefix: Option<String>,
}

impl ModalityEntry {
    /// The projector of this entry's built `modality`: the modality's own
    /// [`Modality::projector`] when the entry names none, else the entry's,
    /// which must then equal the modality's (one source of truth: a
    /// disagreement is an error naming the modality and both specs).
    pub fn projector_for(&self, modality: &dyn Modality) -> Result<ProjectorSpec> {
        let own = modality.projector();
        match self.projector {
            None => Ok(own),
            Some(spec) if spec == own => Ok(spec),
            Some(spec) => Err(Error::Msg(format!(
                "modality `{}`: multitoken.json names the projector `{spec}` but the modality's projector() is `{own}`; \
                 leave `projector` out of the entry (the modality's is the default) or change the modality's config",
                self.builder
            ))),
        }
    }

    /// The projector's key prefix (multi_token's `{name}_lmm_projector` by default).
    pub fn prefix(&self) -> String {
        self.projector_prefix.clone().unwrap_or_else(|| format!("{}_lmm_projector", self.builder))
    }
}

/// A modality with the projector that maps its features into the LM.
pub struct ModalityRuntime {
    /// The encoder side (shared with the preparers, which ask it for layouts).
    pub modality: Arc<dyn Modality>,
    /// Features `[n, width, feature_dim]` to embeddings `[n, token_width, hidden]`.
    pub projector: Projector,
}

/// A checkpoint family that loads from the directory its own library writes
/// (Idefics2, Cephalo's MoE, ...), registered with `inventory::submit!` by the
/// crate that implements it (multitoken-vlm), so this crate names none of them.
pub struct MultimodalImporter {
    /// The family, for messages (`idefics2`).
    pub name: &'static str,
    /// Whether `dir` is a checkpoint of this family (cheap: reads `config.json`).
    pub detect: fn(dir: &Path) -> bool,
    /// Loads the LM, the modalities and, when the checkpoint ships one or the
    /// family has a built-in fallback, the chat template.
    pub load: fn(dir: &Path, opts: &LoadOptions) -> Result<ImportedModel>,
    /// Rewrites the checkpoint as a `multitoken.json` directory at `out`, so
    /// that training and `moe build` work on it with our own layout.
    pub export: fn(dir: &Path, out: &Path) -> Result<()>,
}

multitoken_core::inventory::collect!(MultimodalImporter);

/// What a [`MultimodalImporter`] loads.
pub struct ImportedModel {
    /// The language model.
    pub lm: LoadedModel,
    /// The modalities with their projectors.
    pub modalities: Vec<ModalityRuntime>,
    /// A chat template that overrides the LM's (e.g. the processor's).
    pub template: Option<ChatTemplate>,
    /// How chat prompts get the tokenizer's leading special tokens: a family
    /// whose processor tokenises the rendered chat like any text (Idefics2:
    /// `processor(text=apply_chat_template(...))`) adds the BOS once if the
    /// template did not write it; `TemplateOnly` is `apply_chat_template`'s own
    /// tokenisation.
    pub chat_leading_special_tokens: LeadingSpecialTokens,
}

/// The registered importer that recognises `dir`, if any.
pub fn find_importer(dir: &Path) -> Option<&'static MultimodalImporter> {
    multitoken_core::inventory::iter::<MultimodalImporter>.into_iter().find(|importer| (importer.detect)(dir))
}

/// Where imported checkpoints are rewritten for training and `moe build`:
/// `${MULTITOKEN_WEIGHTS:-$HOME/.cache/multitoken}/imports`.
pub fn imports_dir() -> PathBuf {
    let base = std::env::var_os("MULTITOKEN_WEIGHTS")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache/multitoken")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("imports")
}

/// When `dir` is a checkpoint a registered importer reads, rewrites it as a
/// `multitoken.json` directory under `work` (`work/{hash of dir's config}`,
/// reused when present) and returns that directory; else `None`.
pub fn export_imported(dir: &Path, work: &Path) -> Result<Option<PathBuf>> {
    let Some(importer) = find_importer(dir) else {
        return Ok(None);
    };
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    // Bumped when an export's layout changes, so older rewrites are not reused.
    "export-2".hash(&mut hasher);
    dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf()).hash(&mut hasher);
    for file in ["config.json", "model.safetensors.index.json"] {
        std::fs::read(dir.join(file)).unwrap_or_default().hash(&mut hasher);
    }
    std::fs::metadata(dir.join("model.safetensors")).map(|m| m.len()).unwrap_or(0).hash(&mut hasher);
    let out = work.join(format!("{}-{:016x}", importer.name, hasher.finish()));
    if out.join(MULTIMODAL_CONFIG_FILE).is_file() {
        return Ok(Some(out));
    }
    let partial = work.join(format!(".partial-{}-{:016x}", importer.name, hasher.finish()));
    let _ = std::fs::remove_dir_all(&partial);
    std::fs::create_dir_all(&partial).map_err(|source| Error::Io { path: partial.clone(), source })?;
    (importer.export)(dir, &partial)?;
    let _ = std::fs::remove_dir_all(&out);
    std::fs::rename(&partial, &out).map_err(|source| Error::Io { path: out.clone(), source })?;
    Ok(Some(out))
}

/// A decoder LM with its modalities, ready to prepare, embed and generate.
pub struct MultimodalModel {
    /// The language model and what came with its checkpoint.
    pub lm: LoadedModel,
    /// The modalities; a span's `modality` index points into this list.
    pub modalities: Vec<ModalityRuntime>,
    /// Text modalities: tokens replaced by text before tokenising.
    text_modalities: Vec<Box<dyn TextModality>>,
    template: ChatTemplate,
    chat_leading: LeadingSpecialTokens,
    chat_preparer: InputPreparer,
    raw_preparer: InputPreparer,
}

impl MultimodalModel {
    /// Loads a model directory or file: multimodal when it has `multitoken.json`
    /// or is a llava-hf checkpoint or a multi_token output, a text-only LM otherwise.
    pub fn load(path: &Path, opts: &LoadOptions) -> Result<Self> {
        let config_path = path.join(MULTIMODAL_CONFIG_FILE);
        if path.is_dir() && !config_path.is_file() {
            if let Some(importer) = find_importer(path) {
                let imported = (importer.load)(path, opts)?;
                let mut model = Self::from_parts(imported.lm, imported.modalities, imported.template)?;
                model.set_chat_leading_special_tokens(imported.chat_leading_special_tokens)?;
                return Ok(model);
            }
        }
        if path.is_dir() && !config_path.is_file() && llava::is_llava_dir(path) {
            let (lm, modalities) = llava::load_llava(path, opts)?;
            return Self::from_parts(lm, modalities, None);
        }
        if path.is_dir() && !config_path.is_file() && multi_token::is_multi_token_dir(path) {
            let (lm, modalities) = multi_token::load_multi_token(path, opts)?;
            return Self::from_parts(lm, modalities, None);
        }
        if !path.is_dir() || !config_path.is_file() {
            let lm = load_model(path, opts)?;
            return Self::from_parts(lm, Vec::new(), None);
        }
        let config = read_config(&config_path)?;
        let lm_path = match &config.base_model {
            Some(base) => resolve(path, base),
            None => path.to_path_buf(),
        };
        let lm = load_model(&lm_path, opts)?;
        let modalities = load_modalities(path, &config, &lm, opts)?;
        let template = match &config.chat_template {
            Some(name) if lm.chat_template.is_none() => Some(builtin_template(name, &lm)?),
            _ => None,
        };
        let mut model = Self::from_parts(lm, modalities, template)?;
        if config.chat_adds_bos {
            model.set_chat_leading_special_tokens(LeadingSpecialTokens::AddOnceIfMissing)?;
        }
        let context = opts.modality_context(path);
        for modality in load_text_modalities(path, &config.modalities, &context)? {
            model.add_text_modality(modality)?;
        }
        Ok(model)
    }

    /// Assembles a model from a loaded LM and modalities built elsewhere (from
    /// Rust, or by an importer). `template` overrides the LM's own chat template.
    pub fn from_parts(
        lm: LoadedModel,
        modalities: Vec<ModalityRuntime>,
        template: Option<ChatTemplate>,
    ) -> Result<Self> {
        let template = match template {
            Some(t) => t,
            None => default_template(&lm)?,
        };
        for runtime in &modalities {
            check_projector(runtime, lm.model.hidden_size())?;
            // A wider item never fits the context; refused at load, before a
            // prompt allocates its placeholders (`token_width: 1e9` aborted).
            let (width, context) = (runtime.modality.token_width(), lm.model.max_context());
            if width > context {
                return Err(Error::Msg(format!(
                    "modality `{}`: token_width {width} is more than the LM's context of {context} positions",
                    runtime.modality.name()
                )));
            }
        }
        check_unique_tokens(&modalities)?;
        let chat_leading = LeadingSpecialTokens::TemplateOnly;
        let (chat_preparer, raw_preparer) = build_preparers(&lm, &modalities, &template, chat_leading)?;
        Ok(Self { lm, modalities, text_modalities: Vec::new(), template, chat_leading, chat_preparer, raw_preparer })
    }

    /// How chat prompts get the tokenizer's leading special tokens (see
    /// [`ImportedModel::chat_leading_special_tokens`]); `TemplateOnly` by default.
    pub fn set_chat_leading_special_tokens(&mut self, leading: LeadingSpecialTokens) -> Result<()> {
        self.chat_leading = leading;
        let (chat_preparer, raw_preparer) = build_preparers(&self.lm, &self.modalities, &self.template, leading)?;
        self.chat_preparer = chat_preparer;
        self.raw_preparer = raw_preparer;
        Ok(())
    }

    /// Adds a text modality (its tokens are replaced by its items' text before
    /// tokenising). Its token and data key must differ from every other modality's.
    pub fn add_text_modality(&mut self, modality: Box<dyn TextModality>) -> Result<()> {
        let clash = self
            .modalities
            .iter()
            .map(|m| (m.modality.name(), m.modality.token(), m.modality.data_key()))
            .chain(self.text_modalities.iter().map(|m| (m.name(), m.token(), m.data_key())))
            .find(|(_, token, key)| *token == modality.token() || *key == modality.data_key());
        if let Some((name, token, key)) = clash {
            return Err(Error::Msg(format!(
                "text modality `{}` ({} / {}) clashes with modality `{name}` ({token} / {key})",
                modality.name(),
                modality.token(),
                modality.data_key()
            )));
        }
        self.text_modalities.push(modality);
        Ok(())
    }

    /// The text modalities, in the order they were added.
    pub fn text_modalities(&self) -> impl Iterator<Item = &dyn TextModality> {
        self.text_modalities.iter().map(|m| m.as_ref())
    }

    /// `messages` and `items` with every text modality's tokens replaced by its
    /// items' text (those items removed); `None` when the model has no text modality.
    pub fn substitute_text(&self, messages: &[Message], items: &ItemsByKey) -> Result<Option<(Vec<Message>, ItemsByKey)>> {
        if self.text_modalities.is_empty() {
            return Ok(None);
        }
        let (mut messages, mut items) = (messages.to_vec(), items.clone());
        let modalities: Vec<&dyn TextModality> = self.text_modalities().collect();
        substitute_text_items(&mut messages, &mut items, &modalities)?;
        Ok(Some((messages, items)))
    }

    /// Replaces the chat template (e.g. a built-in one, or jinja from a file).
    pub fn set_chat_template(&mut self, template: ChatTemplate) -> Result<()> {
        let (chat_preparer, raw_preparer) = build_preparers(&self.lm, &self.modalities, &template, self.chat_leading)?;
        self.template = template;
        self.chat_preparer = chat_preparer;
        self.raw_preparer = raw_preparer;
        Ok(())
    }

    /// The chat template in use.
    pub fn template(&self) -> &ChatTemplate {
        &self.template
    }

    /// The language model.
    pub fn language_model(&self) -> &dyn LanguageModel {
        self.lm.model.as_ref()
    }

    /// The modality tokens this model reads, e.g. `["<image>", "<speech>"]`.
    pub fn modality_tokens(&self) -> Vec<&str> {
        self.modalities.iter().map(|m| m.modality.token()).collect()
    }

    /// The modality reading items under `data_key`, with its index.
    pub fn modality_for_key(&self, data_key: &str) -> Option<(usize, &ModalityRuntime)> {
        self.modalities.iter().enumerate().find(|(_, m)| m.modality.data_key() == data_key)
    }

    /// Ids and spans of a chat rendered with the model's template plus the
    /// opening of the assistant turn.
    pub fn prepare_chat(&self, messages: &[Message], items: &ItemsByKey) -> Result<PreparedInput> {
        if let Some((messages, items)) = self.substitute_text(messages, items)? {
            return Ok(self.chat_preparer.prepare_generation(&messages, &items)?);
        }
        Ok(self.chat_preparer.prepare_generation(messages, items)?)
    }

    /// Ids, labels (assistant turns) and spans of a training row, after text
    /// modalities' substitution.
    pub fn prepare_training(&self, messages: &[Message], items: &ItemsByKey) -> Result<PreparedInput> {
        if let Some((messages, items)) = self.substitute_text(messages, items)? {
            return Ok(self.chat_preparer.prepare_training(&messages, &items)?);
        }
        Ok(self.chat_preparer.prepare_training(messages, items)?)
    }

    /// Ids and spans of a raw prompt (tokenizer's special tokens, no template).
    pub fn prepare_raw(&self, text: &str, items: &ItemsByKey) -> Result<PreparedInput> {
        if let Some((messages, items)) = self.substitute_text(&[Message::user(text)], items)? {
            let text = messages.into_iter().next().map(|m| m.content).unwrap_or_default();
            return Ok(self.raw_preparer.prepare_text(&text, &items)?);
        }
        Ok(self.raw_preparer.prepare_text(text, items)?)
    }

    /// The preparer for training rows (labels on assistant turns).
    pub fn chat_preparer(&self) -> &InputPreparer {
        &self.chat_preparer
    }

    /// Preprocesses, encodes and projects one item of modality `index` whose
    /// layout has `slots` slots: its rows `[slots, hidden]` in the LM dtype.
    pub fn project_item(&self, index: usize, item_index: usize, item: &Item, slots: usize) -> Result<Tensor> {
        let runtime = self
            .modalities
            .get(index)
            .ok_or_else(|| Error::Msg(format!("no modality with index {index}")))?;
        let modality = runtime.modality.as_ref();
        let describe = || format!("{} item {} ({})", modality.data_key(), item_index + 1, describe_item(item));
        let pieces = encode_item(modality, item)
            .map_err(|e| Error::Msg(format!("{}: modality `{}`: {e}", describe(), modality.name())))?;
        for piece in &pieces {
            as_feature_batch(piece, modality)?;
        }
        project_item(&runtime.projector, &pieces, self.lm.model.dtype(), slots).map_err(|e| {
            Error::Msg(format!("{}: modality `{}` with projector `{}`: {e}", describe(), modality.name(), runtime.projector.spec()))
        })
    }

    /// Input embeddings `[1, seq, hidden]` of a prepared row: token embeddings
    /// with every item's projected rows spliced in at its spans.
    pub fn embed(&self, prepared: &PreparedInput, items: &ItemsByKey) -> Result<Tensor> {
        self.embed_while(prepared, items, &|| true)
    }

    /// [`MultimodalModel::embed`] that asks `keep_going` before each item
    /// (preprocessing and encoding an item is the costly part) and stops with
    /// an error once it says no: a server stops the work of a request whose
    /// client left or whose deadline passed.
    pub fn embed_while(&self, prepared: &PreparedInput, items: &ItemsByKey, keep_going: &dyn Fn() -> bool) -> Result<Tensor> {
        let lm = self.lm.model.as_ref();
        let ids = Tensor::new(prepared.input_ids.as_slice(), lm.device())?.unsqueeze(0)?;
        let token_embeds = lm.embed_tokens(&ids)?;
        if prepared.spans.is_empty() {
            return Ok(token_embeds);
        }
        let mut projected = Vec::with_capacity(self.modalities.len());
        for (index, runtime) in self.modalities.iter().enumerate() {
            let given = items.get(runtime.modality.data_key()).map(Vec::as_slice).unwrap_or(&[]);
            // Truncation may have dropped trailing items; encode only those still spliced.
            let slots = item_slots(prepared, index, given.len());
            let rows = slots
                .iter()
                .enumerate()
                .map(|(k, &slots)| {
                    if !keep_going() {
                        return Err(Error::Msg("stopped before encoding every item".into()));
                    }
                    self.project_item(index, k, &given[k], slots)
                })
                .collect::<Result<Vec<_>>>()?;
            projected.push(rows);
        }
        let spans = span_embeddings(&prepared.spans, &projected)?;
        Ok(splice_embeddings(&token_embeds, &[spans])?)
    }

    /// Generates a reply to a prepared row, streaming text through `on_text`.
    pub fn generate(
        &self,
        prepared: &PreparedInput,
        items: &ItemsByKey,
        params: &GenerationParams,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<GenerationOutput> {
        // The preparer cut the prompt to the context: report its real length
        // (generation would have reported the cut one), before any item is encoded.
        if let Some(full) = prepared.truncated_from {
            return Err(Error::Msg(format!(
                "the prompt has {full} tokens, which leaves no room in the model's context of {}",
                self.lm.model.max_context()
            )));
        }
        let embeds = self.embed(prepared, items)?;
        let positions = self.positions(prepared)?;
        generate_at(self.lm.model.as_ref(), &self.lm.tokenizer, &embeds, &prepared.input_ids, positions.as_ref(), params, on_text)
    }

    /// The `[3, 1, len]` M-RoPE positions of a prepared row when the LM reads
    /// them and an item of the row has a position grid (Qwen2-VL images);
    /// `None` otherwise (plain positions are then right).
    pub fn positions(&self, prepared: &PreparedInput) -> Result<Option<Tensor>> {
        let lm = self.lm.model.as_ref();
        if !lm.takes_positions() || !prepared.has_position_grids() {
            return Ok(None);
        }
        Ok(Some(prepared.rope_positions().to_tensor(lm.device())?))
    }

}

/// The chat preparer (template writes any BOS, as transformers'
/// `apply_chat_template`) and the raw one (the tokenizer's own special tokens, as
/// `tokenizer(text)`).
fn build_preparers(
    lm: &LoadedModel,
    modalities: &[ModalityRuntime],
    template: &ChatTemplate,
    chat_leading: LeadingSpecialTokens,
) -> Result<(InputPreparer, InputPreparer)> {
    let tokens: Vec<ModalityToken> = modalities.iter().map(|m| ModalityToken::of(m.modality.as_ref())).collect();
    let layouts: Arc<dyn LayoutSource> = Arc::new(modalities.iter().map(|m| Arc::clone(&m.modality)).collect::<Vec<_>>());
    let preparer = |leading| {
        Ok::<_, Error>(InputPreparer::new(
            lm.tokenizer.clone(),
            template.clone(),
            tokens.clone(),
            PreparerConfig {
                placeholder_id: lm.special_tokens.pad_token_id.unwrap_or(0),
                model_max_length: Some(lm.model.max_context()),
                leading_special_tokens: leading,
            },
        )?
        .with_layouts(Arc::clone(&layouts)))
    };
    Ok((preparer(chat_leading)?, preparer(LeadingSpecialTokens::AddOnce)?))
}

/// Reads and validates `multitoken.json`.
pub fn read_config(path: &Path) -> Result<MultimodalConfig> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
    serde_json::from_str(&text).map_err(|e| Error::Config { path: path.to_path_buf(), message: e.to_string() })
}

fn resolve(dir: &Path, relative: &str) -> PathBuf {
    let path = Path::new(relative);
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        dir.join(path)
    }
}

/// Builds the text modalities among `multitoken.json`'s `entries` (the others are skipped).
pub fn load_text_modalities(dir: &Path, entries: &[ModalityEntry], context: &ModalityContext) -> Result<Vec<Box<dyn TextModality>>> {
    entries
        .iter()
        .filter(|entry| is_text_modality(&entry.builder))
        .map(|entry| {
            build_text_modality(&entry.builder, &entry.config, context).map_err(|e| {
                Error::Msg(format!("{}: text modality `{}`: {e}", dir.join(MULTIMODAL_CONFIG_FILE).display(), entry.builder))
            })
        })
        .collect()
}

fn load_modalities(
    dir: &Path,
    config: &MultimodalConfig,
    lm: &LoadedModel,
    opts: &LoadOptions,
) -> Result<Vec<ModalityRuntime>> {
    if config.modalities.iter().all(|entry| is_text_modality(&entry.builder)) {
        return Ok(Vec::new());
    }
    let projectors_path = dir.join(PROJECTORS_FILE);
    if !projectors_path.is_file() {
        return Err(Error::Io {
            path: projectors_path,
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "the projector weights are missing"),
        });
    }
    // The projectors run in the LM's dtype (f32 under `--dtype bf16` on the CPU,
    // whose linears alone are bf16: `LoadOptions::cpu_bf16`).
    // SAFETY: the file is memory-mapped read-only; like every mmap-based loader we
    // rely on nobody truncating it while the model is alive.
    let vb = unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(&[&projectors_path], opts.tensor_dtype(), &opts.device)
    }
    .map_err(|e| Error::Msg(format!("{}: {e}", projectors_path.display())))?;
    let context = opts.modality_context(dir);
    let hidden = lm.model.hidden_size();
    config
        .modalities
        .iter()
        .filter(|entry| !is_text_modality(&entry.builder))
        .map(|entry| {
            let modality = build_modality(&entry.builder, &entry.config, &context)
                .map_err(|e| Error::Msg(format!("{}: modality `{}`: {e}", dir.join(MULTIMODAL_CONFIG_FILE).display(), entry.builder)))?;
            let spec = entry.projector_for(modality.as_ref()).map_err(|e| Error::Msg(format!("{}: {e}", dir.join(MULTIMODAL_CONFIG_FILE).display())))?;
            let projector = Projector::load(spec, modality.feature_dim(), hidden, vb.pp(entry.prefix()))
                .map_err(|e| {
                    Error::Msg(format!("{}: projector `{}` of `{}`: {e}", projectors_path.display(), entry.prefix(), entry.builder))
                })?;
            Ok(ModalityRuntime { modality: Arc::from(modality), projector })
        })
        .collect()
}

/// Slots of each item of modality `index` still spliced into `prepared` (the
/// first ones: truncation drops trailing items whole), from its spans.
pub fn item_slots(prepared: &PreparedInput, index: usize, given: usize) -> Vec<usize> {
    let mut slots: Vec<usize> = Vec::new();
    for span in prepared.spans.iter().filter(|s| s.modality == index && s.item_index < given) {
        if slots.len() <= span.item_index {
            slots.resize(span.item_index + 1, 0);
        }
        slots[span.item_index] += span.len;
    }
    slots
}

/// The LM's own template, else ChatML, with the tokenizer's BOS/EOS strings.
fn default_template(lm: &LoadedModel) -> Result<ChatTemplate> {
    let (bos, eos) = special_strings(lm);
    Ok(match &lm.chat_template {
        Some(source) => ChatTemplate::new(format!("{} chat_template", lm.name), source.clone(), bos, eos)?,
        None => ChatTemplate::builtin("chatml")?.with_special_tokens(bos, eos),
    })
}

/// A built-in template with the LM's BOS/EOS strings.
pub fn builtin_template(name: &str, lm: &LoadedModel) -> Result<ChatTemplate> {
    let (bos, eos) = special_strings(lm);
    Ok(ChatTemplate::builtin(name)?.with_special_tokens(bos, eos))
}

/// The chat template a command line names (`--chat-template`): a jinja file
/// when `spec` is one, else a built-in name (chatml, mistral, llama2, idefics2,
/// phi2), with the LM's BOS/EOS strings. `generate`, `chat` and `serve` share it.
pub fn template_from_spec(spec: &str, lm: &LoadedModel) -> Result<ChatTemplate> {
    let path = Path::new(spec);
    // Built-in names have no dot or slash: anything else is a file, and a missing
    // one is reported as such, not as an unknown built-in name.
    if spec.contains(['/', '\\', '.']) || path.exists() {
        let io = |source| Error::Io { path: path.to_path_buf(), source };
        multitoken_core::check_regular_file(path).map_err(io)?;
        let source = std::fs::read_to_string(path).map_err(io)?;
        let (bos, eos) = special_strings(lm);
        return Ok(ChatTemplate::new(spec.to_string(), source, bos, eos)?);
    }
    builtin_template(spec, lm)
}

fn special_strings(lm: &LoadedModel) -> (String, String) {
    let bos = lm.special_tokens.bos_token.clone().unwrap_or_default();
    let eos = lm.special_tokens.eos_token.clone().unwrap_or_default();
    (bos, eos)
}

/// Every modality's token and data key must be its own: two modalities
/// reading `<image>` would make every prompt ambiguous.
fn check_unique_tokens(modalities: &[ModalityRuntime]) -> Result<()> {
    for (i, a) in modalities.iter().enumerate() {
        for b in &modalities[..i] {
            let (a, b) = (a.modality.as_ref(), b.modality.as_ref());
            if a.token() == b.token() {
                return Err(Error::Msg(format!(
                    "modality `{}` uses the token {} that modality `{}` already uses; each modality needs its own token",
                    a.name(),
                    a.token(),
                    b.name()
                )));
            }
            if a.data_key() == b.data_key() {
                return Err(Error::Msg(format!(
                    "modality `{}` reads items under `{}` as modality `{}` already does; each modality needs its own data key",
                    a.name(),
                    a.data_key(),
                    b.name()
                )));
            }
        }
    }
    Ok(())
}

fn check_projector(runtime: &ModalityRuntime, hidden: usize) -> Result<()> {
    let modality = runtime.modality.as_ref();
    // A vector projector emits a fixed number of positions whatever the
    // encoder gives: a fixed-width modality must occupy exactly those.
    if let ProjectorSpec::VectorMlp { num_tokens, .. } = runtime.projector.spec() {
        let width = modality.token_width();
        if width != num_tokens && width % num_tokens.max(1) != 0 {
            return Err(Error::Msg(format!(
                "modality `{}`: its projector `{}` outputs {num_tokens} positions per piece but token_width() is {width}",
                modality.name(),
                runtime.projector.spec()
            )));
        }
    }
    if runtime.projector.hidden_size() != hidden {
        return Err(Error::Msg(format!(
            "the projector of `{}` outputs width {} but the LM's hidden size is {hidden}",
            modality.name(),
            runtime.projector.hidden_size()
        )));
    }
    if runtime.projector.feature_dim() != modality.feature_dim() {
        return Err(Error::Msg(format!(
            "the projector of `{}` reads width {} but the encoder gives {}",
            modality.name(),
            runtime.projector.feature_dim(),
            modality.feature_dim()
        )));
    }
    Ok(())
}

/// Encoder output as `[n, width, feature_dim]` (a pooled `[n, feature_dim]` is
/// kept as is: the vector projector reads it).
fn as_feature_batch(features: &Tensor, modality: &dyn Modality) -> Result<Tensor> {
    let last = features.dims().last().copied().unwrap_or(0);
    if last != modality.feature_dim() {
        return Err(Error::Msg(format!(
            "modality `{}` encoded features of shape {:?}, expected a last dimension of {}",
            modality.name(),
            features.dims(),
            modality.feature_dim()
        )));
    }
    Ok(features.clone())
}

fn describe_item(item: &Item) -> String {
    match item {
        Item::Path(path) => path.display().to_string(),
        Item::Bytes(bytes) => format!("{} bytes", bytes.len()),
        Item::Text(text) => format!("{} characters of text", text.chars().count()),
    }
}
