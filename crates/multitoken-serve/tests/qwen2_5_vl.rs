//! Serving a Qwen2.5-VL checkpoint as transformers saves it
//! (`xtask/fixtures/qwen2_5_vl.py`): OpenAI chat completions with `image_url`
//! parts answer as direct generation does, requests with different M-RoPE
//! position shifts (no image, one, two) sharing the batch.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use multitoken_core::{Item, ItemsByKey, Message};
use multitoken_lm::generate::GenerationParams;
use multitoken_lm::loader::LoadOptions;
use multitoken_lm::multimodal::MultimodalModel;
use multitoken_serve::ServeConfig;
use serde_json::{json, Value};

fn model_dir() -> std::path::PathBuf {
    fixtures().join("qwen2_5_vl/model")
}

fn image(name: &str) -> std::path::PathBuf {
    fixtures().join("qwen2_5_vl/images").join(name)
}

fn data_url(name: &str) -> String {
    use base64::Engine as _;
    let bytes = std::fs::read(image(name)).unwrap();
    let mime = if name.ends_with(".jpg") { "image/jpeg" } else { "image/png" };
    format!("data:{mime};base64,{}", base64::engine::general_purpose::STANDARD.encode(bytes))
}

#[test]
fn qwen2_5_vl_openai_image_parts_batch_and_answer_like_direct_generation() {
    link_modalities();
    multitoken_vlm::link();
    let reference = MultimodalModel::load(&model_dir(), &LoadOptions::default()).unwrap();
    let cases: Vec<(&str, Vec<&str>)> = vec![
        ("What is this?", vec!["land_61x37.png"]),
        ("Compare them.", vec!["port_29x70.png", "big_203x117.png"]),
        ("Hello without images.", vec![]),
    ];
    let new_tokens = 8;
    let direct: Vec<(Vec<u32>, i64)> = cases
        .iter()
        .map(|(text, files)| {
            let items = ItemsByKey::from([("images".to_string(), files.iter().map(|f| Item::Path(image(f))).collect())]);
            // The server writes the model's image token per part and joins parts with "\n".
            let content = format!("{}{text}", "<|image_pad|>\n".repeat(files.len()));
            let prepared = reference.prepare_chat(&[Message::user(content)], &items).unwrap();
            let params = GenerationParams {
                max_new_tokens: new_tokens,
                eos_token_ids: reference.lm.generation.eos_token_ids.clone(),
                ..Default::default()
            };
            let out = reference.generate(&prepared, &items, &params, &mut |_| true).unwrap();
            (out.token_ids, prepared.rope_positions().delta)
        })
        .collect();
    // The rows really decode at different shifts.
    let mut deltas: Vec<i64> = direct.iter().map(|(_, d)| *d).collect();
    deltas.dedup();
    assert!(deltas.len() >= 3, "{deltas:?}");

    let server = TestServer::start(
        MultimodalModel::load(&model_dir(), &LoadOptions::default()).unwrap(),
        ServeConfig { max_batch: 3, ..Default::default() },
    );
    let url = server.url("/v1/chat/completions");
    let handles: Vec<_> = cases
        .iter()
        .map(|(text, files)| {
            let mut content: Vec<Value> =
                files.iter().map(|f| json!({"type": "image_url", "image_url": {"url": data_url(f)}})).collect();
            content.push(json!({"type": "text", "text": text}));
            let body = json!({
                "model": "multitoken",
                "messages": [{"role": "user", "content": content}],
                "max_tokens": new_tokens,
                "temperature": 0,
            });
            let url = url.clone();
            std::thread::spawn(move || post_json(&url, &body))
        })
        .collect();
    for (handle, ((text, _), (want_ids, _))) in handles.into_iter().zip(cases.iter().zip(&direct)) {
        let (status, body): (u16, Value) = handle.join().unwrap();
        assert_eq!(status, 200, "{text}: {body}");
        let got = body["choices"][0]["message"]["content"].as_str().unwrap_or_default().to_string();
        let want = reference.lm.tokenizer.decode(want_ids, true).unwrap();
        assert_eq!(got, want, "{text}");
    }
    server.shutdown();
}
