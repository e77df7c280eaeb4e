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
//! Qwen2.5-VL's tower (`Qwen2_5_VisionTransformerPretrainedModel`, Bai et al.
//! 2025, "Qwen2.5-VL Technical Report") is the same with RMSNorms, a gated
//! MLP (`down(act(gate(x)) · up(x))`, SiLU by default, biases) and window
//! attention: the rows are put in window order ([`window_order`]:
//! `window_size` pixels a side, cut at the image's edges) and every block not
//! in `fullatt_block_indexes` attends within a window only; the order is
//! undone after the last block, so the output rows are in merge-window order
//! for either family (transformers undoes it after the merger instead, which
//! is the same since the merger works on each window of `m²` rows alone).
//!
//! Keys under the var builder given to [`Qwen2VisionTower::load`] (the
//! `visual` level): `patch_embed.proj.weight`, `blocks.{i}.{norm1,norm2}.*`,
//! `blocks.{i}.attn.{qkv,proj}.*`, `blocks.{i}.mlp.{fc1,fc2}.*` (Qwen2.5-VL:
//! `blocks.{i}.{norm1,norm2}.weight`, `blocks.{i}.mlp.{gate,up,down}_proj.*`). The products
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

/// `Qwen2VLVisionConfig` (or Qwen2.5-VL's `Qwen2_5_VLVisionConfig`) as in a
/// `config.json`'s `vision_config`; other fields (`initializer_range`,
/// `tokens_per_second`, the hub's `in_chans` / `spatial_patch_size`, which
/// transformers ignores too) are ignored.
///
/// The two families name the widths differently: Qwen2-VL's tower is
/// `embed_dim` wide and `hidden_size` is the LM's; Qwen2.5-VL's tower is
/// `hidden_size` wide and `out_hidden_size` is the LM's. [`Self::width`] and
/// [`Self::out_width`] read the right ones; [`Self::is_qwen2_5`] tells them apart.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Qwen2VisionConfig {
    /// Blocks.
    #[serde(default = "default_depth", alias = "num_hidden_layers")]
    pub depth: usize,
    /// Qwen2-VL: width of the tower's residual stream.
    #[serde(default = "default_embed_dim")]
    pub embed_dim: usize,
    /// Qwen2-VL: the merger's output width (the LM's); Qwen2.5-VL: the tower's width.
    #[serde(default = "default_hidden_size")]
    pub hidden_size: usize,
    /// Qwen2.5-VL: the merger's output width (the LM's).
    #[serde(default)]
    pub out_hidden_size: Option<usize>,
    /// MLP activation: `quick_gelu` (Qwen2-VL's default), `silu` (Qwen2.5-VL's),
    /// `gelu`, `gelu_pytorch_tanh` / `gelu_new`.
    #[serde(default)]
    pub hidden_act: Option<String>,
    /// Qwen2-VL: MLP width as a multiple of the width (`int(embed_dim · mlp_ratio)`).
    #[serde(default = "default_mlp_ratio")]
    pub mlp_ratio: f64,
    /// Qwen2.5-VL: width of the gated MLP (3420 by default).
    #[serde(default)]
    pub intermediate_size: Option<usize>,
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
    /// Qwen2.5-VL: side of an attention window in pixels (112 by default).
    #[serde(default)]
    pub window_size: Option<usize>,
    /// Qwen2.5-VL: the blocks with full attention (the others attend within
    /// windows); `[7, 15, 23, 31]` by default.
    #[serde(default)]
    pub fullatt_block_indexes: Option<Vec<usize>>,
    /// `qwen2_vl_vision` (or the older `qwen2_vl`), `qwen2_5_vl_vision` (or `qwen2_5_vl`).
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
            out_hidden_size: None,
            hidden_act: None,
            mlp_ratio: default_mlp_ratio(),
            intermediate_size: None,
            num_heads: default_heads(),
            in_channels: default_channels(),
            patch_size: default_patch(),
            spatial_merge_size: default_merge(),
            temporal_patch_size: default_temporal(),
            rope_parameters: None,
            rope_theta: None,
            window_size: None,
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

impl MlpActivation {
    fn apply(self, linear: &Linear, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            MlpActivation::Fused(act) => linear.forward_with(x, act)?,
            MlpActivation::GeluTanh => gelu_tanh(&linear.forward(x)?)?,
            MlpActivation::Silu => linear.forward(x)?.silu()?,
        })
    }
}

impl Qwen2VisionConfig {
    /// Whether this is Qwen2.5-VL's tower (RMSNorm, gated MLP, window
    /// attention): its `model_type`, or Qwen2.5-only fields.
    pub fn is_qwen2_5(&self) -> bool {
        match self.model_type.as_deref() {
            Some(t) if t.starts_with("qwen2_5_vl") => true,
            Some(t) if t.starts_with("qwen2_vl") => false,
            _ => self.fullatt_block_indexes.is_some() || self.out_hidden_size.is_some() || self.window_size.is_some(),
        }
    }

    /// Width of the tower's residual stream (the merger's input rows).
    pub fn width(&self) -> usize {
        if self.is_qwen2_5() {
            self.hidden_size
        } else {
            self.embed_dim
        }
    }

    /// Width of the merger's output: the LM's hidden size.
    pub fn out_width(&self) -> usize {
        if self.is_qwen2_5() {
            self.out_hidden_size.unwrap_or(3584)
        } else {
            self.hidden_size
        }
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.width() / self.num_heads.max(1)
    }

    /// Width of the MLP: Qwen2.5-VL's `intermediate_size`, else `int(width · mlp_ratio)`.
    pub fn mlp_dim(&self) -> usize {
        if self.is_qwen2_5() {
            self.intermediate_size.unwrap_or(3420)
        } else {
            (self.width() as f64 * self.mlp_ratio) as usize
        }
    }

    /// The activation's name: given, else the family's default.
    pub fn activation_name(&self) -> &str {
        match &self.hidden_act {
            Some(name) => name,
            None if self.is_qwen2_5() => "silu",
            None => "quick_gelu",
        }
    }

    /// Qwen2.5-VL's attention windows, in merged patches per side
    /// (`window_size / spatial_merge_size / patch_size`); `None` for Qwen2-VL.
    pub fn window_units(&self) -> Option<usize> {
        self.is_qwen2_5()
            .then(|| self.window_size.unwrap_or(112) / self.spatial_merge_size.max(1) / self.patch_size.max(1))
    }

    /// Whether block `index` attends over whole frames (every Qwen2-VL block;
    /// Qwen2.5-VL's `fullatt_block_indexes`), rather than within windows.
    pub fn full_attention(&self, index: usize) -> bool {
        if !self.is_qwen2_5() {
            return true;
        }
        match &self.fullatt_block_indexes {
            Some(list) => list.contains(&index),
            None => [7, 15, 23, 31].contains(&index),
        }
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
        let sizes = [
            ("depth", self.depth),
            ("width (embed_dim, or Qwen2.5-VL's hidden_size)", self.width()),
            ("output width (hidden_size, or Qwen2.5-VL's out_hidden_size)", self.out_width()),
            ("num_heads", self.num_heads),
            ("in_channels", self.in_channels),
            ("patch_size", self.patch_size),
            ("spatial_merge_size", self.spatial_merge_size),
            ("temporal_patch_size", self.temporal_patch_size),
        ];
        if let Some((name, _)) = sizes.iter().find(|(_, v)| *v == 0) {
            return bad(format!("{name} must be at least 1"));
        }
        if !self.width().is_multiple_of(self.num_heads) {
            return bad(format!("the width {} is not divisible by num_heads {}", self.width(), self.num_heads));
        }
        // The rotary angles split a head in four (h and w halves, each twice).
        if !self.head_dim().is_multiple_of(4) {
            return bad(format!(
                "the head width {} (width / num_heads) must be a multiple of 4 for the 2-D rotary embedding",
                self.head_dim()
            ));
        }
        // Qwen2.5-VL sizes its MLP by `intermediate_size`; only Qwen2-VL reads the ratio.
        let ratio_is_positive = self.mlp_ratio.is_finite() && self.mlp_ratio > 0.0;
        if !(self.is_qwen2_5() || ratio_is_positive) {
            return bad(format!("mlp_ratio must be a positive number, got {}", self.mlp_ratio));
        }
        if self.mlp_dim() == 0 {
            return bad("the MLP width (intermediate_size, or width · mlp_ratio) must be at least 1".into());
        }
        if self.window_units() == Some(0) {
            return bad(format!(
                "window_size {} is smaller than one merged patch ({} pixels)",
                self.window_size.unwrap_or(112),
                self.spatial_merge_size * self.patch_size
            ));
        }
        if let Some(index) = self.fullatt_block_indexes.iter().flatten().find(|&&i| i >= self.depth) {
            return bad(format!("fullatt_block_indexes names block {index} but the tower has {} (depth)", self.depth));
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
        match self.activation_name() {
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

/// Qwen2.5-VL's window attention order of one `[t, h, w]` patch grid
/// (transformers' `get_vision_window_index`): the merged patches (`m × m`
/// windows of rows) of each frame taken window by window — windows of
/// `units × units` merged patches row-major, cut short at the right and
/// bottom edges, the merged patches of a window row-major — and the length in
/// rows of each window, in that order.
pub fn window_order(grid: [usize; 3], merge: usize, units: usize) -> (Vec<usize>, Vec<usize>) {
    let [t, h, w] = grid;
    let merge = merge.max(1);
    let units = units.max(1);
    let (llm_h, llm_w) = (h / merge, w / merge);
    let mut order = Vec::with_capacity(t * llm_h * llm_w);
    let mut lengths = Vec::new();
    for frame in 0..t {
        let offset = frame * llm_h * llm_w;
        for wy in 0..llm_h.div_ceil(units) {
            for wx in 0..llm_w.div_ceil(units) {
                let before = order.len();
                for y in wy * units..((wy + 1) * units).min(llm_h) {
                    for x in wx * units..((wx + 1) * units).min(llm_w) {
                        order.push(offset + y * llm_w + x);
                    }
                }
                lengths.push((order.len() - before) * merge * merge);
            }
        }
    }
    (order, lengths)
}

/// The Qwen2-VL (or Qwen2.5-VL) vision transformer, merger excluded.
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
        let d = config.width();
        let (c, t, p) = (config.in_channels, config.temporal_patch_size, config.patch_size);
        let weight = vb
            .get((d, c, t, p, p), "patch_embed.proj.weight")?
            .reshape((d, config.row_width()))?;
        let patch_embed = Linear::new(weight, None)?;
        let act = config
            .activation()
            .map_err(|reason| Error::config("Qwen2-VL vision config", reason))?;
        let blocks = (0..config.depth)
            .map(|i| Block::load(config, act, i, vb.pp(format!("blocks.{i}"))))
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
    /// for one item): the last block's output, `[t · h · w, width]`, rows in
    /// the input's merge-window order (Qwen2.5-VL's window order undone, so
    /// that its merger needs no reordering). Each frame attends to itself only.
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
        let mut hidden = self.patch_embed.forward(&rows)?;
        let (mut cos, mut sin) = self.rotary(grid)?;
        // Full attention: each frame alone. Windows (Qwen2.5-VL): rows put in
        // window order, each window alone; undone after the last block.
        let frames = vec![h * w; t];
        let mut windows = None;
        if let Some(units) = cfg.window_units() {
            let (order, lengths) = window_order(grid, m, units);
            let unit = m * m;
            let rows_order: Vec<u32> = order.iter().flat_map(|&u| (u * unit..(u + 1) * unit).map(|r| r as u32)).collect();
            let mut inverse = vec![0u32; n];
            for (at, &r) in rows_order.iter().enumerate() {
                inverse[r as usize] = at as u32;
            }
            let forward_ids = Tensor::from_vec(rows_order, n, &self.device)?;
            hidden = hidden.index_select(&forward_ids, 0)?;
            cos = cos.index_select(&forward_ids, 0)?;
            sin = sin.index_select(&forward_ids, 0)?;
            windows = Some((lengths, Tensor::from_vec(inverse, n, &self.device)?));
        }
        let mut hidden = hidden.unsqueeze(0)?;
        for block in &self.blocks {
            let segments = match (&windows, block.full) {
                (Some((lengths, _)), false) => lengths.as_slice(),
                _ => frames.as_slice(),
            };
            hidden = block.forward(&hidden, &cos, &sin, segments)?;
        }
        let hidden = hidden.squeeze(0)?;
        Ok(match windows {
            Some((_, inverse)) => hidden.index_select(&inverse, 0)?,
            None => hidden,
        })
    }

    /// `cos` and `sin` `[t · h · w, 1, head_dim]` of the rows in
    /// merge-window order, float32.
    fn rotary(&self, grid: [usize; 3]) -> Result<(Tensor, Tensor)> {
        let ids = vision_position_ids(grid, self.config.spatial_merge_size);
        let quarter = self.inv_freq.len();
        let head_dim = 4 * quarter;
        let rows = ids.len();
        let mut cos = Vec::with_capacity(rows * head_dim);
        let mut sin = Vec::with_capacity(rows * head_dim);
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
            // torch's float32 `base ** exponent` is the double power rounded
            // once (checked against torch for head widths 16 to 160), then a
            // float32 reciprocal.
            let power = theta.powf(f64::from(exponent)) as f32;
            1.0f32 / power
        })
        .collect()
}

/// A block's norm: Qwen2-VL's LayerNorm or Qwen2.5-VL's RMSNorm, epsilon 1e-6.
#[derive(Debug, Clone)]
enum Norm {
    Layer(LayerNorm),
    Rms(Tensor),
}

impl Norm {
    fn load(cfg: &Qwen2VisionConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.width();
        if cfg.is_qwen2_5() {
            return Ok(Norm::Rms(vb.get(d, "weight")?));
        }
        let config = LayerNormConfig {
            eps: LAYER_NORM_EPS,
            ..Default::default()
        };
        Ok(Norm::Layer(layer_norm(d, config, vb)?))
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Norm::Layer(ln) => Ok(norm(ln, x)?),
            Norm::Rms(weight) => {
                // Qwen2_5_VLRMSNorm: float32 statistics, weight applied in the input dtype.
                let dtype = x.dtype();
                if !x.track_op() && !weight.track_op() && dtype == DType::F32 {
                    return Ok(candle_nn::ops::rms_norm(&x.contiguous()?, weight, LAYER_NORM_EPS as f32)?);
                }
                let x32 = x.to_dtype(DType::F32)?;
                let variance = x32.sqr()?.mean_keepdim(D::Minus1)?;
                let normed = x32.broadcast_div(&(variance + LAYER_NORM_EPS)?.sqrt()?)?.to_dtype(dtype)?;
                Ok(normed.broadcast_mul(weight)?)
            }
        }
    }
}

/// A block's MLP: Qwen2-VL's `fc2(act(fc1(x)))` or Qwen2.5-VL's
/// `down(act(gate(x)) · up(x))`, all with biases.
#[derive(Debug, Clone)]
enum Mlp {
    Plain { fc1: Linear, fc2: Linear },
    Gated { gate: Linear, up: Linear, down: Linear },
}

/// One `Qwen2VLVisionBlock` / `Qwen2_5_VLVisionBlock`.
#[derive(Debug, Clone)]
struct Block {
    norm1: Norm,
    qkv: Linear,
    proj: Linear,
    norm2: Norm,
    mlp: Mlp,
    heads: usize,
    act: MlpActivation,
    /// Attends over whole frames (else within Qwen2.5-VL's windows).
    full: bool,
}

impl Block {
    fn load(cfg: &Qwen2VisionConfig, act: MlpActivation, index: usize, vb: VarBuilder) -> Result<Self> {
        let d = cfg.width();
        let inner = cfg.mlp_dim();
        let mlp = if cfg.is_qwen2_5() {
            Mlp::Gated {
                gate: Linear::load(&vb.pp("mlp.gate_proj"), d, inner, true)?,
                up: Linear::load(&vb.pp("mlp.up_proj"), d, inner, true)?,
                down: Linear::load(&vb.pp("mlp.down_proj"), inner, d, true)?,
            }
        } else {
            Mlp::Plain {
                fc1: Linear::load(&vb.pp("mlp.fc1"), d, inner, true)?,
                fc2: Linear::load(&vb.pp("mlp.fc2"), inner, d, true)?,
            }
        };
        Ok(Self {
            norm1: Norm::load(cfg, vb.pp("norm1"))?,
            qkv: Linear::load(&vb.pp("attn.qkv"), d, 3 * d, true)?,
            proj: Linear::load(&vb.pp("attn.proj"), d, d, true)?,
            norm2: Norm::load(cfg, vb.pp("norm2"))?,
            mlp,
            heads: cfg.num_heads,
            act,
            full: cfg.full_attention(index),
        })
    }

    /// `x` `[1, rows, d]`; `cos`, `sin` `[rows, 1, head_dim]`; attention
    /// within each of the consecutive `segments` (lengths in rows).
    fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, segments: &[usize]) -> Result<Tensor> {
        let (_, rows, d) = x.dims3()?;
        let head_dim = d / self.heads;
        let h = self.norm1.forward(x)?;
        let qkv = self.qkv.forward(&h)?;
        let rotate = |part: usize| -> Result<Tensor> {
            let t = qkv.narrow(D::Minus1, part * d, d)?.reshape((rows, self.heads, head_dim))?;
            Ok(apply_rotary(&t, cos, sin)?.reshape((1, rows, d))?)
        };
        let (q, k) = match fused_rotary(&qkv, cos, sin, self.heads)? {
            Some(qk) => qk,
            None => (rotate(0)?, rotate(1)?),
        };
        let v = qkv.narrow(D::Minus1, 2 * d, d)?;
        let scale = (head_dim as f64).powf(-0.5);
        let attn = segmented_attention(&q, &k, &v, self.heads, scale, segments)?;
        // The residual sums are formed inside the products (one pass less each).
        let x = self.proj.forward_residual(&attn, x)?;
        let h = self.norm2.forward(&x)?;
        match &self.mlp {
            Mlp::Plain { fc1, fc2 } => Ok(fc2.forward_residual(&self.act.apply(fc1, &h)?, &x)?),
            Mlp::Gated { gate, up, down } => {
                let gated = (self.act.apply(gate, &h)? * up.forward(&h)?)?;
                Ok(down.forward_residual(&gated, &x)?)
            }
        }
    }
}

/// Attention of `[1, rows, d]` rows within each consecutive segment (the
/// `cu_seqlens` of transformers): segments of one length as one batch, else
/// one call per segment.
fn segmented_attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64, segments: &[usize]) -> Result<Tensor> {
    let (_, rows, d) = q.dims3()?;
    if segments.iter().sum::<usize>() != rows {
        return Err(Error::config(
            "Qwen2-VL vision tower",
            format!("attention segments cover {} rows, not {rows}", segments.iter().sum::<usize>()),
        ));
    }
    if let Some(&len) = segments.first() {
        if segments.iter().all(|&l| l == len) {
            let batch = |t: &Tensor| t.reshape((segments.len(), len, d));
            let out = multitoken_kernels::attention(&batch(q)?, &batch(k)?, &batch(v)?, heads, scale, None)?;
            return Ok(out.reshape((1, rows, d))?);
        }
    }
    let mut outputs = Vec::with_capacity(segments.len());
    let mut start = 0;
    for &len in segments {
        let part = |t: &Tensor| t.narrow(1, start, len);
        outputs.push(multitoken_kernels::attention(&part(q)?, &part(k)?, &part(v)?, heads, scale, None)?);
        start += len;
    }
    Ok(Tensor::cat(&outputs, 1)?)
}

/// q and k of a fused `[1, rows, 3d]` QKV output, rotated as [`apply_rotary`]
/// does, in one pass each (candle's composite took seven ops and copies per
/// tensor); `None` unless everything is a dense f32 CPU tensor outside autograd.
/// Same arithmetic: `a · cos - b · sin` equals `a · cos + (-b) · sin` to the bit.
fn fused_rotary(qkv: &Tensor, cos: &Tensor, sin: &Tensor, heads: usize) -> Result<Option<(Tensor, Tensor)>> {
    let all = [qkv, cos, sin];
    if !all.iter().all(|t| t.device().is_cpu() && t.dtype() == DType::F32 && !t.track_op() && t.is_contiguous()) {
        return Ok(None);
    }
    let (_, rows, width) = qkv.dims3()?;
    let d = width / 3;
    let head_dim = d / heads.max(1);
    if cos.elem_count() != rows * head_dim || sin.elem_count() != rows * head_dim || !head_dim.is_multiple_of(2) {
        return Ok(None);
    }
    let half = head_dim / 2;
    let (q, k) = {
        let (qkv_s, qkv_l) = qkv.storage_and_layout();
        let (cos_s, cos_l) = cos.storage_and_layout();
        let (sin_s, sin_l) = sin.storage_and_layout();
        let data = |s: &candle_core::Storage, l: &candle_core::Layout, len: usize| -> Result<Vec<f32>> {
            match s {
                candle_core::Storage::Cpu(cpu) => Ok(cpu.as_slice::<f32>()?[l.start_offset()..][..len].to_vec()),
                _ => Err(Error::config("Qwen2-VL vision tower", "expected CPU tensors")),
            }
        };
        // The tables are small (rows · head_dim); the qkv rows are read in place.
        let (cos, sin) = (data(&cos_s, cos_l, rows * head_dim)?, data(&sin_s, sin_l, rows * head_dim)?);
        let candle_core::Storage::Cpu(cpu) = &*qkv_s else {
            return Ok(None);
        };
        let x = &cpu.as_slice::<f32>()?[qkv_l.start_offset()..][..rows * width];
        let mut q = vec![0f32; rows * d];
        let mut k = vec![0f32; rows * d];
        for r in 0..rows {
            let (c, s) = (&cos[r * head_dim..][..head_dim], &sin[r * head_dim..][..head_dim]);
            for (part, out) in [(0, &mut q), (1, &mut k)] {
                let src = &x[r * width + part * d..][..d];
                let dst = &mut out[r * d..][..d];
                for h in 0..heads {
                    let (src, dst) = (&src[h * head_dim..][..head_dim], &mut dst[h * head_dim..][..head_dim]);
                    for i in 0..half {
                        let (a, b) = (src[i], src[i + half]);
                        dst[i] = a * c[i] - b * s[i];
                        dst[i + half] = b * c[i + half] + a * s[i + half];
                    }
                }
            }
        }
        (q, k)
    };
    let device = qkv.device();
    Ok(Some((Tensor::from_vec(q, (1, rows, d), device)?, Tensor::from_vec(k, (1, rows, d), device)?)))
}

/// `x · cos + rotate_half(x) · sin` over the last axis of `x` `[rows, heads,
/// head_dim]`, in float32 (`apply_rotary_pos_emb_vision`), cast back.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inv_freq_is_torchs_to_the_bit() {
        // `1.0 / (10000.0 ** (torch.arange(0, d/2, 2, dtype=torch.float) / (d/2)))`, as f32 bits.
        let cases: [(usize, &[u32]); 4] = [
            (16, &[0x3f800000, 0x3dcccccd, 0x3c23d70a, 0x3a83126f][..]),
            (64, &[0x3f800000, 0x3f0ff59a, 0x3ea1e89b, 0x3e361887, 0x3dcccccd, 0x3d6655c2, 0x3d0186e3, 0x3c91ad39, 0x3c23d70a, 0x3bb8449c, 0x3b4f3e38, 0x3ae91528, 0x3a83126f, 0x3a136a16, 0x39a5cb60, 0x393a7753][..]),
            (80, &[0x3f800000, 0x3f21866b, 0x3ecbd4b4, 0x3e809bcc, 0x3e224b06, 0x3dcccccd, 0x3d813855, 0x3d231091, 0x3ccdc613, 0x3c81d5a0, 0x3c23d70a, 0x3bcec089, 0x3b8273a4, 0x3b249e78, 0x3acfbc32, 0x3a83126f, 0x3a2566d4, 0x39d0b907, 0x3983b1fa, 0x39263028][..]),
            (128, &[0x3f800000, 0x3f3ff911, 0x3f0ff59a, 0x3ed7e89b, 0x3ea1e89b, 0x3e72d423, 0x3e361887, 0x3e088d77, 0x3dcccccd, 0x3d99940d, 0x3d6655c2, 0x3d2cba15, 0x3d0186e3, 0x3cc2434f, 0x3c91ad39, 0x3c5a7bf2, 0x3c23d70a, 0x3bf5b9b0, 0x3bb8449c, 0x3b8a2e77, 0x3b4f3e38, 0x3b1b690d, 0x3ae91528, 0x3aaec98e, 0x3a83126f, 0x3a44948c, 0x3a136a16, 0x39dd1725, 0x39a5cb60, 0x3978a815, 0x393a7753, 0x390bd472][..]),
        ];
        for (head_dim, want) in cases {
            let got: Vec<u32> = inv_freq(head_dim, 10_000.0).iter().map(|f| f.to_bits()).collect();
            assert_eq!(got, want, "head_dim {head_dim}");
        }
    }

    #[test]
    fn positions_follow_merge_windows() {
        let ids = vision_position_ids([1, 2, 4], 2);
        assert_eq!(ids, vec![[0, 0], [0, 1], [1, 0], [1, 1], [0, 2], [0, 3], [1, 2], [1, 3]]);
    }
}
