//! Hugging Face model directories: `config.json` (llama, mistral, qwen2, phi),
//! safetensors weights, `tokenizer.json`, `tokenizer_config.json`,
//! `chat_template.jinja` / `chat_template.json` and `generation_config.json`.
//!
//! [`ConfigJson`] mirrors the union of the four families' `config.json` fields,
//! in both the transformers 4 layout (`rope_theta` + `rope_scaling`) and the 5
//! layout (`rope_parameters`), with transformers' defaults for absent fields;
//! [`parse_config`] turns it into a [`ModelConfig`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use crate::config::{Activation, Family, Llama3RopeScaling, ModelConfig, RopeStyle};
use crate::loader::{GenerationDefaults, LoadOptions, LoadedModel, SpecialTokens};
use crate::model::CausalLm;
use crate::weights::SafetensorsSource;
use crate::{Error, Result};

/// The `model_type` values we load.
pub const SUPPORTED_MODEL_TYPES: &[&str] = &["llama", "mistral", "qwen2", "phi"];

/// The fields of a llama / mistral / qwen2 / phi `config.json` that matter to us.
#[derive(Debug, Clone, Deserialize)]
pub struct ConfigJson {
    /// `llama`, `mistral`, `qwen2` or `phi`.
    pub model_type: Option<String>,
    /// e.g. `["LlamaForCausalLM"]`.
    #[serde(default)]
    pub architectures: Vec<String>,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Residual width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (defaults to `num_attention_heads`).
    pub num_key_value_heads: Option<usize>,
    /// Head width (defaults to `hidden_size / num_attention_heads`).
    pub head_dim: Option<usize>,
    /// Context length.
    pub max_position_embeddings: Option<usize>,
    /// RMSNorm epsilon (llama family).
    pub rms_norm_eps: Option<f64>,
    /// LayerNorm epsilon (phi).
    pub layer_norm_eps: Option<f64>,
    /// Activation name.
    pub hidden_act: Option<String>,
    /// Bias on q/k/v/o (llama).
    #[serde(default)]
    pub attention_bias: bool,
    /// Bias on the MLP (llama).
    #[serde(default)]
    pub mlp_bias: bool,
    /// Shared embedding / output matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// transformers 4: rotary base.
    pub rope_theta: Option<f64>,
    /// transformers 4: rotary scaling.
    pub rope_scaling: Option<RopeJson>,
    /// transformers 5: rotary base, type and scaling together.
    pub rope_parameters: Option<RopeJson>,
    /// phi (transformers 4 layout).
    pub partial_rotary_factor: Option<f64>,
    /// phi: layer norms on q and k (not supported).
    #[serde(default)]
    pub qk_layernorm: bool,
    /// mistral / qwen2: the attention window. Absent means mistral's default 4096.
    #[serde(default = "default_sliding_window")]
    pub sliding_window: Option<usize>,
    /// qwen2: whether `sliding_window` is used at all.
    #[serde(default)]
    pub use_sliding_window: bool,
    /// qwen2: layers below this index use full attention.
    pub max_window_layers: Option<usize>,
    /// qwen2 (transformers 5): `full_attention` / `sliding_attention` per layer.
    pub layer_types: Option<Vec<String>>,
    /// End-of-sequence id(s).
    pub eos_token_id: Option<TokenIds>,
    /// Beginning-of-sequence id (negative values, seen in old checkpoints, mean none).
    pub bos_token_id: Option<i64>,
    /// Padding id (negative values mean none).
    pub pad_token_id: Option<i64>,
}

fn default_sliding_window() -> Option<usize> {
    Some(4096)
}

/// `rope_parameters` / `rope_scaling`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RopeJson {
    /// `default`, `llama3`, ...
    pub rope_type: Option<String>,
    /// The transformers 4 spelling of `rope_type`.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// Rotary base.
    pub rope_theta: Option<f64>,
    /// Fraction of each head rotated.
    pub partial_rotary_factor: Option<f64>,
    /// llama3 `factor`.
    pub factor: Option<f64>,
    /// llama3 `low_freq_factor`.
    pub low_freq_factor: Option<f64>,
    /// llama3 `high_freq_factor`.
    pub high_freq_factor: Option<f64>,
    /// llama3 `original_max_position_embeddings`.
    pub original_max_position_embeddings: Option<usize>,
    /// Qwen2-VL: frequencies per position stream (temporal, height, width).
    pub mrope_section: Option<Vec<usize>>,
}

/// One id or a list of ids (`eos_token_id`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    /// A single id.
    One(i64),
    /// Several ids.
    Many(Vec<i64>),
}

impl TokenIds {
    /// As a list, dropping negative (meaning "none") entries.
    pub fn to_vec(&self) -> Vec<u32> {
        let ids: &[i64] = match self {
            TokenIds::One(id) => std::slice::from_ref(id),
            TokenIds::Many(ids) => ids,
        };
        ids.iter().filter_map(|&id| u32::try_from(id).ok()).collect()
    }
}

fn id(v: Option<i64>) -> Option<u32> {
    v.and_then(|v| u32::try_from(v).ok())
}

/// A parsed `config.json`: the runtime config plus what it does not cover.
#[derive(Debug, Clone)]
pub struct HfConfig {
    /// The runtime configuration.
    pub model: ModelConfig,
    /// Per-layer sliding windows when layers differ (qwen2 `layer_types`).
    pub layer_sliding_windows: Option<Vec<Option<usize>>>,
    /// The raw fields.
    pub raw: ConfigJson,
}

/// Read and interpret `config.json`.
pub fn parse_config(path: &Path) -> Result<HfConfig> {
    let text = read_text(path)?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::Config { path: path.to_path_buf(), message: format!("malformed JSON: {e}") })?;
    parse_config_value(value, path)
}

/// Interpret an already parsed `config.json` object (or a multimodal config's
/// `text_config`); `path` names it in errors.
pub fn parse_config_value(value: serde_json::Value, path: &Path) -> Result<HfConfig> {
    let cfg_err = |message: String| Error::Config { path: path.to_path_buf(), message };
    let model_type = value.get("model_type").and_then(|v| v.as_str()).map(str::to_string);
    let family = match model_type.as_deref() {
        Some("llama") => Family::Llama,
        Some("mistral") => Family::Mistral,
        Some("qwen2") => Family::Qwen2,
        // Qwen2-VL's text model: Qwen2 with M-RoPE (see `mrope`).
        Some("qwen2_vl_text") => Family::Qwen2,
        Some("phi") => Family::Phi2,
        other => {
            let what = match other {
                Some(t) => format!("unsupported model_type `{t}`"),
                None => "no model_type".to_string(),
            };
            return Err(cfg_err(format!(
                "{what}; supported model types: {}",
                SUPPORTED_MODEL_TYPES.join(", ")
            )));
        }
    };
    let raw: ConfigJson = serde_json::from_value(value).map_err(|e| cfg_err(e.to_string()))?;
    if model_type.as_deref() == Some("qwen2_vl_text") {
        return interpret_qwen2_vl_text(raw).map_err(cfg_err);
    }
    interpret(family, raw).map_err(cfg_err)
}

/// Qwen2-VL's `text_config` (`Qwen2VLTextConfig`): a Qwen2 decoder whose head
/// width is always `hidden_size / num_attention_heads` (its attention ignores
/// `head_dim`), with rotary type `mrope` meaning `default`, and M-RoPE
/// sections from `rope_parameters` / `rope_scaling` (`[16, 24, 24]` when
/// absent, as `Qwen2VLRotaryEmbedding`), base 1e6 by default.
fn interpret_qwen2_vl_text(mut raw: ConfigJson) -> std::result::Result<HfConfig, String> {
    if raw.num_attention_heads == 0 {
        return Err("num_attention_heads is 0".into());
    }
    raw.head_dim = Some(raw.hidden_size / raw.num_attention_heads);
    raw.rms_norm_eps = Some(raw.rms_norm_eps.unwrap_or(1e-5));
    raw.max_position_embeddings = Some(raw.max_position_embeddings.unwrap_or(32768));
    raw.max_window_layers = Some(raw.max_window_layers.unwrap_or(80));
    let mut rope = raw.rope_parameters.clone().or_else(|| raw.rope_scaling.clone()).unwrap_or_default();
    let kind = rope.rope_type.clone().or_else(|| rope.kind.clone());
    if kind.as_deref() == Some("mrope") {
        rope.rope_type = Some("default".into());
        rope.kind = None;
    }
    rope.rope_theta = Some(rope.rope_theta.or(raw.rope_theta).unwrap_or(1_000_000.0));
    let section = rope.mrope_section.clone().unwrap_or_else(|| vec![16, 24, 24]);
    raw.rope_parameters = Some(rope);
    let mut parsed = interpret(Family::Qwen2, raw)?;
    let half = parsed.model.head_dim / 2;
    match section.as_slice() {
        &[t, h, w] if t + h + w == half => parsed.model.mrope_section = Some([t, h, w]),
        other => {
            return Err(format!(
                "mrope_section {other:?} must be three numbers adding up to head_dim / 2 = {half}"
            ))
        }
    }
    Ok(parsed)
}

/// Turn the raw fields into a [`ModelConfig`] the way transformers reads them.
fn interpret(family: Family, raw: ConfigJson) -> std::result::Result<HfConfig, String> {
    if raw.num_attention_heads == 0 {
        return Err("num_attention_heads is 0".into());
    }
    let head_dim = raw.head_dim.unwrap_or(raw.hidden_size / raw.num_attention_heads);
    let rope = raw.rope_parameters.clone().or_else(|| raw.rope_scaling.clone()).unwrap_or_default();
    let rope_type = rope.rope_type.clone().or_else(|| rope.kind.clone()).unwrap_or_else(|| "default".into());
    let max_pos = raw.max_position_embeddings.unwrap_or(2048);
    let rope_scaling = match rope_type.as_str() {
        "default" => None,
        "llama3" => {
            let need = |v: Option<f64>, name: &str| v.ok_or(format!("llama3 rope scaling without `{name}`"));
            Some(Llama3RopeScaling {
                factor: need(rope.factor, "factor")?,
                low_freq_factor: need(rope.low_freq_factor, "low_freq_factor")?,
                high_freq_factor: need(rope.high_freq_factor, "high_freq_factor")?,
                original_max_position_embeddings: rope.original_max_position_embeddings.unwrap_or(max_pos),
            })
        }
        other => return Err(format!("rope type `{other}` is not supported (supported: default, llama3)")),
    };
    let rope_theta = rope.rope_theta.or(raw.rope_theta).unwrap_or(10_000.0);
    let partial_rotary_factor = match family {
        Family::Phi2 => rope.partial_rotary_factor.or(raw.partial_rotary_factor).unwrap_or(0.5),
        _ => rope.partial_rotary_factor.or(raw.partial_rotary_factor).unwrap_or(1.0),
    };
    let default_act = if family == Family::Phi2 { "gelu_new" } else { "silu" };
    let hidden_act = activation(raw.hidden_act.as_deref().unwrap_or(default_act))?;
    if raw.qk_layernorm {
        return Err("phi with qk_layernorm is not supported".into());
    }

    let n = raw.num_hidden_layers;
    let mut layer_windows: Option<Vec<Option<usize>>> = None;
    let sliding_window = match family {
        Family::Mistral => raw.sliding_window,
        Family::Qwen2 => {
            let window = if raw.use_sliding_window { raw.sliding_window } else { None };
            let windows: Vec<Option<usize>> = match (&raw.layer_types, window) {
                (_, None) => vec![None; n],
                (Some(types), Some(w)) => {
                    if types.len() != n {
                        return Err(format!("layer_types has {} entries for {n} layers", types.len()));
                    }
                    types.iter().map(|t| (t == "sliding_attention").then_some(w)).collect()
                }
                (None, Some(w)) => {
                    let first = raw.max_window_layers.unwrap_or(28);
                    (0..n).map(|i| (i >= first).then_some(w)).collect()
                }
            };
            let first = windows.first().copied().flatten();
            if windows.iter().all(|w| *w == first) {
                first
            } else {
                layer_windows = Some(windows);
                None
            }
        }
        Family::Llama | Family::Phi2 => None,
    };
    let (qkv_bias, o_bias, mlp_bias) = match family {
        Family::Llama => (raw.attention_bias, raw.attention_bias, raw.mlp_bias),
        Family::Mistral => (false, false, false),
        Family::Qwen2 => (true, false, false),
        Family::Phi2 => (true, true, true),
    };
    let norm_eps = match family {
        Family::Phi2 => raw.layer_norm_eps.unwrap_or(1e-5),
        Family::Qwen2 => raw.rms_norm_eps.unwrap_or(1e-6),
        _ => raw.rms_norm_eps.unwrap_or(1e-6),
    };
    let model = ModelConfig {
        family,
        vocab_size: raw.vocab_size,
        hidden_size: raw.hidden_size,
        intermediate_size: raw.intermediate_size,
        num_layers: n,
        num_heads: raw.num_attention_heads,
        num_kv_heads: raw.num_key_value_heads.unwrap_or(raw.num_attention_heads),
        head_dim,
        max_position_embeddings: max_pos,
        rope_theta,
        rope_scaling,
        rope_style: RopeStyle::Half,
        partial_rotary_factor,
        norm_eps,
        hidden_act,
        qkv_bias,
        o_bias,
        mlp_bias,
        sliding_window,
        tie_word_embeddings: raw.tie_word_embeddings,
        mrope_section: None,
    };
    Ok(HfConfig { model, layer_sliding_windows: layer_windows, raw })
}

fn activation(name: &str) -> std::result::Result<Activation, String> {
    match name {
        "silu" | "swish" => Ok(Activation::Silu),
        "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Activation::GeluTanh),
        "gelu" => Ok(Activation::Gelu),
        other => Err(format!(
            "hidden_act `{other}` is not supported (supported: silu, gelu, gelu_new, gelu_pytorch_tanh)"
        )),
    }
}

/// Load an HF model directory: config, weights, tokenizer, chat template,
/// special tokens and generation defaults.
pub fn load_hf_dir(dir: &Path, opts: &LoadOptions) -> Result<LoadedModel> {
    if !dir.is_dir() {
        return Err(Error::Io {
            path: dir.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "not a model directory"),
        });
    }
    let cfg = parse_config(&dir.join("config.json"))?;
    let weights = SafetensorsSource::from_dir(dir, opts.tensor_dtype(), &opts.device)?;
    opts.with_lm_weights(&weights, |source| load_hf_dir_with(dir, &cfg, source))
}

/// Like [`load_hf_dir`] with the config and the weights given (e.g. a
/// multimodal checkpoint's `text_config` and its LM tensors under renamed
/// keys); the tokenizer and generation files are read from `dir`.
pub fn load_hf_dir_with(dir: &Path, cfg: &HfConfig, weights: &dyn crate::weights::WeightSource) -> Result<LoadedModel> {
    let mut model = CausalLm::load(&cfg.model, weights)?;
    if let Some(windows) = &cfg.layer_sliding_windows {
        model.set_layer_sliding_windows(windows)?;
    }

    let tokenizer_path = dir.join("tokenizer.json");
    if !tokenizer_path.is_file() {
        return Err(Error::Io {
            path: tokenizer_path,
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "the model directory has no tokenizer.json"),
        });
    }
    let tokenizer = tokenizers::Tokenizer::from_file(&tokenizer_path)
        .map_err(|e| Error::Tokenizer(format!("{}: {e}", tokenizer_path.display())))?;

    let tok_cfg = read_optional_json::<TokenizerConfigJson>(&dir.join("tokenizer_config.json"))?.unwrap_or_default();
    let gen_cfg = read_optional_json::<GenerationConfigJson>(&dir.join("generation_config.json"))?.unwrap_or_default();
    let chat_template = processor_chat_template(dir)?.or_else(|| tok_cfg.chat_template());

    let bos_token = tok_cfg.bos_token.as_ref().and_then(AddedToken::content);
    let eos_token = tok_cfg.eos_token.as_ref().and_then(AddedToken::content);
    let pad_token = tok_cfg.pad_token.as_ref().and_then(AddedToken::content);
    let id_of = |t: &Option<String>| t.as_deref().and_then(|t| tokenizer.token_to_id(t));
    let mut eos_token_ids = gen_cfg
        .eos_token_id
        .as_ref()
        .or(cfg.raw.eos_token_id.as_ref())
        .map(TokenIds::to_vec)
        .unwrap_or_default();
    if eos_token_ids.is_empty() {
        eos_token_ids.extend(id_of(&eos_token));
    }
    let special_tokens = SpecialTokens {
        bos_token_id: id(gen_cfg.bos_token_id).or(id(cfg.raw.bos_token_id)).or_else(|| id_of(&bos_token)),
        pad_token_id: id(gen_cfg.pad_token_id).or(id(cfg.raw.pad_token_id)).or_else(|| id_of(&pad_token)),
        bos_token,
        eos_token,
    };
    let sampling = gen_cfg.do_sample != Some(false);
    let generation = GenerationDefaults {
        eos_token_ids,
        // transformers ignores temperature/top-p/top-k when do_sample is false: greedy.
        temperature: if sampling { gen_cfg.temperature } else { Some(0.0) },
        top_p: if sampling { gen_cfg.top_p } else { None },
        top_k: if sampling { gen_cfg.top_k } else { None },
        repetition_penalty: gen_cfg.repetition_penalty,
    };
    let name = dir
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| dir.display().to_string());
    Ok(LoadedModel {
        model: Arc::new(model),
        tokenizer,
        chat_template,
        special_tokens,
        generation,
        name,
    })
}

/// The processor's chat template, which transformers prefers for a multimodal
/// checkpoint: `chat_template.jinja` (transformers 5) or `chat_template.json`
/// (`{"chat_template": "..."}`, as llava-hf's hub repositories ship it).
fn processor_chat_template(dir: &Path) -> Result<Option<String>> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        return Ok(Some(read_text(&jinja)?));
    }
    #[derive(Deserialize)]
    struct ChatTemplateFile {
        chat_template: String,
    }
    Ok(read_optional_json::<ChatTemplateFile>(&dir.join("chat_template.json"))?.map(|f| f.chat_template))
}

/// `tokenizer_config.json` fields we use.
#[derive(Debug, Default, Deserialize)]
struct TokenizerConfigJson {
    chat_template: Option<ChatTemplateJson>,
    bos_token: Option<AddedToken>,
    eos_token: Option<AddedToken>,
    pad_token: Option<AddedToken>,
}

impl TokenizerConfigJson {
    /// The `default` template of a list, else the first; a plain string as is.
    fn chat_template(&self) -> Option<String> {
        match self.chat_template.as_ref()? {
            ChatTemplateJson::One(t) => Some(t.clone()),
            ChatTemplateJson::Named(list) => list
                .iter()
                .find(|t| t.name == "default")
                .or_else(|| list.first())
                .map(|t| t.template.clone()),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum ChatTemplateJson {
    One(String),
    Named(Vec<NamedTemplate>),
}

#[derive(Debug, Deserialize)]
struct NamedTemplate {
    name: String,
    template: String,
}

/// A special token given as a string or as `{"content": ...}`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum AddedToken {
    Text(String),
    Object { content: String },
    Other(#[allow(dead_code)] serde_json::Value),
}

impl AddedToken {
    fn content(&self) -> Option<String> {
        match self {
            AddedToken::Text(s) | AddedToken::Object { content: s } => Some(s.clone()),
            AddedToken::Other(_) => None,
        }
    }
}

/// `generation_config.json` fields we use.
#[derive(Debug, Default, Deserialize)]
struct GenerationConfigJson {
    eos_token_id: Option<TokenIds>,
    bos_token_id: Option<i64>,
    pad_token_id: Option<i64>,
    do_sample: Option<bool>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<usize>,
    repetition_penalty: Option<f32>,
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })
}

/// Parse an optional JSON file: absent is `None`, malformed is an error naming it.
fn read_optional_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = read_text(path)?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::Config { path: PathBuf::from(path), message: e.to_string() })
}
