//! The Whisper audio modality for multitoken (`<speech>`, data key `speech_audios`).
//!
//! The pipeline, one module each:
//!
//! 1. [`decode`]: wav, flac, mp3 and ogg/vorbis bytes -> interleaved f32 with symphonia,
//!    mono downmix, checks (empty, NaN/inf, length limit, truncation);
//! 2. [`resample`]: band-limited resampling to 16 kHz (polyphase Kaiser-windowed sinc);
//! 3. [`mel`]: transformers' `WhisperFeatureExtractor` log-mel, one `[n_mels, 3000]`
//!    array per 30 s window;
//! 4. [`whisper`]: the Whisper encoder and decoder on candle from HF checkpoints;
//! 5. [`modality`]: the `audio_whisper` [`Modality`](multitoken_core::Modality),
//!    registered with `inventory`;
//! 6. [`transcribe`]: greedy transcription;
//! 7. [`transcript`]: the `<transcript>` text modality (the transcript replaces the
//!    token in the prompt before tokenising).
//!
//! ```
//! use multitoken_audio::{mel::LogMel, to_mono_16k, DecodeConfig};
//!
//! # fn main() -> multitoken_audio::Result<()> {
//! // One second of a 440 Hz stereo tone at 44.1 kHz, from Rust.
//! let stereo: Vec<f32> = (0..44_100)
//!     .flat_map(|i| {
//!         let v = (i as f32 * 440.0 * std::f32::consts::TAU / 44_100.0).sin() * 0.3;
//!         [v, v]
//!     })
//!     .collect();
//! let mono = to_mono_16k("tone", &stereo, 44_100, 2, &DecodeConfig::default())?;
//! assert_eq!(mono.len(), 16_000);
//! let mel = LogMel::new(80)?.compute(&mono);
//! assert_eq!(mel.windows.len(), 1);
//! assert_eq!(mel.windows[0].len(), 80 * 3000);
//! # Ok(())
//! # }
//! ```

// Tests may unwrap and panic: a failure there is the report.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod decode;
pub mod error;
pub mod mel;
pub mod modality;
pub mod resample;
pub mod transcribe;
pub mod transcript;
mod wav;
pub mod whisper;
#[cfg(feature = "whisper-cpp")]
pub mod whisper_cpp;

pub use decode::{decode_bytes, decode_item, load_audio, to_mono_16k, DecodeConfig, DecodedAudio};
pub use error::{Error, Result};
pub use mel::{LogMel, MelWindows};
pub use modality::{AudioConfig, FeatureMode, WhisperAudio, AUDIO_WHISPER};
pub use transcribe::{compression_ratio, TranscribeOptions, Transcriber, Transcript, WindowDecode, MAX_TOKENS_PER_WINDOW};
pub use transcript::{
    WhisperTranscript, AUDIO_WHISPER_TRANSCRIPT, TRANSCRIPT_DATA_KEY, TRANSCRIPT_TOKEN,
};
pub use whisper::{Whisper, WhisperConfig};

/// Whisper's sample rate in Hz.
pub const SAMPLE_RATE: u32 = 16_000;

/// Where `cargo xtask weights` installs the converted Whisper base:
/// `${MULTITOKEN_WEIGHTS:-$HOME/.cache/multitoken}/whisper-base/hf`.
pub fn default_whisper_dir() -> std::path::PathBuf {
    use std::path::PathBuf;
    let cache = std::env::var_os("MULTITOKEN_WEIGHTS")
        .filter(|dir| !dir.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .map(|home| PathBuf::from(home).join(".cache").join("multitoken"))
        })
        .unwrap_or_else(|| PathBuf::from(".cache").join("multitoken"));
    cache.join("whisper-base").join("hf")
}

/// Forces the linker to keep this crate's `inventory` registration in a binary: call
/// it once (e.g. from `main`); it does nothing else.
pub fn link() {
    modality::keep_registration();
    transcript::keep_registration();
}
