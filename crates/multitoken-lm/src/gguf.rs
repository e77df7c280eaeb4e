//! Loading GGUF files (llama.cpp's format): config and tokenizer from the metadata,
//! weights kept quantized.
//!
//! Supported architectures: `llama` (Llama, SmolLM, Mistral written as llama) and
//! `qwen2`. The model code asks for tensors by their transformers names;
//! [`GgufSource`] maps them to llama.cpp's (`model.layers.3.self_attn.q_proj.weight` ->
//! `blk.3.attn_q.weight`) and returns linears as quantized matrices
//! ([`QMatMul`]) unless dequantized weights were asked for, which is what
//! transformers' own GGUF loader does and what the parity test compares against.
//!
//! Rotary embeddings: llama.cpp's converter permutes the rows of `attn_q`/`attn_k` of
//! llama-arch models so that each head's rotary pairs are adjacent (dimension 2i with
//! 2i+1). transformers un-permutes the rows when it loads a GGUF and keeps
//! `rotate_half`; we keep the rows as stored (a quantized matrix cannot be un-permuted
//! cheaply) and rotate interleaved pairs instead ([`RopeStyle::Interleaved`], as
//! candle's `quantized_llama` does). The two are the same computation. `qwen2` files are
//! not permuted (llama.cpp runs them with NEOX rope), so they keep [`RopeStyle::Half`].

mod tokenizer;

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Tensor};

use crate::config::{Activation, Family, ModelConfig, RopeStyle};
use crate::linear::Linear;
use crate::loader::{GenerationDefaults, LoadOptions, LoadedModel, SpecialTokens};
use crate::weights::WeightSource;
use crate::{Error, Result};

pub use tokenizer::{bytes_to_unicode, tokenizer_from_gguf, GgufTokenizer};

/// What happens to the quantized matrices of a GGUF file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GgufWeights {
    /// Linears stay in their GGUF blocks and run as quantized matmuls (activations
    /// are quantized to q8 on the fly on CPU). The default: smallest and fastest.
    #[default]
    Quantized,
    /// Every tensor is dequantized to the load dtype, as transformers' GGUF loader does
    /// (for parity checks, or a device without quantized kernels).
    Dequantized,
}

/// Loads a `.gguf` file with its linears kept quantized.
pub fn load_gguf(path: &Path, opts: &LoadOptions) -> Result<LoadedModel> {
    load_gguf_with(path, opts, GgufWeights::Quantized)
}

/// Loads a `.gguf` file, keeping or dequantizing its quantized matrices.
pub fn load_gguf_with(path: &Path, opts: &LoadOptions, weights: GgufWeights) -> Result<LoadedModel> {
    let tensor_opts = LoadOptions { dtype: opts.tensor_dtype(), ..opts.clone() };
    let source = GgufSource::open(path, &tensor_opts, weights)?;
    let cfg = source.config()?;
    let tok = tokenizer_from_gguf(path, &source.content)?;
    if tok.tokens.len() != cfg.vocab_size {
        return Err(Error::Config {
            path: path.to_path_buf(),
            message: format!("{} tokenizer tokens but a vocabulary of {} rows", tok.tokens.len(), cfg.vocab_size),
        });
    }
    let model = if opts.cpu_bf16() {
        crate::model::CausalLm::load(&cfg, &crate::quantize::Bf16LinearsSource::new(&source))?
    } else {
        crate::model::CausalLm::load(&cfg, &source)?
    };
    let text = |id: Option<u32>| id.and_then(|i| tok.tokens.get(i as usize)).cloned();
    let special_tokens = SpecialTokens {
        bos_token: text(tok.bos_token_id),
        eos_token: text(tok.eos_token_id),
        bos_token_id: tok.bos_token_id,
        pad_token_id: tok.pad_token_id,
    };
    let mut eos_token_ids: Vec<u32> = tok.eos_token_id.into_iter().collect();
    eos_token_ids.extend(tok.extra_eos_token_ids.iter().copied());
    let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| path.display().to_string());
    Ok(LoadedModel {
        model: Arc::new(model),
        tokenizer: tok.tokenizer,
        chat_template: tok.chat_template,
        special_tokens,
        generation: GenerationDefaults { eos_token_ids, ..GenerationDefaults::default() },
        name,
    })
}

/// The architectures we can build from GGUF metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arch {
    Llama,
    Qwen2,
}

impl Arch {
    fn key(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
        }
    }
}

/// A GGUF file seen as a [`WeightSource`] in transformers' naming.
pub struct GgufSource {
    path: PathBuf,
    content: Content,
    /// The file, memory-mapped; tensors are read from it on request.
    mmap: memmap2::Mmap,
    arch: Arch,
    device: Device,
    dtype: DType,
    weights: GgufWeights,
    /// `token_embd` dequantized once: the embedding table and a tied dense `lm_head`
    /// share it.
    embeddings: Mutex<Option<Tensor>>,
    /// Serve llama's `q_proj`/`k_proj` rows in transformers' order (and say
    /// [`RopeStyle::Half`]) instead of llama.cpp's rotary order.
    transformers_rows: bool,
}

impl std::fmt::Debug for GgufSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufSource").field("path", &self.path).field("arch", &self.arch).finish_non_exhaustive()
    }
}

/// Whether a GGUF header sets `general.alignment` to 0: the key as the format
/// stores it (u64 length 17, the name, a u32 integer type 0–5) followed by a zero
/// of that type's width.
fn zero_alignment(bytes: &[u8]) -> bool {
    const KEY: &[u8] = b"\x11\0\0\0\0\0\0\0general.alignment";
    let mut rest = bytes;
    while let Some(at) = rest.windows(KEY.len()).position(|w| w == KEY) {
        let value = &rest[at + KEY.len()..];
        let width = match value.get(..4).map(|t| u32::from_le_bytes([t[0], t[1], t[2], t[3]])) {
            Some(0 | 1) => 1,
            Some(2 | 3) => 2,
            Some(4 | 5) => 4,
            _ => 0,
        };
        if width > 0 && value.get(4..4 + width).is_some_and(|v| v.iter().all(|&b| b == 0)) {
            return true;
        }
        rest = &rest[at + 1..];
    }
    false
}

/// The text of a caught panic.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown failure".to_string())
}

impl GgufSource {
    /// Opens and memory-maps `path` and reads its header; fails on an architecture we
    /// do not build.
    pub fn open(path: &Path, opts: &LoadOptions, weights: GgufWeights) -> Result<Self> {
        let io = |source| Error::Io { path: path.to_path_buf(), source };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: the file is opened read-only and only read through this map; a file
        // changed underneath a running process is outside what we can guard against
        // (the same contract as safetensors' mmap loading).
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        let unreadable = |message: String| Error::Config { path: path.to_path_buf(), message: format!("not a readable GGUF file: {message}") };
        // candle's reader divides by `general.alignment`: 0 is refused before it runs.
        if zero_alignment(&mmap) {
            return Err(unreadable("`general.alignment` is 0 (it must be a positive multiple of 8)".into()));
        }
        // Last resort: any other panic in the reader is an unreadable file, not a crash.
        let content = std::panic::catch_unwind(|| Content::read(&mut Cursor::new(&mmap[..])))
            .map_err(|panic| unreadable(format!("the reader failed ({})", panic_message(&*panic))))?
            .map_err(|e| unreadable(e.to_string()))?;
        let arch_name = content
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .ok_or_else(|| Error::Config { path: path.to_path_buf(), message: "no `general.architecture` in the GGUF metadata".into() })?;
        let arch = match arch_name.as_str() {
            "llama" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            other => {
                return Err(Error::Config {
                    path: path.to_path_buf(),
                    message: format!("GGUF architecture `{other}` is not supported (supported: llama, qwen2)"),
                })
            }
        };
        Ok(Self {
            path: path.to_path_buf(),
            content,
            mmap,
            arch,
            device: opts.device.clone(),
            dtype: opts.dtype,
            weights,
            embeddings: Mutex::new(None),
            transformers_rows: false,
        })
    }

    /// Serves the rows of llama-arch `q_proj`/`k_proj` in transformers' order, the
    /// permutation of llama.cpp's converter undone, and builds the model with
    /// [`RopeStyle::Half`]: the same computation, but LoRA adapters trained on it
    /// fit the HF checkpoint the file came from (a PEFT adapter's `lora_B` rows of
    /// `q_proj` follow the base's rows). Quantized rows move as whole runs of
    /// blocks, so nothing is dequantized.
    pub fn with_transformers_rows(mut self) -> Self {
        self.transformers_rows = self.arch == Arch::Llama;
        self
    }

    /// The heads whose rows `name` (a linear's weight) holds permuted, if it is one
    /// to reorder.
    fn permuted_heads(&self, name: &str, cfg_heads: (usize, usize)) -> Option<usize> {
        if !self.transformers_rows {
            return None;
        }
        if name.ends_with(".self_attn.q_proj.weight") {
            Some(cfg_heads.0)
        } else if name.ends_with(".self_attn.k_proj.weight") {
            Some(cfg_heads.1)
        } else {
            None
        }
    }

    /// The file's tokenizer, as [`tokenizer_from_gguf`] builds it from the metadata.
    pub fn tokenizer(&self) -> Result<GgufTokenizer> {
        tokenizer_from_gguf(&self.path, &self.content)
    }

    /// The block type a tensor (by its transformers name) is stored in, if the
    /// file has it.
    pub fn stored_type(&self, name: &str) -> Option<GgmlDType> {
        let gguf = self.gguf_name(name)?;
        self.content.tensor_infos.get(&gguf).map(|info| info.ggml_dtype)
    }

    fn config_err(&self, message: impl Into<String>) -> Error {
        Error::Config { path: self.path.clone(), message: message.into() }
    }

    fn meta(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(&format!("{}.{key}", self.arch.key()))
    }

    fn meta_usize(&self, key: &str) -> Result<Option<usize>> {
        let Some(v) = self.meta(key) else { return Ok(None) };
        let n = match v {
            Value::U8(x) => *x as u64,
            Value::U16(x) => *x as u64,
            Value::U32(x) => *x as u64,
            Value::U64(x) => *x,
            Value::I8(x) if *x >= 0 => *x as u64,
            Value::I16(x) if *x >= 0 => *x as u64,
            Value::I32(x) if *x >= 0 => *x as u64,
            Value::I64(x) if *x >= 0 => *x as u64,
            other => {
                return Err(self.config_err(format!("`{}.{key}` should be a count, found {other:?}", self.arch.key())))
            }
        };
        Ok(Some(n as usize))
    }

    fn require_usize(&self, key: &str) -> Result<usize> {
        self.meta_usize(key)?
            .ok_or_else(|| self.config_err(format!("no `{}.{key}` in the GGUF metadata", self.arch.key())))
    }

    fn meta_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.meta(key) {
            None => Ok(None),
            Some(Value::F32(x)) => Ok(Some(*x as f64)),
            Some(Value::F64(x)) => Ok(Some(*x)),
            Some(other) => Err(self.config_err(format!("`{}.{key}` should be a number, found {other:?}", self.arch.key()))),
        }
    }

    /// The runtime config described by the metadata.
    pub fn config(&self) -> Result<ModelConfig> {
        let hidden_size = self.require_usize("embedding_length")?;
        let num_heads = self.require_usize("attention.head_count")?;
        let num_kv_heads = self.meta_usize("attention.head_count_kv")?.unwrap_or(num_heads);
        if num_heads == 0 || num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(self.config_err(format!("{num_heads} attention heads cannot share {num_kv_heads} key/value heads")));
        }
        let head_dim = match self.meta_usize("attention.key_length")? {
            Some(d) => d,
            None if hidden_size % num_heads == 0 => hidden_size / num_heads,
            None => return Err(self.config_err(format!("embedding_length {hidden_size} is not a multiple of {num_heads} heads"))),
        };
        if let Some(rot) = self.meta_usize("rope.dimension_count")? {
            if rot != head_dim {
                return Err(self.config_err(format!("partial rotary ({rot} of {head_dim} dims) is not supported for GGUF")));
            }
        }
        if let Some(kind) = self.content.metadata.get(&format!("{}.rope.scaling.type", self.arch.key())) {
            if kind.to_string().map(|s| s != "none").unwrap_or(true) {
                return Err(self.config_err(format!("rope scaling {kind:?} is not supported for GGUF")));
            }
        }
        if self.content.tensor_infos.contains_key("rope_freqs.weight") {
            return Err(self.config_err("llama-3 rope frequency factors (rope_freqs.weight) are not supported for GGUF yet"));
        }
        let embd = self
            .content
            .tensor_infos
            .get("token_embd.weight")
            .ok_or_else(|| self.config_err("no `token_embd.weight` tensor"))?;
        let (vocab_size, embd_width) = embd.shape.dims2().map_err(|e| self.config_err(format!("token_embd.weight: {e}")))?;
        if embd_width != hidden_size {
            return Err(self.config_err(format!("token_embd.weight is {embd_width} wide, embedding_length is {hidden_size}")));
        }
        let (family, rope_style, qkv_bias) = match self.arch {
            Arch::Llama => {
                let style = if self.transformers_rows { RopeStyle::Half } else { RopeStyle::Interleaved };
                (Family::Llama, style, self.content.tensor_infos.contains_key("blk.0.attn_q.bias"))
            }
            Arch::Qwen2 => (Family::Qwen2, RopeStyle::Half, true),
        };
        Ok(ModelConfig {
            family,
            vocab_size,
            hidden_size,
            intermediate_size: self.require_usize("feed_forward_length")?,
            num_layers: self.require_usize("block_count")?,
            num_heads,
            num_kv_heads,
            head_dim,
            max_position_embeddings: self.meta_usize("context_length")?.unwrap_or(4096),
            rope_theta: self.meta_f64("rope.freq_base")?.unwrap_or(10_000.0),
            rope_scaling: None,
            rope_style,
            partial_rotary_factor: 1.0,
            norm_eps: self.meta_f64("attention.layer_norm_rms_epsilon")?.unwrap_or(1e-5),
            hidden_act: Activation::Silu,
            qkv_bias,
            o_bias: false,
            mlp_bias: false,
            sliding_window: None,
            // `lm_head.weight` is served from `token_embd` when `output` is absent,
            // kept quantized; the model must not tie it to the dense embedding table.
            tie_word_embeddings: false,
            mrope_section: None,
        })
    }

    /// The GGUF name for a transformers name, or `None` when there is no such tensor.
    fn gguf_name(&self, name: &str) -> Option<String> {
        let direct = match name {
            "model.embed_tokens.weight" => Some("token_embd.weight".to_string()),
            "model.norm.weight" => Some("output_norm.weight".to_string()),
            "lm_head.weight" if self.content.tensor_infos.contains_key("output.weight") => Some("output.weight".to_string()),
            "lm_head.weight" => Some("token_embd.weight".to_string()),
            _ => None,
        };
        let mapped = direct.or_else(|| {
            let rest = name.strip_prefix("model.layers.")?;
            let (layer, rest) = rest.split_once('.')?;
            let layer: usize = layer.parse().ok()?;
            let (module, suffix) = rest.rsplit_once('.')?;
            let gguf = match module {
                "input_layernorm" => "attn_norm",
                "post_attention_layernorm" => "ffn_norm",
                "self_attn.q_proj" => "attn_q",
                "self_attn.k_proj" => "attn_k",
                "self_attn.v_proj" => "attn_v",
                "self_attn.o_proj" => "attn_output",
                "mlp.gate_proj" => "ffn_gate",
                "mlp.up_proj" => "ffn_up",
                "mlp.down_proj" => "ffn_down",
                _ => return None,
            };
            Some(format!("blk.{layer}.{gguf}.{suffix}"))
        })?;
        self.content.tensor_infos.contains_key(&mapped).then_some(mapped)
    }

    fn tensor_err(&self, name: &str, message: impl Into<String>) -> Error {
        Error::Tensor { name: name.to_string(), message: format!("{} ({})", message.into(), self.path.display()) }
    }

    fn qtensor(&self, name: &str, gguf: &str, shape: &[usize]) -> Result<QTensor> {
        let q = self
            .content
            .tensor(&mut Cursor::new(&self.mmap[..]), gguf, &self.device)
            .map_err(|e| self.tensor_err(name, format!("reading `{gguf}`: {e}")))?;
        if q.shape().dims() != shape {
            return Err(self.tensor_err(name, format!("`{gguf}` has shape {:?}, expected {shape:?}", q.shape().dims())));
        }
        Ok(q)
    }

    fn dense(&self, name: &str, gguf: &str, shape: &[usize]) -> Result<Tensor> {
        if gguf == "token_embd.weight" {
            let mut cached = self.embeddings.lock().map_err(|_| self.tensor_err(name, "embedding cache poisoned"))?;
            if let Some(t) = cached.as_ref() {
                if t.dims() == shape {
                    return Ok(t.clone());
                }
            }
            let t = self.qtensor(name, gguf, shape)?.dequantize(&self.device)?.to_dtype(self.dtype)?;
            *cached = Some(t.clone());
            return Ok(t);
        }
        Ok(self.qtensor(name, gguf, shape)?.dequantize(&self.device)?.to_dtype(self.dtype)?)
    }
}

impl WeightSource for GgufSource {
    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    fn contains(&self, name: &str) -> bool {
        self.gguf_name(name).is_some()
    }

    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let gguf = self.gguf_name(name).ok_or_else(|| self.tensor_err(name, "no such tensor in the GGUF file"))?;
        self.dense(name, &gguf, shape)
    }

    fn linear(&self, prefix: &str, in_dim: usize, out_dim: usize, bias: bool) -> Result<Linear> {
        let weight_name = format!("{prefix}.weight");
        let gguf = self.gguf_name(&weight_name).ok_or_else(|| self.tensor_err(&weight_name, "no such tensor in the GGUF file"))?;
        let bias = if bias {
            let bias_name = format!("{prefix}.bias");
            Some(self.tensor(&bias_name, &[out_dim])?)
        } else {
            None
        };
        let shape = [out_dim, in_dim];
        let keep = self.weights == GgufWeights::Quantized;
        let heads = match self.transformers_rows {
            true => {
                let heads = self.require_usize("attention.head_count")?;
                let kv = self.meta_usize("attention.head_count_kv")?.unwrap_or(heads);
                self.permuted_heads(&weight_name, (heads, kv))
            }
            false => None,
        };
        let q = if keep { Some(self.qtensor(&weight_name, &gguf, &shape)?) } else { None };
        if let Some(heads) = heads {
            return match q {
                Some(q) => {
                    let q = unpermute_rows(&q, heads).map_err(|e| self.tensor_err(&weight_name, e.to_string()))?;
                    Ok(Linear::quantized(QMatMul::from_qtensor(q)?, in_dim, out_dim, bias))
                }
                None => {
                    let w = self.dense(&weight_name, &gguf, &shape)?;
                    let hd = out_dim / heads;
                    let w = w.reshape((heads, hd / 2, 2, in_dim))?.transpose(1, 2)?.contiguous()?.reshape((out_dim, in_dim))?;
                    Linear::dense(w, bias)
                }
            };
        }
        match q {
            Some(q) if !matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) => {
                let matmul = QMatMul::from_qtensor(q)?;
                Ok(Linear::quantized(matmul, in_dim, out_dim, bias))
            }
            Some(q) => Linear::dense(q.dequantize(&self.device)?.to_dtype(self.dtype)?, bias),
            None => Linear::dense(self.dense(&weight_name, &gguf, &shape)?, bias),
        }
    }
}


/// llama.cpp's rotary row permutation undone on a quantized `[out, in]` matrix:
/// within each of `heads` heads, stored row `2i + j` becomes row `j * hd / 2 + i`.
/// Rows are whole runs of blocks, so they move as bytes.
fn unpermute_rows(q: &QTensor, heads: usize) -> Result<QTensor> {
    let (out_dim, in_dim) = q.shape().dims2()?;
    let dtype = q.dtype();
    if heads == 0 || !out_dim.is_multiple_of(heads) || !(out_dim / heads).is_multiple_of(2) || !in_dim.is_multiple_of(dtype.block_size()) {
        return Err(Error::Msg(format!("cannot reorder the rows of a [{out_dim}, {in_dim}] matrix over {heads} heads")));
    }
    let hd = out_dim / heads;
    let row_bytes = in_dim / dtype.block_size() * dtype.type_size();
    let data = q.data()?;
    let mut out = vec![0u8; data.len()];
    for h in 0..heads {
        for i in 0..hd / 2 {
            for j in 0..2 {
                let from = h * hd + 2 * i + j;
                let to = h * hd + j * hd / 2 + i;
                out[to * row_bytes..(to + 1) * row_bytes].copy_from_slice(&data[from * row_bytes..(from + 1) * row_bytes]);
            }
        }
    }
    Ok(candle_core::quantized::ggml_file::qtensor_from_ggml(dtype, &out, vec![out_dim, in_dim], &Device::Cpu)?)
}
