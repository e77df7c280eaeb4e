//! `multitoken mel FILE [--n-mels 80|128] [--json]`: Whisper's log-mel of an audio file.
//!
//! A tool for users who debug audio, and a contract that outside checks use: with
//! `--json` the last stdout line is `{"shape": [n_mels, 3000], "data": [...]}`, the first
//! 30 s window in row-major order. Change it only additively.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use multitoken_audio::{load_audio, DecodeConfig, LogMel};
use multitoken_core::Item;

/// Arguments of `multitoken mel`.
#[derive(Debug, Args)]
pub struct MelArgs {
    /// An audio file: wav, flac, mp3 or ogg/vorbis, any rate and channel count.
    file: PathBuf,
    /// Mel bins: 80 (Whisper up to large-v2) or 128 (large-v3).
    #[arg(long, default_value_t = 80)]
    n_mels: usize,
    /// Longest accepted audio in seconds.
    #[arg(long, default_value_t = 3600.0, value_parser = super::positive_seconds)]
    max_seconds: f64,
    /// Print the first window as one JSON object on the last stdout line.
    #[arg(long)]
    json: bool,
}

/// Run `multitoken mel`.
pub fn run(args: MelArgs) -> Result<()> {
    if args.n_mels != 80 && args.n_mels != 128 {
        bail!("--n-mels must be 80 or 128, got {}", args.n_mels);
    }
    let config = DecodeConfig::with_max_seconds(args.max_seconds);
    let samples = load_audio(&Item::Path(args.file.clone()), &config)?;
    let mel = log_mel_of(&samples, args.n_mels)?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let Some(first) = mel.windows.first() else {
        bail!("{}: no log-mel window", args.file.display());
    };
    if args.json {
        write!(out, "{{\"shape\":[{},{}],\"data\":[", args.n_mels, first.len() / args.n_mels)?;
        for (i, v) in first.iter().enumerate() {
            if i > 0 {
                out.write_all(b",")?;
            }
            // serde_json's float formatting: the shortest text that round-trips.
            out.write_all(serde_json::to_string(v)?.as_bytes())?;
        }
        out.write_all(b"]}\n")?;
    } else {
        let seconds = samples.len() as f64 / f64::from(multitoken_audio::SAMPLE_RATE);
        writeln!(
            out,
            "{}: {seconds:.2} s at 16 kHz, {} window(s) of [{}, 3000]",
            args.file.display(),
            mel.windows.len(),
            args.n_mels
        )?;
        for (k, w) in mel.windows.iter().enumerate() {
            let min = w.iter().copied().fold(f32::INFINITY, f32::min);
            let max = w.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mean = w.iter().sum::<f32>() / w.len() as f32;
            writeln!(out, "window {k}: min {min:.4} max {max:.4} mean {mean:.4}")?;
        }
    }
    out.flush()?;
    Ok(())
}

fn log_mel_of(samples: &[f32], n_mels: usize) -> Result<multitoken_audio::MelWindows> {
    if n_mels != 80 && n_mels != 128 {
        bail!("n_mels must be 80 or 128, got {n_mels}");
    }
    Ok(LogMel::new(n_mels)?.compute(samples))
}

/// Whisper's log-mel windows (`n_mels` × 3000 values each, row-major) of an audio
/// item at any rate and channel count, as `multitoken mel` computes them (the
/// default length limit, an hour).
pub fn log_mel_windows(item: &Item, n_mels: usize) -> Result<Vec<Vec<f32>>> {
    let samples = load_audio(item, &DecodeConfig::with_max_seconds(3600.0))?;
    Ok(log_mel_of(&samples, n_mels)?.windows)
}
