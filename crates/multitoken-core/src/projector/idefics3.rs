//! Idefics3's connector (Laurençon et al. 2024, "Building and better understanding
//! vision-language models"; also SmolVLM's): a pixel shuffle that trades
//! positions for width, then one linear layer into the LM.
//!
//! Layout and numbers follow transformers' `Idefics3Connector`:
//!
//! - `pixel_shuffle(x, s)`: `x` `[n, seq, d]` with `seq = side²` is viewed as a
//!   `side × side` grid; each `s × s` block of positions becomes one position of
//!   width `d · s²`, in transformers' order (two views and two permutes, see
//!   [`pixel_shuffle`]): `[n, seq / s², d · s²]`.
//! - `modality_projection.proj`: `nn.Linear(d · s², text_hidden, bias=False)`.
//!
//! The grid must be square with a side divisible by `scale_factor`; anything
//! else is an error naming the shape (transformers would silently truncate).

use candle_core::{Module, Tensor};
use candle_nn::{Linear, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The parameters of an Idefics3 connector (`scale_factor` of the model's
/// `config.json`); the vision and LM widths come from the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Idefics3ConnectorConfig {
    /// Side of the square of positions merged into one (2 in Idefics3-8B,
    /// 4 in SmolVLM-256M).
    pub scale_factor: usize,
}

impl Idefics3ConnectorConfig {
    /// Why the parameters cannot build a connector, if they cannot.
    pub(super) fn problem(&self) -> Option<String> {
        (self.scale_factor == 0).then(|| "scale_factor must be at least 1".to_string())
    }
}

/// The connector's layers.
#[derive(Debug, Clone)]
pub(super) struct Idefics3Connector {
    scale_factor: usize,
    proj: Linear,
}

impl Idefics3Connector {
    /// Loads `modality_projection.proj.weight` `[hidden, feature_dim · s²]`.
    pub(super) fn load(config: &Idefics3ConnectorConfig, feature_dim: usize, hidden: usize, vb: VarBuilder) -> Result<Self> {
        let s = config.scale_factor;
        let proj = candle_nn::linear_no_bias(feature_dim * s * s, hidden, vb.pp("modality_projection").pp("proj"))?;
        Ok(Self { scale_factor: s, proj })
    }

    /// `[n, seq, feature_dim]` → `[n, seq / s², hidden]`.
    pub(super) fn forward(&self, features: &Tensor) -> Result<Tensor> {
        let shuffled = pixel_shuffle(features, self.scale_factor)?;
        Ok(self.proj.forward(&shuffled)?)
    }
}

/// transformers' `Idefics3Connector.pixel_shuffle`: `[n, side², d]` →
/// `[n, side² / s², d · s²]`.
pub fn pixel_shuffle(x: &Tensor, s: usize) -> Result<Tensor> {
    let (n, seq, d) = x.dims3()?;
    let side = (seq as f64).sqrt().round() as usize;
    if side * side != seq || s == 0 || !side.is_multiple_of(s) {
        return Err(Error::projector(
            "idefics3_connector",
            format!(
                "pixel shuffle by {s} needs a square grid of positions whose side is a multiple of {s}, \
                 got {seq} positions (features of shape {:?})",
                x.dims()
            ),
        ));
    }
    let x = x.reshape((n, side, side / s, d * s))?;
    let x = x.permute((0, 2, 1, 3))?.contiguous()?;
    let x = x.reshape((n, side / s, side / s, d * s * s))?;
    let x = x.permute((0, 2, 1, 3))?.contiguous()?;
    Ok(x.reshape((n, seq / (s * s), d * s * s))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The order transformers' two views and permutes give, by hand for a
    /// 4×4 grid of width 1 and s = 2: output position (r, c) holds, in order,
    /// input (2r, 2c), (2r, 2c+1), (2r+1, 2c), (2r+1, 2c+1).
    #[test]
    fn pixel_shuffle_orders_blocks_as_transformers() -> Result<()> {
        let x = Tensor::arange(0f32, 16.0, &Device::Cpu)?.reshape((1, 16, 1))?;
        let out = pixel_shuffle(&x, 2)?.squeeze(0)?.to_vec2::<f32>()?;
        assert_eq!(out, vec![vec![0., 1., 4., 5.], vec![2., 3., 6., 7.], vec![8., 9., 12., 13.], vec![10., 11., 14., 15.]]);
        assert!(pixel_shuffle(&Tensor::zeros((1, 15, 2), candle_core::DType::F32, &Device::Cpu)?, 2).is_err());
        assert!(pixel_shuffle(&Tensor::zeros((1, 9, 2), candle_core::DType::F32, &Device::Cpu)?, 2).is_err());
        Ok(())
    }

    #[test]
    fn the_spec_reads_and_writes_its_scale_factor() -> std::result::Result<(), Box<dyn std::error::Error>> {
        use crate::ProjectorSpec;
        use serde_json::json;
        let written = json!({"kind": "idefics3_connector", "scale_factor": 4});
        let spec: ProjectorSpec = serde_json::from_value(written.clone())?;
        assert_eq!(spec, ProjectorSpec::Idefics3Connector(Idefics3ConnectorConfig { scale_factor: 4 }));
        assert_eq!(serde_json::to_value(spec)?, written);
        assert_eq!(spec.output_width(1024), 64);
        assert_eq!(spec.to_string(), "idefics3_connector(scale_factor=4)");
        for bad in [json!("idefics3_connector"), json!({"kind": "idefics3_connector"}),
                    json!({"kind": "idefics3_connector", "scale_factor": 0}),
                    json!({"kind": "idefics3_connector", "scale_factor": 2, "bias": true})] {
            assert!(serde_json::from_value::<ProjectorSpec>(bad.clone()).is_err(), "{bad}");
        }
        Ok(())
    }
}
