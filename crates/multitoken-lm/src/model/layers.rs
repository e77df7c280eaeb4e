//! The pieces of a decoder layer besides attention: norms and the MLP slot.
//!
//! The MLP is an enum with a [`Mlp::Custom`] arm so that a mixture of experts (or
//! any other feed-forward) can replace a layer's MLP without touching the model.

use std::fmt::Debug;
use std::sync::Arc;

use candle_core::{DType, Tensor};

use crate::config::Activation;
use crate::linear::Linear;
use crate::Result;

/// A feed-forward block that can stand in for a layer's MLP (e.g. a mixture of experts).
pub trait FeedForward: Send + Sync + Debug {
    /// `[batch, seq, hidden]` to `[batch, seq, hidden]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor>;
}

/// The MLP of one decoder layer.
#[derive(Debug, Clone)]
pub enum Mlp {
    /// `down(act(gate(x)) * up(x))` (llama, mistral, qwen2).
    Gated {
        /// `gate_proj`.
        gate_proj: Linear,
        /// `up_proj`.
        up_proj: Linear,
        /// `down_proj`.
        down_proj: Linear,
        /// The activation on the gate.
        act: Activation,
    },
    /// `fc2(act(fc1(x)))` (phi-2).
    Plain {
        /// `fc1`.
        fc1: Linear,
        /// `fc2`.
        fc2: Linear,
        /// The activation between them.
        act: Activation,
    },
    /// Any other feed-forward, e.g. a mixture of experts.
    Custom(Arc<dyn FeedForward>),
}

impl Mlp {
    /// Its linear layers (none for a custom feed-forward).
    pub fn linears(&self) -> Vec<&Linear> {
        match self {
            Mlp::Gated { gate_proj, up_proj, down_proj, .. } => vec![gate_proj, up_proj, down_proj],
            Mlp::Plain { fc1, fc2, .. } => vec![fc1, fc2],
            Mlp::Custom(_) => Vec::new(),
        }
    }

    /// Apply to `[batch, seq, hidden]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(x, false, |ff, x| ff.forward(x))
    }

    /// [`Mlp::forward`] for `[rows, 1, hidden]`, one position of each of several
    /// sequences, each row's output bit for bit its output alone (see
    /// [`Linear::forward_rows`]; the activations are element-wise, so each
    /// row's values are its values alone); a custom feed-forward runs row by row.
    pub(crate) fn forward_rows(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(x, true, |ff, x| crate::linear::each_row(x, |row| ff.forward(row)))
    }

    /// The MLP with [`Linear::forward`] (`batched`: [`Linear::forward_rows`])
    /// for its linear layers and `custom` for a custom feed-forward: what
    /// [`Mlp::forward`] and [`Mlp::forward_rows`] share.
    fn apply(
        &self,
        x: &Tensor,
        batched: bool,
        custom: impl Fn(&dyn FeedForward, &Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let product = |l: &Linear, x: &Tensor| l.forward_as(x, batched);
        match self {
            Mlp::Gated { gate_proj, up_proj, down_proj, act } => {
                if *act == Activation::Silu {
                    // A decode step's quantized gate and up: both products and
                    // silu · up in one kernel call, the same values as below.
                    if let Some(gated) = Linear::silu_gated_together(gate_proj, up_proj, x, batched)? {
                        return product(down_proj, &gated);
                    }
                }
                let gate = product(gate_proj, x)?;
                let up = product(up_proj, x)?;
                // One op each way for silu(gate) · up: in training candle's
                // composite keeps two activations and takes eight ops backward;
                // in a prefill its two element-wise maps run on candle's pool,
                // which the binary sizes to one thread (`CANDLE_NUM_THREADS=1`,
                // for contention), while ours spreads the rows over the kernels'
                // pool (~6% of an idle SmolLM2 prefill).
                let gated = {
                    let _profile = crate::profile::scope(crate::profile::Part::Activation);
                    if *act == Activation::Silu {
                        multitoken_kernels::train::silu_mul(&gate, &up)?
                    } else {
                        (activate(&gate, *act)? * up)?
                    }
                };
                product(down_proj, &gated)
            }
            Mlp::Plain { fc1, fc2, act } => {
                let hidden = product(fc1, x)?;
                let activated = {
                    let _profile = crate::profile::scope(crate::profile::Part::Activation);
                    activate(&hidden, *act)?
                };
                product(fc2, &activated)
            }
            Mlp::Custom(ff) => custom(ff.as_ref(), x),
        }
    }
}

/// Apply an activation.
pub fn activate(x: &Tensor, act: Activation) -> Result<Tensor> {
    Ok(match act {
        Activation::Silu => candle_nn::ops::silu(x)?,
        Activation::GeluTanh => x.gelu()?,
        Activation::Gelu => x.gelu_erf()?,
    })
}

/// RMSNorm (llama family) or LayerNorm with bias (phi-2).
#[derive(Debug, Clone)]
pub(crate) enum Norm {
    Rms { weight: Tensor, eps: f32 },
    Layer { weight: Tensor, bias: Tensor, eps: f32 },
}

impl Norm {
    /// Normalise the last axis. Half types are normalised in f32 and cast back,
    /// as transformers upcasts.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let _profile = crate::profile::scope(crate::profile::Part::Norm);
        let dtype = x.dtype();
        let f32 = |t: &Tensor| -> Result<Tensor> {
            Ok(if dtype == DType::F32 { t.contiguous()? } else { t.to_dtype(DType::F32)? })
        };
        let x = f32(x)?;
        let y = match self {
            // candle's fused norms have no backward pass: training (a tracked
            // input or weight) takes ours, fused with its backward for a frozen
            // weight and candle's composite for a trained one. Inference on the
            // CPU takes ours too: candle's sums each row in one sequential
            // chain on rayon's threads; ours is a vectorised dot on the
            // kernels' pool (a 481-token prefill's norms: 22-26 -> 3.4-4.9 µs a token).
            Norm::Rms { weight, eps } if x.track_op() || weight.track_op() || x.device().is_cpu() => {
                multitoken_kernels::train::rms_norm(&x, &f32(weight)?, *eps)?
            }
            Norm::Rms { weight, eps } => candle_nn::ops::rms_norm(&x, &f32(weight)?, *eps)?,
            Norm::Layer { weight, bias, eps } if x.track_op() || weight.track_op() || bias.track_op() => {
                candle_nn::ops::layer_norm_slow(&x, &f32(weight)?, &f32(bias)?, *eps)?
            }
            Norm::Layer { weight, bias, eps } => {
                candle_nn::ops::layer_norm(&x, &f32(weight)?, &f32(bias)?, *eps)?
            }
        };
        Ok(if dtype == DType::F32 { y } else { y.to_dtype(dtype)? })
    }
}
