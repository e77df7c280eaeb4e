//! The Whisper model (Radford et al. 2022, "Robust Speech Recognition via Large-Scale
//! Weak Supervision"; reference code: openai/whisper and transformers'
//! `modeling_whisper.py`) on candle-nn: the audio encoder, and the text decoder for
//! multi_token's start-token features and greedy transcription.
//!
//! Keys are those of HF checkpoints (`model.encoder.layers.0.self_attn.q_proj.weight`
//! in `WhisperForConditionalGeneration`, or without `model.` in `WhisperModel`); a
//! missing or mis-shaped tensor is an error naming the key.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, LayerNorm, VarBuilder};
use multitoken_kernels::{layer_norm as norm, Activation, Conv1d, Linear, QkvProjection};
use serde::Deserialize;

use crate::{Error, Result};

/// The fields of a HF Whisper `config.json` that the model reads.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct WhisperConfig {
    /// Mel bins of the input (80, or 128 for large-v3).
    pub num_mel_bins: usize,
    /// Model width.
    pub d_model: usize,
    /// Encoder transformer layers.
    pub encoder_layers: usize,
    /// Encoder attention heads.
    pub encoder_attention_heads: usize,
    /// Encoder MLP width.
    pub encoder_ffn_dim: usize,
    /// Decoder transformer layers.
    pub decoder_layers: usize,
    /// Decoder attention heads.
    pub decoder_attention_heads: usize,
    /// Decoder MLP width.
    pub decoder_ffn_dim: usize,
    /// Encoder positions (1500 for 30 s).
    pub max_source_positions: usize,
    /// Decoder positions (448).
    pub max_target_positions: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// `<|startoftranscript|>`.
    #[serde(default = "default_start")]
    pub decoder_start_token_id: u32,
    /// `<|endoftext|>`.
    #[serde(default = "default_eos")]
    pub eos_token_id: u32,
    /// Tokens never generated.
    #[serde(default)]
    pub suppress_tokens: Vec<u32>,
    /// Tokens not generated as the first text token.
    #[serde(default)]
    pub begin_suppress_tokens: Vec<u32>,
    /// Activation; only `gelu` is supported (every released Whisper uses it).
    #[serde(default = "default_activation")]
    pub activation_function: String,
}

fn default_start() -> u32 {
    50258
}
fn default_eos() -> u32 {
    50257
}
fn default_activation() -> String {
    "gelu".to_string()
}

impl WhisperConfig {
    /// Reads `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            item: path.display().to_string(),
            source,
        })?;
        let config: Self = serde_json::from_str(&text).map_err(|e| Error::Json {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        if config.activation_function != "gelu" {
            return Err(Error::Config(format!(
                "{}: activation `{}` is not supported (Whisper uses gelu)",
                path.display(),
                config.activation_function
            )));
        }
        for (name, heads) in [
            ("encoder", config.encoder_attention_heads),
            ("decoder", config.decoder_attention_heads),
        ] {
            if heads == 0 || !config.d_model.is_multiple_of(heads) {
                return Err(Error::Config(format!(
                    "{}: d_model {} is not divisible by {heads} {name} heads",
                    path.display(),
                    config.d_model
                )));
            }
        }
        Ok(config)
    }
}

/// Loads a tensor of an exact shape, naming the key when it is absent or wrong.
fn get(vb: &VarBuilder, shape: &[usize], name: &str) -> Result<Tensor> {
    let key = if vb.prefix().is_empty() {
        name.to_string()
    } else {
        format!("{}.{name}", vb.prefix())
    };
    if !vb.contains_tensor(name) {
        return Err(Error::Checkpoint(format!("missing tensor `{key}`")));
    }
    vb.get(shape, name)
        .map_err(|e| Error::Checkpoint(format!("tensor `{key}`: {e}")))
}

fn linear(vb: &VarBuilder, input: usize, output: usize, bias: bool) -> Result<Linear> {
    let weight = get(vb, &[output, input], "weight")?;
    let bias = if bias { Some(get(vb, &[output], "bias")?) } else { None };
    Ok(Linear::new(weight, bias)?)
}

fn layer_norm(vb: &VarBuilder, dim: usize) -> Result<LayerNorm> {
    Ok(LayerNorm::new(get(vb, &[dim], "weight")?, get(vb, &[dim], "bias")?, 1e-5))
}

/// Multi-head attention with Whisper's bias-less key projection.
#[derive(Debug, Clone)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
}

impl Attention {
    fn load(vb: &VarBuilder, dim: usize, heads: usize) -> Result<Self> {
        let q_proj = linear(&vb.pp("q_proj"), dim, dim, true)?;
        let k_proj = linear(&vb.pp("k_proj"), dim, dim, false)?;
        let v_proj = linear(&vb.pp("v_proj"), dim, dim, true)?;
        Ok(Self {
            q_proj,
            k_proj,
            v_proj,
            out_proj: linear(&vb.pp("out_proj"), dim, dim, true)?,
            heads,
        })
    }

    /// `[b, t, d]` -> `[b, heads, t, head_dim]`.
    fn split(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        Ok(x.reshape((b, t, self.heads, d / self.heads))?
            .transpose(1, 2)?
            .contiguous()?)
    }

    /// Keys and values of `source` (cached for cross-attention).
    fn key_value(&self, source: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((
            self.split(&self.k_proj.forward(source)?)?,
            self.split(&self.v_proj.forward(source)?)?,
        ))
    }

    fn attend(&self, x: &Tensor, kv: &(Tensor, Tensor), causal: bool) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let head_dim = d / self.heads;
        let q = (self.split(&self.q_proj.forward(x)?)? * (head_dim as f64).powf(-0.5))?;
        let mut scores = q.matmul(&kv.0.t()?)?;
        if causal && t > 1 {
            let s = kv.0.dim(2)?;
            let mask: Vec<f32> = (0..t)
                .flat_map(|i| (0..s).map(move |j| if j + t > i + s { f32::NEG_INFINITY } else { 0.0 }))
                .collect();
            let mask = Tensor::from_vec(mask, (t, s), x.device())?.to_dtype(scores.dtype())?;
            scores = scores.broadcast_add(&mask)?;
        }
        let weights = softmax(&scores)?;
        let out = weights.matmul(&kv.1)?.transpose(1, 2)?.reshape((b, t, d))?;
        Ok(self.out_proj.forward(&out)?)
    }
}

/// The encoder's unmasked self-attention through the fused kernels: one QKV
/// product when frozen, no `[b, heads, t, t]` score tensor.
#[derive(Debug, Clone)]
struct EncoderSelfAttention {
    qkv: QkvProjection,
    out_proj: Linear,
    heads: usize,
}

impl EncoderSelfAttention {
    fn load(vb: &VarBuilder, dim: usize, heads: usize) -> Result<Self> {
        Ok(Self {
            qkv: QkvProjection::new(
                linear(&vb.pp("q_proj"), dim, dim, true)?,
                linear(&vb.pp("k_proj"), dim, dim, false)?,
                linear(&vb.pp("v_proj"), dim, dim, true)?,
            )?,
            out_proj: linear(&vb.pp("out_proj"), dim, dim, true)?,
            heads,
        })
    }

    /// `residual + attention(x)`, the sum formed inside the output product.
    fn forward_residual(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        let d = x.dim(2)?;
        let (q, k, v) = self.qkv.forward(x)?;
        let scale = ((d / self.heads) as f64).powf(-0.5);
        let out = multitoken_kernels::attention(&q, &k, &v, self.heads, scale, None)?;
        Ok(self.out_proj.forward_residual(&out, residual)?)
    }
}

/// Pre-norm MLP: `fc2(gelu(fc1(x)))`.
#[derive(Debug, Clone)]
struct Mlp {
    fc1: Linear,
    fc2: Linear,
}

impl Mlp {
    fn load(vb: &VarBuilder, dim: usize, hidden: usize) -> Result<Self> {
        Ok(Self {
            fc1: linear(&vb.pp("fc1"), dim, hidden, true)?,
            fc2: linear(&vb.pp("fc2"), hidden, dim, true)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.fc2.forward(&self.fc1.forward_with(x, Activation::Gelu)?)?)
    }

    /// `residual + mlp(x)`, the sum formed inside `fc2`'s product.
    fn forward_residual(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        Ok(self.fc2.forward_residual(&self.fc1.forward_with(x, Activation::Gelu)?, residual)?)
    }
}

#[derive(Debug, Clone)]
struct EncoderLayer {
    self_attn: EncoderSelfAttention,
    self_attn_layer_norm: LayerNorm,
    mlp: Mlp,
    final_layer_norm: LayerNorm,
}

/// Whisper's audio encoder: two convolutions (the second with stride 2), sinusoidal
/// positions (stored in the checkpoint), pre-norm transformer layers, a final norm.
#[derive(Debug, Clone)]
pub struct WhisperEncoder {
    conv1: Conv1d,
    conv2: Conv1d,
    embed_positions: Tensor,
    layers: Vec<EncoderLayer>,
    layer_norm: LayerNorm,
    num_mel_bins: usize,
}

impl WhisperEncoder {
    /// Loads the encoder from `vb` at the `encoder` level of a checkpoint.
    pub fn load(vb: &VarBuilder, config: &WhisperConfig) -> Result<Self> {
        let d = config.d_model;
        let conv = |name: &str, input: usize, stride: usize| -> Result<Conv1d> {
            let vb = vb.pp(name);
            let weight = get(&vb, &[d, input, 3], "weight")?;
            Ok(Conv1d::new(weight, Some(get(&vb, &[d], "bias")?), stride, 1)?)
        };
        let layers = (0..config.encoder_layers)
            .map(|i| {
                let vb = vb.pp(format!("layers.{i}"));
                Ok(EncoderLayer {
                    self_attn: EncoderSelfAttention::load(&vb.pp("self_attn"), d, config.encoder_attention_heads)?,
                    self_attn_layer_norm: layer_norm(&vb.pp("self_attn_layer_norm"), d)?,
                    mlp: Mlp::load(&vb, d, config.encoder_ffn_dim)?,
                    final_layer_norm: layer_norm(&vb.pp("final_layer_norm"), d)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            conv1: conv("conv1", config.num_mel_bins, 1)?,
            conv2: conv("conv2", d, 2)?,
            embed_positions: get(&vb.pp("embed_positions"), &[config.max_source_positions, d], "weight")?,
            layers,
            layer_norm: layer_norm(&vb.pp("layer_norm"), d)?,
            num_mel_bins: config.num_mel_bins,
        })
    }

    /// Log-mel `[b, n_mels, frames]` to encoder states `[b, frames / 2, d_model]`.
    pub fn forward(&self, mel: &Tensor) -> Result<Tensor> {
        let (_, bins, frames) = mel.dims3()?;
        let positions = self.embed_positions.dim(0)?;
        if bins != self.num_mel_bins || frames.div_ceil(2) > positions {
            return Err(Error::Config(format!(
                "the encoder expects log-mel [batch, {}, <= {}], got {:?}",
                self.num_mel_bins,
                positions * 2,
                mel.dims()
            )));
        }
        // Time-major from here on: [b, frames, d_model].
        let x = self.conv1.forward_time_major(&mel.transpose(1, 2)?, Activation::Gelu)?;
        let x = self.conv2.forward_time_major(&x, Activation::Gelu)?;
        let t = x.dim(1)?;
        let mut x = x.broadcast_add(&self.embed_positions.narrow(0, 0, t)?)?;
        for layer in &self.layers {
            let h = norm(&layer.self_attn_layer_norm, &x)?;
            x = layer.self_attn.forward_residual(&h, &x)?;
            let h = norm(&layer.final_layer_norm, &x)?;
            x = layer.mlp.forward_residual(&h, &x)?;
        }
        Ok(norm(&self.layer_norm, &x)?)
    }
}

#[derive(Debug, Clone)]
struct DecoderLayer {
    self_attn: Attention,
    self_attn_layer_norm: LayerNorm,
    encoder_attn: Attention,
    encoder_attn_layer_norm: LayerNorm,
    mlp: Mlp,
    final_layer_norm: LayerNorm,
}

/// Whisper's text decoder; logits use the token embedding matrix (tied weights).
#[derive(Debug, Clone)]
pub struct WhisperDecoder {
    embed_tokens: Embedding,
    embed_positions: Tensor,
    layers: Vec<DecoderLayer>,
    layer_norm: LayerNorm,
}

/// Cross-attention keys and values of one encoded clip, per decoder layer.
#[derive(Debug, Clone)]
pub struct CrossCache(Vec<(Tensor, Tensor)>);

/// The decoder's self-attention keys and values of the tokens fed so far, per
/// layer ([`WhisperDecoder::hidden_cached`]); empty for a new decode.
#[derive(Debug, Clone, Default)]
pub struct SelfCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl SelfCache {
    /// Tokens fed so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing was fed yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl WhisperDecoder {
    /// Loads the decoder from `vb` at the `decoder` level of a checkpoint.
    pub fn load(vb: &VarBuilder, config: &WhisperConfig) -> Result<Self> {
        let d = config.d_model;
        let layers = (0..config.decoder_layers)
            .map(|i| {
                let vb = vb.pp(format!("layers.{i}"));
                let heads = config.decoder_attention_heads;
                Ok(DecoderLayer {
                    self_attn: Attention::load(&vb.pp("self_attn"), d, heads)?,
                    self_attn_layer_norm: layer_norm(&vb.pp("self_attn_layer_norm"), d)?,
                    encoder_attn: Attention::load(&vb.pp("encoder_attn"), d, heads)?,
                    encoder_attn_layer_norm: layer_norm(&vb.pp("encoder_attn_layer_norm"), d)?,
                    mlp: Mlp::load(&vb, d, config.decoder_ffn_dim)?,
                    final_layer_norm: layer_norm(&vb.pp("final_layer_norm"), d)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            embed_tokens: Embedding::new(get(&vb.pp("embed_tokens"), &[config.vocab_size, d], "weight")?, d),
            embed_positions: get(&vb.pp("embed_positions"), &[config.max_target_positions, d], "weight")?,
            layers,
            layer_norm: layer_norm(&vb.pp("layer_norm"), d)?,
        })
    }

    /// Cross-attention keys and values for encoder states `[b, frames, d]`.
    pub fn cross_cache(&self, encoded: &Tensor) -> Result<CrossCache> {
        Ok(CrossCache(
            self.layers
                .iter()
                .map(|layer| layer.encoder_attn.key_value(encoded))
                .collect::<Result<_>>()?,
        ))
    }

    /// Final hidden states `[b, tokens, d]` of token ids `[b, tokens]` (full sequence,
    /// causal) attending to the encoded clip.
    pub fn hidden(&self, ids: &Tensor, cross: &CrossCache) -> Result<Tensor> {
        // The whole sequence is one piece after nothing: the cache starts empty
        // and is dropped.
        self.hidden_cached(ids, cross, &mut SelfCache::default())
    }

    /// [`WhisperDecoder::hidden`] one piece at a time: the final hidden states
    /// `[b, t, d]` of the new token ids `[b, t]`, which follow the `cache.len()`
    /// tokens whose self-attention keys and values `cache` holds (it gains
    /// theirs). A decode feeds the prompt, then each new token: every step costs
    /// one position's work instead of the whole sequence's again.
    pub fn hidden_cached(&self, ids: &Tensor, cross: &CrossCache, cache: &mut SelfCache) -> Result<Tensor> {
        let t = ids.dim(1)?;
        let offset = cache.len;
        if offset + t > self.embed_positions.dim(0)? {
            return Err(Error::Config(format!(
                "{} decoder tokens exceed the {} decoder positions",
                offset + t,
                self.embed_positions.dim(0)?
            )));
        }
        if cache.layers.len() != self.layers.len() {
            cache.layers = vec![None; self.layers.len()];
        }
        let mut x = self
            .embed_tokens
            .forward(ids)?
            .broadcast_add(&self.embed_positions.narrow(0, offset, t)?)?;
        for ((layer, kv), past) in self.layers.iter().zip(&cross.0).zip(cache.layers.iter_mut()) {
            let h = norm(&layer.self_attn_layer_norm, &x)?;
            let (k, v) = layer.self_attn.key_value(&h)?;
            let self_kv = match past.take() {
                Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
                None => (k, v),
            };
            x = (&x + layer.self_attn.attend(&h, &self_kv, true)?)?;
            *past = Some(self_kv);
            let h = norm(&layer.encoder_attn_layer_norm, &x)?;
            x = (&x + layer.encoder_attn.attend(&h, kv, false)?)?;
            let h = norm(&layer.final_layer_norm, &x)?;
            x = (&x + layer.mlp.forward(&h)?)?;
        }
        cache.len = offset + t;
        Ok(norm(&self.layer_norm, &x)?)
    }

    /// Logits `[b, vocab]` of the last position of hidden states `[b, t, d]`.
    pub fn last_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let t = hidden.dim(1)?;
        let last = hidden.narrow(1, t - 1, 1)?.squeeze(1)?;
        // A decode step's product with the whole vocabulary (26M weights for
        // Whisper base): the kernels' matrix-vector product streams the table
        // once over the pool, where candle's matmul packs it on one thread.
        if let Some(logits) = multitoken_kernels::lm::linear_rows(&last, self.embed_tokens.embeddings())? {
            return Ok(logits);
        }
        Ok(last.matmul(&self.embed_tokens.embeddings().t()?)?)
    }
}

/// A Whisper checkpoint: config, encoder and decoder.
#[derive(Debug, Clone)]
pub struct Whisper {
    /// The checkpoint's config.
    pub config: WhisperConfig,
    /// The audio encoder.
    pub encoder: WhisperEncoder,
    /// The text decoder.
    pub decoder: WhisperDecoder,
}

impl Whisper {
    /// Loads `config.json` and `model.safetensors` from a HF Whisper directory
    /// (`WhisperForConditionalGeneration` or `WhisperModel` key layout), memory-mapped.
    pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let config = WhisperConfig::from_file(&dir.join("config.json"))?;
        let weights = dir.join("model.safetensors");
        if !weights.is_file() {
            return Err(Error::Checkpoint(format!("{} does not exist", weights.display())));
        }
        // SAFETY: the file is memory-mapped read-only; like every mmap user we rely on
        // nobody truncating it while it is mapped.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], dtype, device) }
            .map_err(|e| Error::Checkpoint(format!("{}: {e}", weights.display())))?;
        Self::from_var_builder(vb, config)
    }

    /// Builds the model from a var builder at the checkpoint's root.
    pub fn from_var_builder(vb: VarBuilder, config: WhisperConfig) -> Result<Self> {
        let root = if vb.contains_tensor("model.encoder.conv1.weight") {
            vb.pp("model")
        } else {
            vb
        };
        Ok(Self {
            encoder: WhisperEncoder::load(&root.pp("encoder"), &config)?,
            decoder: WhisperDecoder::load(&root.pp("decoder"), &config)?,
            config,
        })
    }

    /// The device the weights live on.
    pub fn encoder_device(&self) -> Device {
        self.encoder.embed_positions.device().clone()
    }

    /// The dtype of the weights.
    pub fn dtype(&self) -> DType {
        self.encoder.embed_positions.dtype()
    }

    /// multi_token's features: the decoder's final hidden state at the single
    /// `<|startoftranscript|>` token, `[b, d_model]`, for log-mel `[b, n_mels, 3000]`.
    pub fn start_token_features(&self, mel: &Tensor) -> Result<Tensor> {
        let encoded = self.encoder.forward(mel)?;
        let b = mel.dim(0)?;
        let ids = Tensor::full(self.config.decoder_start_token_id, (b, 1), mel.device())?;
        let cross = self.decoder.cross_cache(&encoded)?;
        Ok(self.decoder.hidden(&ids, &cross)?.squeeze(1)?)
    }
}

/// Average-pools encoder frames `[frames, d]` to `[width, d]`: output `i` is the mean
/// of frames `floor(i * frames / width) .. ceil((i + 1) * frames / width)` (torch's
/// `adaptive_avg_pool1d`).
pub fn adaptive_avg_pool(frames: &Tensor, width: usize) -> Result<Tensor> {
    let n = frames.dim(0)?;
    if width == 0 || n == 0 {
        return Err(Error::Config(format!("cannot pool {n} frames to {width} positions")));
    }
    let rows = (0..width)
        .map(|i| {
            let start = i * n / width;
            let end = ((i + 1) * n).div_ceil(width);
            Ok(frames.narrow(0, start, end - start)?.mean_keepdim(0)?)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::cat(&rows, 0)?.contiguous()?)
}

/// Greedy argmax over the last dimension of `[vocab]` logits, with `suppressed` ids
/// never chosen.
pub fn argmax_suppressed(logits: &Tensor, suppressed: &[u32]) -> Result<u32> {
    let mut values: Vec<f32> = logits.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    for &id in suppressed {
        if let Some(v) = values.get_mut(id as usize) {
            *v = f32::NEG_INFINITY;
        }
    }
    values
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i as u32)
        .ok_or_else(|| Error::Config("empty logits".to_string()))
}


/// Softmax over the last dimension, differentiable when training.
fn softmax(x: &Tensor) -> candle_core::Result<Tensor> {
    if x.track_op() {
        candle_nn::ops::softmax(x, candle_core::D::Minus1)
    } else {
        candle_nn::ops::softmax_last_dim(x)
    }
}
