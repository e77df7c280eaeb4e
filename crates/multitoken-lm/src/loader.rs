//! One entry point for every checkpoint format: an HF directory or a `.gguf` file.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device};
use multitoken_core::LanguageModel;

use crate::{Error, Result};

/// How to load a checkpoint: the activation dtype and the device.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Dtype of dense weights and activations (f32, f16 or bf16).
    pub dtype: DType,
    /// Where the weights live.
    pub device: Device,
    /// Quantize an HF directory's linears to this block format as they are read
    /// (`--quantize`); `None` keeps them in `dtype`. A GGUF file, already
    /// quantized, refuses it.
    pub quantize: Option<crate::quantize::Quantization>,
    /// Keep the modality towers' frozen linears in this block format
    /// (`--quantize-towers q8_0|q4_1`); `None` keeps them in `dtype`.
    pub quantize_towers: Option<TowerQuantization>,
}

/// The block formats a tower's linears can be kept in (`--quantize-towers`).
pub type TowerQuantization = multitoken_kernels::quantized::Format;

/// `--quantize-towers`' value: `q8_0` or `q4_1`.
pub fn parse_tower_quantization(value: &str) -> Result<TowerQuantization> {
    match value.to_ascii_lowercase().as_str() {
        "q8_0" => Ok(TowerQuantization::Q8_0),
        "q4_1" => Ok(TowerQuantization::Q4_1),
        "q4_k" => Err(Error::Msg(
            "towers take q8_0 or q4_1 (q4_k's 256-weight blocks are for the LM's linears: --quantize q4_k)".into(),
        )),
        other => Err(Error::Msg(format!("unknown tower quantization {other:?}: q8_0 or q4_1"))),
    }
}

impl Default for LoadOptions {
    /// f32 on the CPU.
    fn default() -> Self {
        Self { dtype: DType::F32, device: Device::Cpu, quantize: None, quantize_towers: None }
    }
}

impl LoadOptions {
    /// `--dtype bf16` on the CPU: dense linears keep their weights in bf16 and
    /// multiply f32 activations ([`crate::quantize::Bf16LinearsSource`]), while
    /// every other tensor and all activations stay f32 (candle's bf16
    /// element-wise ops on the CPU ran at less than half the f32 speed).
    pub fn cpu_bf16(&self) -> bool {
        self.dtype == DType::BF16 && self.device.is_cpu()
    }

    /// The dtype the LM's tensors are loaded in: f32 under [`Self::cpu_bf16`], else `dtype`.
    pub fn tensor_dtype(&self) -> DType {
        if self.cpu_bf16() {
            DType::F32
        } else {
            self.dtype
        }
    }

    /// Runs `load` on `weights` wrapped as these options ask for an LM's
    /// linears: quantized as they are read ([`Self::quantize`],
    /// [`crate::quantize::QuantizingSource`]), then kept in bf16 under
    /// [`Self::cpu_bf16`] ([`crate::quantize::Bf16LinearsSource`]). Every
    /// loader that builds an LM from its own weight source (an HF directory,
    /// llava, multi_token, the VLM families, MoE) goes through here, so
    /// `--quantize` and `--dtype bf16` mean the same for each.
    pub fn with_lm_weights<T, E>(
        &self,
        weights: &dyn crate::weights::WeightSource,
        load: impl FnOnce(&dyn crate::weights::WeightSource) -> std::result::Result<T, E>,
    ) -> std::result::Result<T, E> {
        let quantized = self.quantize.map(|format| crate::quantize::QuantizingSource::new(weights, format));
        let source: &dyn crate::weights::WeightSource = match &quantized {
            Some(q) => q,
            None => weights,
        };
        if self.cpu_bf16() {
            load(&crate::quantize::Bf16LinearsSource::new(source))
        } else {
            load(source)
        }
    }

    /// The context a modality builder gets for the model directory `dir`: this
    /// device, the towers' quantization, and [`Self::tensor_dtype`]: under
    /// `--dtype bf16` on the CPU the towers stay f32 like the LM's activations
    /// (candle's CPU bf16 ops are slower than f32, and the demo model's
    /// random-weight Whisper moved its beep counts by more than a step in bf16).
    pub fn modality_context(&self, dir: impl Into<std::path::PathBuf>) -> multitoken_core::ModalityContext {
        let mut context = multitoken_core::ModalityContext::new(self.device.clone(), self.tensor_dtype(), dir);
        context.quantize = self.quantize_towers;
        context
    }
}

/// Token ids and strings a tokenizer treats specially, as the checkpoint names them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SpecialTokens {
    /// Beginning-of-sequence token text (for chat templates' `bos_token`).
    pub bos_token: Option<String>,
    /// End-of-sequence token text (for chat templates' `eos_token`).
    pub eos_token: Option<String>,
    /// Beginning-of-sequence id.
    pub bos_token_id: Option<u32>,
    /// Padding id, if the checkpoint has one.
    pub pad_token_id: Option<u32>,
}

/// Generation defaults read from `generation_config.json` (or GGUF metadata).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationDefaults {
    /// Every id that ends generation.
    pub eos_token_ids: Vec<u32>,
    /// Default temperature, if the checkpoint sets one.
    pub temperature: Option<f64>,
    /// Default top-p.
    pub top_p: Option<f64>,
    /// Default top-k.
    pub top_k: Option<usize>,
    /// Default repetition penalty.
    pub repetition_penalty: Option<f32>,
}

/// A language model ready to run, with everything that came with its checkpoint.
pub struct LoadedModel {
    /// The decoder.
    pub model: Arc<dyn LanguageModel>,
    /// The tokenizer (tokenizer.json, or rebuilt from GGUF metadata).
    pub tokenizer: tokenizers::Tokenizer,
    /// The model's own jinja chat template, if it ships one.
    pub chat_template: Option<String>,
    /// Special tokens.
    pub special_tokens: SpecialTokens,
    /// Generation defaults.
    pub generation: GenerationDefaults,
    /// A display name (directory or file name).
    pub name: String,
}

/// A loader for a kind of model directory this crate does not build itself,
/// registered with `multitoken_core::inventory::submit!` by the crate that does
/// (e.g. multitoken-moe for `moe.json` directories, so that this crate does not
/// depend on it). [`load_model`] hands a directory holding `marker` to `load`.
#[derive(Debug)]
pub struct DirLoader {
    /// A file name whose presence in a directory selects this loader (`moe.json`).
    pub marker: &'static str,
    /// Loads such a directory.
    pub load: fn(&Path, &LoadOptions) -> Result<LoadedModel>,
}

multitoken_core::inventory::collect!(DirLoader);

/// The marker of a mixture-of-experts directory (multitoken-moe registers its loader).
pub const MOE_MARKER: &str = "moe.json";

/// Load a checkpoint: an HF model directory, or a `.gguf` file. A directory
/// holding the marker file of a registered [`DirLoader`] goes to that loader.
pub fn load_model(path: &Path, opts: &LoadOptions) -> Result<LoadedModel> {
    if path.is_dir() {
        let mut registered = multitoken_core::inventory::iter::<DirLoader>.into_iter();
        if let Some(loader) = registered.find(|l| path.join(l.marker).is_file()) {
            return (loader.load)(path, opts);
        }
        if path.join(MOE_MARKER).is_file() {
            return Err(Error::Msg(format!(
                "{} is a mixture-of-experts model ({MOE_MARKER}) but multitoken-moe is not linked into this program",
                path.display()
            )));
        }
        return crate::hf::load_hf_dir(path, opts);
    }
    if !path.exists() {
        return Err(Error::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such model directory or file"),
        });
    }
    let is_gguf = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    if is_gguf {
        if let Some(format) = opts.quantize {
            return Err(already_quantized(path, format));
        }
        return crate::gguf::load_gguf(path, opts);
    }
    Err(Error::Msg(format!(
        "{}: expected an HF model directory (with config.json) or a .gguf file",
        path.display()
    )))
}

/// The error for `--quantize` given with a GGUF file, whose matrices are already
/// in blocks: requantizing them would silently lose precision twice.
pub fn already_quantized(path: &Path, format: crate::quantize::Quantization) -> Error {
    Error::Msg(format!(
        "{}: --quantize {format} was given, but a GGUF file is already quantized; drop --quantize (the file's own blocks are used) or pass an HF directory",
        path.display()
    ))
}
