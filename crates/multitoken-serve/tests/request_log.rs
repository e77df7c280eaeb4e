//! One log line per request through `tracing` at info level: method, path,
//! status, tokens (prompt + completion when the answer knows them) and time.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, dead_code)]

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use multitoken_serve::log::{LineSubscriber, REQUEST_TARGET};
use multitoken_serve::ServeConfig;
use serde_json::json;

#[test]
fn every_request_logs_one_line() {
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let sink = lines.clone();
    // The server runs on its own threads: the subscriber must be the global one.
    tracing::subscriber::set_global_default(LineSubscriber::new(move |line| sink.lock().unwrap().push(line))).unwrap();
    let server = TestServer::start(text_model(), ServeConfig::default());
    let body = json!({"messages": [{"role": "user", "content": "Hello"}], "max_new_tokens": 3});
    let (status, answer) = post_json(&server.url("/generate"), &body);
    assert_eq!(status, 200, "{answer}");
    let (status, _) = get(&server.url("/health"));
    assert_eq!(status, 200);
    let (status, _) = get(&server.url("/no/such/route"));
    assert_eq!(status, 404);
    let (status, _) = post_json(&server.url("/generate"), &json!({"messages": 3}));
    assert_eq!(status, 400);
    server.shutdown();
    let lines = lines.lock().unwrap().clone();
    let requests: Vec<&String> = lines.iter().filter(|l| l.contains(REQUEST_TARGET)).collect();
    assert_eq!(requests.len(), 4, "one line per request: {lines:#?}");
    let expect = [
        ("method=POST path=/generate status=200", true),
        ("method=GET path=/health status=200", false),
        ("method=GET path=/no/such/route status=404", false),
        ("method=POST path=/generate status=400", false),
    ];
    for (line, (head, has_tokens)) in requests.iter().zip(expect) {
        assert!(line.starts_with("INFO "), "{line}");
        assert!(line.contains(head), "{line} lacks {head:?}");
        assert!(line.contains("time_ms="), "{line}");
        if has_tokens {
            // prompt + completion, three tokens generated at most.
            let tokens = line.split("tokens=").nth(1).unwrap().split_whitespace().next().unwrap();
            let (prompt, completion) = tokens.split_once('+').unwrap();
            assert!(prompt.parse::<usize>().unwrap() > 0, "{line}");
            assert!((1..=3).contains(&completion.parse::<usize>().unwrap()), "{line}");
        } else {
            assert!(line.contains("tokens=-"), "{line}");
        }
    }
}
