//! Where weights come from: memory-mapped safetensors or a GGUF file.
//!
//! Model code asks for tensors by their transformers name
//! (`model.layers.0.self_attn.q_proj.weight`); each source maps that name to its
//! own layout and checks the shape, so a missing or mis-shaped tensor is an error
//! naming the key and the file, never a silent random init.

use candle_core::Tensor;

use crate::linear::Linear;
use crate::Result;

/// A store of named weights in the transformers naming scheme.
pub trait WeightSource {
    /// The file(s) behind this source, for error messages.
    fn describe(&self) -> String;
    /// Whether a tensor of that name exists.
    fn contains(&self, name: &str) -> bool;
    /// A dense tensor of exactly `shape`, in the model dtype, on the model device.
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor>;
    /// The linear layer `{prefix}.weight` (`[out_dim, in_dim]`) and, when `bias`,
    /// `{prefix}.bias`; a quantized source may keep the weight quantized.
    fn linear(&self, prefix: &str, in_dim: usize, out_dim: usize, bias: bool) -> Result<Linear>;
}
