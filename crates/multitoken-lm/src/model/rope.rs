//! Rotary position embeddings (RoFormer, <https://arxiv.org/abs/2104.09864>).
//!
//! Frequencies follow transformers' `modeling_rope_utils.py` (default and Llama-3
//! scaling); cos/sin are computed per call from the positions in f32, as
//! transformers does, then cast to the model dtype. Both pairings are supported:
//! [`RopeStyle::Half`] (transformers' `rotate_half`) and [`RopeStyle::Interleaved`]
//! (llama.cpp), through candle-nn's fused `rope` / `rope_i` kernels.

use candle_core::{DType, Device, Tensor, D};

use crate::config::{Llama3RopeScaling, ModelConfig, RopeStyle};
use crate::{Error, Result};

/// Where the new positions sit: one shared range, or per-row ids (left padding).
pub(crate) enum Positions {
    /// Every row uses `start..start + len`.
    Range { start: usize, len: usize },
    /// `[batch, seq]` f32 position ids, one row per sequence.
    PerRow(Tensor),
    /// `[3, batch, seq]` f32 temporal, height and width position ids (M-RoPE).
    Streams(Tensor),
}

/// The inverse frequencies of one model and how they are applied.
#[derive(Debug, Clone)]
pub(crate) struct RotaryEmbedding {
    inv_freq: Tensor,
    rot_dim: usize,
    head_dim: usize,
    style: RopeStyle,
    /// M-RoPE: frequencies `[0, s0)` follow the temporal stream, the next
    /// `s1` the height stream, the last `s2` the width stream.
    mrope_section: Option<[usize; 3]>,
}

impl RotaryEmbedding {
    /// Build from the config: `rot_dim = int(head_dim * partial_rotary_factor)`.
    pub(crate) fn new(cfg: &ModelConfig, device: &Device) -> Result<Self> {
        let factor = cfg.partial_rotary_factor;
        if !(factor > 0.0 && factor <= 1.0) {
            return Err(Error::Msg(format!(
                "partial_rotary_factor must be in (0, 1], got {factor}"
            )));
        }
        let rot_dim = (cfg.head_dim as f64 * factor) as usize;
        if rot_dim == 0 || rot_dim.rem_euclid(2) != 0 {
            return Err(Error::Msg(format!(
                "rotary dimension {rot_dim} (head_dim {} x partial_rotary_factor {factor}) must be even and non-zero",
                cfg.head_dim
            )));
        }
        let inv_freq = inv_freq(rot_dim, cfg.rope_theta, cfg.rope_scaling.as_ref());
        let inv_freq = Tensor::from_vec(inv_freq, (1, rot_dim / 2), device)?;
        if let Some(section) = cfg.mrope_section {
            if section.iter().sum::<usize>() != rot_dim / 2 {
                return Err(Error::Msg(format!(
                    "mrope_section {section:?} must add up to the rotary dimension / 2 = {}",
                    rot_dim / 2
                )));
            }
        }
        Ok(Self { inv_freq, rot_dim, head_dim: cfg.head_dim, style: cfg.rope_style, mrope_section: cfg.mrope_section })
    }

    /// Whether the model reads three position streams (M-RoPE).
    pub(crate) fn is_multimodal(&self) -> bool {
        self.mrope_section.is_some()
    }

    /// cos and sin for `positions`: `[seq, rot/2]` for a shared range,
    /// `[batch, seq, rot/2]` for per-row ids.
    pub(crate) fn cos_sin(&self, positions: &Positions, dtype: DType) -> Result<(Tensor, Tensor)> {
        let device = self.inv_freq.device();
        let freqs = match positions {
            Positions::Range { start, len } => {
                let pos: Vec<f32> = (*start..start + len).map(|p| p as f32).collect();
                let pos = Tensor::from_vec(pos, (*len, 1), device)?;
                pos.broadcast_mul(&self.inv_freq)?
            }
            Positions::PerRow(ids) => {
                let (b, t) = ids.dims2()?;
                let pos = ids.to_dtype(DType::F32)?.reshape((b * t, 1))?;
                pos.broadcast_mul(&self.inv_freq)?.reshape((b, t, self.rot_dim / 2))?
            }
            Positions::Streams(ids) => {
                let (streams, b, t) = ids.dims3()?;
                let Some(section) = self.mrope_section.filter(|_| streams == 3) else {
                    return Err(Error::Msg(format!(
                        "{streams} position streams given to a model with {} (M-RoPE reads 3)",
                        if self.mrope_section.is_some() { "M-RoPE" } else { "one position stream" }
                    )));
                };
                // transformers' `recomposition_frequencies`: each section of
                // the frequencies takes its angles from its own stream.
                let ids = ids.to_dtype(DType::F32)?;
                let mut parts = Vec::with_capacity(3);
                let mut first = 0;
                for (stream, &width) in section.iter().enumerate() {
                    if width == 0 {
                        continue;
                    }
                    let pos = ids.get(stream)?.reshape((b * t, 1))?;
                    let inv = self.inv_freq.narrow(1, first, width)?;
                    parts.push(pos.broadcast_mul(&inv)?.reshape((b, t, width))?);
                    first += width;
                }
                Tensor::cat(&parts, 2)?.contiguous()?
            }
        };
        Ok((freqs.cos()?.to_dtype(dtype)?, freqs.sin()?.to_dtype(dtype)?))
    }

    /// Rotate `x` of shape `[batch, heads, seq, head_dim]` (contiguous).
    pub(crate) fn apply(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let _profile = crate::profile::scope(crate::profile::Part::Rope);
        if self.rot_dim == self.head_dim {
            return self.rotate(x, cos, sin);
        }
        let rot = x.narrow(D::Minus1, 0, self.rot_dim)?.contiguous()?;
        let pass = x.narrow(D::Minus1, self.rot_dim, self.head_dim - self.rot_dim)?;
        Ok(Tensor::cat(&[&self.rotate(&rot, cos, sin)?, &pass], D::Minus1)?.contiguous()?)
    }

    fn rotate(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        // candle's fused kernels have no backward pass: training (a tracked
        // input) takes ours, which reads `[seq, dim / 2]` tables.
        // Inference on the CPU takes ours too: candle's walks each element by
        // index on rayon's threads, ours is a vectorised loop on the kernels'
        // pool (the same operations, so the same values).
        let cpu_f32 = x.device().is_cpu() && x.dtype() == DType::F32;
        let ours = (x.track_op() || cpu_f32) && cos.rank() == 2;
        if x.track_op() && cos.rank() == 3 && self.style == RopeStyle::Half {
            // Per-row tables (M-RoPE positions) in training: plain tensor ops,
            // `x * cos + rotate_half(x) * sin`, which all have a backward pass.
            return rotate_half_per_row(x, cos, sin);
        }
        Ok(match (self.style, ours) {
            (RopeStyle::Half, false) => candle_nn::rotary_emb::rope(x, cos, sin)?,
            (RopeStyle::Interleaved, false) => candle_nn::rotary_emb::rope_i(x, cos, sin)?,
            // One op each way on the CPU (candle's `rope_slow` otherwise).
            (style, true) => multitoken_kernels::train::rope(x, cos, sin, style == RopeStyle::Interleaved)?,
        })
    }
}

/// transformers' `q * cos + rotate_half(q) * sin` with `[batch, seq, dim / 2]`
/// tables, from differentiable ops.
fn rotate_half_per_row(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = cos.dim(D::Minus1)?;
    let widen = |t: &Tensor| -> Result<Tensor> { Ok(Tensor::cat(&[t, t], D::Minus1)?.unsqueeze(1)?) };
    let (cos, sin) = (widen(cos)?, widen(sin)?);
    let first = x.narrow(D::Minus1, 0, half)?;
    let second = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&second.neg()?, &first], D::Minus1)?;
    Ok((x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?)?)
}

/// `1 / theta^(2i / dim)`, with Llama-3 frequency scaling when configured.
fn inv_freq(dim: usize, theta: f64, scaling: Option<&Llama3RopeScaling>) -> Vec<f32> {
    (0..dim)
        .step_by(2)
        .map(|i| {
            // transformers computes the exponent in f32; so do we.
            let exponent = (i as f32 / dim as f32) as f64;
            let f = (1.0 / theta.powf(exponent)) as f32;
            match scaling {
                Some(s) => llama3_scale(f, s),
                None => f,
            }
        })
        .collect()
}

/// transformers' `_compute_llama3_parameters` for one frequency.
fn llama3_scale(inv_freq: f32, s: &Llama3RopeScaling) -> f32 {
    let old_context = s.original_max_position_embeddings as f64;
    let low_freq_wavelen = old_context / s.low_freq_factor;
    let high_freq_wavelen = old_context / s.high_freq_factor;
    let f = inv_freq as f64;
    let wavelen = 2.0 * std::f64::consts::PI / f;
    let scaled = if wavelen > low_freq_wavelen { f / s.factor } else { f };
    let out = if wavelen < high_freq_wavelen || wavelen > low_freq_wavelen {
        scaled
    } else {
        let smooth = (old_context / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
        (1.0 - smooth) * scaled / s.factor + smooth * scaled
    };
    out as f32
}
