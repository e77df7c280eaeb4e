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
//!
//! GELU is the exact (erf) one, torch's `nn.GELU()` default; LayerNorm uses
//! torch's default epsilon 1e-5.

use std::fmt;
use std::str::FromStr;

use candle_core::{Module, Tensor, D};
use candle_nn::{LayerNorm, Linear, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// torch's `nn.LayerNorm` default epsilon.
const LAYER_NORM_EPS: f64 = 1e-5;

/// Which projector a modality uses. Serialized as `{"kind": "mlp2x_gelu"}`,
/// `{"kind": "vector_mlp", "num_layers": 2, "num_tokens": 10}`, ...; a bare
/// string (`"mlp2x_gelu"`, LLaVA's `mm_projector_type`) is accepted for kinds
/// without parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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
}

impl ProjectorSpec {
    /// The spec's kind name as written in configs: `linear`, `mlp2x_gelu`,
    /// `vector_mlp`, `resblock`, `linear_resblock`.
    pub fn kind_name(&self) -> String {
        match self {
            ProjectorSpec::Linear => "linear".to_string(),
            ProjectorSpec::MlpGelu { depth } => format!("mlp{depth}x_gelu"),
            ProjectorSpec::VectorMlp { .. } => "vector_mlp".to_string(),
            ProjectorSpec::ResBlock => "resblock".to_string(),
            ProjectorSpec::LinearResBlock => "linear_resblock".to_string(),
        }
    }

    /// Output positions per item given `input_width` encoder positions per item:
    /// per-position kinds keep the width, the vector projector emits `num_tokens`.
    pub fn output_width(&self, input_width: usize) -> usize {
        match self {
            ProjectorSpec::VectorMlp { num_tokens, .. } => *num_tokens,
            _ => input_width,
        }
    }

    /// Checks the parameters: depths and counts at least 1.
    pub fn validate(&self) -> Result<()> {
        let kind = self.kind_name();
        match *self {
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
            other => {
                let depth = other
                    .strip_prefix("mlp")
                    .and_then(|rest| rest.strip_suffix("x_gelu"))
                    .and_then(|digits| digits.parse::<usize>().ok())
                    .ok_or_else(|| {
                        Error::projector(
                            other,
                            "unknown kind; expected linear, mlp{N}x_gelu, vector_mlp, resblock or \
                             linear_resblock",
                        )
                    })?;
                ProjectorSpec::MlpGelu { depth }
            }
        };
        spec.validate()?;
        Ok(spec)
    }
}

/// The object form of a spec on disk.
#[derive(Serialize, Deserialize)]
struct SpecRepr {
    kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    num_layers: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    num_tokens: Option<usize>,
}

/// What deserialization accepts: a bare kind name or the object form.
#[derive(Deserialize)]
#[serde(untagged)]
enum SpecInput {
    Name(String),
    Object(SpecRepr),
}

impl TryFrom<SpecInput> for ProjectorSpec {
    type Error = Error;

    fn try_from(input: SpecInput) -> Result<Self> {
        let repr = match input {
            SpecInput::Name(name) => return name.parse(),
            SpecInput::Object(repr) => repr,
        };
        if repr.kind != "vector_mlp" {
            if repr.num_layers.is_some() || repr.num_tokens.is_some() {
                return Err(Error::projector(
                    &repr.kind,
                    "num_layers/num_tokens only apply to vector_mlp",
                ));
            }
            return repr.kind.parse();
        }
        let (Some(num_layers), Some(num_tokens)) = (repr.num_layers, repr.num_tokens) else {
            return Err(Error::projector(
                "vector_mlp",
                "needs both num_layers and num_tokens",
            ));
        };
        let spec = ProjectorSpec::VectorMlp {
            num_layers,
            num_tokens,
        };
        spec.validate()?;
        Ok(spec)
    }
}

impl From<ProjectorSpec> for SpecRepr {
    fn from(spec: ProjectorSpec) -> Self {
        let (num_layers, num_tokens) = match spec {
            ProjectorSpec::VectorMlp {
                num_layers,
                num_tokens,
            } => (Some(num_layers), Some(num_tokens)),
            _ => (None, None),
        };
        SpecRepr {
            kind: spec.kind_name(),
            num_layers,
            num_tokens,
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
    /// item and returns `num_tokens` positions.
    pub fn forward(&self, features: &Tensor) -> Result<Tensor> {
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
        match &self.layers {
            ProjectorLayers::PerPosition(mlp) => mlp.forward(&features),
            ProjectorLayers::ResBlock(block) => block.forward(&features),
            ProjectorLayers::LinearResBlock(linear, block) => {
                block.forward(&linear.forward(&features)?)
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
                    .map(|head| head.forward(&features))
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
