//! Parity with sentence-transformers on the real all-MiniLM-L6-v2 weights
//! (`cargo xtask weights`), against `tests/fixtures/document/minilm.json`
//! (`cargo xtask fixtures document`). Skipped, saying so, where the weights are
//! not installed.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

use candle_core::{DType, Device};
use multitoken_core::{build_modality, Item, ModalityContext};
use multitoken_document::{default_minilm_dir, ChunkConfig, SentenceEncoder};
use serde_json::Value;

fn fixture() -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/document/minilm.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// The installed weights, or `None` after printing why the test is skipped.
fn weights() -> Option<PathBuf> {
    let dir = default_minilm_dir();
    if dir.join("model.safetensors").is_file() {
        Some(dir)
    } else {
        eprintln!("skipped: {} not found; run cargo xtask weights", dir.display());
        None
    }
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (na * nb)
}

fn rows(value: &Value) -> Vec<Vec<f32>> {
    serde_json::from_value(value.clone()).unwrap()
}

/// `got` matches `expect` row by row: cosine at least 0.9999, norms equal.
fn check(what: &str, got: &[Vec<f32>], expect: &[Vec<f32>]) {
    assert_eq!(got.len(), expect.len(), "{what}: row count");
    for (i, (g, e)) in got.iter().zip(expect).enumerate() {
        let c = cosine(g, e);
        assert!(c >= 0.9999, "{what}: row {i} cosine {c}");
        let (ng, ne) = (cosine(g, g).sqrt(), cosine(e, e).sqrt());
        assert!((ng - ne).abs() < 1e-4, "{what}: row {i} norms {ng} vs {ne}");
    }
}

#[test]
fn minilm_matches_sentence_transformers() {
    let Some(dir) = weights() else { return };
    let fixture = fixture();
    let sentences: Vec<String> = serde_json::from_value(fixture["sentences"].clone()).unwrap();
    let expect = rows(&fixture["embeddings"]);
    let encoder = SentenceEncoder::load(&dir, &Device::Cpu, DType::F32).unwrap();
    assert_eq!(encoder.dim(), fixture["dim"].as_u64().unwrap() as usize);
    assert_eq!(encoder.max_seq_length(), fixture["max_seq_length"].as_u64().unwrap() as usize);

    let ids: Vec<Vec<u32>> = serde_json::from_value(fixture["token_ids"].clone()).unwrap();
    for (sentence, ids) in sentences.iter().zip(&ids) {
        let chunks = encoder.chunk(sentence, &ChunkConfig::default()).unwrap();
        assert_eq!(chunks, vec![ids.clone()], "token ids of {sentence:?}");
    }

    let refs: Vec<&str> = sentences.iter().map(String::as_str).collect();
    check("batched", &encoder.embed_texts(&refs, &ChunkConfig::default()).unwrap(), &expect);
    // One at a time: no padding at all.
    let single: Vec<Vec<f32>> = refs
        .iter()
        .map(|s| encoder.embed_texts(&[s], &ChunkConfig::default()).unwrap().remove(0))
        .collect();
    check("one by one", &single, &expect);
}

#[test]
fn registered_modality_embeds_like_the_encoder() {
    let Some(dir) = weights() else { return };
    let fixture = fixture();
    let sentence = fixture["sentences"][1].as_str().unwrap().to_string();
    let expect = rows(&fixture["embeddings"])[1].clone();
    let context = ModalityContext::cpu_f32("/nonexistent-model-dir");
    let config = serde_json::json!({"encoder": dir.display().to_string(), "num_tokens": 32});
    let modality = build_modality("document_minilm", &config, &context).unwrap();
    assert_eq!(
        (modality.name(), modality.token(), modality.data_key(), modality.token_width(), modality.feature_dim()),
        ("document_minilm", "<document>", "documents", 32, 384)
    );
    let windows = modality.preprocess(&Item::Text(sentence)).unwrap();
    let features = modality.encode(&windows.unsqueeze(0).unwrap()).unwrap();
    assert_eq!(features.dims(), &[1, 384]);
    check("modality", &features.to_vec2::<f32>().unwrap(), &[expect]);
    // With no `encoder`, document_minilm falls back to the installed weights.
    let fallback = build_modality("document_minilm", &serde_json::json!({}), &context).unwrap();
    assert_eq!(fallback.feature_dim(), 384);
}

#[test]
fn long_documents_are_chunked_not_truncated() {
    let Some(dir) = weights() else { return };
    let encoder = SentenceEncoder::load(&dir, &Device::Cpu, DType::F32).unwrap();
    let sentence = "Every sentence of this long report says something new about the project. ";
    let text = sentence.repeat(60);
    let config = ChunkConfig { max_tokens: Some(128), overlap: 16 };
    let chunks = encoder.chunk(&text, &config).unwrap();
    assert!(chunks.len() >= 5, "{} chunks", chunks.len());
    assert!(chunks.iter().all(|c| c.len() <= 128));
    let total: usize = chunks.iter().map(|c| c.len() - 2).sum();
    let plain = encoder.chunk(&text, &ChunkConfig { max_tokens: Some(10_000), overlap: 0 });
    assert!(plain.is_err(), "chunks over max_seq_length are refused");
    let tokens = encoder.tokenize(&text).unwrap().len();
    assert_eq!(total, tokens + 16 * (chunks.len() - 1), "every token in a chunk, overlaps counted twice");
    let row = encoder.embed_texts(&[&text], &config).unwrap().remove(0);
    let norm: f32 = row.iter().map(|v| v * v).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-5, "re-normalised mean, norm {norm}");
    // The row is the normalised mean of the chunk embeddings.
    let each = encoder.embed_ids(&chunks).unwrap().to_vec2::<f32>().unwrap();
    let mut mean = vec![0f32; row.len()];
    for chunk in &each {
        for (m, v) in mean.iter_mut().zip(chunk) {
            *m += v / each.len() as f32;
        }
    }
    let norm: f32 = mean.iter().map(|v| v * v).sum::<f32>().sqrt();
    let mean: Vec<f32> = mean.iter().map(|v| v / norm).collect();
    check("chunk mean", &[row], &[mean]);
}
