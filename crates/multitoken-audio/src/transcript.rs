//! The `<transcript>` text modality (multi_token's `WhisperTranscriptModality`): each
//! `<transcript>` token in a prompt is replaced by the greedy transcript of the k-th
//! `transcript_audios` item, made by our candle Whisper decoder, before tokenising
//! (see [`multitoken_core::preparer::substitute_text_items`]). The LM sees only text.

use std::path::Path;

use candle_core::Device;
use multitoken_core::preparer::TextModality;
use multitoken_core::Item;

use crate::decode::DecodeConfig;
use crate::transcribe::Transcriber;
use crate::Result;

/// Builder name of the transcript modality.
pub const AUDIO_WHISPER_TRANSCRIPT: &str = "audio_whisper_transcript";
/// The token replaced by a transcript.
pub const TRANSCRIPT_TOKEN: &str = "<transcript>";
/// The row key of the audio clips to transcribe.
pub const TRANSCRIPT_DATA_KEY: &str = "transcript_audios";

/// A [`TextModality`] that turns audio items into their transcripts.
#[derive(Debug)]
pub struct WhisperTranscript {
    transcriber: Transcriber,
    decode: DecodeConfig,
}

impl WhisperTranscript {
    /// Wraps a loaded transcriber.
    pub fn new(transcriber: Transcriber, decode: DecodeConfig) -> Self {
        Self {
            transcriber,
            decode,
        }
    }

    /// Loads a HF Whisper directory (`config.json`, `model.safetensors`, `tokenizer.json`).
    pub fn load(dir: &Path, device: &Device, decode: DecodeConfig) -> Result<Self> {
        Ok(Self::new(Transcriber::load(dir, device)?, decode))
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
        Ok(self.transcriber.transcribe_item(item, &self.decode)?.text)
    }
}
