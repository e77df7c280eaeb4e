//! The `whisper-cpp` feature: `<transcript>` text made by whisper.cpp (through
//! `whisper-rs`) from a ggml model file the user gives, instead of our candle
//! decoder. `cargo xtask weights` writes `whisper-base/ggml-base.bin` from the
//! same Whisper base, so both backends can run on one checkpoint.
//!
//! Audio goes through our own decoding and resampling (the same 16 kHz mono as
//! the candle path); whisper.cpp computes its own log-mel and decodes greedily
//! in English without timestamps, the settings of [`crate::Transcriber`].

use std::path::Path;

use multitoken_core::Item;
use whisper_rs::{FullParams, SamplingStrategy, WhisperContext, WhisperContextParameters};

use crate::decode::{describe_item, load_audio, DecodeConfig};
use crate::{Error, Result};

/// A loaded whisper.cpp model: the backend of [`crate::WhisperTranscript::load_ggml`].
pub struct WhisperCpp {
    context: WhisperContext,
    threads: i32,
}

impl std::fmt::Debug for WhisperCpp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WhisperCpp").field("threads", &self.threads).finish_non_exhaustive()
    }
}

impl WhisperCpp {
    /// Loads a whisper.cpp ggml model file (`ggml-base.bin`, ...).
    pub fn load(ggml_model: &Path) -> Result<Self> {
        let name = ggml_model.display().to_string();
        if !ggml_model.is_file() {
            return Err(Error::Io {
                item: name,
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such ggml model file"),
            });
        }
        // whisper.cpp prints its loading log to stderr unless the hooks take it.
        whisper_rs::install_logging_hooks();
        let context = WhisperContext::new_with_params(&name, WhisperContextParameters::default())
            .map_err(|e| Error::Format { item: name.clone(), reason: format!("whisper.cpp could not load it: {e}") })?;
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()) as i32;
        Ok(Self { context, threads })
    }

    /// Runs whisper.cpp on `threads` threads (default: every core).
    pub fn with_threads(mut self, threads: usize) -> Self {
        self.threads = threads.clamp(1, i32::MAX as usize) as i32;
        self
    }

    /// whisper.cpp's log-mel and encoder on the first 30 s window of 16 kHz
    /// `samples`, nothing decoded: the encoder-alone figure of `cargo xtask
    /// bench audio --whisper-cpp`.
    pub fn encode_window(&self, samples: &[f32]) -> Result<()> {
        let failed = |e: whisper_rs::WhisperError| Error::Format { item: "samples".into(), reason: format!("whisper.cpp: {e}") };
        let mut state = self.context.create_state().map_err(failed)?;
        let threads = self.threads as usize;
        state.pcm_to_mel(samples, threads).map_err(failed)?;
        state.encode(0, threads).map_err(failed)?;
        Ok(())
    }

    /// The greedy transcript of one audio item, decoded and resampled under `decode`.
    pub fn transcribe(&self, item: &Item, decode: &DecodeConfig) -> Result<String> {
        let samples = load_audio(item, decode)?;
        self.transcribe_samples(&samples).map_err(|e| match e {
            Error::Format { reason, .. } => Error::Format { item: describe_item(item), reason },
            other => other,
        })
    }

    /// The greedy transcript of 16 kHz mono `samples`.
    pub fn transcribe_samples(&self, samples: &[f32]) -> Result<String> {
        let failed = |e: whisper_rs::WhisperError| Error::Format { item: "samples".into(), reason: format!("whisper.cpp: {e}") };
        let mut state = self.context.create_state().map_err(failed)?;
        let mut params = FullParams::new(SamplingStrategy::Greedy { best_of: 1 });
        params.set_language(Some("en"));
        // Greedy only, as `TranscribeOptions::greedy`: no temperature fallback.
        params.set_temperature(0.0);
        params.set_temperature_inc(0.0);
        params.set_n_threads(self.threads);
        params.set_no_timestamps(true);
        params.set_print_progress(false);
        params.set_print_realtime(false);
        params.set_print_timestamps(false);
        params.set_print_special(false);
        state.full(params, samples).map_err(failed)?;
        let mut text = String::new();
        for segment in state.as_iter() {
            let piece = segment.to_str_lossy().map_err(failed)?;
            text.push_str(&piece);
        }
        Ok(text.trim().to_string())
    }
}
