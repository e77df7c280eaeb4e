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
