//! `pooling: "chunks"`: one token group per chunk, fixed width `max_chunks`, on the
//! real all-MiniLM-L6-v2 (skipped, saying so, where it is not installed).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use candle_core::{DType, Device};
use multitoken_core::{build_modality, Item, ModalityContext, ProjectorSpec};
use multitoken_document::{default_minilm_dir, ChunkConfig, SentenceEncoder};

fn close(a: &[f32], b: &[f32]) -> bool {
    a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-5)
}

fn normalised_mean(rows: &[Vec<f32>]) -> Vec<f32> {
    let mut mean = vec![0f32; rows[0].len()];
    for row in rows {
        for (m, v) in mean.iter_mut().zip(row) {
            *m += v / rows.len() as f32;
        }
    }
    let norm = mean.iter().map(|v| v * v).sum::<f32>().sqrt();
    mean.iter().map(|v| v / norm).collect()
}

#[test]
fn chunk_groups_have_a_fixed_width() {
    let dir = default_minilm_dir();
    if !dir.join("model.safetensors").is_file() {
        eprintln!(
            "skipped: {} not found; run cargo xtask weights",
            dir.display()
        );
        return;
    }
    let context = ModalityContext::cpu_f32("/nonexistent-model-dir");
    let config = serde_json::json!({
        "encoder": dir.display().to_string(), "pooling": "chunks", "max_chunks": 4,
        "chunk_tokens": 32, "chunk_overlap": 0, "num_layers": 2
    });
    let modality = build_modality("document_minilm", &config, &context).unwrap();
    assert_eq!(modality.token_width(), 4);
    assert_eq!(modality.projector(), ProjectorSpec::MlpGelu { depth: 2 });

    let encoder = SentenceEncoder::load(&dir, &Device::Cpu, DType::F32).unwrap();
    let chunking = ChunkConfig {
        max_tokens: Some(32),
        overlap: 0,
    };
    // Seven chunks: averaged in overlapping groups. One chunk: repeated four times.
    let long =
        "Every sentence of this long report says something new about the project. ".repeat(16);
    let short = "A short note.";
    for (text, expect_chunks) in [(long.as_str(), 7usize), (short, 1)] {
        let chunks = encoder.chunk(text, &chunking).unwrap();
        assert_eq!(chunks.len(), expect_chunks, "{text:.20}");
        let each = encoder
            .embed_ids(&chunks)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let windows = modality.preprocess(&Item::Text(text.to_string())).unwrap();
        let features = modality.encode(&windows.unsqueeze(0).unwrap()).unwrap();
        assert_eq!(features.dims(), &[1, 4, 384]);
        let rows = features.squeeze(0).unwrap().to_vec2::<f32>().unwrap();
        for (i, row) in rows.iter().enumerate() {
            // torch adaptive_avg_pool1d ranges: floor(i*c/w) .. ceil((i+1)*c/w).
            let (c, w) = (expect_chunks, 4);
            let group = &each[i * c / w..((i + 1) * c).div_ceil(w)];
            assert!(close(row, &normalised_mean(group)), "{text:.20}: group {i}");
        }
    }
    // Bad settings are refused when the modality is built.
    let bad = serde_json::json!({"encoder": dir.display().to_string(), "pooling": "chunks", "max_chunks": 0});
    let error = build_modality("document_minilm", &bad, &context)
        .err()
        .unwrap()
        .to_string();
    assert!(error.contains("max_chunks"), "{error}");
    let bad = serde_json::json!({"encoder": dir.display().to_string(), "pooling": "max"});
    let error = build_modality("document_minilm", &bad, &context)
        .err()
        .unwrap()
        .to_string();
    assert!(error.contains("pooling `max`"), "{error}");
}
