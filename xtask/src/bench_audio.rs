//! `cargo xtask bench audio`: the audio front end and the Whisper-base encoder on CPU,
//! ours against the Python reference in one run.
//!
//! ```text
//! cargo xtask bench audio [--threads N] [--clips 32] [--repeat 3] [--no-python] [--whisper-cpp]
//! ```
//!
//! 1. log-mel (80 bins) of `--clips` x 30 s clips at 16 kHz vs transformers'
//!    `WhisperFeatureExtractor` (numpy), goal >= 3x;
//! 2. decode + downmix + resample of a 60 s 44.1 kHz stereo 16-bit wav to 16 kHz mono vs
//!    `librosa.load(sr=16000)` (soxr_hq), goal >= 3x;
//! 3. the Whisper-base encoder forward on one 30 s window, f32, vs transformers,
//!    goal >= 1.0x.
//!
//! With `--whisper-cpp` (xtask rebuilt with its `whisper-cpp` feature, which builds
//! whisper.cpp; CI never does): whisper.cpp on the same Whisper base (`ggml-base.bin`,
//! converted by `cargo xtask weights` from the same checkpoint), same threads:
//! 4. greedy English transcription (no temperature fallback) of one ~30 s speech clip (a
//!    paragraph read by espeak-ng, else the espeak fixture
//!    repeated), ours (candle, `Transcriber`) vs whisper.cpp, texts compared, goal >= 1.0x;
//! 5. log-mel + encoder alone on one 30 s window, vs whisper.cpp's `pcm_to_mel` + `encode`.
//!
//! Same thread count on both sides (`RAYON_NUM_THREADS` / `torch.set_num_threads`);
//! best of `--repeat` after a warm-up. Ours runs in this process (`cargo run --release
//! -p xtask -- bench audio` for a release build; candle and realfft are optimised in
//! every profile). Needs the converted Whisper base (`cargo xtask weights`).

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use multitoken_audio::{default_whisper_dir, load_audio, DecodeConfig, LogMel, Whisper};
use multitoken_core::Item;

use crate::bench::last_json_line;
use crate::weights::{python, workspace_root};

/// Run `bench audio`.
pub fn run(args: &[String]) -> Result<()> {
    let mut threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let mut clips = 32usize;
    let mut repeat = 3usize;
    let mut with_python = true;
    let mut with_whisper_cpp = false;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut number = |name: &str| -> Result<usize> {
            let v = it.next().with_context(|| format!("{name} needs a number"))?;
            v.parse().with_context(|| format!("{name} {v}: not a number"))
        };
        match arg.as_str() {
            "--threads" => threads = number("--threads")?.max(1),
            "--clips" => clips = number("--clips")?.max(1),
            "--repeat" => repeat = number("--repeat")?.max(1),
            "--no-python" => with_python = false,
            "--whisper-cpp" => with_whisper_cpp = true,
            other => bail!("unknown argument `{other}`"),
        }
    }
    // Before any thread pool exists.
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    let model_dir = default_whisper_dir();
    if !model_dir.join("model.safetensors").is_file() {
        bail!("{} not found: run `cargo xtask weights` first", model_dir.display());
    }
    let target = workspace_root().join("target").join("bench");
    std::fs::create_dir_all(&target)?;
    let wav = target.join("audio_60s_44k_stereo.wav");
    write_wav(&wav, 44_100, 2, 60)?;

    eprintln!("ours, {threads} threads ...");
    let n = 30 * 16_000;
    let clip_samples: Vec<Vec<f32>> = (0..clips)
        .map(|k| {
            (0..n)
                .map(|i| {
                    let t = i as f64 / 16_000.0;
                    let tau = std::f64::consts::TAU;
                    (0.3 * (tau * (200.0 + 25.0 * k as f64) * t).sin() * (tau * 0.5 * t).sin()) as f32
                })
                .collect()
        })
        .collect();
    let mel = LogMel::new(80)?;
    let mel_s = best(repeat, || {
        for clip in &clip_samples {
            std::hint::black_box(mel.compute(clip));
        }
        Ok(())
    })?;
    let item = Item::Path(wav.clone());
    let decode_s = best(repeat, || {
        let samples = load_audio(&item, &DecodeConfig::default())?;
        if samples.len() != 60 * 16_000 {
            bail!("decoded {} samples, expected {}", samples.len(), 60 * 16_000);
        }
        Ok(())
    })?;
    let whisper = Whisper::load(&model_dir, &Device::Cpu, DType::F32)?;
    let window = mel.compute(&clip_samples[0]).windows.swap_remove(0);
    let input = Tensor::from_vec(window, (1, 80, 3000), &Device::Cpu)?;
    let encoder_s = best(repeat, || {
        std::hint::black_box(whisper.encoder.forward(&input)?);
        Ok(())
    })?;

    let reference = if with_python {
        eprintln!("python reference, {threads} threads ...");
        let mut cmd = Command::new(python());
        cmd.arg(workspace_root().join("xtask").join("bench").join("audio.py"))
            .arg("--wav")
            .arg(&wav)
            .arg("--model")
            .arg(&model_dir)
            .args(["--clips", &clips.to_string(), "--threads", &threads.to_string(), "--repeat", &repeat.to_string()])
            .env("OMP_NUM_THREADS", threads.to_string())
            .env("MKL_NUM_THREADS", threads.to_string());
        Some(last_json_line(&mut cmd)?)
    } else {
        None
    };

    println!();
    println!("audio, CPU, {threads} threads (best of {repeat})");
    let rows = [
        (format!("log-mel 80 x {clips} x 30 s clips"), mel_s, "mel_s", 3.0),
        ("decode+resample 60 s 44.1 kHz stereo wav".to_string(), decode_s, "decode_s", 3.0),
        ("Whisper-base encoder, 1 x 30 s, f32".to_string(), encoder_s, "encoder_s", 1.0),
    ];
    println!("{:<44} {:>10} {:>10} {:>8} {:>6}", "", "ours (s)", "ref (s)", "speedup", "goal");
    for (name, ours, key, goal) in rows {
        match reference.as_ref().and_then(|r| r[key].as_f64()) {
            Some(theirs) => {
                println!("{name:<44} {ours:>10.4} {theirs:>10.4} {:>7.2}x {goal:>5.1}x", theirs / ours)
            }
            None => println!("{name:<44} {ours:>10.4} {:>10} {:>8} {goal:>5.1}x", "-", "-"),
        }
    }
    if let Some(r) = &reference {
        println!("reference: torch {}, librosa {}", r["torch"], r["librosa"]);
    }
    if with_whisper_cpp {
        whisper_cpp_rows(threads, repeat, &model_dir, &clip_samples[0], encoder_s + mel_s / clips as f64)?;
    }
    Ok(())
}

/// The paragraph `espeak-ng` reads for the transcription row (28.8 s at its
/// default voice and 150 words a minute): ordinary prose that repeats nothing, so
/// that neither engine's decode runs into a loop.
#[cfg(feature = "whisper-cpp")]
const SPEECH_TEXT: &str = "The old lighthouse stood at the edge of the cliff for more than two hundred years. \
Every evening the keeper climbed the narrow stairs, lit the great lamp, and watched the ships pass safely through the dark water. \
One winter night a terrible storm rolled in from the north. Waves crashed against the rocks and the wind howled through the broken windows. \
Still the light kept burning, and in the morning the fishermen came home to their families, tired but alive.";

/// Speech of about 30 s at 16 kHz: [`SPEECH_TEXT`] read by `espeak-ng` (Debian's
/// `espeak-ng` package) when it is installed; else the espeak fixture ("The quick
/// brown fox ...") repeated with 0.3 s pauses, which says one sentence eight times.
#[cfg(feature = "whisper-cpp")]
fn speech_clip_30s() -> Result<Vec<f32>> {
    let read = workspace_root().join("target").join("bench").join("speech_lighthouse_22k.wav");
    let spoken = read.is_file()
        || std::process::Command::new("espeak-ng")
            .args(["-v", "en-us", "-s", "150", "-w"])
            .arg(&read)
            .arg(SPEECH_TEXT)
            .status()
            .is_ok_and(|s| s.success());
    if spoken {
        return Ok(load_audio(&Item::Path(read), &DecodeConfig::default())?);
    }
    eprintln!("espeak-ng is not installed (apt-get install espeak-ng): the clip repeats one sentence");
    let fixture = workspace_root().join("tests/fixtures/audio/espeak_fox22k.wav");
    let speech = load_audio(&Item::Path(fixture), &DecodeConfig::default())?;
    let limit = 29 * 16_000;
    let mut clip = Vec::with_capacity(limit);
    while clip.len() + speech.len() <= limit {
        clip.extend_from_slice(&speech);
        clip.extend(std::iter::repeat_n(0.0f32, 16_000 * 3 / 10));
    }
    Ok(clip)
}

/// Rows 4 and 5: ours against whisper.cpp (see the module docs).
#[cfg(feature = "whisper-cpp")]
fn whisper_cpp_rows(threads: usize, repeat: usize, model_dir: &Path, window: &[f32], ours_encoder_s: f64) -> Result<()> {
    use multitoken_audio::whisper_cpp::WhisperCpp;
    // `cargo xtask weights` writes it next to the HF directory.
    let ggml = model_dir.parent().unwrap_or(model_dir).join("ggml-base.bin");
    if !ggml.is_file() {
        bail!("{} not found: run `cargo xtask weights` first", ggml.display());
    }
    let clip = speech_clip_30s()?;
    let target = workspace_root().join("target").join("bench");
    let wav = target.join("speech_30s_16k.wav");
    write_samples_wav(&wav, &clip)?;
    let item = Item::Path(wav);
    let decode = DecodeConfig::default();
    eprintln!("whisper.cpp vs ours: transcription of {:.1} s, {threads} threads ...", clip.len() as f64 / 16_000.0);
    let ours = multitoken_audio::Transcriber::load(model_dir, &Device::Cpu)?;
    let cpp = WhisperCpp::load(&ggml)?.with_threads(threads);
    // Both engines' plain greedy decode (no temperature fallback): the fallback
    // rules differ (openai-whisper's compression ratio vs whisper.cpp's entropy),
    // and on a clip that trips them one engine decodes a window six times.
    let greedy = multitoken_audio::TranscribeOptions::greedy(multitoken_audio::MAX_TOKENS_PER_WINDOW);
    let mut ours_text = String::new();
    let ours_s = best(repeat, || {
        ours_text = ours.transcribe_item_with(&item, &decode, &greedy)?.text;
        Ok(())
    })?;
    let mut cpp_text = String::new();
    let cpp_s = best(repeat, || {
        cpp_text = cpp.transcribe(&item, &decode)?;
        Ok(())
    })?;
    let cpp_encoder_s = best(repeat, || Ok(cpp.encode_window(window)?))?;
    println!();
    println!("{:<44} {:>10} {:>10} {:>8} {:>6}", "", "ours (s)", "w.cpp (s)", "speedup", "goal");
    println!("{:<44} {ours_s:>10.4} {cpp_s:>10.4} {:>7.2}x {:>5.1}x", "transcribe ~30 s speech, greedy", cpp_s / ours_s, 1.0);
    println!("{:<44} {ours_encoder_s:>10.4} {cpp_encoder_s:>10.4} {:>7.2}x {:>6}", "log-mel + encoder, 1 x 30 s window", cpp_encoder_s / ours_encoder_s, "-");
    println!("same text: {}", ours_text == cpp_text);
    println!("ours:        {ours_text}");
    println!("whisper.cpp: {cpp_text}");
    Ok(())
}

#[cfg(not(feature = "whisper-cpp"))]
fn whisper_cpp_rows(_: usize, _: usize, _: &Path, _: &[f32], _: f64) -> Result<()> {
    bail!("--whisper-cpp needs xtask built with its `whisper-cpp` feature: run it as `cargo xtask bench audio --whisper-cpp` (which adds it) or `cargo run --release -p xtask --features whisper-cpp -- bench audio --whisper-cpp`")
}

/// 16-bit mono 16 kHz WAV of `samples`.
#[cfg(feature = "whisper-cpp")]
fn write_samples_wav(path: &Path, samples: &[f32]) -> Result<()> {
    let values = samples.iter().map(|s| (s.clamp(-1.0, 1.0) * 32767.0).round() as i16);
    write_pcm16_wav(path, 16_000, 1, samples.len(), values)
}

fn best(repeat: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut best = f64::INFINITY;
    for _ in 0..repeat {
        let start = Instant::now();
        f()?;
        best = best.min(start.elapsed().as_secs_f64());
    }
    Ok(best)
}

/// A 16-bit PCM wav: two detuned tones with a slow envelope, one per channel.
fn write_wav(path: &Path, rate: u32, channels: u16, seconds: u32) -> Result<()> {
    let frames = rate * seconds;
    let values = (0..frames).flat_map(|i| {
        let t = f64::from(i) / f64::from(rate);
        (0..channels).map(move |c| {
            let f = 330.0 + 110.0 * f64::from(c);
            let v = 0.4 * (std::f64::consts::TAU * f * t).sin() * (0.5 + 0.5 * (t * 0.7).sin());
            (v * 32767.0) as i16
        })
    });
    write_pcm16_wav(path, rate, channels, frames as usize * usize::from(channels), values)
}

/// A 16-bit PCM WAV of `count` interleaved `values`.
fn write_pcm16_wav(path: &Path, rate: u32, channels: u16, count: usize, values: impl Iterator<Item = i16>) -> Result<()> {
    let data_len = (count * 2) as u32;
    let mut bytes = Vec::with_capacity(44 + data_len as usize);
    bytes.extend_from_slice(b"RIFF");
    bytes.extend_from_slice(&(36 + data_len).to_le_bytes());
    bytes.extend_from_slice(b"WAVEfmt ");
    bytes.extend_from_slice(&16u32.to_le_bytes());
    bytes.extend_from_slice(&1u16.to_le_bytes());
    bytes.extend_from_slice(&channels.to_le_bytes());
    bytes.extend_from_slice(&rate.to_le_bytes());
    bytes.extend_from_slice(&(rate * u32::from(channels) * 2).to_le_bytes());
    bytes.extend_from_slice(&(channels * 2).to_le_bytes());
    bytes.extend_from_slice(&16u16.to_le_bytes());
    bytes.extend_from_slice(b"data");
    bytes.extend_from_slice(&data_len.to_le_bytes());
    for v in values {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}
