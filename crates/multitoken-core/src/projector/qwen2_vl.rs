//! Qwen2-VL's patch merger (Wang et al. 2024, "Qwen2-VL: Enhancing
//! Vision-Language Model's Perception of the World at Any Resolution"), the
//! `merger` of transformers' `Qwen2VisionTransformerPretrainedModel`
//! (`PatchMerger` in `models/qwen2_vl/modeling_qwen2_vl.py`):
//!
//! `mlp(ln_q(x).view(-1, feature_dim · m²))` with `m = spatial_merge_size`:
//! a LayerNorm (epsilon 1e-6) over each vision row, then every `m²`
//! consecutive rows (one `m × m` window: the tower's rows come in
//! merge-window order) joined into one vector, then `Linear(feature_dim · m²,
//! feature_dim · m²)`, exact GELU, `Linear(feature_dim · m², hidden)`.
//!
//! Qwen2.5-VL's `Qwen2_5_VLPatchMerger` is the same with an RMSNorm for
//! `ln_q` (`"norm": "rms_norm"`; float32 statistics, no bias).
//!
//! Keys under the projector's var builder (the `merger` level of a Qwen2-VL
//! checkpoint): `ln_q.{weight,bias}` (`ln_q.weight` with RMSNorm),
//! `mlp.0.{weight,bias}`, `mlp.2.{weight,bias}`.

use candle_core::{DType, Module, Tensor, D};
use candle_nn::{LayerNorm, LayerNormConfig, Linear, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// `PatchMerger`'s LayerNorm epsilon (fixed in transformers, not configurable).
const MERGER_LN_EPS: f64 = 1e-6;

/// The parameters of a Qwen2-VL patch merger; the widths come from the caller
/// (the tower's `embed_dim` in, the LM's hidden size out).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Qwen2VlMergerConfig {
    /// Side of the square window of rows merged into one (the vision config's
    /// `spatial_merge_size`, 2 in every Qwen2-VL checkpoint).
    pub spatial_merge_size: usize,
    /// `ln_q`'s kind: `layer_norm` (Qwen2-VL, the default) or `rms_norm` (Qwen2.5-VL).
    #[serde(default, skip_serializing_if = "MergerNorm::is_layer_norm")]
    pub norm: MergerNorm,
}

/// The norm a patch merger applies to each row first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MergerNorm {
    /// torch's `LayerNorm` with a bias (Qwen2-VL).
    #[default]
    LayerNorm,
    /// `Qwen2_5_VLRMSNorm` (Qwen2.5-VL).
    RmsNorm,
}

impl MergerNorm {
    fn is_layer_norm(&self) -> bool {
        *self == MergerNorm::LayerNorm
    }
}

impl Qwen2VlMergerConfig {
    /// Rows merged into one output position: `spatial_merge_size²`.
    pub fn rows_per_output(&self) -> usize {
        self.spatial_merge_size * self.spatial_merge_size
    }

    /// Why the parameters cannot build a merger, if they cannot.
    pub(super) fn problem(&self) -> Option<String> {
        (self.spatial_merge_size == 0).then(|| "spatial_merge_size must be at least 1".to_string())
    }
}

/// The merger's layers.
#[derive(Debug, Clone)]
pub(super) struct Qwen2VlMerger {
    ln_q: RowNorm,
    fc1: MergerLinear,
    fc2: MergerLinear,
    rows: usize,
    merged_width: usize,
}

impl Qwen2VlMerger {
    pub(super) fn load(config: &Qwen2VlMergerConfig, feature_dim: usize, hidden_size: usize, vb: VarBuilder) -> Result<Self> {
        let rows = config.rows_per_output();
        let merged_width = feature_dim * rows;
        let ln_config = LayerNormConfig { eps: MERGER_LN_EPS, ..Default::default() };
        Ok(Self {
            ln_q: match config.norm {
                MergerNorm::LayerNorm => RowNorm::Layer(candle_nn::layer_norm(feature_dim, ln_config, vb.pp("ln_q"))?),
                MergerNorm::RmsNorm => RowNorm::Rms(vb.pp("ln_q").get(feature_dim, "weight")?),
            },
            fc1: MergerLinear::new(candle_nn::linear(merged_width, merged_width, vb.pp("mlp.0"))?)?,
            fc2: MergerLinear::new(candle_nn::linear(merged_width, hidden_size, vb.pp("mlp.2"))?)?,
            rows,
            merged_width,
        })
    }

    /// `[n, width, feature_dim]` (width a multiple of `m²`) to `[n, width / m², hidden]`.
    pub(super) fn forward(&self, features: &Tensor) -> Result<Tensor> {
        let (n, width, _) = features.dims3()?;
        if width % self.rows != 0 {
            return Err(Error::projector(
                super::QWEN2_VL_MERGER,
                format!(
                    "merges {} rows into one but got {width} rows per item (shape {:?}); \
                     an image's rows are a whole number of merge windows",
                    self.rows,
                    features.dims()
                ),
            ));
        }
        let normed = self.ln_q.forward(features)?;
        let grouped = normed.reshape((n, width / self.rows, self.merged_width))?;
        let hidden = self.fc1.forward(&grouped)?.gelu_erf()?;
        self.fc2.forward(&hidden)
    }
}

/// A merger `Linear`. A frozen f32 CPU weight is kept transposed, `[in, out]`
/// and dense, and applied to the rows as one 2-D product: candle's `Linear`
/// multiplies by a transposed `[out, in]` view per batch, which ran the
/// 5120² product at ~0.75x torch's speed; a variable stays as it is so that
/// training sees its updates.
#[derive(Debug, Clone)]
enum MergerLinear {
    Plain(Linear),
    Frozen { weight_t: Tensor, bias: Option<Tensor> },
}

impl MergerLinear {
    fn new(linear: Linear) -> Result<Self> {
        let weight = linear.weight();
        let frozen = !weight.is_variable() && weight.device().is_cpu() && weight.dtype() == DType::F32;
        if !frozen || linear.bias().is_some_and(Tensor::is_variable) {
            return Ok(Self::Plain(linear));
        }
        Ok(Self::Frozen {
            weight_t: weight.t()?.contiguous()?,
            bias: linear.bias().cloned(),
        })
    }

    /// `x W^T + b` for `x` `[..., in]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Plain(linear) => Ok(linear.forward(x)?),
            Self::Frozen { weight_t, bias } => {
                let (inputs, outputs) = weight_t.dims2()?;
                let mut dims = x.dims().to_vec();
                let rows = x.elem_count() / inputs.max(1);
                let y = x.contiguous()?.reshape((rows, inputs))?.matmul(weight_t)?;
                let y = match bias {
                    Some(b) => y.broadcast_add(b)?,
                    None => y,
                };
                if let Some(last) = dims.last_mut() {
                    *last = outputs;
                }
                Ok(y.reshape(dims)?)
            }
        }
    }
}

/// The merger's `ln_q`.
#[derive(Debug, Clone)]
enum RowNorm {
    Layer(LayerNorm),
    /// An RMSNorm's weight.
    Rms(Tensor),
}

impl RowNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            RowNorm::Layer(ln) => layer_norm(ln, xs),
            RowNorm::Rms(weight) => {
                // Qwen2_5_VLRMSNorm: float32 statistics, weight applied in the input dtype.
                let dtype = xs.dtype();
                if !xs.track_op() && !weight.track_op() && dtype == DType::F32 {
                    return Ok(candle_nn::ops::rms_norm(&xs.contiguous()?, weight, MERGER_LN_EPS as f32)?);
                }
                let x32 = xs.to_dtype(DType::F32)?;
                let variance = x32.sqr()?.mean_keepdim(D::Minus1)?;
                let normed = x32.broadcast_div(&(variance + MERGER_LN_EPS)?.sqrt()?)?.to_dtype(dtype)?;
                Ok(normed.broadcast_mul(weight)?)
            }
        }
    }
}

/// LayerNorm through candle's fused kernel, or its composite form when
/// anything tracks gradients (the fused one has no backward).
fn layer_norm(ln: &LayerNorm, xs: &Tensor) -> Result<Tensor> {
    let tracked = xs.track_op() || ln.weight().track_op() || ln.bias().is_some_and(Tensor::track_op);
    match ln.bias() {
        Some(bias) if tracked => Ok(candle_nn::ops::layer_norm_slow(xs, ln.weight(), bias, MERGER_LN_EPS as f32)?),
        _ => Ok(ln.forward(xs)?),
    }
}
