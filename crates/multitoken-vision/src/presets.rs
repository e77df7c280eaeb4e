//! Named recipes as data: `presets/*.json` (compiled in), each a `vision_clip`
//! builder config plus what the recipe expects of the LM.
//!
//! - `llava-1.5`: CLIP ViT-L/14-336, `vision_feature_layer` -2 without CLS
//!   (576 × 1024), `mlp2x_gelu` to a 4096-wide LM.
//! - `jnana`: CLIP ViT-B/32 last-layer patches without CLS (49 × 768), a linear +
//!   residual-block projector (`linear_resblock`) to Phi-2 (2560), and the
//!   end-of-image text written after every `<image>`.
//!
//! A preset's `config` goes into a `multitoken.json` modality entry as it is
//! (add `"tower"` for the directory of trained tower weights); with a trainable
//! [`ModalityContext`] the tower starts from random weights.

use multitoken_core::{ModalityContext, ProjectorSpec};
use serde::Deserialize;

use crate::modality::{VisionClip, VisionClipConfig, VisionMode, IMAGE_TOKEN};
use crate::{Error, Result};

/// The presets compiled into the crate: (name, JSON text).
const PRESETS: [(&str, &str); 2] = [
    ("llava-1.5", include_str!("../presets/llava-1.5.json")),
    ("jnana", include_str!("../presets/jnana.json")),
];

/// One recipe.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preset {
    /// Its name, e.g. `jnana`.
    pub name: String,
    /// What it is, in one sentence.
    pub description: String,
    /// The modality builder (`vision_clip`).
    pub builder: String,
    /// Hidden size of the LM the recipe projects into.
    pub lm_hidden_size: usize,
    /// Text written after each image token (Jñāna's end-of-image text), if any.
    #[serde(default)]
    pub image_suffix: Option<String>,
    /// The builder config (a `multitoken.json` modality entry's `config`).
    pub config: serde_json::Value,
}

impl Preset {
    /// The preset called `name`; unknown names list the known ones.
    pub fn by_name(name: &str) -> Result<Self> {
        let (_, text) = PRESETS.iter().find(|(n, _)| *n == name).ok_or_else(|| {
            Error::config(
                "preset",
                format!(
                    "no preset named `{name}`; known presets: {}",
                    names().join(", ")
                ),
            )
        })?;
        serde_json::from_str(text)
            .map_err(|e| Error::config(format!("preset `{name}`"), e.to_string()))
    }

    /// The projector the recipe uses.
    pub fn projector(&self) -> Result<ProjectorSpec> {
        let value = self
            .config
            .get("projector")
            .cloned()
            .unwrap_or(serde_json::Value::Null);
        serde_json::from_value(value)
            .map_err(|e| Error::config(format!("preset `{}` projector", self.name), e.to_string()))
    }

    /// Builds the recipe's modality; paths in its config resolve against
    /// `context.model_dir` (a trainable context starts from random weights).
    pub fn build(&self, context: &ModalityContext) -> Result<VisionClip> {
        let config: VisionClipConfig = serde_json::from_value(self.config.clone())
            .map_err(|e| Error::config(format!("preset `{}`", self.name), e.to_string()))?;
        VisionClip::from_config(&config, VisionMode::Patches, context)
    }

    /// A prompt with the recipe's end-of-image text after every `<image>`.
    pub fn apply_image_suffix(&self, prompt: &str) -> String {
        match &self.image_suffix {
            Some(suffix) => prompt.replace(IMAGE_TOKEN, &format!("{IMAGE_TOKEN}{suffix}")),
            None => prompt.to_string(),
        }
    }
}

/// Names of the compiled-in presets.
pub fn names() -> Vec<&'static str> {
    PRESETS.iter().map(|(n, _)| *n).collect()
}
