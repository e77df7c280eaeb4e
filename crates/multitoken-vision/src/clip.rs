//! The CLIP vision tower (Radford et al. 2021, "Learning Transferable Visual
//! Models From Natural Language Supervision"), as transformers'
//! `CLIPVisionModel` (`models/clip/modeling_clip.py`), with every layer's
//! hidden states available for LLaVA's `vision_feature_layer`.
//!
//! Keys under the var builder given to [`ClipVisionTower::load`] (the
//! `vision_model` level): `embeddings.{class_embedding, patch_embedding.weight,
//! position_embedding.weight}`, `pre_layrnorm.*`, `encoder.layers.{i}.{self_attn.
//! {q,k,v,out}_proj, layer_norm1, mlp.{fc1,fc2}, layer_norm2}.*`, `post_layernorm.*`.

use candle_core::{Tensor, D};
use multitoken_kernels::{layer_norm as norm, Activation, Linear, QkvProjection};
use candle_nn::{layer_norm, LayerNorm, LayerNormConfig, VarBuilder};
use serde::Deserialize;

use crate::{Error, Result};

/// `CLIPVisionConfig` as in `config.json` (or a llava `vision_config`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ClipVisionConfig {
    /// Width of the residual stream.
    #[serde(default = "default_hidden")]
    pub hidden_size: usize,
    /// Width of the MLP.
    #[serde(default = "default_intermediate")]
    pub intermediate_size: usize,
    /// Transformer layers.
    #[serde(default = "default_layers")]
    pub num_hidden_layers: usize,
    /// Attention heads.
    #[serde(default = "default_heads")]
    pub num_attention_heads: usize,
    /// Input side in pixels.
    #[serde(default = "default_image_size")]
    pub image_size: usize,
    /// Patch side in pixels.
    #[serde(default = "default_patch")]
    pub patch_size: usize,
    /// Input channels.
    #[serde(default = "default_channels")]
    pub num_channels: usize,
    /// `quick_gelu` (OpenAI CLIP) or `gelu` (exact).
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// LayerNorm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
}

fn default_hidden() -> usize {
    768
}
fn default_intermediate() -> usize {
    3072
}
fn default_layers() -> usize {
    12
}
fn default_heads() -> usize {
    12
}
fn default_image_size() -> usize {
    224
}
fn default_patch() -> usize {
    32
}
fn default_channels() -> usize {
    3
}
fn default_act() -> String {
    "quick_gelu".to_string()
}
fn default_eps() -> f64 {
    1e-5
}

impl ClipVisionConfig {
    /// Patches per image side.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Patch positions per image (CLS excluded).
    pub fn num_patches(&self) -> usize {
        self.grid() * self.grid()
    }

    /// Checks that the shapes are consistent.
    pub fn validate(&self, what: &str) -> Result<()> {
        let bad = |reason: String| Err(Error::config(what, reason));
        if self.patch_size == 0 || self.image_size < self.patch_size {
            return bad(format!(
                "patch_size {} must be positive and at most image_size {}",
                self.patch_size, self.image_size
            ));
        }
        if self.num_attention_heads == 0 || !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return bad(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if !matches!(self.hidden_act.as_str(), "quick_gelu" | "gelu") {
            return bad(format!("hidden_act `{}` is not supported (quick_gelu, gelu)", self.hidden_act));
        }
        Ok(())
    }
}

/// What the tower returns for a batch.
#[derive(Debug, Clone)]
pub struct ClipVisionOutput {
    /// `hidden_states[0]` (after `pre_layrnorm`) up to the last layer computed,
    /// each `[batch, 1 + patches, hidden]`.
    pub hidden_states: Vec<Tensor>,
    /// `post_layernorm(last[:, 0])`, `[batch, hidden]`, when the last layer ran.
    pub pooled: Option<Tensor>,
}

/// The CLIP vision transformer.
#[derive(Debug, Clone)]
pub struct ClipVisionTower {
    config: ClipVisionConfig,
    class_embedding: Tensor,
    patch_weight: Tensor,
    position_embedding: Tensor,
    pre_layrnorm: LayerNorm,
    layers: Vec<EncoderLayer>,
    post_layernorm: LayerNorm,
}

impl ClipVisionTower {
    /// Loads the tower from `vb` at the `vision_model` level.
    pub fn load(config: &ClipVisionConfig, vb: VarBuilder) -> Result<Self> {
        config.validate("CLIP vision config")?;
        let d = config.hidden_size;
        let p = config.patch_size;
        let emb = vb.pp("embeddings");
        let class_embedding = emb.get(d, "class_embedding")?;
        // A view of the checkpoint tensor, not a transposed copy: when the tower
        // trains, the weight is a variable and the forward must read its
        // current value (a copy made here would stay at the initial one).
        let patch_weight = emb
            .get((d, config.num_channels, p, p), "patch_embedding.weight")?
            .reshape((d, config.num_channels * p * p))?;
        let position_embedding =
            emb.get((config.num_patches() + 1, d), "position_embedding.weight")?;
        let ln = |name: &str| {
            layer_norm(
                d,
                LayerNormConfig {
                    eps: config.layer_norm_eps,
                    ..Default::default()
                },
                vb.pp(name),
            )
        };
        let pre_layrnorm = ln("pre_layrnorm")?;
        let post_layernorm = ln("post_layernorm")?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| EncoderLayer::load(config, vb.pp(format!("encoder.layers.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            config: config.clone(),
            class_embedding,
            patch_weight,
            position_embedding,
            pre_layrnorm,
            layers,
            post_layernorm,
        })
    }

    /// The config the tower was built from.
    pub fn config(&self) -> &ClipVisionConfig {
        &self.config
    }

    /// Runs `pixel_values` `[batch, 3, H, W]` through the first `num_layers` layers
    /// (all when `None`).
    pub fn forward(&self, pixel_values: &Tensor, num_layers: Option<usize>) -> Result<ClipVisionOutput> {
        let (b, c, h, w) = pixel_values.dims4()?;
        let cfg = &self.config;
        if c != cfg.num_channels || h != cfg.image_size || w != cfg.image_size {
            return Err(Error::config(
                "CLIP vision tower",
                format!(
                    "pixel values are [{b}, {c}, {h}, {w}] but the tower takes [_, {}, {s}, {s}]",
                    cfg.num_channels,
                    s = cfg.image_size
                ),
            ));
        }
        let p = cfg.patch_size;
        let g = cfg.grid();
        let dtype = self.patch_weight.dtype();
        // Stride-p convolution without bias = matmul over flattened patches.
        let patches = pixel_values
            .to_dtype(dtype)?
            .narrow(2, 0, g * p)?
            .narrow(3, 0, g * p)?
            .reshape((b, c, g, p, g, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .reshape((b * g * g, c * p * p))?;
        let patch_embeds = multitoken_kernels::linear(&patches, &self.patch_weight, None, Activation::Identity)?
            .reshape((b, g * g, cfg.hidden_size))?;
        let cls = self
            .class_embedding
            .reshape((1, 1, cfg.hidden_size))?
            .broadcast_as((b, 1, cfg.hidden_size))?;
        let embeddings = Tensor::cat(&[&cls, &patch_embeds], 1)?
            .broadcast_add(&self.position_embedding.unsqueeze(0)?)?;
        let mut hidden = norm(&self.pre_layrnorm, &embeddings)?;
        let run = num_layers.unwrap_or(self.layers.len()).min(self.layers.len());
        let mut hidden_states = Vec::with_capacity(run + 1);
        hidden_states.push(hidden.clone());
        for layer in &self.layers[..run] {
            hidden = layer.forward(&hidden)?;
            hidden_states.push(hidden.clone());
        }
        let pooled = if run == self.layers.len() {
            Some(norm(&self.post_layernorm, &hidden.narrow(1, 0, 1)?.squeeze(1)?)?)
        } else {
            None
        };
        Ok(ClipVisionOutput {
            hidden_states,
            pooled,
        })
    }
}

#[derive(Debug, Clone)]
struct EncoderLayer {
    /// q, k and v: one fused product when the tower is frozen.
    qkv: QkvProjection,
    out_proj: Linear,
    layer_norm1: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    layer_norm2: LayerNorm,
    heads: usize,
    quick_gelu: bool,
}

impl EncoderLayer {
    fn load(cfg: &ClipVisionConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        let attn = vb.pp("self_attn");
        let ln_cfg = LayerNormConfig {
            eps: cfg.layer_norm_eps,
            ..Default::default()
        };
        let q_proj = Linear::load(&attn.pp("q_proj"), d, d, true)?;
        let k_proj = Linear::load(&attn.pp("k_proj"), d, d, true)?;
        let v_proj = Linear::load(&attn.pp("v_proj"), d, d, true)?;
        Ok(Self {
            qkv: QkvProjection::new(q_proj, k_proj, v_proj)?,
            out_proj: Linear::load(&attn.pp("out_proj"), d, d, true)?,
            layer_norm1: layer_norm(d, ln_cfg, vb.pp("layer_norm1"))?,
            fc1: Linear::load(&vb.pp("mlp.fc1"), d, cfg.intermediate_size, true)?,
            fc2: Linear::load(&vb.pp("mlp.fc2"), cfg.intermediate_size, d, true)?,
            layer_norm2: layer_norm(d, ln_cfg, vb.pp("layer_norm2"))?,
            heads: cfg.num_attention_heads,
            quick_gelu: cfg.hidden_act == "quick_gelu",
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let d = x.dim(D::Minus1)?;
        let scale = ((d / self.heads) as f64).powf(-0.5);
        let h = norm(&self.layer_norm1, x)?;
        let (q, k, v) = self.qkv.forward(&h)?;
        let attn = multitoken_kernels::attention(&q, &k, &v, self.heads, scale, None)?;
        // The residual sums are formed inside the products (one pass less each).
        let x = self.out_proj.forward_residual(&attn, x)?;
        let act = if self.quick_gelu { Activation::QuickGelu } else { Activation::Gelu };
        let h = self.fc1.forward_with(&norm(&self.layer_norm2, &x)?, act)?;
        Ok(self.fc2.forward_residual(&h, &x)?)
    }
}

/// Which hidden states feed the projector (LLaVA's `vision_feature_layer` and
/// `vision_feature_select_strategy`, multi_token's pooled mode).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FeatureSelect {
    /// Hidden states of these layers (negative counts from the end of
    /// `hidden_states`, which has `num_layers + 1` entries), concatenated on the
    /// feature axis; `keep_cls` keeps position 0 (`full`) or drops it (`default`).
    Layers {
        /// Layer indexes as in the config.
        layers: Vec<i64>,
        /// `true` for `full`, `false` for `default`.
        keep_cls: bool,
    },
    /// The pooled output `[batch, 1, hidden]` (multi_token's `vision_clip_pool`).
    Pooled,
}

/// Layer indexes into `hidden_states` (`num_layers + 1` entries; negative
/// from the end), as LLaVA's `vision_feature_layer` gives them (CLIP and
/// SigLIP towers alike).
pub(crate) fn resolve_layers(layers: &[i64], num_layers: usize) -> Result<Vec<usize>> {
    let count = num_layers as i64 + 1;
    layers
        .iter()
        .map(|&l| {
            let at = if l < 0 { count + l } else { l };
            if (0..count).contains(&at) {
                Ok(at as usize)
            } else {
                Err(Error::config("vision_feature_layer", format!("layer {l} is outside a tower with {num_layers} layers")))
            }
        })
        .collect()
}

impl FeatureSelect {
    /// Resolves layer indexes against a tower of `num_layers` layers.
    fn resolved(&self, num_layers: usize) -> Result<Vec<usize>> {
        let FeatureSelect::Layers { layers, .. } = self else {
            return Ok(Vec::new());
        };
        if layers.is_empty() {
            return Err(Error::config("vision_feature_layer", "needs at least one layer"));
        }
        resolve_layers(layers, num_layers)
    }

    /// Checks the layers against the tower.
    pub fn validate(&self, num_layers: usize) -> Result<()> {
        self.resolved(num_layers).map(|_| ())
    }

    /// Positions per item and feature width for `config`.
    pub fn output_shape(&self, config: &ClipVisionConfig) -> (usize, usize) {
        match self {
            FeatureSelect::Pooled => (1, config.hidden_size),
            FeatureSelect::Layers { layers, keep_cls } => (
                config.num_patches() + usize::from(*keep_cls),
                config.hidden_size * layers.len(),
            ),
        }
    }

    /// Runs `tower` on `pixel_values` and selects the features:
    /// `[batch, positions, width]`.
    pub fn features(&self, tower: &ClipVisionTower, pixel_values: &Tensor) -> Result<Tensor> {
        let n = tower.config().num_hidden_layers;
        match self {
            FeatureSelect::Pooled => {
                let out = tower.forward(pixel_values, None)?;
                let pooled = out
                    .pooled
                    .ok_or_else(|| Error::config("vision_clip_pool", "the tower has no pooled output"))?;
                Ok(pooled.unsqueeze(1)?)
            }
            FeatureSelect::Layers { keep_cls, .. } => {
                let layers = self.resolved(n)?;
                let deepest = layers.iter().copied().max().unwrap_or(n);
                let out = tower.forward(pixel_values, Some(deepest))?;
                let picked = layers
                    .iter()
                    .map(|&l| out.hidden_states[l].clone())
                    .collect::<Vec<_>>();
                let features = Tensor::cat(&picked, D::Minus1)?;
                if *keep_cls {
                    Ok(features)
                } else {
                    let positions = features.dim(1)?;
                    Ok(features.narrow(1, 1, positions - 1)?)
                }
            }
        }
    }
}


