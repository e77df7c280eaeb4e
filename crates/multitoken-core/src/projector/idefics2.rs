//! Idefics2's connector (Laurençon et al. 2024, "What matters when building
//! vision-language models?"): a SwiGLU modality projection from the vision width to
//! the LM width, then a perceiver resampler that pools any number of positions into
//! a fixed number of learned latents.
//!
//! Layout and numbers follow transformers' `Idefics2Connector`:
//!
//! - `modality_projection`: `down(silu(gate(x)) * up(x))`, vision hidden ->
//!   `intermediate_size` (the text config's) -> LM hidden, no biases.
//! - `perceiver_resampler`: `latents` `[n_latents, hidden]`; per layer, pre-norm
//!   cross-attention whose queries are the latents and whose keys and values are
//!   `concat([context, latents])` (grouped-query, scaled by `head_dim^-0.5`, not
//!   causal), a residual, then a pre-norm SwiGLU MLP `hidden -> 4 * hidden -> hidden`
//!   and a residual; a final RMSNorm.
//! - RMSNorm is Idefics2RMSNorm: variance in f32, `weight * (x / sqrt(var + eps))`
//!   with the normalised value cast back to the input dtype before the weight.
//!
//! Both activations are SiLU (Idefics2 takes the projection's from the text config's
//! `hidden_act` and the perceiver's from its own; every published Idefics2 and
//! Cephalo checkpoint has `silu` in both). An importer should reject other values.
//!
//! Under autograd the norms and the softmax are candle's composite ops (its fused
//! ones have no backward); the fused ones run only when no input tracks gradients.

use candle_core::{DType, Module, Tensor, D};
use candle_nn::{Init, Linear, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::Result;

/// The parameters of an Idefics2 connector, named as in Idefics2's
/// `perceiver_config` (plus the text config's `intermediate_size`, the width of
/// the modality projection). The vision and LM widths come from the caller.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Idefics2ConnectorConfig {
    /// Output positions per item (64 in Idefics2-8b).
    pub resampler_n_latents: usize,
    /// Perceiver layers (3 in Idefics2-8b).
    pub resampler_depth: usize,
    /// Query heads of the perceiver attention (16).
    pub resampler_n_heads: usize,
    /// Width of each head (96); `n_heads * head_dim` need not equal the hidden size.
    pub resampler_head_dim: usize,
    /// Key/value heads (4); must divide `resampler_n_heads`.
    pub num_key_value_heads: usize,
    /// Inner width of the modality projection: the text config's
    /// `intermediate_size` (14336 in Idefics2-8b).
    pub intermediate_size: usize,
    /// Epsilon of the perceiver's RMSNorms (`perceiver_config.rms_norm_eps`).
    pub rms_norm_eps: f64,
}

impl Idefics2ConnectorConfig {
    /// Why the parameters cannot build a connector, if they cannot.
    pub(super) fn problem(&self) -> Option<String> {
        let counts = [
            ("resampler_n_latents", self.resampler_n_latents),
            ("resampler_depth", self.resampler_depth),
            ("resampler_n_heads", self.resampler_n_heads),
            ("resampler_head_dim", self.resampler_head_dim),
            ("num_key_value_heads", self.num_key_value_heads),
            ("intermediate_size", self.intermediate_size),
        ];
        if let Some((name, _)) = counts.iter().find(|(_, value)| *value == 0) {
            return Some(format!("{name} must be at least 1"));
        }
        if !self
            .resampler_n_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Some(format!(
                "resampler_n_heads {} must be a multiple of num_key_value_heads {}",
                self.resampler_n_heads, self.num_key_value_heads
            ));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return Some(format!(
                "rms_norm_eps must be a positive number, got {}",
                self.rms_norm_eps
            ));
        }
        None
    }
}

/// Idefics2MLP: `down(silu(gate(x)) * up(x))`, no biases.
#[derive(Debug, Clone)]
struct SwiGlu {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl SwiGlu {
    fn load(in_dim: usize, mid_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            gate_proj: candle_nn::linear_no_bias(in_dim, mid_dim, vb.pp("gate_proj"))?,
            up_proj: candle_nn::linear_no_bias(in_dim, mid_dim, vb.pp("up_proj"))?,
            down_proj: candle_nn::linear_no_bias(mid_dim, out_dim, vb.pp("down_proj"))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let gate = self.gate_proj.forward(xs)?.silu()?;
        let up = self.up_proj.forward(xs)?;
        Ok(self.down_proj.forward(&(gate * up)?)?)
    }
}

/// Idefics2RMSNorm.
#[derive(Debug, Clone)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn load(size: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(size, "weight", Init::Const(1.0))?;
        Ok(Self { weight, eps })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let fused = xs.dtype() == DType::F32
            && xs.is_contiguous()
            && !xs.track_op()
            && !self.weight.track_op();
        if fused {
            // Same function in f32; no backward, hence only off the training path.
            #[allow(clippy::cast_possible_truncation)] // an epsilon fits an f32
            let eps = self.eps as f32;
            return Ok(candle_nn::ops::rms_norm(xs, &self.weight, eps)?);
        }
        let dtype = xs.dtype();
        let xs = xs.to_dtype(DType::F32)?;
        let variance = xs.sqr()?.mean_keepdim(D::Minus1)?;
        let inv_rms = (variance + self.eps)?.sqrt()?.recip()?;
        let normed = xs.broadcast_mul(&inv_rms)?.to_dtype(dtype)?;
        Ok(normed.broadcast_mul(&self.weight)?)
    }
}

/// Softmax over the last dimension in f32, composite when gradients flow.
fn softmax_last_dim(scores: &Tensor) -> Result<Tensor> {
    if scores.track_op() {
        Ok(candle_nn::ops::softmax(scores, D::Minus1)?)
    } else {
        Ok(candle_nn::ops::softmax_last_dim(scores)?)
    }
}

/// Idefics2PerceiverAttention: latents attend to `[context, latents]`.
#[derive(Debug, Clone)]
struct PerceiverAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
}

impl PerceiverAttention {
    fn load(hidden: usize, config: &Idefics2ConnectorConfig, vb: VarBuilder) -> Result<Self> {
        let n_heads = config.resampler_n_heads;
        let n_kv_heads = config.num_key_value_heads;
        let head_dim = config.resampler_head_dim;
        Ok(Self {
            q_proj: candle_nn::linear_no_bias(hidden, n_heads * head_dim, vb.pp("q_proj"))?,
            k_proj: candle_nn::linear_no_bias(hidden, n_kv_heads * head_dim, vb.pp("k_proj"))?,
            v_proj: candle_nn::linear_no_bias(hidden, n_kv_heads * head_dim, vb.pp("v_proj"))?,
            o_proj: candle_nn::linear_no_bias(n_heads * head_dim, hidden, vb.pp("o_proj"))?,
            n_heads,
            n_kv_heads,
            head_dim,
        })
    }

    /// `latents` `[n, q, hidden]` and `context` `[n, s, hidden]` (both normed);
    /// `bias` an additive `[n, 1, 1, s + q]` key bias. Returns `[n, q, hidden]`.
    ///
    /// The query heads that share a key/value head are stacked along the query
    /// axis, so each group is one product with its keys (no repeated K/V).
    fn forward(&self, latents: &Tensor, context: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let (n, q_len, _) = latents.dims3()?;
        let keys_in = Tensor::cat(&[context, latents], 1)?;
        let kv_len = keys_in.dim(1)?;
        let groups = self.n_heads / self.n_kv_heads;
        let scale = (self.head_dim as f64).powf(-0.5);

        // Head h reads key/value head h / groups (transformers' repeat_kv order), so
        // [n, heads, q, d] regroups as [n, kv_heads, groups * q, d].
        let queries = (self
            .q_proj
            .forward(latents)?
            .reshape((n, q_len, self.n_heads, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((n, self.n_kv_heads, groups * q_len, self.head_dim))?
            * scale)?;
        let split_heads = |xs: Tensor| -> candle_core::Result<Tensor> {
            xs.reshape((n, kv_len, self.n_kv_heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let keys = split_heads(self.k_proj.forward(&keys_in)?)?;
        let values = split_heads(self.v_proj.forward(&keys_in)?)?;

        let dtype = queries.dtype();
        let mut scores = queries.matmul(&keys.t()?)?.to_dtype(DType::F32)?;
        if let Some(bias) = bias {
            scores = scores.broadcast_add(bias)?;
        }
        let probs = softmax_last_dim(&scores)?.to_dtype(dtype)?;
        let out = probs
            .matmul(&values)?
            .reshape((n, self.n_heads, q_len, self.head_dim))?
            .transpose(1, 2)?
            .reshape((n, q_len, self.n_heads * self.head_dim))?;
        Ok(self.o_proj.forward(&out)?)
    }
}

/// Idefics2PerceiverLayer: pre-norm cross-attention and MLP, each with a residual.
#[derive(Debug, Clone)]
struct PerceiverLayer {
    input_latents_norm: RmsNorm,
    input_context_norm: RmsNorm,
    self_attn: PerceiverAttention,
    post_attention_layernorm: RmsNorm,
    mlp: SwiGlu,
}

impl PerceiverLayer {
    fn load(hidden: usize, config: &Idefics2ConnectorConfig, vb: VarBuilder) -> Result<Self> {
        let eps = config.rms_norm_eps;
        Ok(Self {
            input_latents_norm: RmsNorm::load(hidden, eps, vb.pp("input_latents_norm"))?,
            input_context_norm: RmsNorm::load(hidden, eps, vb.pp("input_context_norm"))?,
            self_attn: PerceiverAttention::load(hidden, config, vb.pp("self_attn"))?,
            post_attention_layernorm: RmsNorm::load(
                hidden,
                eps,
                vb.pp("post_attention_layernorm"),
            )?,
            mlp: SwiGlu::load(hidden, 4 * hidden, hidden, vb.pp("mlp"))?,
        })
    }

    fn forward(&self, latents: &Tensor, context: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let normed_latents = self.input_latents_norm.forward(latents)?;
        let normed_context = self.input_context_norm.forward(context)?;
        let attended = self
            .self_attn
            .forward(&normed_latents, &normed_context, bias)?;
        let latents = (latents + attended)?;
        let mlp_out = self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&latents)?)?;
        Ok((latents + mlp_out)?)
    }
}

/// Idefics2Connector: modality projection, then the perceiver resampler.
#[derive(Debug, Clone)]
pub(super) struct Idefics2Connector {
    modality_projection: SwiGlu,
    latents: Tensor,
    layers: Vec<PerceiverLayer>,
    norm: RmsNorm,
}

impl Idefics2Connector {
    /// Loads from `vb` at the connector's own path (Idefics2's `connector`).
    ///
    /// With a `VarMap`-backed builder the norms start at one and the latents at
    /// N(0, 1): transformers starts the latents at ones too, which gives every
    /// latent the same query until training tells them apart.
    pub(super) fn load(
        config: &Idefics2ConnectorConfig,
        feature_dim: usize,
        hidden: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let modality_projection = SwiGlu::load(
            feature_dim,
            config.intermediate_size,
            hidden,
            vb.pp("modality_projection"),
        )?;
        let vb = vb.pp("perceiver_resampler");
        let latents = vb.get_with_hints(
            (config.resampler_n_latents, hidden),
            "latents",
            Init::Randn {
                mean: 0.0,
                stdev: 1.0,
            },
        )?;
        let layers_vb = vb.pp("layers");
        let layers = (0..config.resampler_depth)
            .map(|layer| PerceiverLayer::load(hidden, config, layers_vb.pp(layer.to_string())))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::load(hidden, config.rms_norm_eps, vb.pp("norm"))?;
        Ok(Self {
            modality_projection,
            latents,
            layers,
            norm,
        })
    }

    /// `features` `[n, s, feature_dim]` to `[n, n_latents, hidden]`. `key_mask`
    /// `[n, s]` marks real positions with a non-zero value; masked positions get no
    /// attention (and no gradient). The latents are never masked.
    pub(super) fn forward(&self, features: &Tensor, key_mask: Option<&Tensor>) -> Result<Tensor> {
        let context = self.modality_projection.forward(features)?;
        let n = context.dim(0)?;
        let (n_latents, hidden) = self.latents.dims2()?;
        let bias = key_mask.map(|mask| key_bias(mask, n_latents)).transpose()?;
        let mut latents = self
            .latents
            .unsqueeze(0)?
            .broadcast_as((n, n_latents, hidden))?
            .contiguous()?;
        for layer in &self.layers {
            latents = layer.forward(&latents, &context, bias.as_ref())?;
        }
        self.norm.forward(&latents)
    }
}

/// The additive f32 attention bias `[n, 1, 1, s + n_latents]` for a key mask
/// `[n, s]`: 0 where the mask is non-zero and at the latents, `f32::MIN` elsewhere
/// (the softmax's exp of it is exactly 0).
fn key_bias(mask: &Tensor, n_latents: usize) -> Result<Tensor> {
    let (n, s) = mask.dims2()?;
    let keep = mask.to_dtype(DType::F32)?.ne(0f32)?;
    let zeros = Tensor::zeros((n, s), DType::F32, mask.device())?;
    let masked = Tensor::full(f32::MIN, (n, s), mask.device())?;
    let context_bias = keep.where_cond(&zeros, &masked)?;
    let latent_bias = Tensor::zeros((n, n_latents), DType::F32, mask.device())?;
    Ok(Tensor::cat(&[context_bias, latent_bias], 1)?.reshape((n, 1, 1, s + n_latents))?)
}
