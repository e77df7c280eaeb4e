//! Serving LLaVA-NeXT and LLaVA-OneVision checkpoints as transformers saves them: OpenAI chat
//! completions with `image_url` parts (data URLs) answer as direct generation
//! does, and two concurrent requests with different numbers of image slots
//! (AnyRes: the count depends on each image's size) share the batch.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use multitoken_core::{Item, ItemsByKey, Message};
use multitoken_lm::generate::GenerationParams;
use multitoken_lm::loader::LoadOptions;
use multitoken_lm::multimodal::MultimodalModel;
use multitoken_serve::ServeConfig;
use serde_json::{json, Value};

fn model_dir(name: &str) -> std::path::PathBuf {
    fixtures().join("llava_next").join(name)
}

fn image(name: &str) -> std::path::PathBuf {
    fixtures().join("llava_next/images").join(name)
}

fn data_url(name: &str) -> String {
    use base64::Engine as _;
    let bytes = std::fs::read(image(name)).unwrap();
    format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(bytes))
}

#[test]
fn openai_image_parts_answer_like_direct_generation() {
    for name in ["next", "ov"] {
        check(name);
    }
}

fn check(name: &str) {
    link_modalities();
    multitoken_vlm::link();
    let reference = MultimodalModel::load(&model_dir(name), &LoadOptions::default()).unwrap();
    let cases: Vec<(&str, Vec<&str>)> = vec![
        ("What is this?", vec!["a_40x30.png"]),
        ("Compare.", vec!["b_23x61.png", "f_300x280.png"]),
    ];
    let direct: Vec<Vec<u32>> = cases
        .iter()
        .map(|(text, files)| {
            let items = ItemsByKey::from([("images".to_string(), files.iter().map(|f| Item::Path(image(f))).collect())]);
            // The server joins content parts with "\n".
            let content = format!("{}{text}", "<image>\n".repeat(files.len()));
            let prepared = reference.prepare_chat(&[Message::user(content)], &items).unwrap();
            let params = GenerationParams {
                max_new_tokens: 6,
                eos_token_ids: reference.lm.generation.eos_token_ids.clone(),
                ..Default::default()
            };
            reference.generate(&prepared, &items, &params, &mut |_| true).unwrap().token_ids
        })
        .collect();

    let server = TestServer::start(
        MultimodalModel::load(&model_dir(name), &LoadOptions::default()).unwrap(),
        ServeConfig { max_batch: 4, ..Default::default() },
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
                "max_tokens": 6,
                "temperature": 0,
            });
            let url = url.clone();
            std::thread::spawn(move || post_json(&url, &body))
        })
        .collect();
    for (handle, ((text, _), want_ids)) in handles.into_iter().zip(cases.iter().zip(&direct)) {
        let (status, body): (u16, Value) = handle.join().unwrap();
        assert_eq!(status, 200, "{name} {text}: {body}");
        let got = body["choices"][0]["message"]["content"].as_str().unwrap_or_default().to_string();
        let want = reference.lm.tokenizer.decode(want_ids, true).unwrap();
        assert_eq!(got, want, "{name} {text}");
    }
    server.shutdown();
}
