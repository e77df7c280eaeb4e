//! `multitoken transcribe FILE [--model DIR] [--json]`: greedy Whisper transcription.
//!
//! The default model is the converted Whisper base that `cargo xtask weights` installs
//! in `$MULTITOKEN_WEIGHTS/whisper-base/hf` (default `~/.cache/multitoken`). With
//! `--json` the last stdout line is `{"text": "...", "windows": N, "tokens": [[...]]}`.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::Args;
use multitoken_audio::{DecodeConfig, Transcriber};
use multitoken_core::Item;
use serde_json::json;

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
    #[arg(long, default_value_t = 3600.0)]
    max_seconds: f64,
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
    let dir = match args.model {
        Some(dir) => dir,
        None => default_model()?,
    };
    let transcriber = Transcriber::load(&dir, &Device::Cpu)?;
    let config = DecodeConfig {
        max_seconds: args.max_seconds,
    };
    let transcript = transcriber.transcribe_item(&Item::Path(args.file), &config)?;
    if args.json {
        let line = json!({
            "text": transcript.text,
            "windows": transcript.tokens.len(),
            "tokens": transcript.tokens,
        });
        println!("{line}");
    } else {
        println!("{}", transcript.text);
    }
    Ok(())
}
