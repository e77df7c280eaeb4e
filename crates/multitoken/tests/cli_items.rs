//! Items without a modality token: `generate` places them as `chat` does (before
//! the text, one token per item), so `--image X --prompt "What shape is this?"`
//! is the same prompt as `"<image>\nWhat shape is this?"`; `--raw` prompts are
//! kept exact (a missing token is an error, as in transformers' processors).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn multitoken(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_multitoken")).args(args).env("RUST_BACKTRACE", "0").output().unwrap()
}

fn json_line(out: &Output) -> Value {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

#[test]
fn generate_places_items_without_tokens_as_chat_does() {
    let demo = root().join("examples/demo-model");
    if !demo.join("multitoken.json").is_file() {
        eprintln!("skipped: no demo model at {}", demo.display());
        return;
    }
    let model = demo.to_str().unwrap();
    let image = root().join("examples/shapes/red-circle.png");
    let image = image.to_str().unwrap();
    let audio = root().join("examples/shapes/two-low-beeps.wav");
    let audio = audio.to_str().unwrap();
    let generate = |items: &[&str], prompt: &str| {
        let mut args = vec!["generate", "--model", model, "--json", "--max-new-tokens", "6", "--prompt", prompt];
        args.extend_from_slice(items);
        json_line(&multitoken(&args))
    };
    // One image, then an image and a clip: the same prompt as with the tokens typed.
    let cases: [(&[&str], &str, &str); 2] = [
        (&["--image", image], "What shape is this?", "<image>\nWhat shape is this?"),
        (&["--image", image, "--audio", audio], "Describe both.", "<image>\n<speech>\nDescribe both."),
    ];
    for (items, bare, typed) in cases {
        let placed = generate(items, bare);
        let explicit = generate(items, typed);
        assert_eq!(placed["prompt_tokens"], explicit["prompt_tokens"], "{bare:?}");
        assert_eq!(placed["token_ids"], explicit["token_ids"], "{bare:?}");
    }
    // A token already in the prompt is not doubled.
    let once = generate(&["--image", image], "<image>\nWhat shape is this?");
    let placed = generate(&["--image", image], "What shape is this?");
    assert_eq!(once["prompt_tokens"], placed["prompt_tokens"]);
    // chat --prompt answers the same words.
    let out = multitoken(&["chat", "--model", model, "--max-new-tokens", "6", "--image", image, "--prompt", "What shape is this?"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let chat = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(chat, placed["text"].as_str().unwrap().trim(), "chat and generate differ");
    // --raw keeps the prompt exact: no token, no place for the image.
    let out = multitoken(&["generate", "--model", model, "--raw", "--image", image, "--prompt", "What shape is this?"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "--raw without <image> should fail");
    assert!(stderr.contains("<image>"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
