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
