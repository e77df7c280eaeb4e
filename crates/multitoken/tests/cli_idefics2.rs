//! `multitoken generate` on Idefics2 and Cephalo MoE directories as
//! transformers saves them (`xtask/fixtures/idefics2.py`): the parity
//! contract's command (`--raw --temperature 0 --ignore-eos --json`) gives
//! transformers' greedy ids, and bad input (a token count that differs from the
//! images, an MoE whose `k` exceeds its experts) is a clear error.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/idefics2")
}

fn generate(model: &Path, prompt: &str, images: &[&str], max_new: usize) -> std::io::Result<Output> {
    let mut command = Command::new(env!("CARGO_BIN_EXE_multitoken"));
    command.arg("generate").arg("--model").arg(model).args(["--raw", "--prompt", prompt]);
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

/// The first recorded case of each fixture (the lossless images) through the CLI.
#[test]
fn the_parity_command_gives_transformers_ids() -> TestResult {
    for name in ["split", "nosplit", "moe_k2"] {
        let expected: Value = serde_json::from_str(&std::fs::read_to_string(fixtures().join(name).join("expected.json"))?)?;
        let case = expected["cases"]
            .as_array()
            .and_then(|cases| cases.iter().find(|c| c["images"].as_array().is_some_and(|i| !i.is_empty() && i.iter().all(|f| f.as_str().is_some_and(|f| f.ends_with(".png"))))))
            .ok_or("no png case")?;
        let images: Vec<&str> = case["images"].as_array().ok_or("images")?.iter().filter_map(Value::as_str).collect();
        let want: Vec<u64> = case["greedy_ids"].as_array().ok_or("ids")?.iter().filter_map(Value::as_u64).collect();
        let prompt = case["prompt"].as_str().ok_or("prompt")?;
        let got = new_ids(&generate(&fixtures().join(name), prompt, &images, want.len())?)?;
        assert_eq!(got, want, "{name}: {prompt:?} {images:?}");
    }
    Ok(())
}

#[test]
fn bad_input_is_a_clear_error() -> TestResult {
    let split = fixtures().join("split");
    let mismatch = generate(&split, "User:<image><image>Two?<end_of_utterance>\nAssistant:", &["a_40x30.png"], 2)?;
    let stderr = String::from_utf8_lossy(&mismatch.stderr);
    assert!(!mismatch.status.success() && stderr.contains('2') && stderr.contains('1') && stderr.contains("<image>"), "{stderr}");

    // An MoE config whose k exceeds its experts.
    let dir = std::env::temp_dir().join(format!("multitoken-idefics2-bad-k-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    for entry in std::fs::read_dir(fixtures().join("moe_k1"))? {
        let entry = entry?;
        std::fs::copy(entry.path(), dir.join(entry.file_name()))?;
    }
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json"))?)?;
    config["k"] = Value::from(7);
    std::fs::write(dir.join("config.json"), serde_json::to_string(&config)?)?;
    let bad_k = generate(&dir, "User: hi<end_of_utterance>\nAssistant:", &[], 2)?;
    let stderr = String::from_utf8_lossy(&bad_k.stderr);
    assert!(!bad_k.status.success() && stderr.contains("k is 7 but the model has only 3 experts"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
