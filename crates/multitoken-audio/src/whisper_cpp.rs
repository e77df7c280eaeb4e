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

    /// The greedy transcript of one audio item, decoded and resampled under `decode`.
    pub fn transcribe(&self, item: &Item, decode: &DecodeConfig) -> Result<String> {
        let samples = load_audio(item, decode)?;
        let failed = |e: whisper_rs::WhisperError| Error::Format { item: describe_item(item), reason: format!("whisper.cpp: {e}") };
        let mut state = self.context.create_state().map_err(failed)?;
        let mut params = FullParams::new(SamplingStrategy::Greedy { best_of: 1 });
        params.set_language(Some("en"));
        params.set_n_threads(self.threads);
        params.set_no_timestamps(true);
        params.set_print_progress(false);
        params.set_print_realtime(false);
        params.set_print_timestamps(false);
        params.set_print_special(false);
        state.full(params, &samples).map_err(failed)?;
        let mut text = String::new();
        for segment in state.as_iter() {
            let piece = segment.to_str_lossy().map_err(failed)?;
            text.push_str(&piece);
        }
        Ok(text.trim().to_string())
    }
}
