//! A modality the server knows nothing about (`test_sensor`, registered in
//! this test crate) is reached through the generic OpenAI part
//! `{"type": "input_item", "modality": ..., "data": ...}` by its builder name,
//! data key or token, with data as JSON or text, and through `/generate` rows;
//! the answers equal direct generation. Unknown modalities are named 400s.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

#[path = "../../../tests/support/sensor_modality.rs"]
mod sensor;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use common::*;
use multitoken_core::{Item, ItemsByKey, Message};
use multitoken_lm::generate::GenerationParams;
use multitoken_lm::loader::LoadOptions;
use multitoken_lm::multimodal::MultimodalModel;
use multitoken_serve::ServeConfig;
use serde_json::json;

/// The llama fixture plus `test_sensor` (its default projector, random weights).
fn sensor_model_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("multitoken-serve-sensor-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    sensor::write_encoder(&dir.join("sensor")).unwrap();
    let config = json!({
        "base_model": fixtures().join("lm/llama"),
        "modalities": [{"builder": sensor::NAME}]
    });
    std::fs::write(dir.join("multitoken.json"), config.to_string()).unwrap();
    let (features, hidden) = (sensor::FEATURES, 64);
    // Fixed weights (not random per run), so that the answers compared below
    // are the same in every run.
    let tensors: HashMap<String, Tensor> = [
        ("0.weight", fixed(&[hidden, features], 0.5, 7)),
        ("0.bias", fixed(&[hidden], 0.5, 11)),
        ("2.weight", fixed(&[hidden, hidden], 0.2, 13)),
        ("2.bias", fixed(&[hidden], 0.2, 17)),
    ]
    .into_iter()
    .map(|(k, v)| (format!("test_sensor_lmm_projector.{k}"), v))
    .collect();
    candle_core::safetensors::save(&tensors, dir.join("projectors.safetensors")).unwrap();
    dir
}

/// Deterministic values in `[-scale, scale]`.
fn fixed(shape: &[usize], scale: f32, step: usize) -> Tensor {
    let n: usize = shape.iter().product();
    let values: Vec<f32> = (0..n).map(|i| ((i * step % 97) as f32 / 48.0 - 1.0) * scale).collect();
    Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
}

fn direct_answer(model: &MultimodalModel, reading: &str) -> String {
    let items = ItemsByKey::from([("readings".to_string(), vec![Item::Text(reading.to_string())])]);
    // Content parts are joined by newlines.
    let prepared = model.prepare_chat(&[Message::new("user", "value\n<reading>")], &items).unwrap();
    let params = GenerationParams { max_new_tokens: 6, eos_token_ids: model.lm.generation.eos_token_ids.clone(), ..Default::default() };
    model.generate(&prepared, &items, &params, &mut |_| true).unwrap().text
}

#[test]
fn input_item_parts_reach_a_custom_modality() {
    let dir = sensor_model_dir();
    let reference = MultimodalModel::load(&dir, &LoadOptions::default()).unwrap();
    let want = direct_answer(&reference, "[1,2,3]");
    let other = direct_answer(&reference, "[9,0,4]");
    let server = TestServer::start(
        MultimodalModel::load(&dir, &LoadOptions::default()).unwrap(),
        ServeConfig { model_name: "tiny".into(), ..Default::default() },
    );
    let ask = |modality: &str, data: serde_json::Value| {
        let content = json!([
            {"type": "text", "text": "value"},
            {"type": "input_item", "modality": modality, "data": data}
        ]);
        let request = json!({"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 6});
        post_json(&server.url("/v1/chat/completions"), &request)
    };
    for (modality, data) in [
        ("test_sensor", json!([1, 2, 3])),
        ("readings", json!("1, 2, 3")),
        ("<reading>", json!("1 2 3")),
    ] {
        let (status, body) = ask(modality, data);
        assert_eq!(status, 200, "{modality}: {body}");
        assert_eq!(body["choices"][0]["message"]["content"], json!(want), "{modality}");
    }
    // Another reading gives another answer (the item really arrives).
    assert_ne!(want, other);
    let (status, body) = ask("test_sensor", json!([9, 0, 4]));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], json!(other));
    // /generate rows: JSON items for a modality that takes them inline.
    let (status, body) = post_json(
        &server.url("/generate"),
        &json!({"messages": [{"role": "user", "content": "value\n<reading>"}], "readings": [[1, 2, 3]], "max_new_tokens": 6}),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["output"], json!(want));

    // The model list says what kind of items each modality reads.
    let (status, models) = get(&server.url("/v1/models"));
    assert_eq!(status, 200, "{models}");
    assert!(models.contains("\"media\":\"other\"") && models.contains("<reading>"), "{models}");

    let (status, body) = ask("thermometer", json!([1]));
    assert_eq!(status, 400, "{body}");
    assert!(body.to_string().contains("thermometer"), "{body}");
    let (status, body) = ask("test_sensor", json!("one, two"));
    assert!((400..500).contains(&status) || status == 500, "{body}");
    assert!(body.to_string().contains("not a number"), "{body}");
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}
