//! Projectors: from encoder features to LM embeddings.
//!
//! The kinds follow the Python projects this crate answers, with the same layer
//! layout so that their checkpoints load by key name:
//!
//! - `linear`: LLaVA's `nn.Linear(feature_dim, hidden)` applied per position.
//!   Keys: `weight`, `bias`.
//! - `mlp{N}x_gelu`: LLaVA's `build_vision_projector` /
//!   multi_token's `build_patch_mlp_projector`: `nn.Sequential(Linear(feat, hidden),
//!   (GELU, Linear(hidden, hidden)) x (N-1))` applied per patch. Keys are the
//!   Sequential indexes: `0.weight`, `0.bias`, `2.weight`, ... (`mm_projector.0.weight`
//!   once the caller prefixes the var builder with `mm_projector`).
//! - `vector_mlp`: multi_token's `_MLPVectorProjector`: `num_tokens` independent
//!   MLPs of `num_layers` linears (GELU between), each mapping one pooled feature
//!   vector `[feat]` to `[hidden]`; their outputs are concatenated into
//!   `[num_tokens, hidden]`. Keys: `mlps.{t}.{0,2,...}.{weight,bias}`.
//! - `resblock`: LLaVA-1.5's `SimpleResBlock(channels)`: `x = pre_norm(x);
//!   x + proj(x)` with `proj = Sequential(Linear, GELU, Linear)`; needs
//!   `feature_dim == hidden`. Keys: `pre_norm.{weight,bias}`, `proj.0.*`, `proj.2.*`.
//! - `linear_resblock`: Jñāna's projector: a `Linear(feature_dim, hidden)` (CLIP
//!   768 to Phi-2 2560) followed by a `SimpleResBlock(hidden)`, laid out as
//!   `nn.Sequential(linear, res_block)`. Keys: `0.*`, `1.pre_norm.*`, `1.proj.0.*`,
//!   `1.proj.2.*`.
//! - `idefics2_connector`: Idefics2's `Idefics2Connector` (also Cephalo's base): a
//!   SwiGLU modality projection (feature width -> `intermediate_size` -> hidden,
//!   no biases), then a perceiver resampler whose `resampler_n_latents` learned
//!   latents cross-attend (grouped-query) to the projected positions over
//!   `resampler_depth` pre-RMSNorm layers; any number of positions in, a fixed
//!   number out. Keys as under `connector.` in an Idefics2 checkpoint:
//!   `modality_projection.{gate,up,down}_proj.weight`,
//!   `perceiver_resampler.latents`, `perceiver_resampler.layers.{i}.{input_latents_norm,
//!   input_context_norm,post_attention_layernorm}.weight`,
//!   `perceiver_resampler.layers.{i}.self_attn.{q,k,v,o}_proj.weight`,
//!   `perceiver_resampler.layers.{i}.mlp.{gate,up,down}_proj.weight`,
//!   `perceiver_resampler.norm.weight`. See `idefics2.rs`.
//! - `qwen2_vl_merger`: Qwen2-VL's `PatchMerger`: LayerNorm (eps 1e-6) per row,
//!   every `spatial_merge_size²` consecutive rows joined, then `Linear`, GELU,
//!   `Linear` to the LM width; `width / spatial_merge_size²` positions out.
//!   Keys as under `visual.merger.` in a Qwen2-VL checkpoint: `ln_q.*`,
//!   `mlp.0.*`, `mlp.2.*`. See `qwen2_vl.rs`.
//! - `idefics3_connector`: Idefics3's / SmolVLM's `Idefics3Connector`: a pixel
//!   shuffle by `scale_factor` (`side²` positions of width `d` become
//!   `side² / s²` of width `d · s²`), then `modality_projection.proj` (a
//!   linear, no bias). See `idefics3.rs`.
//! - `llava_next`: LLaVA-NeXT's / LLaVA-OneVision's `linear_1`, GELU, `linear_2`
//!   per position, and for a rank-4 grid piece the AnyRes packing (optional
//!   `anyres_max_N` bilinear shrink, `image_newline` after each row). Keys:
//!   `linear_{1,2}.*`, `image_newline`. See `llava_next.rs`.
//!
//! GELU is the exact (erf) one, torch's `nn.GELU()` default; LayerNorm uses
//! torch's default epsilon 1e-5.

use std::fmt;
use std::str::FromStr;

use candle_core::{Module, Tensor, D};
use candle_nn::{LayerNorm, Linear, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

pub mod idefics2;

use idefics2::Idefics2Connector;
pub use idefics2::Idefics2ConnectorConfig;

pub mod qwen2_vl;

use qwen2_vl::Qwen2VlMerger;
pub use qwen2_vl::Qwen2VlMergerConfig;

pub mod idefics3;

use idefics3::Idefics3Connector;
pub use idefics3::Idefics3ConnectorConfig;

pub mod llava_next;

use llava_next::LlavaNextProjector;
pub use llava_next::LlavaNextProjectorConfig;

/// torch's `nn.LayerNorm` default epsilon.
const LAYER_NORM_EPS: f64 = 1e-5;

/// Which projector a modality uses. Serialized as `{"kind": "mlp2x_gelu"}`,
/// `{"kind": "vector_mlp", "num_layers": 2, "num_tokens": 10}`,
/// `{"kind": "idefics2_connector", "resampler_n_latents": 64, "resampler_depth": 3,
/// "resampler_n_heads": 16, "resampler_head_dim": 96, "num_key_value_heads": 4,
/// "intermediate_size": 14336, "rms_norm_eps": 1e-5}`, ...; a bare string
/// (`"mlp2x_gelu"`, LLaVA's `mm_projector_type`) is accepted for kinds without
/// parameters.
///
/// `PartialEq` but not `Eq`: the Idefics2 connector carries an f64 epsilon.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "SpecInput", into = "SpecRepr")]
pub enum ProjectorSpec {
    /// One linear layer per position.
    Linear,
    /// LLaVA `mlp{depth}x_gelu`: `depth` linears with GELU between, per position.
    MlpGelu {
        /// Number of linear layers (2 for `mlp2x_gelu`), at least 1.
        depth: usize,
    },
    /// multi_token's vector projector: `num_tokens` independent MLPs on one vector.
    VectorMlp {
        /// Linear layers in each MLP, at least 1.
        num_layers: usize,
        /// Output positions per item (one MLP each), at least 1.
        num_tokens: usize,
    },
    /// LLaVA-1.5's `SimpleResBlock`; feature width must equal the LM hidden size.
    ResBlock,
    /// Jñāna: a linear from feature width to hidden, then a `SimpleResBlock`.
    LinearResBlock,
    /// Idefics2's connector: SwiGLU projection, then a perceiver resampler to
    /// `resampler_n_latents` positions.
    Idefics2Connector(Idefics2ConnectorConfig),
    /// Qwen2-VL's patch merger: `spatial_merge_size²` rows into one position.
    Qwen2VlMerger(Qwen2VlMergerConfig),
    /// Idefics3's connector: pixel shuffle by `scale_factor`, then one linear
    /// (no bias): `side²` positions in, `side² / scale_factor²` out.
    Idefics3Connector(Idefics3ConnectorConfig),
    /// LLaVA-NeXT / OneVision: per-position MLP, AnyRes grid packing.
    LlavaNext(LlavaNextProjectorConfig),
}

/// Kind name of [`ProjectorSpec::Idefics2Connector`].
const IDEFICS2_CONNECTOR: &str = "idefics2_connector";
/// Kind name of [`ProjectorSpec::Qwen2VlMerger`].
const QWEN2_VL_MERGER: &str = "qwen2_vl_merger";
/// Kind name of [`ProjectorSpec::Idefics3Connector`].
const IDEFICS3_CONNECTOR: &str = "idefics3_connector";
/// Kind name of [`ProjectorSpec::LlavaNext`].
const LLAVA_NEXT: &str = "llava_next";

impl ProjectorSpec {
    /// The spec's kind name as written in configs: `linear`, `mlp2x_gelu`,
    /// `vector_mlp`, `resblock`, `linear_resblock`, `idefics2_connector`.
    pub fn kind_name(&self) -> String {
        match self {
            ProjectorSpec::Linear => "linear".to_string(),
            ProjectorSpec::MlpGelu { depth } => format!("mlp{depth}x_gelu"),
            ProjectorSpec::VectorMlp { .. } => "vector_mlp".to_string(),
            ProjectorSpec::ResBlock => "resblock".to_string(),
            ProjectorSpec::LinearResBlock => "linear_resblock".to_string(),
            ProjectorSpec::Idefics2Connector(_) => IDEFICS2_CONNECTOR.to_string(),
            ProjectorSpec::Qwen2VlMerger(_) => QWEN2_VL_MERGER.to_string(),
            ProjectorSpec::Idefics3Connector(_) => IDEFICS3_CONNECTOR.to_string(),
            ProjectorSpec::LlavaNext(_) => LLAVA_NEXT.to_string(),
        }
    }

    /// Output positions per item given `input_width` encoder positions per item:
    /// per-position kinds keep the width, the vector projector emits `num_tokens`,
    /// the Idefics2 connector `resampler_n_latents` whatever the input width.
    pub fn output_width(&self, input_width: usize) -> usize {
        match self {
            ProjectorSpec::VectorMlp { num_tokens, .. } => *num_tokens,
            ProjectorSpec::Idefics2Connector(config) => config.resampler_n_latents,
            ProjectorSpec::Qwen2VlMerger(config) => input_width / config.rows_per_output().max(1),
            ProjectorSpec::Idefics3Connector(config) => {
                input_width / (config.scale_factor * config.scale_factor).max(1)
            }
            _ => input_width,
        }
    }

    /// Checks the parameters: depths and counts at least 1; for the Idefics2
    /// connector also heads a multiple of key/value heads and a positive epsilon.
    pub fn validate(&self) -> Result<()> {
        let kind = self.kind_name();
        match *self {
            ProjectorSpec::Qwen2VlMerger(config) => match config.problem() {
                Some(reason) => Err(Error::projector(kind, reason)),
                None => Ok(()),
            },
            ProjectorSpec::Idefics2Connector(config) => match config.problem() {
                Some(reason) => Err(Error::projector(kind, reason)),
                None => Ok(()),
            },
            ProjectorSpec::Idefics3Connector(config) => match config.problem() {
                Some(reason) => Err(Error::projector(kind, reason)),
                None => Ok(()),
            },
            ProjectorSpec::LlavaNext(config) => match config.problem() {
                Some(reason) => Err(Error::projector(kind, reason)),
                None => Ok(()),
            },
            ProjectorSpec::MlpGelu { depth: 0 } => {
                Err(Error::projector(kind, "depth must be at least 1"))
            }
            ProjectorSpec::VectorMlp { num_layers: 0, .. } => {
                Err(Error::projector(kind, "num_layers must be at least 1"))
            }
            ProjectorSpec::VectorMlp { num_tokens: 0, .. } => {
                Err(Error::projector(kind, "num_tokens must be at least 1"))
            }
            _ => Ok(()),
        }
    }
}

impl fmt::Display for ProjectorSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProjectorSpec::VectorMlp {
                num_layers,
                num_tokens,
            } => {
                write!(
                    f,
                    "vector_mlp(num_layers={num_layers}, num_tokens={num_tokens})"
                )
            }
            ProjectorSpec::Idefics2Connector(c) => write!(
                f,
                "{IDEFICS2_CONNECTOR}(n_latents={}, depth={}, heads={}x{}, kv_heads={}, \
                 intermediate_size={}, rms_norm_eps={:e})",
                c.resampler_n_latents,
                c.resampler_depth,
                c.resampler_n_heads,
                c.resampler_head_dim,
                c.num_key_value_heads,
                c.intermediate_size,
                c.rms_norm_eps
            ),
            ProjectorSpec::Qwen2VlMerger(c) => {
                let norm = match c.norm {
                    qwen2_vl::MergerNorm::LayerNorm => "layer_norm",
                    qwen2_vl::MergerNorm::RmsNorm => "rms_norm",
                };
                write!(f, "{QWEN2_VL_MERGER}(spatial_merge_size={}, norm={norm})", c.spatial_merge_size)
            }
            ProjectorSpec::Idefics3Connector(c) => {
                write!(f, "{IDEFICS3_CONNECTOR}(scale_factor={})", c.scale_factor)
            }
            other => f.write_str(&other.kind_name()),
        }
    }
}

impl FromStr for ProjectorSpec {
    type Err = Error;

    /// Parses a parameterless kind name: `linear`, `mlp{N}x_gelu`, `resblock`
    /// (also LLaVA's `simple_res_block`), `linear_resblock`.
    fn from_str(name: &str) -> Result<Self> {
        let spec = match name {
            "linear" => ProjectorSpec::Linear,
            "resblock" | "simple_res_block" => ProjectorSpec::ResBlock,
            "linear_resblock" => ProjectorSpec::LinearResBlock,
            "vector_mlp" => {
                return Err(Error::projector(
                    name,
                    "needs num_layers and num_tokens; write it as an object",
                ))
            }
            IDEFICS2_CONNECTOR => {
                return Err(Error::projector(
                    name,
                    "needs the perceiver's parameters; write it as an object",
                ))
            }
            QWEN2_VL_MERGER => {
                return Err(Error::projector(
                    name,
                    "needs spatial_merge_size; write it as an object",
                ))
            }
            IDEFICS3_CONNECTOR => {
                return Err(Error::projector(
                    name,
                    "needs scale_factor; write it as an object",
                ))
            }
            LLAVA_NEXT => {
                return Err(Error::projector(
                    name,
                    "needs tile_grid; write it as an object",
                ))
            }
            other => {
                let depth = other
                    .strip_prefix("mlp")
                    .and_then(|rest| rest.strip_suffix("x_gelu"))
                    .and_then(|digits| digits.parse::<usize>().ok())
                    .ok_or_else(|| {
                        Error::projector(
                            other,
                            "unknown kind; expected linear, mlp{N}x_gelu, vector_mlp, resblock, \
                             linear_resblock or idefics2_connector",
                        )
                    })?;
                ProjectorSpec::MlpGelu { depth }
            }
        };
        spec.validate()?;
        Ok(spec)
    }
}

/// The object form of a spec as written: the kind and its parameters inline.
#[derive(Serialize)]
struct SpecRepr {
    kind: String,
    #[serde(flatten)]
    params: Option<SpecParams>,
}

/// The parameters of the kinds that have some, in their written order.
#[derive(Serialize)]
#[serde(untagged)]
enum SpecParams {
    Vector {
        num_layers: usize,
        num_tokens: usize,
    },
    Idefics2(Idefics2ConnectorConfig),
    Qwen2VlMerger(Qwen2VlMergerConfig),
    Idefics3(Idefics3ConnectorConfig),
    LlavaNext(LlavaNextProjectorConfig),
}

/// The object form as read: the kind, and every other field kept for the kind's
/// own parameter type to check.
#[derive(Deserialize)]
struct SpecObject {
    kind: String,
    #[serde(flatten)]
    params: serde_json::Map<String, serde_json::Value>,
}

/// `vector_mlp`'s parameters as read (both required; checked by hand so the
/// error says so plainly).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VectorParams {
    num_layers: Option<usize>,
    num_tokens: Option<usize>,
}

/// What deserialization accepts: a bare kind name or the object form.
#[derive(Deserialize)]
#[serde(untagged)]
enum SpecInput {
    Name(String),
    Object(SpecObject),
}

impl TryFrom<SpecInput> for ProjectorSpec {
    type Error = Error;

    fn try_from(input: SpecInput) -> Result<Self> {
        let SpecObject { kind, params } = match input {
            SpecInput::Name(name) => return name.parse(),
            SpecInput::Object(object) => object,
        };
        let params = serde_json::Value::Object(params);
        let spec = match kind.as_str() {
            "vector_mlp" => {
                let VectorParams {
                    num_layers,
                    num_tokens,
                } = serde_json::from_value(params)
                    .map_err(|e| Error::projector(&kind, e.to_string()))?;
                let (Some(num_layers), Some(num_tokens)) = (num_layers, num_tokens) else {
                    return Err(Error::projector(
                        kind,
                        "needs both num_layers and num_tokens",
                    ));
                };
                ProjectorSpec::VectorMlp {
                    num_layers,
                    num_tokens,
                }
            }
            IDEFICS2_CONNECTOR => ProjectorSpec::Idefics2Connector(
                serde_json::from_value(params)
                    .map_err(|e| Error::projector(&kind, e.to_string()))?,
            ),
            QWEN2_VL_MERGER => ProjectorSpec::Qwen2VlMerger(
                serde_json::from_value(params)
                    .map_err(|e| Error::projector(&kind, e.to_string()))?,
            ),
            IDEFICS3_CONNECTOR => ProjectorSpec::Idefics3Connector(
                serde_json::from_value(params)
                    .map_err(|e| Error::projector(&kind, e.to_string()))?,
            ),
            LLAVA_NEXT => ProjectorSpec::LlavaNext(
                serde_json::from_value(params)
                    .map_err(|e| Error::projector(&kind, e.to_string()))?,
            ),
            _ => {
                let names: Vec<&str> = params
                    .as_object()
                    .map(|map| map.keys().map(String::as_str).collect())
                    .unwrap_or_default();
                if !names.is_empty() {
                    return Err(Error::projector(
                        &kind,
                        format!("takes no parameters, got {}", names.join(", ")),
                    ));
                }
                return kind.parse();
            }
        };
        spec.validate()?;
        Ok(spec)
    }
}

impl From<ProjectorSpec> for SpecRepr {
    fn from(spec: ProjectorSpec) -> Self {
        let params = match spec {
            ProjectorSpec::VectorMlp {
                num_layers,
                num_tokens,
            } => Some(SpecParams::Vector {
                num_layers,
                num_tokens,
            }),
            ProjectorSpec::Idefics2Connector(config) => Some(SpecParams::Idefics2(config)),
            ProjectorSpec::Qwen2VlMerger(config) => Some(SpecParams::Qwen2VlMerger(config)),
            ProjectorSpec::Idefics3Connector(config) => Some(SpecParams::Idefics3(config)),
            ProjectorSpec::LlavaNext(config) => Some(SpecParams::LlavaNext(config)),
            _ => None,
        };
        SpecRepr {
            kind: spec.kind_name(),
            params,
        }
    }
}

/// Linears with exact GELU between them, laid out as an `nn.Sequential` whose
/// GELUs take the odd indexes.
#[derive(Debug, Clone)]
struct GeluMlp {
    linears: Vec<Linear>,
}

impl GeluMlp {
    fn load(depth: usize, in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Self> {
        let linears = (0..depth)
            .map(|layer| {
                let layer_in = if layer == 0 { in_dim } else { out_dim };
                // Sequential index: linears at 0, 2, 4, ... with GELU at the odd ones.
                candle_nn::linear(layer_in, out_dim, vb.pp((2 * layer).to_string()))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self { linears })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut xs = xs.clone();
        for (layer, linear) in self.linears.iter().enumerate() {
            if layer > 0 {
                xs = xs.gelu_erf()?;
            }
            xs = linear.forward(&xs)?;
        }
        Ok(xs)
    }
}

/// LLaVA-1.5's `SimpleResBlock`.
#[derive(Debug, Clone)]
struct SimpleResBlock {
    pre_norm: LayerNorm,
    proj: GeluMlp,
}

impl SimpleResBlock {
    fn load(channels: usize, vb: VarBuilder) -> Result<Self> {
        let pre_norm = candle_nn::layer_norm(channels, LAYER_NORM_EPS, vb.pp("pre_norm"))?;
        let proj = GeluMlp::load(2, channels, channels, vb.pp("proj"))?;
        Ok(Self { pre_norm, proj })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let normed = self.pre_norm.forward(xs)?;
        Ok((&normed + self.proj.forward(&normed)?)?)
    }
}

/// The layers of one projector kind.
#[derive(Debug, Clone)]
enum ProjectorLayers {
    PerPosition(GeluMlp),
    Vector(Vec<GeluMlp>),
    ResBlock(SimpleResBlock),
    LinearResBlock(Linear, SimpleResBlock),
    Idefics2(Idefics2Connector),
    Qwen2VlMerger(Qwen2VlMerger),
    Idefics3(Idefics3Connector),
    LlavaNext(LlavaNextProjector),
}

/// A projector module built from a [`ProjectorSpec`] and a var builder.
#[derive(Debug, Clone)]
pub struct Projector {
    spec: ProjectorSpec,
    feature_dim: usize,
    hidden_size: usize,
    layers: ProjectorLayers,
}

impl Projector {
    /// Loads (or, with a `VarMap`-backed builder, creates) the projector's
    /// weights from `vb`, whose prefix is the projector's own module path.
    ///
    /// Fails naming the tensor when a weight is missing or mis-shaped.
    pub fn load(
        spec: ProjectorSpec,
        feature_dim: usize,
        hidden_size: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        spec.validate()?;
        let layers = match spec {
            ProjectorSpec::Linear => ProjectorLayers::PerPosition(GeluMlp {
                linears: vec![candle_nn::linear(feature_dim, hidden_size, vb)?],
            }),
            ProjectorSpec::MlpGelu { depth } => {
                ProjectorLayers::PerPosition(GeluMlp::load(depth, feature_dim, hidden_size, vb)?)
            }
            ProjectorSpec::VectorMlp {
                num_layers,
                num_tokens,
            } => {
                let mlps = vb.pp("mlps");
                let heads = (0..num_tokens)
                    .map(|token| {
                        GeluMlp::load(
                            num_layers,
                            feature_dim,
                            hidden_size,
                            mlps.pp(token.to_string()),
                        )
                    })
                    .collect::<Result<Vec<_>>>()?;
                ProjectorLayers::Vector(heads)
            }
            ProjectorSpec::ResBlock => {
                if feature_dim != hidden_size {
                    return Err(Error::projector(
                        spec.kind_name(),
                        format!(
                            "a residual block keeps its width: feature_dim {feature_dim} must equal \
                             hidden size {hidden_size} (use linear_resblock)"
                        ),
                    ));
                }
                ProjectorLayers::ResBlock(SimpleResBlock::load(hidden_size, vb)?)
            }
            ProjectorSpec::LinearResBlock => {
                let linear = candle_nn::linear(feature_dim, hidden_size, vb.pp("0"))?;
                ProjectorLayers::LinearResBlock(
                    linear,
                    SimpleResBlock::load(hidden_size, vb.pp("1"))?,
                )
            }
            ProjectorSpec::Idefics2Connector(config) => ProjectorLayers::Idefics2(
                Idefics2Connector::load(&config, feature_dim, hidden_size, vb)?,
            ),
            ProjectorSpec::Qwen2VlMerger(config) => ProjectorLayers::Qwen2VlMerger(
                Qwen2VlMerger::load(&config, feature_dim, hidden_size, vb)?,
            ),
            ProjectorSpec::Idefics3Connector(config) => ProjectorLayers::Idefics3(
                Idefics3Connector::load(&config, feature_dim, hidden_size, vb)?,
            ),
            ProjectorSpec::LlavaNext(config) => ProjectorLayers::LlavaNext(
                LlavaNextProjector::load(&config, feature_dim, hidden_size, vb)?,
            ),
        };
        Ok(Self {
            spec,
            feature_dim,
            hidden_size,
            layers,
        })
    }

    /// The spec this projector was built from.
    pub fn spec(&self) -> ProjectorSpec {
        self.spec
    }

    /// Width of the features it takes.
    pub fn feature_dim(&self) -> usize {
        self.feature_dim
    }

    /// Width of the embeddings it produces (the LM hidden size).
    pub fn hidden_size(&self) -> usize {
        self.hidden_size
    }

    /// Projects encoder features `[n, width, feature_dim]` (or `[n, feature_dim]`
    /// for one vector per item) to `[n, token_width, hidden]`.
    ///
    /// Per-position kinds keep `width`; the vector projector needs one vector per
    /// item and returns `num_tokens` positions; the Idefics2 connector takes any
    /// width and returns `resampler_n_latents` positions, every position of every
    /// row taking part (see [`Projector::forward_masked`] for padded rows).
    pub fn forward(&self, features: &Tensor) -> Result<Tensor> {
        // LLaVA-NeXT's grid pieces are rank 4; its own forward checks shapes.
        if let ProjectorLayers::LlavaNext(layers) = &self.layers {
            return layers.forward(features);
        }
        let features = self.check_features(features)?;
        self.forward_checked(&features, None)
    }

    /// [`Projector::forward`] for rows padded to one width: `key_mask` `[n, width]`
    /// is non-zero at real positions. The Idefics2 connector gives padded positions
    /// no attention, so each row's output equals that of the row alone. The other
    /// kinds map positions independently and ignore the mask: their outputs at
    /// padded positions are computed and meaningless.
    pub fn forward_masked(&self, features: &Tensor, key_mask: &Tensor) -> Result<Tensor> {
        let features = self.check_features(features)?;
        let (n, width, _) = features.dims3()?;
        if key_mask.dims() != [n, width] {
            return Err(self.shape_error(format!(
                "expects a key mask [n, width] = [{n}, {width}] for features of shape {:?}, got {:?}",
                features.dims(),
                key_mask.dims()
            )));
        }
        self.forward_checked(&features, Some(key_mask))
    }

    /// Features as `[n, width, feature_dim]`, or an error naming their shape.
    fn check_features(&self, features: &Tensor) -> Result<Tensor> {
        let features = match features.rank() {
            2 => features.unsqueeze(1)?,
            3 => features.clone(),
            rank => {
                return Err(self.shape_error(format!(
                    "expects features [n, width, {}] or [n, {}], got rank {rank} shape {:?}",
                    self.feature_dim,
                    self.feature_dim,
                    features.dims()
                )))
            }
        };
        let last = features.dim(D::Minus1)?;
        if last != self.feature_dim {
            return Err(self.shape_error(format!(
                "expects feature width {}, got features of shape {:?}",
                self.feature_dim,
                features.dims()
            )));
        }
        Ok(features)
    }

    fn forward_checked(&self, features: &Tensor, key_mask: Option<&Tensor>) -> Result<Tensor> {
        match &self.layers {
            ProjectorLayers::Idefics2(connector) => connector.forward(features, key_mask),
            ProjectorLayers::Qwen2VlMerger(merger) => merger.forward(features),
            // Every crop is a full square grid; padded rows would change the shuffle.
            ProjectorLayers::Idefics3(connector) => connector.forward(features),
            ProjectorLayers::LlavaNext(layers) => layers.forward(features),
            ProjectorLayers::PerPosition(mlp) => mlp.forward(features),
            ProjectorLayers::ResBlock(block) => block.forward(features),
            ProjectorLayers::LinearResBlock(linear, block) => {
                block.forward(&linear.forward(features)?)
            }
            ProjectorLayers::Vector(heads) => {
                let width = features.dim(1)?;
                if width != 1 {
                    return Err(self.shape_error(format!(
                        "takes one pooled vector per item, got {width} positions per item (shape {:?})",
                        features.dims()
                    )));
                }
                // Each head maps [n, 1, feat] to [n, 1, hidden]; multi_token concatenates
                // them on dim -2.
                let outputs = heads
                    .iter()
                    .map(|head| head.forward(features))
                    .collect::<Result<Vec<_>>>()?;
                Ok(Tensor::cat(&outputs, 1)?)
            }
        }
    }

    fn shape_error(&self, reason: String) -> Error {
        Error::projector(self.spec.kind_name(), reason)
    }
}

impl Module for Projector {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        Projector::forward(self, xs).map_err(|error| match error {
            Error::Candle(inner) => inner,
            other => candle_core::Error::Msg(other.to_string()),
        })
    }
}

#[cfg(test)]
mod tests;
