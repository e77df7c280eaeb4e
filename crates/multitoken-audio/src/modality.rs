//! The `audio_whisper` modality (`<speech>`, data key `speech_audios`, as in
//! multi_token) and its registration.
//!
//! `preprocess` turns an item into log-mel windows `[windows, n_mels, 3000]`; `encode`
//! takes `[items, windows, n_mels, 3000]` (or `[items, n_mels, 3000]` for one window
//! each) and returns one feature set per item, in one of two modes:
//!
//! - [`FeatureMode::DecoderStart`] (multi_token's `WhisperAudioModality`): the decoder's
//!   final hidden state at `<|startoftranscript|>`, averaged over windows,
//!   `[items, 1, d_model]`, for the vector projector with `num_tokens` outputs;
//! - [`FeatureMode::EncoderPooled`]: the encoder frames of all windows, average-pooled
//!   to `token_width` positions, `[items, token_width, d_model]`, for a per-position
//!   projector (`mlp2x_gelu`).

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::Tensor;
use multitoken_core::{Item, Modality, ModalityBuilder, ModalityContext, ProjectorSpec};
use serde::Deserialize;

use crate::decode::{describe_item, load_audio, DecodeConfig};
use crate::mel::{LogMel, N_FRAMES};
use crate::whisper::{adaptive_avg_pool, Whisper};
use crate::{Error, Result};

/// Registry name of the modality.
pub const AUDIO_WHISPER: &str = "audio_whisper";

/// Which Whisper features feed the projector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FeatureMode {
    /// Decoder hidden state at the start token -> vector projector (multi_token).
    #[default]
    DecoderStart,
    /// Encoder frames average-pooled to `token_width` -> per-position projector.
    EncoderPooled,
}

/// The modality's settings in `multitoken.json`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct AudioConfig {
    /// HF Whisper directory, relative to the model directory or absolute.
    pub model_path: PathBuf,
    /// Feature mode.
    pub features: FeatureMode,
    /// Output positions of the vector projector (decoder-start mode).
    pub num_tokens: usize,
    /// Linear layers per vector-projector MLP (decoder-start mode).
    pub num_projector_layers: usize,
    /// Pooled positions per item (encoder-pooled mode).
    pub token_width: usize,
    /// Linear layers of the per-position GELU MLP (encoder-pooled mode).
    pub projector_depth: usize,
    /// Longest accepted clip in seconds.
    pub max_seconds: f64,
}

impl Default for AudioConfig {
    fn default() -> Self {
        Self {
            model_path: PathBuf::from("whisper"),
            features: FeatureMode::DecoderStart,
            num_tokens: 10,
            num_projector_layers: 2,
            token_width: 32,
            projector_depth: 2,
            max_seconds: DecodeConfig::default().max_seconds,
        }
    }
}

/// Whisper as a multitoken modality.
#[derive(Debug, Clone)]
pub struct WhisperAudio {
    model: Arc<Whisper>,
    mel: LogMel,
    config: AudioConfig,
}

impl WhisperAudio {
    /// A modality around a loaded model.
    pub fn new(model: Arc<Whisper>, config: AudioConfig) -> Result<Self> {
        if config.num_tokens == 0 || config.token_width == 0 || config.num_projector_layers == 0 || config.projector_depth == 0 {
            return Err(Error::Config(format!(
                "{AUDIO_WHISPER}: num_tokens, token_width, num_projector_layers and projector_depth must be at least 1, got {config:?}"
            )));
        }
        if config.max_seconds.is_nan() || config.max_seconds <= 0.0 {
            return Err(Error::Config(format!(
                "{AUDIO_WHISPER}: max_seconds must be positive, got {}",
                config.max_seconds
            )));
        }
        let mel = LogMel::new(model.config.num_mel_bins)?;
        Ok(Self { model, mel, config })
    }

    /// Loads the Whisper checkpoint named by `config.model_path` in `context`.
    pub fn load(config: AudioConfig, context: &ModalityContext) -> Result<Self> {
        let dir = context.resolve(&config.model_path);
        let model = match &context.trainable {
            None => Whisper::load(&dir, &context.device, context.dtype)?,
            // Trainable: the checkpoint's tensors (if any) become variables of `map`;
            // a directory with `config.json` but no weights starts from random weights.
            Some(_) => {
                let whisper_config = crate::whisper::WhisperConfig::from_file(&dir.join("config.json"))?;
                let vb = context
                    .var_builder(&dir.join("model.safetensors"))
                    .map_err(|e| Error::Checkpoint(e.to_string()))?;
                Whisper::from_var_builder(vb, whisper_config)?
            }
        };
        Self::new(Arc::new(model), config)
    }

    /// The loaded model.
    pub fn model(&self) -> &Whisper {
        &self.model
    }

    /// Log-mel windows `[windows, n_mels, 3000]` of mono 16 kHz samples.
    pub fn mel_tensor(&self, samples: &[f32]) -> Result<Tensor> {
        let mel = self.mel.compute(samples);
        let n = mel.windows.len();
        let data: Vec<f32> = mel.windows.into_iter().flatten().collect();
        let device = self.model.encoder_device();
        Ok(Tensor::from_vec(data, (n, mel.n_mels, N_FRAMES), &device)?)
    }

    fn encode_item(&self, windows: &Tensor) -> Result<Tensor> {
        let windows = windows.to_dtype(self.model.dtype())?;
        match self.config.features {
            FeatureMode::DecoderStart => {
                // [windows, d] -> mean over windows -> [1, d]
                Ok(self.model.start_token_features(&windows)?.mean_keepdim(0)?)
            }
            FeatureMode::EncoderPooled => {
                let encoded = self.model.encoder.forward(&windows)?;
                let (w, t, d) = encoded.dims3()?;
                let frames = encoded.reshape((w * t, d))?;
                adaptive_avg_pool(&frames, self.config.token_width)
            }
        }
    }

    fn encode_batch(&self, batch: &Tensor) -> Result<Tensor> {
        let batch = match batch.rank() {
            3 => batch.unsqueeze(1)?,
            4 => batch.clone(),
            rank => {
                return Err(Error::Config(format!(
                    "{AUDIO_WHISPER}: encode expects [items, windows, n_mels, 3000] or [items, n_mels, 3000], got rank {rank} {:?}",
                    batch.dims()
                )))
            }
        };
        let items = (0..batch.dim(0)?)
            .map(|i| self.encode_item(&batch.get(i)?))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::stack(&items, 0)?)
    }
}

impl Modality for WhisperAudio {
    fn name(&self) -> &str {
        AUDIO_WHISPER
    }
    fn token(&self) -> &str {
        "<speech>"
    }
    fn data_key(&self) -> &str {
        "speech_audios"
    }
    fn token_width(&self) -> usize {
        match self.config.features {
            FeatureMode::DecoderStart => self.config.num_tokens,
            FeatureMode::EncoderPooled => self.config.token_width,
        }
    }
    fn feature_dim(&self) -> usize {
        self.model.config.d_model
    }
    fn preprocess(&self, item: &Item) -> multitoken_core::Result<Tensor> {
        let decode = DecodeConfig::with_max_seconds(self.config.max_seconds);
        let samples = load_audio(item, &decode)?;
        self.mel_tensor(&samples).map_err(|e| {
            multitoken_core::Error::msg(format!("{}: {e}", describe_item(item)))
        })
    }
    fn encode(&self, batch: &Tensor) -> multitoken_core::Result<Tensor> {
        Ok(self.encode_batch(batch)?)
    }
    fn media(&self) -> multitoken_core::ItemMedia {
        multitoken_core::ItemMedia::Audio
    }
    fn encoder_weights(&self) -> Option<multitoken_core::EncoderWeights> {
        Some(multitoken_core::EncoderWeights::at("model_path").with_default("whisper"))
    }
    fn projector(&self) -> ProjectorSpec {
        match self.config.features {
            FeatureMode::DecoderStart => ProjectorSpec::VectorMlp {
                num_layers: self.config.num_projector_layers,
                num_tokens: self.config.num_tokens,
            },
            FeatureMode::EncoderPooled => ProjectorSpec::MlpGelu {
                depth: self.config.projector_depth,
            },
        }
    }
}

fn build_audio_whisper(
    config: &serde_json::Value,
    context: &ModalityContext,
) -> multitoken_core::Result<Box<dyn Modality>> {
    let config: AudioConfig = serde_json::from_value(config.clone())
        .map_err(|e| Error::Config(format!("{AUDIO_WHISPER} config: {e}")))?;
    Ok(Box::new(WhisperAudio::load(config, context)?))
}

multitoken_core::inventory::submit! {
    ModalityBuilder { name: AUDIO_WHISPER, build: build_audio_whisper }
}

/// Referenced by [`crate::link`] so that the object holding the registration above
/// is never dropped by the linker.
pub(crate) fn keep_registration() {
    std::hint::black_box(build_audio_whisper as fn(_, _) -> _);
}
