//! `multitoken transcribe FILE [--model DIR] [--max-new-tokens N] [--json]`: Whisper
//! transcription, greedy with openai-whisper's temperature fallback and no-speech
//! rules (`multitoken_audio::TranscribeOptions`), so noise gives no text or a short
//! one rather than a repetition loop.
//!
//! The default model is the converted Whisper base that `cargo xtask weights` installs
//! in `$MULTITOKEN_WEIGHTS/whisper-base/hf` (default `~/.cache/multitoken`). With
//! `--json` the last stdout line is `{"text": "...", "windows": N, "tokens": [[...]],
//! "decodes": [{"temperature", "avg_logprob", "compression_ratio", "no_speech_prob",
//! "skipped"}, ...]}` (one `decodes` entry per 30 s window).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::Args;
use multitoken_audio::transcribe::MAX_TOKENS_PER_WINDOW;
use multitoken_audio::{DecodeConfig, TranscribeOptions, Transcriber};
use multitoken_core::Item;
use serde_json::json;

/// Longest accepted audio by default: an hour.
const DEFAULT_MAX_SECONDS: f64 = 3600.0;

/// Arguments of `multitoken transcribe`.
#[derive(Debug, Args)]
pub struct TranscribeArgs {
    /// An audio file: wav, flac, mp3 or ogg/vorbis.
    file: PathBuf,
    /// A HF Whisper directory (config.json, model.safetensors, tokenizer.json)
    /// [default: whisper-base from `cargo xtask weights`].
    #[arg(long)]
    model: Option<PathBuf>,
    /// Longest accepted audio in seconds.
    #[arg(long, default_value_t = DEFAULT_MAX_SECONDS, value_parser = super::positive_seconds)]
    max_seconds: f64,
    /// Most tokens generated per 30 s window.
    #[arg(long, default_value_t = MAX_TOKENS_PER_WINDOW)]
    max_new_tokens: usize,
    /// A decode whose text's zlib compression ratio is above this (a repetition)
    /// is retried at the next temperature (openai-whisper's rule).
    #[arg(long, default_value_t = 2.4)]
    compression_ratio_threshold: f64,
    /// A decode whose mean token log-probability is below this is retried at the
    /// next temperature.
    #[arg(long, default_value_t = -1.0, allow_negative_numbers = true)]
    logprob_threshold: f64,
    /// A window whose no-speech probability is above this, and whose decode is
    /// below --logprob-threshold, is silence: no text.
    #[arg(long, default_value_t = 0.6)]
    no_speech_threshold: f64,
    /// Greedy only: no temperature fallback, no thresholds (the plain decode).
    #[arg(long)]
    no_fallback: bool,
    /// Print one JSON object on the last stdout line.
    #[arg(long)]
    json: bool,
}

fn default_model() -> Result<PathBuf> {
    let cache = match std::env::var_os("MULTITOKEN_WEIGHTS").filter(|d| !d.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").context("neither MULTITOKEN_WEIGHTS nor HOME is set")?)
            .join(".cache")
            .join("multitoken"),
    };
    let dir = cache.join("whisper-base").join("hf");
    if !dir.join("model.safetensors").is_file() {
        bail!("no Whisper model at {} (run `cargo xtask weights`, or pass --model DIR)", dir.display());
    }
    Ok(dir)
}

/// Run `multitoken transcribe`.
pub fn run(args: TranscribeArgs) -> Result<()> {
    let transcriber = load_transcriber(args.model.as_deref())?;
    let config = DecodeConfig::with_max_seconds(args.max_seconds);
    let options = if args.no_fallback {
        TranscribeOptions::greedy(args.max_new_tokens)
    } else {
        TranscribeOptions {
            max_new_tokens: args.max_new_tokens,
            compression_ratio_threshold: Some(args.compression_ratio_threshold),
            logprob_threshold: Some(args.logprob_threshold),
            no_speech_threshold: Some(args.no_speech_threshold),
            ..TranscribeOptions::default()
        }
    };
    let transcript = transcriber.transcribe_item_with(&Item::Path(args.file), &config, &options)?;
    if args.json {
        let decodes: Vec<serde_json::Value> = transcript
            .windows
            .iter()
            .map(|w| {
                json!({
                    "temperature": w.temperature,
                    "avg_logprob": w.avg_logprob,
                    "compression_ratio": w.compression_ratio,
                    "no_speech_prob": w.no_speech_prob,
                    "skipped": w.skipped,
                })
            })
            .collect();
        let line = json!({
            "text": transcript.text,
            "windows": transcript.tokens.len(),
            "tokens": transcript.tokens,
            "decodes": decodes,
        });
        println!("{line}");
    } else {
        println!("{}", transcript.text);
    }
    Ok(())
}

/// The Whisper model `model` names (a directory or a hub id), else the default one.
fn load_transcriber(model: Option<&std::path::Path>) -> Result<Transcriber> {
    let dir = match model {
        Some(model) => crate::hub::resolve_model_arg(model)?,
        None => default_model()?,
    };
    Ok(Transcriber::load(&dir, &Device::Cpu)?)
}

/// The transcript of an audio item with `multitoken transcribe`'s defaults
/// (greedy with temperature fallback, 30 s windows over the whole clip).
pub fn transcribe_item(model: Option<&std::path::Path>, item: &Item) -> Result<String> {
    let transcriber = load_transcriber(model)?;
    let config = DecodeConfig::with_max_seconds(DEFAULT_MAX_SECONDS);
    let transcript = transcriber.transcribe_item_with(item, &config, &TranscribeOptions::default())?;
    Ok(transcript.text)
}
