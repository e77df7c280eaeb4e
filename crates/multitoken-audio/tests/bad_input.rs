//! Broken and hostile input: every case is a clear error naming the item, never a panic.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

use multitoken_audio::{decode_bytes, load_audio, to_mono_16k, DecodeConfig};
use multitoken_core::Item;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/audio").join(name)
}

/// A RIFF/WAVE file: `format` 1 (PCM) or 3 (IEEE float), `bits` per sample.
fn wav(format: u16, channels: u16, rate: u32, bits: u16, data: &[u8]) -> Vec<u8> {
    let block = channels * bits / 8;
    let mut out = Vec::new();
    out.extend_from_slice(b"RIFF");
    out.extend_from_slice(&(36 + data.len() as u32).to_le_bytes());
    out.extend_from_slice(b"WAVEfmt ");
    out.extend_from_slice(&16u32.to_le_bytes());
    out.extend_from_slice(&format.to_le_bytes());
    out.extend_from_slice(&channels.to_le_bytes());
    out.extend_from_slice(&rate.to_le_bytes());
    out.extend_from_slice(&(rate * u32::from(block)).to_le_bytes());
    out.extend_from_slice(&block.to_le_bytes());
    out.extend_from_slice(&bits.to_le_bytes());
    out.extend_from_slice(b"data");
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out.extend_from_slice(data);
    out
}

fn float_wav(samples: &[f32]) -> Vec<u8> {
    let data: Vec<u8> = samples.iter().flat_map(|s| s.to_le_bytes()).collect();
    wav(3, 1, 16_000, 32, &data)
}

/// Loads `bytes` as an item and renders the outcome.
fn check(bytes: Vec<u8>, max_seconds: f64, expect: &str) {
    let config = DecodeConfig { max_seconds };
    let got = match load_audio(&Item::Bytes(bytes), &config) {
        Ok(samples) => format!("ok {} samples", samples.len()),
        Err(e) => e.to_string(),
    };
    assert!(got.contains(expect), "expected `{expect}` in `{got}`");
}

#[test]
fn broken_files_are_clear_errors() {
    let good = std::fs::read(fixture("speech16k.wav")).unwrap();
    let flac = std::fs::read(fixture("stereo44k.flac")).unwrap();
    let ogg = std::fs::read(fixture("mono22k.ogg")).unwrap();
    let mp3 = std::fs::read(fixture("mono48k.mp3")).unwrap();
    let n = good.len();
    check(good.clone(), 3600.0, "ok 40000 samples");
    check(Vec::new(), 3600.0, "audio of 0 bytes: zero-length audio");
    check(b"this is not audio at all, just text".to_vec(), 3600.0, "unsupported audio format");
    check(vec![0u8; 4096], 3600.0, "unsupported audio format");
    check(good[..n / 2].to_vec(), 3600.0, "truncated audio: the header announces 40000 frames");
    check(good[..44].to_vec(), 3600.0, "truncated audio");
    check(good[..20].to_vec(), 3600.0, "audio of 20 bytes");
    check(wav(1, 1, 16_000, 16, &[]), 3600.0, "zero-length audio");
    check(good.clone(), 1.0, "over the limit of 1.0 s");
    check(float_wav(&[0.1, f32::NAN, 0.2]), 3600.0, "sample 1 is not a finite number (NaN)");
    check(float_wav(&[0.1, 0.2, f32::INFINITY]), 3600.0, "sample 2 is not a finite number (inf)");
    // WMA in a WAV container: a codec we do not decode.
    check(wav(0x161, 1, 16_000, 16, &[0u8; 256]), 3600.0, "audio of 300 bytes: unsupported audio format");
    check(flac[..flac.len() / 3].to_vec(), 3600.0, "truncated audio");
    for (name, bytes) in [("flac", &flac), ("ogg", &ogg), ("mp3", &mp3)] {
        // symphonia keeps vorbis end padding (254 samples here) that libsndfile trims.
        check(bytes.clone(), 3600.0, if name == "ogg" { "ok 16254 samples" } else { "ok 16000 samples" });
        let cut = bytes[..bytes.len() / 2].to_vec();
        // Streams without a frame count in the header may end early; either way no panic.
        let outcome = load_audio(&Item::Bytes(cut), &DecodeConfig::default());
        if let Err(e) = outcome {
            assert!(e.to_string().contains("bytes"), "{name}: {e}");
        }
    }
}

#[test]
fn corrupted_bytes_never_panic() {
    let sources = ["speech16k.wav", "stereo44k.flac", "mono22k.ogg", "mono48k.mp3"];
    let mut state = 0x2545_f491_4f6c_dd1du64;
    for source in sources {
        let good = std::fs::read(fixture(source)).unwrap();
        for round in 0..24 {
            let mut bytes = good.clone();
            for _ in 0..(1 + round % 8) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let at = (state % bytes.len() as u64) as usize;
                bytes[at] ^= (state >> 32) as u8 | 1;
            }
            let _ = decode_bytes(source, bytes, None, &DecodeConfig::default());
        }
    }
}

#[test]
fn paths_and_items_name_themselves() {
    let missing = fixture("no-such-file.wav");
    let e = load_audio(&Item::Path(missing.clone()), &DecodeConfig::default()).unwrap_err();
    assert!(e.to_string().starts_with(&format!("{}: cannot read", missing.display())), "{e}");
    let e = load_audio(&Item::Text("hello".into()), &DecodeConfig::default()).unwrap_err();
    assert!(e.to_string().contains("must be a path or file bytes"), "{e}");
}

#[test]
fn raw_samples_are_checked() {
    let cases: &[(&[f32], u32, usize, &str)] = &[
        (&[0.0; 32], 16_000, 1, "ok 32"),
        (&[0.0; 32], 16_000, 2, "ok 16"),
        (&[], 16_000, 1, "clip: zero-length audio"),
        (&[0.0, f32::NEG_INFINITY], 16_000, 1, "clip: sample 1 is not a finite number (-inf)"),
        (&[0.0; 3], 16_000, 2, "not a whole number of 2-channel frames"),
        (&[0.0; 4], 0, 1, "sample rate 0 Hz is outside"),
        (&[0.0; 4], 16_000, 0, "0 channels"),
        (&[0.0; 20_000], 16_000, 1, "over the limit of 1.0 s"),
    ];
    for (samples, rate, channels, expect) in cases {
        let got = match to_mono_16k("clip", samples, *rate, *channels, &DecodeConfig { max_seconds: 1.0 }) {
            Ok(out) => format!("ok {}", out.len()),
            Err(e) => e.to_string(),
        };
        assert!(got.contains(expect), "expected `{expect}` in `{got}`");
    }
}

/// A transcript modality whose `multitoken.json` settings are wrong fails to
/// build with a message naming the setting or the missing model.
#[test]
fn transcript_modality_configs_that_cannot_work_are_refused() {
    multitoken_audio::link();
    let context = multitoken_core::ModalityContext::cpu_f32(std::env::temp_dir());
    let build = |config: serde_json::Value| {
        multitoken_core::build_text_modality("audio_whisper_transcript", &config, &context)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    let missing = build(serde_json::json!({"model_path": "no-such-whisper-dir"}));
    assert!(missing.contains("no-such-whisper-dir"), "{missing}");
    let typo = build(serde_json::json!({"model_pth": "x"}));
    assert!(typo.contains("model_pth"), "{typo}");
    let negative = build(serde_json::json!({"model_path": "x", "max_seconds": -1.0}));
    assert!(negative.contains("max_seconds"), "{negative}");
}
