//! Parity with transformers on the fixtures written by `xtask/fixtures/audio.py`:
//! `WhisperFeatureExtractor` log-mel (16 kHz within 1e-4; resampled input from other
//! rates within a looser bound, since rubato and soxr differ) and a tiny random Whisper.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use multitoken_audio::{load_audio, DecodeConfig, LogMel, Whisper};
use multitoken_core::Item;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/audio")
}

/// The long clip of the fixture script: f64 math, then f32.
fn formula(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let t = i as f64 / 16000.0;
            let tau = 2.0 * std::f64::consts::PI;
            (0.3 * (tau * 440.0 * t).sin() * (tau * 0.25 * t).sin()
                + 0.1 * (tau * (300.0 + 40.0 * t) * t).sin()) as f32
        })
        .collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn log_mel_matches_whisper_feature_extractor() {
    let dir = fixtures();
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("mel.json")).unwrap()).unwrap();
    let expected = candle_core::safetensors::load(dir.join("mel.safetensors"), &Device::Cpu).unwrap();
    let mut report = Vec::new();
    let mut checked = 0;
    let mut failures = Vec::new();
    for (name, case) in meta.as_object().unwrap() {
        let samples = if let Some(n) = case.get("formula") {
            formula(n.as_u64().unwrap() as usize)
        } else {
            let path = dir.join(case["file"].as_str().unwrap());
            load_audio(&Item::Path(path), &DecodeConfig::default()).unwrap()
        };
        let resampled = case.get("resampled").is_some();
        let want_len = case["samples"].as_u64().unwrap() as usize;
        if resampled {
            // symphonia keeps the vorbis end padding that libsndfile trims (< 30 ms).
            assert!(samples.len().abs_diff(want_len) < 500, "{name}: {} samples", samples.len());
        } else {
            assert_eq!(samples.len(), want_len, "{name}: samples");
        }
        // Two band-limited resamplers agree closely but not to 1e-4 in log space.
        let tolerance = if resampled { 0.5 } else { 1e-4 };
        for n_mels in [80usize, 128] {
            let key = |k: usize| format!("{name}.{n_mels}.w{k}");
            if !expected.contains_key(&key(0)) {
                continue;
            }
            let ours = LogMel::new(n_mels).unwrap().compute(&samples);
            assert_eq!(ours.windows.len() as u64, case["windows"].as_u64().unwrap(), "{name}");
            for (k, window) in ours.windows.iter().enumerate() {
                let want: Vec<Vec<f32>> = expected[&key(k)].to_vec2().unwrap();
                let frames: Vec<i64> = expected[&format!("{}.frames", key(k))].to_vec1().unwrap();
                let mut worst = 0.0f32;
                for (m, row) in want.iter().enumerate() {
                    let got: Vec<f32> = frames.iter().map(|&f| window[m * 3000 + f as usize]).collect();
                    worst = worst.max(max_abs_diff(&got, row));
                }
                report.push(format!("{} max |diff| {worst:.2e} (tolerance {tolerance:.0e})", key(k)));
                if worst > tolerance {
                    failures.push(key(k));
                }
                checked += 1;
            }
        }
    }
    eprintln!("{}", report.join("\n"));
    assert!(failures.is_empty(), "over tolerance: {failures:?}\n{}", report.join("\n"));
    assert!(checked >= 10, "only {checked} windows checked");
}

fn tiny() -> (Whisper, HashMap<String, Tensor>, Tensor) {
    let dir = fixtures().join("whisper-tiny");
    let model = Whisper::load(&dir, &Device::Cpu, DType::F32).unwrap();
    let expected = candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu).unwrap();
    let samples = load_audio(&Item::Path(fixtures().join("speech16k.wav")), &DecodeConfig::default()).unwrap();
    let mel = LogMel::new(80).unwrap().compute(&samples);
    let mel = Tensor::from_vec(mel.windows[0].clone(), (1, 80, 3000), &Device::Cpu).unwrap();
    (model, expected, mel)
}

fn check_close(name: &str, got: &Tensor, want: &Tensor, tolerance: f32) {
    assert_eq!(got.dims(), want.dims(), "{name}: shape");
    let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
    let want: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
    let worst = max_abs_diff(&got, &want);
    eprintln!("{name}: max |diff| {worst:.2e}");
    assert!(worst <= tolerance, "{name}: max |diff| {worst} > {tolerance}");
}

#[test]
fn tiny_whisper_matches_transformers() {
    let (model, expected, mel) = tiny();
    let encoded = model.encoder.forward(&mel).unwrap();
    check_close("encoder", &encoded, &expected["encoder"], 1e-4);
    let start = model.start_token_features(&mel).unwrap().unsqueeze(1).unwrap();
    check_close("start-token decoder state", &start, &expected["start"], 1e-4);
    let ids = expected["ids"].to_dtype(DType::U32).unwrap();
    let cross = model.decoder.cross_cache(&encoded).unwrap();
    let hidden = model.decoder.hidden(&ids, &cross).unwrap();
    let logits = model.decoder.last_logits(&hidden).unwrap();
    check_close("last logits", &logits, &expected["logits"], 1e-4);
}
