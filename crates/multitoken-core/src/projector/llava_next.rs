//! LLaVA-NeXT's and LLaVA-OneVision's projector with AnyRes packing
//! (transformers' `LlavaNextMultiModalProjector` + `pack_image_features`).
//!
//! The per-position MLP (`linear_1`, exact GELU, `linear_2`) maps every
//! feature; a modality gives one image as two pieces: the base image's
//! features `[1, positions, feature_dim]` (projected as they are) and the
//! tiles' unpadded feature grid as a rank-4 piece `[1, rows, cols,
//! feature_dim]`. Unpadding is a selection of positions, so it commutes with the
//! per-position MLP and the modality does it before projecting. The grid is
//! projected, shrunk by bilinear interpolation when OneVision's `anyres_max_N`
//! says it is too large (`ratio = sqrt(rows·cols / (N · tile_grid²)) > 1.1`,
//! to `⌊rows / ratio⌋ × ⌊cols / ratio⌋`, torch's `interpolate(mode="bilinear",
//! align_corners=False)`, after the projection as the reference does), and
//! `image_newline` ends every row: `rows · (cols + 1)` positions, row-major.
//!
//! Keys (an importer maps the checkpoint's `multi_modal_projector.*` and
//! `image_newline` onto them): `linear_1.{weight,bias}`,
//! `linear_2.{weight,bias}` (no biases with `bias: false`), `image_newline` `[hidden]`.

use candle_core::{Module, Tensor};
use candle_nn::{Linear, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Parameters of the `llava_next` projector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlavaNextProjectorConfig {
    /// Patches per side of one tile (`image_size / patch_size`), the unit of
    /// the `anyres_max_N` rule.
    pub tile_grid: usize,
    /// OneVision's `anyres_max_N`; absent for LLaVA-NeXT (no interpolation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_num_patches: Option<usize>,
    /// Whether `linear_1` and `linear_2` have biases (`multimodal_projector_bias`).
    #[serde(default = "with_bias")]
    pub bias: bool,
}

fn with_bias() -> bool {
    true
}

impl LlavaNextProjectorConfig {
    /// Why the parameters are unusable, if they are.
    pub fn problem(&self) -> Option<String> {
        if self.tile_grid == 0 {
            return Some("tile_grid must be at least 1".into());
        }
        if self.max_num_patches == Some(0) {
            return Some("max_num_patches must be at least 1".into());
        }
        None
    }

    /// The grid after the `anyres_max_N` rule (in doubles, as Python).
    pub fn pooled_size(&self, rows: usize, cols: usize) -> (usize, usize) {
        let Some(max) = self.max_num_patches else {
            return (rows, cols);
        };
        let ratio = ((rows * cols) as f64 / (max * self.tile_grid * self.tile_grid) as f64).sqrt();
        if ratio > 1.1 {
            ((rows as f64 / ratio).floor() as usize, (cols as f64 / ratio).floor() as usize)
        } else {
            (rows, cols)
        }
    }
}

/// The loaded layers.
#[derive(Debug, Clone)]
pub(crate) struct LlavaNextProjector {
    config: LlavaNextProjectorConfig,
    linear_1: Linear,
    linear_2: Linear,
    image_newline: Tensor,
    feature_dim: usize,
    hidden: usize,
}

impl LlavaNextProjector {
    pub(crate) fn load(config: &LlavaNextProjectorConfig, feature_dim: usize, hidden: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            config: *config,
            linear_1: candle_nn::linear_b(feature_dim, hidden, config.bias, vb.pp("linear_1"))?,
            linear_2: candle_nn::linear_b(hidden, hidden, config.bias, vb.pp("linear_2"))?,
            image_newline: vb.get(hidden, "image_newline")?,
            feature_dim,
            hidden,
        })
    }

    fn mlp(&self, xs: &Tensor) -> Result<Tensor> {
        Ok(self.linear_2.forward(&self.linear_1.forward(xs)?.gelu_erf()?)?)
    }

    /// Rank 2/3: per-position features (`[n, feat]` or `[n, width, feat]`);
    /// rank 4: one unpadded grid `[1, rows, cols, feat]` → `[1, rows' · (cols' + 1), hidden]`.
    pub(crate) fn forward(&self, features: &Tensor) -> Result<Tensor> {
        let dims = features.dims().to_vec();
        let bad = |why: String| Error::projector("llava_next", why);
        if dims.last() != Some(&self.feature_dim) {
            return Err(bad(format!("expects feature width {}, got features of shape {dims:?}", self.feature_dim)));
        }
        match dims.len() {
            2 => self.mlp(&features.unsqueeze(1)?),
            3 => self.mlp(features),
            4 if dims[0] == 1 && dims[1] > 0 => self.grid(&features.get(0)?),
            _ => Err(bad(format!(
                "expects per-position features [n, width, {f}] or one grid [1, rows, cols, {f}], got {dims:?}",
                f = self.feature_dim
            ))),
        }
    }

    fn grid(&self, grid: &Tensor) -> Result<Tensor> {
        let (rows, cols, feat) = grid.dims3()?;
        if cols == 0 {
            // An extremely tall image keeps no column: each row is its newline alone.
            let newline = self.image_newline.to_dtype(grid.dtype())?.reshape((1, 1, self.hidden))?;
            return Ok(newline.broadcast_as((1, rows, self.hidden))?.contiguous()?);
        }
        let projected = self.mlp(&grid.reshape((rows * cols, feat))?)?.reshape((rows, cols, self.hidden))?;
        let (new_rows, new_cols) = self.config.pooled_size(rows, cols);
        let pooled = if (new_rows, new_cols) == (rows, cols) {
            projected
        } else {
            bilinear(&projected, new_rows, new_cols)?
        };
        let newline = self
            .image_newline
            .to_dtype(pooled.dtype())?
            .reshape((1, 1, self.hidden))?
            .broadcast_as((new_rows, 1, self.hidden))?;
        let with_newlines = Tensor::cat(&[&pooled, &newline], 1)?;
        Ok(with_newlines.reshape((1, new_rows * (new_cols + 1), self.hidden))?)
    }
}

/// torch's `interpolate(x, [out_rows, out_cols], mode="bilinear",
/// align_corners=False)` of a `[rows, cols, hidden]` grid, as two products
/// with interpolation matrices (so gradients flow to the projector).
fn bilinear(grid: &Tensor, out_rows: usize, out_cols: usize) -> Result<Tensor> {
    let (rows, cols, hidden) = grid.dims3()?;
    if out_rows == 0 || out_cols == 0 {
        return Err(Error::projector(
            "llava_next",
            format!("a {rows}x{cols} feature grid would shrink to {out_rows}x{out_cols}"),
        ));
    }
    let dtype = grid.dtype();
    let device = grid.device();
    let along_rows = Tensor::from_vec(weights(rows, out_rows), (out_rows, rows), device)?.to_dtype(dtype)?;
    let along_cols = Tensor::from_vec(weights(cols, out_cols), (out_cols, cols), device)?.to_dtype(dtype)?;
    // Rows: [out_rows, rows] x [rows, cols·hidden].
    let by_rows = along_rows.matmul(&grid.reshape((rows, cols * hidden))?)?.reshape((out_rows, cols, hidden))?;
    // Columns: [out_cols, cols] x [cols, hidden] for every output row.
    let along_cols = along_cols.unsqueeze(0)?.broadcast_as((out_rows, out_cols, cols))?.contiguous()?;
    Ok(along_cols.matmul(&by_rows.contiguous()?)?)
}

/// The `[out, in]` bilinear weights of torch's CPU kernel (float arithmetic:
/// `src = (dst + 0.5) · in/out − 0.5`, clamped at 0; the two neighbours
/// `floor(src)` and the next one within bounds).
fn weights(input: usize, output: usize) -> Vec<f32> {
    let scale = input as f32 / output as f32;
    let mut out = vec![0f32; output * input];
    for dst in 0..output {
        let src = (scale * (dst as f32 + 0.5) - 0.5).max(0.0);
        let i0 = (src as usize).min(input - 1);
        let i1 = if i0 < input - 1 { i0 + 1 } else { i0 };
        let lambda1 = (src - i0 as f32).clamp(0.0, 1.0);
        let lambda0 = 1.0 - lambda1;
        out[dst * input + i0] += lambda0;
        out[dst * input + i1] += lambda1;
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use candle_core::Device;

    #[test]
    fn bilinear_matches_torch_on_a_ramp() {
        // torch.nn.functional.interpolate(torch.arange(8.).view(1,1,8,1).expand(1,1,8,2), [5, 2],
        // mode="bilinear")[0,0,:,0] = [0.3, 1.9, 3.5, 5.1, 6.7].
        let ramp: Vec<f32> = (0..8).flat_map(|r| [r as f32, r as f32]).collect();
        let grid = Tensor::from_vec(ramp, (8, 2, 1), &Device::Cpu).unwrap();
        let out = bilinear(&grid, 5, 2).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let want = [0.3f32, 0.3, 1.9, 1.9, 3.5, 3.5, 5.1, 5.1, 6.7, 6.7];
        for (a, b) in out.iter().zip(want) {
            assert!((a - b).abs() < 1e-5, "{out:?}");
        }
    }

    #[test]
    fn pooling_follows_the_anyres_max_rule() {
        let cfg = LlavaNextProjectorConfig { tile_grid: 4, max_num_patches: Some(2), bias: true };
        assert_eq!(cfg.pooled_size(8, 8), (5, 5));
        assert_eq!(cfg.pooled_size(4, 8), (4, 8));
        assert!(LlavaNextProjectorConfig { tile_grid: 0, max_num_patches: None, bias: true }.problem().is_some());
    }
}
