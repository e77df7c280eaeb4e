//! End-to-end test of `multitoken transcribe` on espeak-ng speech
//! (`tests/fixtures/audio/espeak_fox22k.wav`) with the converted Whisper base; skips
//! with a message when `cargo xtask weights` has not installed it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Command;

#[test]
fn transcribe_returns_the_spoken_words() {
    let dir = multitoken_audio::default_whisper_dir();
    if !dir.join("model.safetensors").is_file() {
        eprintln!(
            "skipped: no Whisper base at {} (run `cargo xtask weights`)",
            dir.display()
        );
        return;
    }
    let wav =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/audio/espeak_fox22k.wav");
    let out = Command::new(env!("CARGO_BIN_EXE_multitoken"))
        .args(["transcribe", "--json"])
        .arg(&wav)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let value: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let text = value["text"].as_str().unwrap().to_lowercase();
    assert_eq!(value["windows"], 1);
    for word in ["quick", "brown", "fox", "jump", "over", "lazy", "dog"] {
        assert!(text.contains(word), "{word:?} missing from {text:?}");
    }
}

/// `generate --transcript clip.wav` puts the clip's transcript where `<transcript>`
/// stands: the prompt has exactly as many tokens as the same text typed in.
#[test]
fn generate_substitutes_transcript_tokens() {
    let whisper = multitoken_audio::default_whisper_dir();
    let lm = std::env::var_os("MULTITOKEN_WEIGHTS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(&std::env::var("HOME").unwrap()).join(".cache/multitoken"))
        .join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !whisper.join("model.safetensors").is_file() || !lm.is_file() {
        eprintln!("skipped: Whisper base or SmolLM2 not installed (run `cargo xtask weights`)");
        return;
    }
    let wav =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/audio/espeak_fox22k.wav");
    let prompt_tokens = |extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_multitoken"))
            .args(["generate", "--json", "--max-new-tokens", "1"])
            .args(extra)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{extra:?}: {stderr}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let value: serde_json::Value =
            serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
        value["prompt_tokens"].as_u64().unwrap()
    };
    let wav = wav.to_str().unwrap();
    let heard = prompt_tokens(&[
        "--prompt",
        "Heard: <transcript> Repeat it.",
        "--transcript",
        wav,
    ]);
    let typed = prompt_tokens(&[
        "--prompt",
        "Heard: The quick brown fox jump over the lazy dog. Repeat it.",
    ]);
    assert_eq!(heard, typed);
    let out = Command::new(env!("CARGO_BIN_EXE_multitoken"))
        .args([
            "generate",
            "--prompt",
            "<transcript> <transcript>",
            "--transcript",
            wav,
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("<transcript>"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// A mono 16-bit WAV of `seconds` of seeded white noise (xorshift; no fixture file).
fn noise_wav(path: &Path, seconds: u32, seed: u64) {
    let rate = 16_000u32;
    let n = rate * seconds;
    let mut state = seed | 1;
    let mut data = Vec::with_capacity(n as usize * 2);
    for _ in 0..n {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        // Uniform in [-0.1, 0.1) of full scale.
        let v = ((state >> 11) as f64 / (1u64 << 53) as f64 - 0.5) * 0.2;
        data.extend_from_slice(&((v * 32767.0) as i16).to_le_bytes());
    }
    let mut wav = Vec::new();
    wav.extend_from_slice(b"RIFF");
    wav.extend_from_slice(&(36 + data.len() as u32).to_le_bytes());
    wav.extend_from_slice(b"WAVEfmt ");
    wav.extend_from_slice(&16u32.to_le_bytes());
    wav.extend_from_slice(&1u16.to_le_bytes());
    wav.extend_from_slice(&1u16.to_le_bytes());
    wav.extend_from_slice(&rate.to_le_bytes());
    wav.extend_from_slice(&(rate * 2).to_le_bytes());
    wav.extend_from_slice(&2u16.to_le_bytes());
    wav.extend_from_slice(&16u16.to_le_bytes());
    wav.extend_from_slice(b"data");
    wav.extend_from_slice(&(data.len() as u32).to_le_bytes());
    wav.extend_from_slice(&data);
    std::fs::write(path, wav).unwrap();
}

/// Noise gives no text or a short one, never a repetition loop (openai-whisper's
/// compression-ratio / log-probability fallback and no-speech rules), and
/// `--max-new-tokens` bounds a window's tokens.
#[test]
fn noise_gives_no_repetition_loop() {
    let dir = multitoken_audio::default_whisper_dir();
    if !dir.join("model.safetensors").is_file() {
        eprintln!("skipped: no Whisper base at {} (run `cargo xtask weights`)", dir.display());
        return;
    }
    let wav = std::env::temp_dir().join(format!("multitoken-noise-{}.wav", std::process::id()));
    noise_wav(&wav, 8, 0x5eed);
    let transcribe = |extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_multitoken"))
            .args(["transcribe", "--json"])
            .args(extra)
            .arg(&wav)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{extra:?}: {stderr}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let value: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
        value
    };
    let value = transcribe(&[]);
    let text = value["text"].as_str().unwrap();
    eprintln!("noise: {text:?} {}", value["decodes"]);
    let tokens = value["tokens"][0].as_array().unwrap().len();
    assert!(tokens < 100, "{tokens} tokens for noise: {text:?}");
    assert!(
        multitoken_audio::compression_ratio(text) <= 2.4,
        "a repetition: {text:?}"
    );
    let words: Vec<String> = text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect();
    for word in &words {
        let count = words.iter().filter(|w| *w == word).count();
        assert!(count <= 5, "{word:?} {count} times in {text:?}");
    }
    // The flag bounds the plain greedy decode as well.
    let value = transcribe(&["--no-fallback", "--max-new-tokens", "6"]);
    assert!(value["tokens"][0].as_array().unwrap().len() <= 6, "{value}");
    let out = Command::new(env!("CARGO_BIN_EXE_multitoken"))
        .args(["transcribe", "--max-new-tokens", "0"])
        .arg(&wav)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("max_new_tokens is 0"), "{stderr}");
    let _ = std::fs::remove_file(&wav);
}
