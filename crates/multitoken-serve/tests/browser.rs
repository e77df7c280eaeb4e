//! The web chat page end to end in headless Chromium (Debian's `chromium` +
//! `playwright-core` from npm, installed by `.ci/run`): load the page, attach an
//! image, ask about it, see the streamed answer, save a screenshot under
//! `target/serve-browser/`. Skips with a message when chromium, node or the npm
//! packages are missing (CI installs them).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use multitoken_serve::ServeConfig;

#[test]
fn the_chat_page_answers_an_image_question_in_chromium() {
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("browser-test");
    let node_ok = Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !Path::new(&chromium).exists() || !node_ok || !dir.join("node_modules/playwright-core").is_dir() {
        eprintln!(
            "SKIPPED: the browser test needs {chromium} (apt-get install chromium), node, and `npm ci` in {} (.ci/run does all three)",
            dir.display()
        );
        return;
    }
    // The page's own GET / must be the HTML that the test drives.
    // The demo model when it is built, else the tiny fixture vision model.
    let (model, name) = match demo_model() {
        Some(model) => (model, "demo-model"),
        None => {
            eprintln!("examples/demo-model is not built yet: the browser test uses the tiny fixture vision model");
            (vision_model("browser"), "tiny-vision")
        }
    };
    let limits = multitoken_serve::Limits {
        max_new_tokens: 24,
        ..Default::default()
    };
    let server = TestServer::start(
        model,
        ServeConfig {
            model_name: name.into(),
            limits,
            ..Default::default()
        },
    );
    let (status, html) = get(&server.url("/"));
    assert_eq!(status, 200);
    assert!(html.contains("id=\"prompt\"") && html.contains("/v1/chat/completions"));

    let out_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/serve-browser");
    std::fs::create_dir_all(&out_dir).unwrap();
    let screenshot = out_dir.join("chat.png");
    let _ = std::fs::remove_file(&screenshot);
    let image = fixtures().join("vision/images/rgb_96x64.png");
    let output = Command::new("node")
        .current_dir(&dir)
        .env("CHROMIUM", &chromium)
        .arg("chat.mjs")
        .arg(server.url("/"))
        .arg(&image)
        .arg(&screenshot)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "node chat.mjs failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let result: serde_json::Value = serde_json::from_str(stdout.trim().lines().last().unwrap_or_default()).unwrap();
    assert_eq!(result["model"], name);
    assert!(result["modalities"].as_str().unwrap().contains("<image>"), "{result}");
    assert_eq!(result["error"], false, "{result}");
    assert_eq!(result["images"], 1, "{result}");
    assert!(
        !result["answer"].as_str().unwrap().is_empty(),
        "no streamed answer: {result}"
    );
    assert!(result["chunks"].as_u64().unwrap_or(0) >= 1, "no streamed chunks: {result}");
    assert!(
        std::fs::metadata(&screenshot).unwrap().len() > 1000,
        "no screenshot at {}",
        screenshot.display()
    );
    // The page streamed through /v1/chat/completions with the image.
    let (_, metrics) = get(&server.url("/metrics"));
    assert!(
        metrics.contains("multitoken_requests_total{route=\"/v1/chat/completions\",status=\"200\"} 1"),
        "{metrics}"
    );
}
