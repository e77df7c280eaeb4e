//! `multitoken generate` on Idefics3 and SmolVLM directories as transformers
//! saves them (`xtask/fixtures/idefics3.py`): the parity contract's command
//! (`--raw --temperature 0 --ignore-eos --json`) with one and two images gives
//! transformers' greedy ids; without `--raw` the checkpoint's chat template
//! applies; a token count that differs from the images is a clear error.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/idefics3")
}

fn generate(model: &Path, raw: bool, prompt: &str, images: &[&str], max_new: usize) -> std::io::Result<Output> {
    let mut command = Command::new(env!("CARGO_BIN_EXE_multitoken"));
    command.arg("generate").arg("--model").arg(model);
    if raw {
        command.arg("--raw");
    }
    command.args(["--prompt", prompt]);
    for image in images {
        command.arg("--image").arg(fixtures().join("images").join(image));
    }
    command
        .args(["--max-new-tokens", &max_new.to_string(), "--temperature", "0", "--ignore-eos", "--json"])
        .env("RUST_BACKTRACE", "0")
        .output()
}

fn new_ids(output: &Output) -> Result<Vec<u64>, Box<dyn std::error::Error>> {
    if !output.status.success() {
        return Err(String::from_utf8_lossy(&output.stderr).into_owned().into());
    }
    let stdout = String::from_utf8(output.stdout.clone())?;
    let json: Value = serde_json::from_str(stdout.lines().last().ok_or("no stdout")?)?;
    Ok(json["token_ids"].as_array().map(|a| a.iter().filter_map(Value::as_u64).collect()).unwrap_or_default())
}

fn ids(value: &Value) -> Vec<u64> {
    value.as_array().map(|a| a.iter().filter_map(Value::as_u64).collect()).unwrap_or_default()
}

fn strings(value: &Value) -> Vec<&str> {
    value.as_array().map(|a| a.iter().filter_map(Value::as_str).collect()).unwrap_or_default()
}

#[test]
fn the_parity_command_gives_transformers_ids() -> TestResult {
    for name in ["split", "nosplit", "smolvlm", "odd"] {
        let expected: Value = serde_json::from_str(&std::fs::read_to_string(fixtures().join(name).join("expected.json"))?)?;
        let cases = expected["cases"].as_array().ok_or("cases")?;
        // One image (case 0) and two images, one of them a JPEG (case 1).
        for case in &cases[..2] {
            let prompt = case["prompt"].as_str().ok_or("prompt")?;
            let images = strings(&case["images"]);
            let want = ids(&case["greedy_ids"]);
            let got = new_ids(&generate(&fixtures().join(name), true, prompt, &images, want.len())?)?;
            assert_eq!(got, want, "{name}: {prompt:?} {images:?}");
        }
        // Without --raw the checkpoint's chat template renders the prompt.
        let chat = cases.iter().find(|c| c["chat"] == Value::Bool(true)).ok_or("no chat case")?;
        let want = ids(&chat["greedy_ids"]);
        let content = chat["user_content"].as_str().ok_or("user_content")?;
        let got = new_ids(&generate(&fixtures().join(name), false, content, &strings(&chat["images"]), want.len())?)?;
        assert_eq!(got, want, "{name}: chat");
    }
    Ok(())
}

#[test]
fn a_token_count_that_differs_from_the_images_is_a_clear_error() -> TestResult {
    let out = generate(&fixtures().join("smolvlm"), true, "User:<image><image>Two?<end_of_utterance>\nAssistant:", &["a_40x30.png"], 2)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains('2') && stderr.contains('1') && stderr.contains("<image>"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    Ok(())
}
