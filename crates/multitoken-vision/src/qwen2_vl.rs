//! Qwen2-VL's vision tower (Wang et al. 2024, "Qwen2-VL: Enhancing
//! Vision-Language Model's Perception of the World at Any Resolution"):
//! transformers' `Qwen2VisionTransformerPretrainedModel`
//! (`models/qwen2_vl/modeling_qwen2_vl.py`) up to, not including, its patch
//! merger (the merger is the core projector kind `qwen2_vl_merger`, so that
//! training the projector trains it).
//!
//! - Patch embedding: a `Conv3d` without bias whose kernel equals its stride
//!   (`temporal_patch_size × patch_size²`), i.e. one product of each
//!   preprocessed row (`[C · T · P · P]`, [`crate::qwen2_vl_processor`]) with
//!   the flattened kernel.
//! - 2-D rotary positions (`Qwen2VLVisionRotaryEmbedding`, axial): each row's
//!   `(h, w)` patch coordinates in merge-window order ([`vision_position_ids`]);
//!   `head_dim / 4` frequencies `θ^(-2i / (head_dim/2))`, the angles of `h`
//!   then of `w` filling half a head, repeated for the other half, applied to
//!   q and k with `rotate_half` in float32.
//! - `depth` pre-norm blocks: LayerNorm (eps 1e-6), fused `qkv` attention over
//!   the rows of one frame (`cu_seqlens`: an image never attends to another),
//!   `proj`, residual; LayerNorm, `fc1`, the config's `hidden_act`
//!   (`quick_gelu` by default), `fc2`, residual. No final norm: the merger
//!   has its own.
//!
//! Keys under the var builder given to [`Qwen2VisionTower::load`] (the
//! `visual` level): `patch_embed.proj.weight`, `blocks.{i}.{norm1,norm2}.*`,
//! `blocks.{i}.attn.{qkv,proj}.*`, `blocks.{i}.mlp.{fc1,fc2}.*`. The products
//! go through multitoken-kernels' threaded `Linear` (the residual sums inside,
//! the activation fused) and its attention kernel, as CLIP's tower does.

use candle_core::{DType, Device, Tensor, D};
use candle_nn::{layer_norm, LayerNorm, LayerNormConfig, VarBuilder};
use multitoken_kernels::{layer_norm as norm, Activation, Linear};
use serde::Deserialize;

use crate::siglip::gelu_tanh;
use crate::{Error, Result};

/// The blocks' LayerNorm epsilon (fixed in transformers).
const LAYER_NORM_EPS: f64 = 1e-6;

/// `Qwen2VLVisionConfig` as in a Qwen2-VL `config.json`'s `vision_config`;
/// other fields (`model_type`, `initializer_range`, the hub's `in_chans` /
/// `spatial_patch_size`, which transformers ignores too) are ignored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Qwen2VisionConfig {
    /// Blocks.
    #[serde(default = "default_depth", alias = "num_hidden_layers")]
    pub depth: usize,
    /// Width of the tower's residual stream.
    #[serde(default = "default_embed_dim")]
    pub embed_dim: usize,
    /// Width of the merger's output: the LM's hidden size.
    #[serde(default = "default_hidden_size")]
    pub hidden_size: usize,
    /// MLP activation: `quick_gelu`, `gelu`, `gelu_pytorch_tanh` / `gelu_new`, `silu`.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// MLP width as a multiple of `embed_dim` (`int(embed_dim · mlp_ratio)`).
    #[serde(default = "default_mlp_ratio")]
    pub mlp_ratio: f64,
    /// Attention heads.
    #[serde(default = "default_heads", alias = "num_attention_heads")]
    pub num_heads: usize,
    /// Input channels.
    #[serde(default = "default_channels")]
    pub in_channels: usize,
    /// Patch side in pixels.
    #[serde(default = "default_patch")]
    pub patch_size: usize,
    /// Side of the window of patches the merger joins.
    #[serde(default = "default_merge")]
    pub spatial_merge_size: usize,
    /// Frames per temporal patch.
    #[serde(default = "default_temporal")]
    pub temporal_patch_size: usize,
    /// `{"rope_theta": ..., "rope_type": "axial"}`; θ 10000 when absent.
    #[serde(default)]
    pub rope_parameters: Option<serde_json::Value>,
    /// Older configs' top-level θ.
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// Qwen2.5-VL's marker (its tower has window attention and RMSNorm): refused.
    #[serde(default)]
    pub fullatt_block_indexes: Option<serde_json::Value>,
    /// `qwen2_vl_vision` (or the older `qwen2_vl`); Qwen2.5-VL's is refused.
    #[serde(default)]
    pub model_type: Option<String>,
}

fn default_depth() -> usize {
    32
}
fn default_embed_dim() -> usize {
    1280
}
fn default_hidden_size() -> usize {
    3584
}
fn default_act() -> String {
    "quick_gelu".to_string()
}
fn default_mlp_ratio() -> f64 {
    4.0
}
fn default_heads() -> usize {
    16
}
fn default_channels() -> usize {
    3
}
fn default_patch() -> usize {
    14
}
fn default_merge() -> usize {
    2
}
fn default_temporal() -> usize {
    2
}

impl Default for Qwen2VisionConfig {
    /// `Qwen2VLVisionConfig()`'s defaults (Qwen2-VL-7B's tower).
    fn default() -> Self {
        Self {
            depth: default_depth(),
            embed_dim: default_embed_dim(),
            hidden_size: default_hidden_size(),
            hidden_act: default_act(),
            mlp_ratio: default_mlp_ratio(),
            num_heads: default_heads(),
            in_channels: default_channels(),
            patch_size: default_patch(),
            spatial_merge_size: default_merge(),
            temporal_patch_size: default_temporal(),
            rope_parameters: None,
            rope_theta: None,
            fullatt_block_indexes: None,
            model_type: None,
        }
    }
}

/// The MLP activation of a tower.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MlpActivation {
    /// One the kernels fuse into `fc1`.
    Fused(Activation),
    /// The tanh approximation of GELU, a pass after `fc1`.
    GeluTanh,
    /// SiLU, a pass after `fc1`.
    Silu,
}

impl Qwen2VisionConfig {
    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.embed_dim / self.num_heads.max(1)
    }

    /// Width of the MLP: `int(embed_dim · mlp_ratio)`.
    pub fn mlp_dim(&self) -> usize {
        (self.embed_dim as f64 * self.mlp_ratio) as usize
    }

    /// Width of one preprocessed row: `in_channels · temporal_patch_size · patch_size²`.
    pub fn row_width(&self) -> usize {
        self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size
    }

    /// The rotary base θ: `rope_parameters.rope_theta`, else `rope_theta`, else 10000.
    pub fn rope_theta(&self) -> f64 {
        self.rope_parameters
            .as_ref()
            .and_then(|p| p.get("rope_theta"))
            .and_then(serde_json::Value::as_f64)
            .or(self.rope_theta)
            .unwrap_or(10_000.0)
    }

    /// Checks that every size is positive and the shapes fit together; `what`
    /// names the config in errors.
    pub fn validate(&self, what: &str) -> Result<()> {
        let bad = |reason: String| Err(Error::config(what, reason));
        if self.fullatt_block_indexes.is_some() || self.model_type.as_deref() == Some("qwen2_5_vl") {
            return bad("this is a Qwen2.5-VL vision config (window attention, RMSNorm, SwiGLU): not supported, only Qwen2-VL's tower is".into());
        }
        let sizes = [
            ("depth", self.depth),
            ("embed_dim", self.embed_dim),
            ("hidden_size", self.hidden_size),
            ("num_heads", self.num_heads),
            ("in_channels", self.in_channels),
            ("patch_size", self.patch_size),
            ("spatial_merge_size", self.spatial_merge_size),
            ("temporal_patch_size", self.temporal_patch_size),
        ];
        if let Some((name, _)) = sizes.iter().find(|(_, v)| *v == 0) {
            return bad(format!("{name} must be at least 1"));
        }
        if !self.embed_dim.is_multiple_of(self.num_heads) {
            return bad(format!("embed_dim {} is not divisible by num_heads {}", self.embed_dim, self.num_heads));
        }
        // The rotary angles split a head in four (h and w halves, each twice).
        if !self.head_dim().is_multiple_of(4) {
            return bad(format!(
                "the head width embed_dim / num_heads = {} must be a multiple of 4 for the 2-D rotary embedding",
                self.head_dim()
            ));
        }
        if !(self.mlp_ratio.is_finite() && self.mlp_ratio > 0.0) || self.mlp_dim() == 0 {
            return bad(format!("mlp_ratio must be a positive number, got {}", self.mlp_ratio));
        }
        let theta = self.rope_theta();
        if !(theta.is_finite() && theta > 0.0) {
            return bad(format!("rope_theta must be a positive number, got {theta}"));
        }
        if let Some(kind) = self
            .rope_parameters
            .as_ref()
            .and_then(|p| p.get("rope_type").or_else(|| p.get("type")))
            .and_then(serde_json::Value::as_str)
        {
            if kind != "axial" && kind != "default" {
                return bad(format!("the vision rotary embedding supports only `axial` rope, got `{kind}`"));
            }
        }
        self.activation().map(|_| ()).map_err(|reason| Error::config(what, reason))
    }

    fn activation(&self) -> std::result::Result<MlpActivation, String> {
        match self.hidden_act.as_str() {
            "quick_gelu" => Ok(MlpActivation::Fused(Activation::QuickGelu)),
            "gelu" => Ok(MlpActivation::Fused(Activation::Gelu)),
            "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" => Ok(MlpActivation::GeluTanh),
            "silu" | "swish" => Ok(MlpActivation::Silu),
            other => Err(format!(
                "hidden_act `{other}` is not supported (quick_gelu, gelu, gelu_pytorch_tanh, gelu_new, gelu_fast, silu)"
            )),
        }
    }
}

/// The rotary `(h, w)` coordinates of each row of a `[t, h, w]` patch grid, in
/// merge-window order (transformers' `get_vision_position_ids`): windows of
/// `merge × merge` patches row-major, the patches of each window row-major,
/// the whole repeated for every frame.
pub fn vision_position_ids(grid: [usize; 3], merge: usize) -> Vec<[u32; 2]> {
    let [t, h, w] = grid;
    let merge = merge.max(1);
    let mut ids = Vec::with_capacity(t * h * w);
    for _ in 0..t {
        for block_y in 0..h / merge {
            for block_x in 0..w / merge {
                for in_y in 0..merge {
                    for in_x in 0..merge {
                        ids.push([(block_y * merge + in_y) as u32, (block_x * merge + in_x) as u32]);
                    }
                }
            }
        }
    }
    ids
}

/// The Qwen2-VL vision transformer, merger excluded.
#[derive(Debug, Clone)]
pub struct Qwen2VisionTower {
    config: Qwen2VisionConfig,
    /// The `Conv3d` as a linear over flattened `(c, t, p, p)` rows.
    patch_embed: Linear,
    /// `head_dim / 4` rotary frequencies, float32 as transformers computes them.
    inv_freq: Vec<f32>,
    blocks: Vec<Block>,
    dtype: DType,
    device: Device,
}

impl Qwen2VisionTower {
    /// Loads the tower from `vb` at the `visual` level. A missing or
    /// mis-shaped tensor is an error naming its key.
    pub fn load(vb: VarBuilder, config: &Qwen2VisionConfig) -> Result<Self> {
        config.validate("Qwen2-VL vision config")?;
        let d = config.embed_dim;
        let (c, t, p) = (config.in_channels, config.temporal_patch_size, config.patch_size);
        let weight = vb
            .get((d, c, t, p, p), "patch_embed.proj.weight")?
            .reshape((d, config.row_width()))?;
        let patch_embed = Linear::new(weight, None)?;
        let act = config
            .activation()
            .map_err(|reason| Error::config("Qwen2-VL vision config", reason))?;
        let blocks = (0..config.depth)
            .map(|i| Block::load(config, act, vb.pp(format!("blocks.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            config: config.clone(),
            patch_embed,
            inv_freq: inv_freq(config.head_dim(), config.rope_theta()),
            blocks,
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })
    }

    /// The config the tower was built from.
    pub fn config(&self) -> &Qwen2VisionConfig {
        &self.config
    }

    /// Encodes one image's (or video's) rows `[t · h · w, row_width]` of patch
    /// grid `[t, h, w]` (the processor's `pixel_values` and `image_grid_thw`
    /// for one item): the last block's output, `[t · h · w, embed_dim]`, rows
    /// in the input's merge-window order. Each frame attends to itself only.
    pub fn forward(&self, rows: &Tensor, grid: [usize; 3]) -> Result<Tensor> {
        let cfg = &self.config;
        let [t, h, w] = grid;
        let n = t * h * w;
        let m = cfg.spatial_merge_size;
        if n == 0 || !h.is_multiple_of(m) || !w.is_multiple_of(m) {
            return Err(Error::config(
                "Qwen2-VL vision tower",
                format!("the patch grid {grid:?} must be non-empty with h and w multiples of spatial_merge_size {m}"),
            ));
        }
        let (got, width) = rows.dims2()?;
        if got != n || width != cfg.row_width() {
            return Err(Error::config(
                "Qwen2-VL vision tower",
                format!(
                    "expects [{n}, {}] rows for the grid {grid:?} (in_channels · temporal_patch_size · patch_size²), got {:?}",
                    cfg.row_width(),
                    rows.dims()
                ),
            ));
        }
        let rows = rows.to_device(&self.device)?.to_dtype(self.dtype)?;
        // Frames as the batch: attention stays inside each one (cu_seqlens).
        let mut hidden = self.patch_embed.forward(&rows)?.reshape((t, h * w, cfg.embed_dim))?;
        let (cos, sin) = self.rotary(grid)?;
        for block in &self.blocks {
            hidden = block.forward(&hidden, &cos, &sin)?;
        }
        Ok(hidden.reshape((n, cfg.embed_dim))?)
    }

    /// `cos` and `sin` `[h · w, 1, head_dim]` of one frame's rows (every frame
    /// has the same positions), float32.
    fn rotary(&self, grid: [usize; 3]) -> Result<(Tensor, Tensor)> {
        let [_, h, w] = grid;
        let ids = vision_position_ids([1, h, w], self.config.spatial_merge_size);
        let quarter = self.inv_freq.len();
        let head_dim = 4 * quarter;
        let mut cos = Vec::with_capacity(ids.len() * head_dim);
        let mut sin = Vec::with_capacity(ids.len() * head_dim);
        let mut angles = vec![0f32; 2 * quarter];
        for [y, x] in ids {
            for (i, f) in self.inv_freq.iter().enumerate() {
                // float32 products, as torch's `position_ids.float() * inv_freq`.
                angles[i] = y as f32 * f;
                angles[quarter + i] = x as f32 * f;
            }
            for _ in 0..2 {
                cos.extend(angles.iter().map(|&a| f64::from(a).cos() as f32));
                sin.extend(angles.iter().map(|&a| f64::from(a).sin() as f32));
            }
        }
        let rows = h * w;
        Ok((
            Tensor::from_vec(cos, (rows, 1, head_dim), &self.device)?,
            Tensor::from_vec(sin, (rows, 1, head_dim), &self.device)?,
        ))
    }
}

/// `1 / θ^(arange(0, head_dim/2, 2) / (head_dim/2))` in float32, as
/// `compute_axial_rope_parameters` computes it.
fn inv_freq(head_dim: usize, theta: f64) -> Vec<f32> {
    let spatial = head_dim / 2;
    (0..spatial)
        .step_by(2)
        .map(|i| {
            let exponent = i as f32 / spatial as f32;
            let power = (theta as f32).powf(exponent);
            1.0f32 / power
        })
        .collect()
}

fn ln_config() -> LayerNormConfig {
    LayerNormConfig {
        eps: LAYER_NORM_EPS,
        ..Default::default()
    }
}

/// One `Qwen2VLVisionBlock`.
#[derive(Debug, Clone)]
struct Block {
    norm1: LayerNorm,
    qkv: Linear,
    proj: Linear,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
    act: MlpActivation,
}

impl Block {
    fn load(cfg: &Qwen2VisionConfig, act: MlpActivation, vb: VarBuilder) -> Result<Self> {
        let d = cfg.embed_dim;
        let mlp = cfg.mlp_dim();
        Ok(Self {
            norm1: layer_norm(d, ln_config(), vb.pp("norm1"))?,
            qkv: Linear::load(&vb.pp("attn.qkv"), d, 3 * d, true)?,
            proj: Linear::load(&vb.pp("attn.proj"), d, d, true)?,
            norm2: layer_norm(d, ln_config(), vb.pp("norm2"))?,
            fc1: Linear::load(&vb.pp("mlp.fc1"), d, mlp, true)?,
            fc2: Linear::load(&vb.pp("mlp.fc2"), mlp, d, true)?,
            heads: cfg.num_heads,
            act,
        })
    }

    /// `x` `[frames, rows, d]`; `cos`, `sin` `[rows, 1, head_dim]`.
    fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let (frames, rows, d) = x.dims3()?;
        let head_dim = d / self.heads;
        let h = norm(&self.norm1, x)?;
        let qkv = self.qkv.forward(&h)?;
        let rotate = |part: usize| -> Result<Tensor> {
            let t = qkv.narrow(D::Minus1, part * d, d)?.reshape((frames, rows, self.heads, head_dim))?;
            Ok(apply_rotary(&t, cos, sin)?.reshape((frames, rows, d))?)
        };
        let q = rotate(0)?;
        let k = rotate(1)?;
        let v = qkv.narrow(D::Minus1, 2 * d, d)?;
        let scale = (head_dim as f64).powf(-0.5);
        let attn = multitoken_kernels::attention(&q, &k, &v, self.heads, scale, None)?;
        // The residual sums are formed inside the products (one pass less each).
        let x = self.proj.forward_residual(&attn, x)?;
        let h = norm(&self.norm2, &x)?;
        let h = match self.act {
            MlpActivation::Fused(act) => self.fc1.forward_with(&h, act)?,
            MlpActivation::GeluTanh => gelu_tanh(&self.fc1.forward(&h)?)?,
            MlpActivation::Silu => self.fc1.forward(&h)?.silu()?,
        };
        Ok(self.fc2.forward_residual(&h, &x)?)
    }
}

/// `x · cos + rotate_half(x) · sin` over the last axis of `x` `[frames, rows,
/// heads, head_dim]`, in float32 (`apply_rotary_pos_emb_vision`), cast back.
fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    let out = (x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?)?;
    out.to_dtype(dtype)?.contiguous()
}
