//! The HTTP API on loopback with tiny fixture models: /generate, chat
//! completions (plain and streamed), models, health, metrics, batching that
//! gives the same answers as one-at-a-time generation, items, and bad input.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{BufRead, BufReader};

use common::*;
use multitoken_core::{ItemsByKey, Message};
use multitoken_lm::generate::GenerationParams;
use multitoken_serve::{Limits, ServeConfig};
use serde_json::{json, Value};

fn user(text: &str) -> Value {
    json!([{"role": "user", "content": text}])
}

/// What the model says, generated directly (no server, no batching).
fn direct_answer(model: &multitoken_lm::multimodal::MultimodalModel, prompt: &str, max_new_tokens: usize) -> String {
    let messages = [Message::new("user", prompt)];
    let prepared = model.prepare_chat(&messages, &ItemsByKey::new()).unwrap();
    let params = GenerationParams {
        max_new_tokens,
        eos_token_ids: model.lm.generation.eos_token_ids.clone(),
        ..Default::default()
    };
    model
        .generate(&prepared, &ItemsByKey::new(), &params, &mut |_| true)
        .unwrap()
        .text
}

#[test]
fn generate_and_chat_completions_answer_like_direct_generation() {
    let reference = text_model();
    let server = TestServer::start(
        text_model(),
        ServeConfig {
            model_name: "tiny".into(),
            ..Default::default()
        },
    );

    let want = direct_answer(&reference, "hello there", 12);
    let (status, body) = post_json(
        &server.url("/generate"),
        &json!({"messages": user("hello there"), "max_new_tokens": 12}),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["output"], json!(want));

    let request = json!({"model": "tiny", "messages": user("hello there"), "max_tokens": 12});
    let (status, body) = post_json(&server.url("/v1/chat/completions"), &request);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["choices"][0]["message"]["content"], json!(want));
    let usage = &body["usage"];
    assert_eq!(
        usage["total_tokens"],
        json!(usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap())
    );
    assert!(usage["completion_tokens"].as_u64().unwrap() >= 1);

    // Streamed: role chunk, content chunks, a finish chunk, usage, [DONE].
    let mut streaming = request.clone();
    streaming["stream"] = json!(true);
    streaming["stream_options"] = json!({"include_usage": true});
    let response = client()
        .post(&server.url("/v1/chat/completions"))
        .send(streaming.to_string())
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let content_type = response
        .headers()
        .get("content-type")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    assert!(content_type.starts_with("text/event-stream"), "{content_type}");
    let reader = BufReader::new(response.into_body().into_reader());
    let data: Vec<String> = reader
        .lines()
        .map(Result::unwrap)
        .filter_map(|l| l.strip_prefix("data: ").map(str::to_string))
        .collect();
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, want);
    let finish: Vec<&Value> = chunks
        .iter()
        .filter_map(|c| c["choices"][0].get("finish_reason"))
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finish.len(), 1);
    assert_eq!(chunks.last().unwrap()["usage"], body["usage"]);
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk"));

    let (status, models) = get(&server.url("/v1/models"));
    assert_eq!(status, 200);
    let models: Value = serde_json::from_str(&models).unwrap();
    assert_eq!(models["data"][0]["id"], "tiny");
    let (status, health) = get(&server.url("/health"));
    assert_eq!(
        (
            status,
            serde_json::from_str::<Value>(&health).unwrap()["status"].clone()
        ),
        (200, json!("ok"))
    );
    let (status, metrics) = get(&server.url("/metrics"));
    assert_eq!(status, 200);
    for needle in [
        "multitoken_requests_total{route=\"/generate\",status=\"200\"} 1",
        "multitoken_request_duration_seconds_bucket{route=\"/v1/chat/completions\",le=\"+Inf\"} 2",
        "multitoken_generated_tokens_total",
        "multitoken_queue_depth 0",
        "multitoken_time_to_first_token_seconds_count 3",
    ] {
        assert!(metrics.contains(needle), "metrics lack {needle:?}:\n{metrics}");
    }
}

/// Concurrent requests are decoded in one batch (each sequence with its own
/// cache of its own length) and still get exactly their one-at-a-time answers.
#[test]
fn batched_answers_equal_one_at_a_time_answers() {
    let reference = text_model();
    let prompts: Vec<String> = (0..8)
        .map(|i| format!("{} question number {i}", "why ".repeat(i * 3)))
        .collect();
    let wants: Vec<String> = prompts.iter().map(|p| direct_answer(&reference, p, 20)).collect();
    let server = TestServer::start(
        text_model(),
        ServeConfig {
            max_batch: 8,
            ..Default::default()
        },
    );
    let url = server.url("/generate");
    let handles: Vec<_> = prompts
        .iter()
        .map(|p| {
            let (url, body) = (url.clone(), json!({"messages": user(p), "max_new_tokens": 20}));
            std::thread::spawn(move || post_json(&url, &body))
        })
        .collect();
    for ((handle, want), prompt) in handles.into_iter().zip(&wants).zip(&prompts) {
        let (status, body) = handle.join().unwrap();
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["output"].as_str().unwrap(), want, "answer to {prompt:?}");
    }
}

/// Twenty concurrent requests of different lengths, two of them with images
/// (whose encoders run on the preparing threads), decoded in one ragged batch
/// (each sequence with its own cache; past the 16 rows where a dense product
/// would change kernel): every answer is exactly its one-at-a-time answer.
#[test]
fn batched_answers_with_images_equal_one_at_a_time_answers() {
    use multitoken_core::Item;
    let dir = vision_model_dir("batch-images");
    let load = || {
        link_modalities();
        multitoken_lm::multimodal::MultimodalModel::load(&dir, &Default::default()).unwrap()
    };
    let reference = load();
    // (prompt, image fixture)
    let requests: Vec<(String, Option<&str>)> = (0..20)
        .map(|i| match i {
            3 => ("<image>\nWhat is this?".to_string(), Some("rgb_96x64.png")),
            11 => ("Describe <image> in a few words, then say more about it.".to_string(), Some("rgb_13x21.png")),
            _ => (format!("{} question number {i}", "tell me ".repeat(i % 7 * 2)), None),
        })
        .collect();
    let wants: Vec<String> = requests
        .iter()
        .map(|(prompt, image)| {
            let items = match image {
                Some(name) => ItemsByKey::from([(
                    "images".to_string(),
                    vec![Item::Path(fixtures().join("vision/images").join(name))],
                )]),
                None => ItemsByKey::new(),
            };
            let prepared = reference.prepare_chat(&[Message::new("user", prompt)], &items).unwrap();
            let params = GenerationParams {
                max_new_tokens: 16,
                eos_token_ids: reference.lm.generation.eos_token_ids.clone(),
                ..Default::default()
            };
            reference.generate(&prepared, &items, &params, &mut |_| true).unwrap().text
        })
        .collect();
    let server = TestServer::start(load(), ServeConfig { max_batch: 20, ..Default::default() });
    let url = server.url("/generate");
    let handles: Vec<_> = requests
        .iter()
        .map(|(prompt, image)| {
            let images: Vec<String> = image.iter().map(|name| image_data_url(name)).collect();
            let body = json!({"messages": user(prompt), "images": images, "max_new_tokens": 16});
            let url = url.clone();
            std::thread::spawn(move || post_json(&url, &body))
        })
        .collect();
    for ((handle, want), (prompt, _)) in handles.into_iter().zip(&wants).zip(&requests) {
        let (status, body) = handle.join().unwrap();
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["output"].as_str().unwrap(), want, "answer to {prompt:?}");
    }
}

#[test]
fn images_come_as_data_urls_or_allowed_files() {
    let dir = std::env::temp_dir().join(format!("multitoken-serve-allowed-{}", std::process::id()));
    let allowed = dir.join("allowed");
    std::fs::create_dir_all(&allowed).unwrap();
    std::fs::copy(fixtures().join("vision/images/rgb_96x64.png"), allowed.join("cat.png")).unwrap();
    std::fs::copy(fixtures().join("vision/images/rgb_13x21.png"), dir.join("secret.png")).unwrap();
    #[cfg(unix)]
    {
        let _ = std::fs::remove_file(allowed.join("link.png"));
        std::os::unix::fs::symlink(dir.join("secret.png"), allowed.join("link.png")).unwrap();
    }
    let config = ServeConfig {
        allow_files: Some(allowed.clone()),
        ..Default::default()
    };
    let server = TestServer::start(vision_model("items"), config);
    let generate = |images: Value, text: &str| {
        post_json(
            &server.url("/generate"),
            &json!({"messages": user(text), "images": images, "max_new_tokens": 4}),
        )
    };
    let (status, body) = generate(json!([image_data_url("rgb_96x64.png")]), "<image>\nWhat is this?");
    assert_eq!(status, 200, "{body}");
    // Bare base64 (no `data:` header), as the OpenAI route's `input_audio.data`: the same answer.
    let data_url = image_data_url("rgb_96x64.png");
    let bare = data_url.split_once(',').unwrap().1.to_string();
    let (status, bare_body) = generate(json!([bare]), "<image>\nWhat is this?");
    assert_eq!(status, 200, "{bare_body}");
    assert_eq!(bare_body["output"], body["output"], "bare base64 reads as the data URL does");
    let (status, body) = generate(
        json!(["cat.png", image_data_url("rgb_13x21.png")]),
        "<image> and <image>?",
    );
    assert_eq!(status, 200, "{body}");

    // (images, prompt, error message fragment)
    let cases = [
        (
            json!(["../secret.png"]),
            "<image>",
            "not a file under the allowed directory",
        ),
        (
            json!([dir.join("secret.png")]),
            "<image>",
            "not a file under the allowed directory",
        ),
        #[cfg(unix)]
        (json!(["link.png"]), "<image>", "not a file under the allowed directory"),
        (json!(["http://127.0.0.1:9/cat.png"]), "<image>", "without --allow-urls"),
        (
            json!(["data:image/png;base64,!!!!"]),
            "<image>",
            "images[0]: invalid base64",
        ),
        (
            json!(["data:image/png;base64,aGVsbG8gd29ybGQ="]),
            "<image>",
            "images[0]: not a decodable image",
        ),
        (
            json!([image_data_url("rgb_96x64.png"), image_data_url("rgb_96x64.png")]),
            "one <image>",
            "2",
        ),
        (json!([image_data_url("rgb_96x64.png")]), "no token", "<image>"),
        (json!([42]), "<image>", "images[0] must be a string"),
        (json!("cat.png"), "<image>", "`images` must be an array"),
    ];
    for (images, prompt, fragment) in cases {
        let (status, body) = generate(images.clone(), prompt);
        assert_eq!(status, 400, "{images} {prompt}: {body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(fragment),
            "{images} {prompt}: {message:?} lacks {fragment:?}"
        );
    }

    // Chat completions: image_url parts become <image> tokens.
    let request = json!({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image_data_url("rgb_96x64.png")}},
        {"type": "text", "text": "What is in the picture?"}
    ]}], "max_tokens": 3});
    let (status, body) = post_json(&server.url("/v1/chat/completions"), &request);
    assert_eq!(status, 200, "{body}");
    assert!(
        body["usage"]["prompt_tokens"].as_u64().unwrap() > 25,
        "the image's 25 positions count: {body}"
    );
    let (_, models) = get(&server.url("/v1/models"));
    assert!(models.contains("\"token\":\"<image>\""), "{models}");
    drop(server);

    // Per-request limits: pixels per image and items per request.
    let limits = Limits {
        max_image_pixels: 96 * 64 - 1,
        max_items: 2,
        ..Default::default()
    };
    let server = TestServer::start(
        vision_model("limits"),
        ServeConfig {
            limits,
            ..Default::default()
        },
    );
    let cases = [
        (
            json!([image_data_url("rgb_96x64.png")]),
            "<image>",
            "96x64, more than the limit of 6143 pixels",
        ),
        (
            json!([
                image_data_url("rgb_13x21.png"),
                image_data_url("rgb_13x21.png"),
                image_data_url("rgb_13x21.png")
            ]),
            "<image><image><image>",
            "3 items, more than the limit of 2",
        ),
    ];
    for (images, prompt, fragment) in cases {
        let body = json!({"messages": user(prompt), "images": images, "max_new_tokens": 2});
        let (status, body) = post_json(&server.url("/generate"), &body);
        assert_eq!(status, 400, "{body}");
        assert!(
            body["error"]["message"].as_str().unwrap().contains(fragment),
            "{body} lacks {fragment:?}"
        );
    }
    let body = json!({"messages": user("<image>"), "images": [image_data_url("rgb_13x21.png")], "max_new_tokens": 2});
    assert_eq!(post_json(&server.url("/generate"), &body).0, 200);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A table of bad requests: each gets its 4xx with an OpenAI error body naming the problem.
#[test]
fn bad_requests_get_named_4xx_errors() {
    let limits = Limits {
        max_body_bytes: 4096,
        max_new_tokens: 64,
        max_items: 2,
        ..Default::default()
    };
    let server = TestServer::start(
        text_model(),
        ServeConfig {
            limits,
            model_name: "tiny".into(),
            ..Default::default()
        },
    );
    let big = format!(
        "{{\"messages\": [{{\"role\": \"user\", \"content\": \"{}\"}}]}}",
        "x".repeat(5000)
    );
    // (path, body, status, message fragment)
    let cases: Vec<(&str, String, u16, &str)> = vec![
        ("/generate", "{not json".into(), 400, "not valid JSON"),
        ("/generate", "".into(), 400, "empty"),
        ("/generate", "[1, 2]".into(), 400, "must be a JSON object"),
        ("/generate", "{}".into(), 400, "no `messages`"),
        (
            "/generate",
            r#"{"messages": "hi"}"#.into(),
            400,
            "`messages` must be an array",
        ),
        (
            "/generate",
            r#"{"messages": [{"role": "user"}]}"#.into(),
            400,
            "has no `content`",
        ),
        (
            "/generate",
            r#"{"messages": [{"role": "wizard", "content": "x"}]}"#.into(),
            400,
            "role",
        ),
        (
            "/generate",
            r#"{"messages": [{"role": "user", "content": 5}]}"#.into(),
            400,
            "must be a string",
        ),
        (
            "/generate",
            r#"{"messages": [{"role": "user", "content": "x"}], "max_new_tokens": "ten"}"#.into(),
            400,
            "max_new_tokens",
        ),
        (
            "/generate",
            r#"{"messages": [{"role": "user", "content": "x"}], "max_new_tokens": 65}"#.into(),
            400,
            "limit of 64",
        ),
        (
            "/generate",
            r#"{"messages": [{"role": "user", "content": "x"}], "temperature": -1}"#.into(),
            400,
            "temperature",
        ),
        (
            "/generate",
            r#"{"messages": [{"role": "user", "content": "x <image>"}], "images": ["data:image/png;base64,AAAA"]}"#
                .into(),
            400,
            "reads no `images`",
        ),
        (
            "/generate",
            r#"{"messages": [{"role": "user", "content": "x"}], "images": ["a", "b", "c"]}"#.into(),
            400,
            "reads no `images`",
        ),
        ("/generate", big.clone(), 413, "limit of 4096 bytes"),
        ("/v1/chat/completions", big, 413, "limit of 4096 bytes"),
        ("/v1/chat/completions", "{\"messages\": [".into(), 400, "not valid JSON"),
        (
            "/v1/chat/completions",
            r#"{"model": "gpt-9", "messages": []}"#.into(),
            404,
            "gpt-9",
        ),
        (
            "/v1/chat/completions",
            r#"{"messages": []}"#.into(),
            400,
            "messages is empty",
        ),
        (
            "/v1/chat/completions",
            r#"{"messages": [{"role": "tool", "content": "x"}]}"#.into(),
            400,
            "not supported",
        ),
        (
            "/v1/chat/completions",
            r#"{"messages": [{"role": "user", "content": [{"type": "video", "x": 1}]}]}"#.into(),
            400,
            "\"video\" is not supported",
        ),
        (
            "/v1/chat/completions",
            r#"{"messages": [{"role": "user", "content": [{"type": "text"}]}]}"#.into(),
            400,
            "text must be a string",
        ),
        (
            "/v1/chat/completions",
            r#"{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]}"#
                .into(),
            400,
            "reads no `images`",
        ),
        (
            "/v1/chat/completions",
            r#"{"messages": [{"role": "user", "content": "x"}], "stream": "yes"}"#.into(),
            400,
            "`stream` must be a boolean",
        ),
        (
            "/v1/chat/completions",
            r#"{"messages": [{"role": "user", "content": "x"}], "n": 3}"#.into(),
            400,
            "one choice",
        ),
        (
            "/v1/chat/completions",
            r#"{"messages": [{"role": "user", "content": "x"}], "top_p": 7}"#.into(),
            400,
            "top_p",
        ),
        ("/nowhere", "{}".into(), 404, "no route /nowhere"),
    ];
    for (path, body, status, fragment) in &cases {
        let (got, text) = post(&server.url(path), "application/json", body.as_bytes());
        let shown = body.get(..80).unwrap_or(body);
        assert_eq!(got, *status, "{path} {shown}: {text}");
        let json: Value =
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("{path} {shown}: body is not JSON: {text}"));
        let message = json["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(fragment),
            "{path} {shown}: {message:?} lacks {fragment:?}"
        );
        assert!(json["error"]["type"].is_string());
    }
    let (status, _) = get(&server.url("/generate"));
    assert_eq!(status, 405);
}

/// A thousand malformed and oversized requests, then a good one that succeeds.
#[test]
fn the_server_keeps_serving_after_a_thousand_bad_requests() {
    let limits = Limits {
        max_body_bytes: 2048,
        ..Default::default()
    };
    let server = TestServer::start(
        text_model(),
        ServeConfig {
            limits,
            ..Default::default()
        },
    );
    let bodies: Vec<Vec<u8>> = vec![
        b"{".to_vec(),
        b"\xff\xfe\x00garbage".to_vec(),
        b"null".to_vec(),
        br#"{"messages": [{"role": "user", "content": ["#.to_vec(),
        br#"{"messages": [{"role": "user", "content": "hi"}], "images": ["data:image/png;base64,%%%"]}"#.to_vec(),
        br#"{"messages": [{"role": "user", "content": "hi"}], "seed": -4}"#.to_vec(),
        vec![b'['; 3000],
        format!(
            r#"{{"messages": [{{"role": "user", "content": "{}"}}]}}"#,
            "a".repeat(4000)
        )
        .into_bytes(),
    ];
    let url_generate = server.url("/generate");
    let url_chat = server.url("/v1/chat/completions");
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let (bodies, g, c) = (bodies.clone(), url_generate.clone(), url_chat.clone());
            std::thread::spawn(move || {
                let mut statuses = Vec::new();
                for i in 0..250 {
                    let url = if (i + t) % 2 == 0 { &g } else { &c };
                    let (status, _) = post(url, "application/json", &bodies[(i * 7 + t) % bodies.len()]);
                    statuses.push(status);
                }
                statuses
            })
        })
        .collect();
    let statuses: Vec<u16> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
    assert_eq!(statuses.len(), 1000);
    assert!(
        statuses.iter().all(|s| (400..500).contains(s)),
        "not all 4xx: {:?}",
        statuses.iter().filter(|s| !(400..500).contains(*s)).collect::<Vec<_>>()
    );
    assert!(statuses.contains(&413) && statuses.contains(&400));
    let (status, body) = post_json(
        &url_generate,
        &json!({"messages": user("still there?"), "max_new_tokens": 3}),
    );
    assert_eq!(status, 200, "{body}");
    assert!(body["output"].is_string());
}

/// A load test on loopback: 16 clients, 160 requests mixing good and bad ones,
/// streamed and not; no 5xx.
#[test]
fn a_loopback_load_test_has_no_server_errors() {
    let server = TestServer::start(
        text_model(),
        ServeConfig {
            max_batch: 8,
            ..Default::default()
        },
    );
    let (g, c) = (server.url("/generate"), server.url("/v1/chat/completions"));
    let threads: Vec<_> = (0..16)
        .map(|t| {
            let (g, c) = (g.clone(), c.clone());
            std::thread::spawn(move || {
                let mut statuses = Vec::new();
                for i in 0..10 {
                    let prompt = format!("client {t} request {i}");
                    let (status, body) = match (t + i) % 4 {
                        0 => post_json(
                            &g,
                            &json!({"messages": user(&prompt), "max_new_tokens": 8, "temperature": 0.8, "seed": i}),
                        ),
                        1 => post_json(&c, &json!({"messages": user(&prompt), "max_tokens": 8, "stream": true})),
                        2 => post_json(&c, &json!({"messages": user(&prompt), "max_tokens": 8})),
                        _ => post_json(&g, &json!({"messages": "broken"})),
                    };
                    if status >= 500 {
                        eprintln!("5xx: {body}");
                    }
                    statuses.push(status);
                }
                statuses
            })
        })
        .collect();
    let statuses: Vec<u16> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
    assert_eq!(statuses.len(), 160);
    assert_eq!(statuses.iter().filter(|s| **s >= 500).count(), 0, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 120);
    let (_, metrics) = get(&server.url("/metrics"));
    assert!(!metrics.contains("status=\"5"), "{metrics}");
}

/// Shutdown lets a running request finish; a client that goes away frees its slot.
#[test]
fn graceful_shutdown_finishes_running_requests_and_disconnects_free_slots() {
    let mut server = TestServer::start(
        text_model(),
        ServeConfig {
            max_batch: 1,
            ..Default::default()
        },
    );
    // A streaming client that reads one chunk and hangs up.
    let body = json!({"messages": user("tell me a long story"), "max_tokens": 200, "stream": true});
    let response = client()
        .post(&server.url("/v1/chat/completions"))
        .send(body.to_string())
        .unwrap();
    let mut reader = BufReader::new(response.into_body().into_reader());
    let mut first = String::new();
    reader.read_line(&mut first).unwrap();
    assert!(first.starts_with("data: "), "{first}");
    drop(reader);
    // With one slot, this request runs only once the abandoned one is gone.
    let (status, body) = post_json(
        &server.url("/generate"),
        &json!({"messages": user("next"), "max_new_tokens": 4}),
    );
    assert_eq!(status, 200, "{body}");

    // The scheduler updates its gauge just after answering: wait for the last
    // request to have left it, so that the `1` seen below is the next request.
    while !get(&server.url("/metrics")).1.contains("multitoken_running_sequences 0") {
        std::thread::yield_now();
    }
    let url = server.url("/generate");
    let running =
        std::thread::spawn(move || post_json(&url, &json!({"messages": user("finish me"), "max_new_tokens": 60})));
    // Wait until the request is being decoded, then ask the server to stop.
    // (If it already finished, the shutdown below must still leave it answered.)
    while !running.is_finished()
        && !get(&server.url("/metrics"))
            .1
            .contains("multitoken_running_sequences 1")
    {
        std::thread::yield_now();
    }
    server.signal_stop();
    let (status, body) = running.join().unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body["output"].is_string());
    server.shutdown();
}
