//! The official `openai` Python client against the server: models, a chat
//! completion with an image, the same streamed, and a bad request raising
//! `BadRequestError`. Skips with a message when Python lacks the `openai`
//! package (`.ci/run` installs it and sets `MULTITOKEN_PYTHON`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use multitoken_serve::ServeConfig;

#[test]
fn the_official_openai_client_works() {
    let python = std::env::var("MULTITOKEN_PYTHON").unwrap_or_else(|_| "python3".into());
    let has_openai = Command::new(&python)
        .args(["-c", "import openai"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_openai {
        eprintln!(
            "SKIPPED: `{python}` cannot import openai; `pip install openai` (or set MULTITOKEN_PYTHON; .ci/run does)"
        );
        return;
    }
    let server = TestServer::start(
        vision_model("openai"),
        ServeConfig {
            model_name: "tiny-vision".into(),
            ..Default::default()
        },
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openai_client.py");
    let output = Command::new(&python)
        .arg(&script)
        .arg(server.url("/v1"))
        .arg(fixtures().join("vision/images/rgb_96x64.png"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{python} openai_client.py failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let seen: serde_json::Value = serde_json::from_str(stdout.trim().lines().last().unwrap_or_default()).unwrap();
    assert_eq!(seen["models"], serde_json::json!(["tiny-vision"]));
    // Same seed, same prompt: the streamed text is the plain answer.
    assert_eq!(seen["streamed"], seen["plain"], "{seen}");
    assert_eq!(seen["stream_usage"], seen["plain_usage"], "{seen}");
    assert!(seen["plain_usage"].as_u64().unwrap() > 25, "{seen}");
    assert_eq!(seen["stream_finish"], seen["plain_finish"], "{seen}");
    assert_eq!(seen["error"][0], 400, "{seen}");
    assert!(
        seen["error"][1].as_str().unwrap().contains("content must be a string"),
        "{seen}"
    );
}
