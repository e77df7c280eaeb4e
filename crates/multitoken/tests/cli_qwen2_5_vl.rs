//! `multitoken generate` on Qwen2.5-VL directories (`xtask/fixtures/qwen2_5_vl.py`:
//! as transformers saves it, in the hub's layout, and one of another shape):
//! the parity contract's command (`--raw --temperature 0 --ignore-eos --json`)
//! with no, one and two images gives transformers' greedy ids (window-attention
//! tower, M-RoPE positions and the decode delta included), and a prompt without
//! `--raw` goes through the checkpoint's chat template.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/qwen2_5_vl")
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

fn cases() -> Result<Vec<Value>, Box<dyn std::error::Error>> {
    cases_of(&fixtures())
}

fn cases_of(dir: &Path) -> Result<Vec<Value>, Box<dyn std::error::Error>> {
    let expected: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json"))?)?;
    Ok(expected["cases"].as_array().cloned().unwrap_or_default())
}

fn strings(value: &Value) -> Vec<&str> {
    value.as_array().map(|a| a.iter().filter_map(Value::as_str).collect()).unwrap_or_default()
}

fn ids(value: &Value) -> Vec<u64> {
    value.as_array().map(|a| a.iter().filter_map(Value::as_u64).collect()).unwrap_or_default()
}

/// Every raw case with none, one or two images (text after them included), in
/// both checkpoint layouts and in a checkpoint of another shape.
#[test]
fn the_qwen2_5_vl_parity_command_gives_transformers_ids() -> TestResult {
    let mut checked = [0usize; 3];
    for name in ["model", "hub", "tied"] {
        let own = fixtures().join(name);
        let cases = if own.join("expected.json").is_file() { cases_of(&own)? } else { cases()? };
        for case in cases.iter().filter(|c| c["chat"].as_bool() != Some(true)) {
            let images = strings(&case["images"]);
            let want = ids(&case["greedy_ids"]);
            let prompt = case["prompt"].as_str().ok_or("prompt")?;
            let got = new_ids(&generate(&fixtures().join(name), true, prompt, &images, want.len())?)?;
            assert_eq!(got, want, "{name}: {prompt:?} {images:?}");
            checked[images.len().min(2)] += 1;
        }
    }
    assert!(checked.iter().all(|&n| n > 0), "cases with 0, 1 and 2 images: {checked:?}");
    Ok(())
}

/// Without `--raw` the prompt goes through the checkpoint's chat template, `<image>`
/// standing for an image part (`<|vision_start|><|image_pad|><|vision_end|>`).
#[test]
fn a_qwen2_5_vl_chat_prompt_uses_the_checkpoints_template() -> TestResult {
    let cases = cases()?;
    let case = cases
        .iter()
        .find(|c| c["chat"].as_bool() == Some(true) && c["messages"].as_array().is_some_and(|m| m.len() == 1))
        .ok_or("no single-turn chat case")?;
    let text: String = case["messages"][0]["content"]
        .as_array()
        .ok_or("content")?
        .iter()
        .map(|part| if part["type"] == "image" { "<image>".to_string() } else { part["text"].as_str().unwrap_or_default().to_string() })
        .collect();
    let images = strings(&case["images"]);
    let want = ids(&case["greedy_ids"]);
    let got = new_ids(&generate(&fixtures().join("model"), false, &text, &images, want.len())?)?;
    assert_eq!(got, want, "chat {text:?}");
    Ok(())
}

/// A vision config naming a full-attention block the tower lacks is a clear
/// error, not a panic.
#[test]
fn a_bad_qwen2_5_vl_vision_config_is_a_clear_error() -> TestResult {
    let model = fixtures().join("model");
    let dir = std::env::temp_dir().join(format!("multitoken-qwen2-5-vl-bad-vision-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    for entry in std::fs::read_dir(&model)? {
        let entry = entry?;
        std::fs::copy(entry.path(), dir.join(entry.file_name()))?;
    }
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json"))?)?;
    config["vision_config"]["fullatt_block_indexes"] = serde_json::json!([1, 7]);
    std::fs::write(dir.join("config.json"), serde_json::to_string(&config)?)?;
    let bad = generate(&dir, true, "hi", &[], 2)?;
    let stderr = String::from_utf8_lossy(&bad.stderr);
    std::fs::remove_dir_all(&dir)?;
    assert!(!bad.status.success() && stderr.contains("fullatt_block_indexes") && stderr.contains("Qwen2.5-VL"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    Ok(())
}
