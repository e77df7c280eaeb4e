//! `multitoken generate` on llava-hf checkpoints: the tiny random
//! `LlavaForConditionalGeneration` fixtures of `xtask/fixtures/llava.py` give
//! transformers' greedy ids through the CLI, with one or two `--image` flags;
//! the k-th flag fills the k-th `<image>`, and a count mismatch is an error
//! naming both counts.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/llava")
}

fn multitoken(args: &[String]) -> Result<Output, std::io::Error> {
    Command::new(env!("CARGO_BIN_EXE_multitoken"))
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
}

fn ids(value: &Value) -> Vec<u64> {
    value
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default()
}

/// Runs `generate --raw --json` with `images` and returns the JSON line.
fn generate(
    model: &str,
    prompt: &str,
    images: &[&str],
    max_new: usize,
) -> Result<Value, Box<dyn std::error::Error>> {
    let mut args: Vec<String> = ["generate", "--model"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.push(fixtures().join(model).to_string_lossy().into_owned());
    for image in images {
        args.push("--image".into());
        args.push(
            fixtures()
                .join("images")
                .join(image)
                .to_string_lossy()
                .into_owned(),
        );
    }
    args.extend(
        [
            "--raw",
            "--json",
            "--prompt",
            prompt,
            "--max-new-tokens",
            &max_new.to_string(),
        ]
        .map(String::from),
    );
    let output = multitoken(&args)?;
    if !output.status.success() {
        return Err(format!(
            "{model} {images:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        )
        .into());
    }
    let stdout = String::from_utf8(output.stdout)?;
    Ok(serde_json::from_str(
        stdout.lines().last().ok_or("no stdout")?,
    )?)
}

/// Every recorded case (one image, two images, two images swapped) of two
/// llava configurations gives transformers' ids through the CLI.
#[test]
fn cli_generate_with_images_matches_transformers() -> TestResult {
    for model in ["llama_default", "qwen2_full", "phi_full", "siglip_qwen2"] {
        let expected: Value = serde_json::from_str(&std::fs::read_to_string(
            fixtures().join(model).join("expected.json"),
        )?)?;
        let cases = expected["cases"].as_array().ok_or("no cases")?;
        for case in cases {
            let prompt = case["prompt"].as_str().ok_or("no prompt")?;
            let images: Vec<&str> = case["images"]
                .as_array()
                .ok_or("no images")?
                .iter()
                .filter_map(Value::as_str)
                .collect();
            let want = ids(&case["greedy_ids"]);
            let got = generate(model, prompt, &images, want.len())?;
            assert_eq!(
                ids(&got["token_ids"]),
                want,
                "{model} {images:?}: greedy ids differ from transformers"
            );
        }
    }
    Ok(())
}

/// Swapping the two images changes the answer: each `<image>` reads its own image.
#[test]
fn two_images_fill_the_tokens_in_order() -> TestResult {
    let prompt = "USER: <image> and <image>\nCompare them. ASSISTANT:";
    let forward = generate("qwen2_full", prompt, &["a_40x30.png", "c_64x64.jpg"], 8)?;
    let swapped = generate("qwen2_full", prompt, &["c_64x64.jpg", "a_40x30.png"], 8)?;
    assert_ne!(
        ids(&forward["token_ids"]),
        ids(&swapped["token_ids"]),
        "the image order must matter"
    );
    Ok(())
}

/// Two `<image>` tokens with one `--image` fail with both counts in the message.
#[test]
fn image_count_mismatch_names_both_counts() -> TestResult {
    let err = match generate(
        "llama_default",
        "USER: <image> and <image>\nHi ASSISTANT:",
        &["a_40x30.png"],
        4,
    ) {
        Ok(v) => return Err(format!("expected an error, got {v}").into()),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("2 `<image>` token(s)") && err.contains("1 images item(s)"),
        "unclear error: {err}"
    );
    Ok(())
}
