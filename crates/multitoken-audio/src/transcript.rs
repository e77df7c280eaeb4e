//! The `<transcript>` text modality (multi_token's `WhisperTranscriptModality`): each
//! `<transcript>` token in a prompt is replaced by the greedy transcript of the k-th
//! `transcript_audios` item, made by our candle Whisper decoder, before tokenising
//! (see [`multitoken_core::preparer::substitute_text_items`]). The LM sees only text.

use std::path::Path;

use candle_core::Device;
use multitoken_core::preparer::TextModality;
use multitoken_core::{Item, ModalityContext, TextModalityBuilder};
use serde::Deserialize;

use crate::decode::DecodeConfig;
use crate::transcribe::Transcriber;
use crate::Result;

/// Builder name of the transcript modality.
pub const AUDIO_WHISPER_TRANSCRIPT: &str = "audio_whisper_transcript";
/// The token replaced by a transcript.
pub const TRANSCRIPT_TOKEN: &str = "<transcript>";
/// The row key of the audio clips to transcribe.
pub const TRANSCRIPT_DATA_KEY: &str = "transcript_audios";

/// Who makes the transcripts.
#[derive(Debug)]
enum Backend {
    /// Our candle Whisper decoder (greedy).
    Candle(Box<Transcriber>),
    /// whisper.cpp from a ggml file (the `whisper-cpp` feature).
    #[cfg(feature = "whisper-cpp")]
    WhisperCpp(crate::whisper_cpp::WhisperCpp),
}

/// A [`TextModality`] that turns audio items into their transcripts.
#[derive(Debug)]
pub struct WhisperTranscript {
    backend: Backend,
    decode: DecodeConfig,
}

impl WhisperTranscript {
    /// Wraps a loaded transcriber.
    pub fn new(transcriber: Transcriber, decode: DecodeConfig) -> Self {
        Self {
            backend: Backend::Candle(Box::new(transcriber)),
            decode,
        }
    }

    /// Loads a HF Whisper directory (`config.json`, `model.safetensors`, `tokenizer.json`).
    pub fn load(dir: &Path, device: &Device, decode: DecodeConfig) -> Result<Self> {
        Ok(Self::new(Transcriber::load(dir, device)?, decode))
    }

    /// Transcribes with whisper.cpp from a ggml model file (`ggml-base.bin`, ...).
    #[cfg(feature = "whisper-cpp")]
    pub fn load_ggml(ggml_model: &Path, decode: DecodeConfig) -> Result<Self> {
        Ok(Self {
            backend: Backend::WhisperCpp(crate::whisper_cpp::WhisperCpp::load(ggml_model)?),
            decode,
        })
    }
}

impl TextModality for WhisperTranscript {
    fn name(&self) -> &str {
        AUDIO_WHISPER_TRANSCRIPT
    }

    fn token(&self) -> &str {
        TRANSCRIPT_TOKEN
    }

    fn data_key(&self) -> &str {
        TRANSCRIPT_DATA_KEY
    }

    fn to_text(&self, item: &Item) -> multitoken_core::Result<String> {
        Ok(match &self.backend {
            Backend::Candle(transcriber) => transcriber.transcribe_item(item, &self.decode)?.text,
            #[cfg(feature = "whisper-cpp")]
            Backend::WhisperCpp(whisper) => whisper.transcribe(item, &self.decode)?,
        })
    }
}

/// `multitoken.json` settings of `audio_whisper_transcript`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TranscriptConfig {
    /// The HF Whisper directory, relative to the model directory (default: the
    /// Whisper base `cargo xtask weights` installs).
    #[serde(default)]
    pub model_path: Option<String>,
    /// Longest accepted clip in seconds (default: one hour).
    #[serde(default)]
    pub max_seconds: Option<f64>,
    /// A whisper.cpp ggml model file, relative to the model directory: transcripts
    /// then come from whisper.cpp (the `whisper-cpp` feature) instead of our decoder.
    #[serde(default)]
    pub ggml_model: Option<String>,
}

/// Builds the transcript modality from its `multitoken.json` entry, e.g.
/// `{"builder": "audio_whisper_transcript", "config": {"model_path": "whisper"}}`.
fn build_transcript(
    config: &serde_json::Value,
    context: &ModalityContext,
) -> multitoken_core::Result<Box<dyn TextModality>> {
    let parsed: TranscriptConfig = if config.is_null() {
        TranscriptConfig::default()
    } else {
        serde_json::from_value(config.clone()).map_err(|e| {
            multitoken_core::Error::msg(format!("{AUDIO_WHISPER_TRANSCRIPT} config: {e}"))
        })?
    };
    let dir = match &parsed.model_path {
        Some(path) => context.resolve(path),
        None => crate::default_whisper_dir(),
    };
    let mut decode = DecodeConfig::default();
    if let Some(seconds) = parsed.max_seconds {
        if !(seconds.is_finite() && seconds > 0.0) {
            return Err(multitoken_core::Error::msg(format!(
                "{AUDIO_WHISPER_TRANSCRIPT} config: max_seconds must be a positive number, got {seconds}"
            )));
        }
        decode.max_seconds = seconds;
    }
    if let Some(ggml) = &parsed.ggml_model {
        return ggml_transcript(&context.resolve(ggml), decode);
    }
    let modality = WhisperTranscript::load(&dir, &context.device, decode).map_err(|e| {
        multitoken_core::Error::msg(format!("{AUDIO_WHISPER_TRANSCRIPT}: Whisper model {}: {e}", dir.display()))
    })?;
    Ok(Box::new(modality))
}

/// The whisper.cpp transcript modality for `ggml_model`.
#[cfg(feature = "whisper-cpp")]
fn ggml_transcript(ggml: &Path, decode: DecodeConfig) -> multitoken_core::Result<Box<dyn TextModality>> {
    Ok(Box::new(WhisperTranscript::load_ggml(ggml, decode)?))
}

/// Without the feature a ggml model is a clear error, not our decoder in its place.
#[cfg(not(feature = "whisper-cpp"))]
fn ggml_transcript(ggml: &Path, _decode: DecodeConfig) -> multitoken_core::Result<Box<dyn TextModality>> {
    Err(multitoken_core::Error::msg(format!(
        "{AUDIO_WHISPER_TRANSCRIPT}: ggml_model {} needs whisper.cpp, and this binary was built \
         without the `whisper-cpp` feature (`cargo build -p multitoken --features whisper-cpp`)",
        ggml.display()
    )))
}

multitoken_core::inventory::submit! {
    TextModalityBuilder { name: AUDIO_WHISPER_TRANSCRIPT, build: build_transcript }
}

/// Referenced by [`crate::link`] so that the linker keeps the registration above.
pub(crate) fn keep_registration() {
    std::hint::black_box(build_transcript as fn(_, _) -> _);
}
