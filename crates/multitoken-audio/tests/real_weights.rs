//! Real-weight checks on the converted Whisper base (`cargo xtask weights`); each
//! test prints a skip message and returns when the weights are absent.
//!
//! - encoder parity with transformers' `WhisperModel` encoder on selected output rows
//!   (`xtask/fixtures/whisper_base.py` -> `tests/fixtures/audio/whisper-base-encoder.safetensors`);
//! - greedy transcription of `tests/fixtures/audio/espeak_fox22k.wav`, made with
//!   `espeak-ng -v en-us -s 150 -w espeak_fox22k.wav "The quick brown fox jumps over the lazy dog."`
//!   (committed, so CI needs no espeak-ng; 22.05 kHz, so the resampler is on the path).
//!   Ours and transformers' greedy decode both give "The quick brown fox jump over the lazy dog."

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use multitoken_audio::{
    default_whisper_dir, load_audio, DecodeConfig, LogMel, Transcriber, Whisper,
};
use multitoken_core::Item;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/audio")
}

fn weights() -> Option<PathBuf> {
    let dir = default_whisper_dir();
    if dir.join("model.safetensors").is_file() && dir.join("tokenizer.json").is_file() {
        Some(dir)
    } else {
        eprintln!(
            "skipped: no Whisper base at {} (run `cargo xtask weights`)",
            dir.display()
        );
        None
    }
}

#[test]
fn whisper_base_encoder_matches_transformers() {
    let Some(dir) = weights() else { return };
    let model = Whisper::load(&dir, &Device::Cpu, DType::F32).unwrap();
    let expected = candle_core::safetensors::load(
        fixtures().join("whisper-base-encoder.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let samples = load_audio(
        &Item::Path(fixtures().join("speech16k.wav")),
        &DecodeConfig::default(),
    )
    .unwrap();
    let mel = LogMel::new(80).unwrap().compute(&samples);
    let mel = Tensor::from_vec(mel.windows[0].clone(), (1, 80, 3000), &Device::Cpu).unwrap();
    let encoded = model.encoder.forward(&mel).unwrap().squeeze(0).unwrap();
    assert_eq!(encoded.dims(), &[1500, 512]);
    let rows = expected["rows"].to_dtype(DType::U32).unwrap();
    let got: Vec<Vec<f32>> = encoded.index_select(&rows, 0).unwrap().to_vec2().unwrap();
    let want: Vec<Vec<f32>> = expected["encoder"].to_vec2().unwrap();
    assert_eq!(got.len(), want.len());
    let mut worst = 0.0f32;
    for (g, w) in got.iter().zip(&want) {
        for (a, b) in g.iter().zip(w) {
            worst = worst.max((a - b).abs());
        }
    }
    eprintln!(
        "whisper-base encoder: {} rows, max |diff| {worst:.2e}",
        got.len()
    );
    assert!(
        worst <= 1e-3,
        "whisper-base encoder max |diff| {worst} > 1e-3"
    );
}

#[test]
fn whisper_base_transcribes_espeak_speech() {
    let Some(dir) = weights() else { return };
    let transcriber = Transcriber::load(&dir, &Device::Cpu).unwrap();
    let item = Item::Path(fixtures().join("espeak_fox22k.wav"));
    let transcript = transcriber
        .transcribe_item(&item, &DecodeConfig::default())
        .unwrap();
    eprintln!("transcript: {:?}", transcript.text);
    let words: Vec<String> = transcript
        .text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect();
    // transformers' greedy decode of the same file (float32) hears "jump", not "jumps".
    for word in ["quick", "brown", "fox", "jump", "over", "lazy", "dog"] {
        assert!(
            words.iter().any(|w| w.starts_with(word)),
            "{word:?} missing from {:?}",
            transcript.text
        );
    }
}

#[test]
fn transcript_modality_substitutes_the_spoken_words() {
    use multitoken_audio::{WhisperTranscript, TRANSCRIPT_DATA_KEY};
    use multitoken_core::preparer::substitute_text_items;
    use multitoken_core::{ItemsByKey, Message};
    let Some(dir) = weights() else { return };
    let whisper = WhisperTranscript::load(&dir, &Device::Cpu, DecodeConfig::default()).unwrap();
    let mut messages = vec![Message::user(
        "<image> Someone said: \"<transcript>\". Repeat it.",
    )];
    let mut items = ItemsByKey::new();
    items.insert(
        TRANSCRIPT_DATA_KEY.into(),
        vec![Item::Path(fixtures().join("espeak_fox22k.wav"))],
    );
    items.insert("images".into(), vec![Item::Path("a.png".into())]);
    substitute_text_items(&mut messages, &mut items, &[&whisper]).unwrap();
    assert_eq!(
        messages[0].content,
        "<image> Someone said: \"The quick brown fox jump over the lazy dog.\". Repeat it."
    );
    assert!(!items.contains_key(TRANSCRIPT_DATA_KEY));
    assert_eq!(items["images"].len(), 1);
}

/// `audio_whisper_transcript` as `multitoken.json` names it: built through the
/// registry, with its model path resolved against the model directory.
#[test]
fn transcript_modality_builds_from_the_registry() {
    let Some(dir) = weights() else { return };
    multitoken_audio::link();
    let (parent, name) = (dir.parent().unwrap(), dir.file_name().unwrap().to_str().unwrap());
    let context = multitoken_core::ModalityContext::cpu_f32(parent);
    let config = serde_json::json!({"model_path": name, "max_seconds": 60.0});
    let modality = multitoken_core::build_text_modality("audio_whisper_transcript", &config, &context).unwrap();
    assert_eq!((modality.token(), modality.data_key()), ("<transcript>", "transcript_audios"));
    let text = modality.to_text(&Item::Path(fixtures().join("espeak_fox22k.wav"))).unwrap();
    assert!(text.contains("quick brown fox"), "{text}");
}

/// The `whisper-cpp` feature: whisper.cpp transcribes the same speech from the
/// ggml file `cargo xtask weights` writes, built through the registry as a
/// `multitoken.json` entry with `ggml_model` would be.
#[cfg(feature = "whisper-cpp")]
#[test]
fn whisper_cpp_transcribes_espeak_speech_from_the_converted_ggml_file() {
    let Some(dir) = weights() else { return };
    let ggml = dir.parent().unwrap().join("ggml-base.bin");
    assert!(ggml.is_file(), "{} is missing: run `cargo xtask weights`", ggml.display());
    multitoken_audio::link();
    let context = multitoken_core::ModalityContext::cpu_f32(std::env::temp_dir());
    let config = serde_json::json!({"ggml_model": ggml});
    let modality = multitoken_core::build_text_modality("audio_whisper_transcript", &config, &context).unwrap();
    let text = modality.to_text(&Item::Path(fixtures().join("espeak_fox22k.wav"))).unwrap();
    assert!(text.to_lowercase().contains("quick brown fox"), "{text}");
}

/// Without the feature, a ggml model in the config is refused, naming the feature.
#[cfg(not(feature = "whisper-cpp"))]
#[test]
fn a_ggml_model_without_the_whisper_cpp_feature_is_a_clear_error() {
    multitoken_audio::link();
    let context = multitoken_core::ModalityContext::cpu_f32(std::env::temp_dir());
    let config = serde_json::json!({"ggml_model": "ggml-base.bin"});
    let err = multitoken_core::build_text_modality("audio_whisper_transcript", &config, &context).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("whisper-cpp"), "{err}");
}
