//! Serving a model whose items have different widths (Idefics2: 5 crops of
//! slots wrapped in `<fake_token_around_image>` per image): concurrent requests
//! with one and two images share the batch, answer as direct generation does,
//! and report their real prompt lengths.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use multitoken_core::{Item, ItemsByKey, Message};
use multitoken_lm::generate::GenerationParams;
use multitoken_lm::loader::LoadOptions;
use multitoken_lm::multimodal::MultimodalModel;
use multitoken_serve::ServeConfig;
use serde_json::{json, Value};

fn idefics2_dir() -> std::path::PathBuf {
    fixtures().join("idefics2/split")
}

fn image(name: &str) -> std::path::PathBuf {
    fixtures().join("idefics2/images").join(name)
}

fn data_url(name: &str) -> String {
    use base64::Engine as _;
    let bytes = std::fs::read(image(name)).unwrap();
    format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(bytes))
}

#[test]
fn requests_of_different_widths_batch_and_answer_like_direct_generation() {
    link_modalities();
    multitoken_vlm::link();
    let reference = MultimodalModel::load(&idefics2_dir(), &LoadOptions::default()).unwrap();
    let cases: Vec<(&str, Vec<&str>)> = vec![
        ("<image>What is this?", vec!["a_40x30.png"]),
        ("<image><image>Compare.", vec!["b_23x37.png", "d_90x20_gray.png"]),
        ("<image> Is it gray?", vec!["d_90x20_gray.png"]),
    ];
    let direct: Vec<(Vec<u32>, usize)> = cases
        .iter()
        .map(|(text, files)| {
            let items = ItemsByKey::from([("images".to_string(), files.iter().map(|f| Item::Path(image(f))).collect())]);
            let prepared = reference.prepare_chat(&[Message::user(*text)], &items).unwrap();
            let params = GenerationParams {
                max_new_tokens: 6,
                eos_token_ids: reference.lm.generation.eos_token_ids.clone(),
                ..Default::default()
            };
            let out = reference.generate(&prepared, &items, &params, &mut |_| true).unwrap();
            (out.token_ids, prepared.input_ids.len())
        })
        .collect();
    // Two images cost more positions than one: the widths really differ.
    assert!(direct[1].1 >= direct[0].1 + 20, "{} vs {}", direct[1].1, direct[0].1);

    let server = TestServer::start(
        MultimodalModel::load(&idefics2_dir(), &LoadOptions::default()).unwrap(),
        ServeConfig { max_batch: 4, ..Default::default() },
    );
    let url = server.url("/generate");
    let handles: Vec<_> = cases
        .iter()
        .map(|(text, files)| {
            let body = json!({
                "messages": [{"role": "user", "content": text}],
                "images": files.iter().map(|f| data_url(f)).collect::<Vec<_>>(),
                "max_new_tokens": 6,
                "temperature": 0,
            });
            let url = url.clone();
            std::thread::spawn(move || post_json(&url, &body))
        })
        .collect();
    for (handle, ((text, _), (want_ids, _))) in handles.into_iter().zip(cases.iter().zip(&direct)) {
        let (status, body): (u16, Value) = handle.join().unwrap();
        assert_eq!(status, 200, "{text}: {body}");
        let text_out = body["output"].as_str().unwrap_or_default().to_string();
        let want = reference.lm.tokenizer.decode(want_ids, true).unwrap();
        assert_eq!(text_out, want, "{text}");
    }
    server.shutdown();
}
