//! Where an Idefics2 checkpoint keeps each part, and the LM's tensors under our
//! causal-LM names.

use candle_core::Tensor;
use multitoken_lm::weights::SafetensorsSource;
use multitoken_lm::{Linear, WeightSource};

use crate::{Error, Result};

/// The key prefixes of one checkpoint: `model.` for Idefics2 as transformers
/// saves it, `model.model.` for Cephalo's MoE (whose head is `model.lm_head`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyLayout {
    /// Prefix of `text_model.`, `vision_model.`, `connector.`.
    root: String,
    /// Prefix of the head's `weight`.
    head: String,
}

impl KeyLayout {
    /// Finds the layout from the token embeddings' key.
    pub fn detect(weights: &SafetensorsSource, moe: bool) -> Result<Self> {
        let candidates: &[(&str, &str)] = if moe {
            &[("model.model.", "model.lm_head."), ("model.", "lm_head.")]
        } else {
            &[("model.", "lm_head."), ("model.model.", "model.lm_head.")]
        };
        for (root, head) in candidates {
            if weights.contains(&format!("{root}text_model.embed_tokens.weight")) {
                return Ok(Self { root: (*root).into(), head: (*head).into() });
            }
        }
        Err(Error::Lm(multitoken_lm::Error::Msg(format!(
            "{}: no Idefics2 text model: expected `model.text_model.embed_tokens.weight` (or Cephalo's \
             `model.model.text_model.embed_tokens.weight`)",
            weights.describe()
        ))))
    }

    /// `…text_model.`
    pub fn text_prefix(&self) -> String {
        format!("{}text_model.", self.root)
    }

    /// `…vision_model` (no trailing dot: the tower builder's `weights_prefix`).
    pub fn vision_prefix(&self) -> String {
        format!("{}vision_model", self.root)
    }

    /// `…connector.`
    pub fn connector_prefix(&self) -> String {
        format!("{}connector.", self.root)
    }

    /// The head's weight key.
    pub fn head_weight(&self) -> String {
        format!("{}weight", self.head)
    }
}

/// The LM's tensors under plain causal-LM names (`model.layers.0…`,
/// `lm_head.weight`), read from the checkpoint's keys; for an MoE, a layer's
/// MLP is served from its expert 0 (the mixture replaces it after loading).
pub struct LmKeys<'a> {
    inner: &'a SafetensorsSource,
    layout: &'a KeyLayout,
    moe: bool,
}

impl<'a> LmKeys<'a> {
    /// The LM's view of `inner`.
    pub fn new(inner: &'a SafetensorsSource, layout: &'a KeyLayout, moe: bool) -> Self {
        Self { inner, layout, moe }
    }

    fn rename(&self, name: &str) -> String {
        if let Some(rest) = name.strip_prefix("model.") {
            let rest = match rest.split_once(".mlp.") {
                Some((layer, tail)) if self.moe && layer.starts_with("layers.") => format!("{layer}.mlp.experts.0.{tail}"),
                _ => rest.to_string(),
            };
            format!("{}{rest}", self.layout.text_prefix())
        } else if let Some(rest) = name.strip_prefix("lm_head") {
            format!("{}{rest}", self.layout.head.trim_end_matches('.'))
        } else {
            name.to_string()
        }
    }
}

impl WeightSource for LmKeys<'_> {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn contains(&self, name: &str) -> bool {
        self.inner.contains(&self.rename(name))
    }
    fn tensor(&self, name: &str, shape: &[usize]) -> multitoken_lm::Result<Tensor> {
        self.inner.tensor(&self.rename(name), shape)
    }
    fn linear(&self, prefix: &str, in_dim: usize, out_dim: usize, bias: bool) -> multitoken_lm::Result<Linear> {
        self.inner.linear(&self.rename(prefix), in_dim, out_dim, bias)
    }
}
