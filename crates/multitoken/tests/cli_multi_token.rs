//! `multitoken generate --model DIR` on a sshh12/multi_token training output: the
//! tiny `vision_clip` and `vision_clip_pool` outputs of `xtask/fixtures/multi_token.py`
//! give multi_token's greedy ids through the CLI's chat path, one and two images.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/multi_token")
}

fn ids(value: &Value) -> Vec<u64> {
    value
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default()
}

/// `generate --json --ignore-eos` with the user turn `prompt` and `images`; the JSON line.
fn generate(
    output: &str,
    prompt: &str,
    images: &[&str],
    max_new: usize,
) -> Result<Value, Box<dyn std::error::Error>> {
    let mut args = vec![
        "generate".to_string(),
        "--model".into(),
        fixtures().join(output).display().to_string(),
    ];
    for image in images {
        args.push("--image".into());
        args.push(fixtures().join("images").join(image).display().to_string());
    }
    args.extend(
        [
            "--json",
            "--ignore-eos",
            "--prompt",
            prompt,
            "--max-new-tokens",
            &max_new.to_string(),
        ]
        .map(String::from),
    );
    let out = Command::new(env!("CARGO_BIN_EXE_multitoken"))
        .args(&args)
        .env("RUST_BACKTRACE", "0")
        .output()?;
    if !out.status.success() {
        return Err(format!(
            "{output} {images:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    let stdout = String::from_utf8(out.stdout)?;
    Ok(serde_json::from_str(
        stdout.lines().last().ok_or("no stdout")?,
    )?)
}

#[test]
fn cli_generate_on_multi_token_outputs_matches_multi_token() -> TestResult {
    for output in ["output", "output_pool"] {
        let expected: Value = serde_json::from_str(&std::fs::read_to_string(
            fixtures().join(output).join("expected.json"),
        )?)?;
        for case in expected["cases"].as_array().ok_or("no cases")? {
            // Each case is one user turn, as `--prompt` makes it.
            let prompt = case["messages"][0]["content"].as_str().ok_or("no prompt")?;
            let images: Vec<&str> = case["images"]
                .as_array()
                .ok_or("no images")?
                .iter()
                .filter_map(Value::as_str)
                .collect();
            let want = ids(&case["greedy_ids"]);
            let got = generate(output, prompt, &images, want.len())?;
            assert_eq!(
                ids(&got["token_ids"]),
                want,
                "{output} {images:?}: greedy ids differ from multi_token"
            );
        }
    }
    Ok(())
}

/// `--model` given relative to the working directory, with the tower named in
/// `multitoken_import.json` relative to the output: the same answer as the
/// absolute path (the tower path was joined to the model directory twice).
#[test]
fn relative_model_path_finds_the_imported_tower() -> TestResult {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let image = fixtures().join("images").join("a_40x30.png");
    let run = |model: &str, dir: &Path| -> Result<Value, Box<dyn std::error::Error>> {
        let out = Command::new(env!("CARGO_BIN_EXE_multitoken"))
            .current_dir(dir)
            .args(["generate", "--model", model, "--image"])
            .arg(&image)
            .args(["--prompt", "What is this?", "--max-new-tokens", "3", "--ignore-eos", "--json"])
            .env("RUST_BACKTRACE", "0")
            .output()?;
        if !out.status.success() {
            return Err(format!("{model}: {}", String::from_utf8_lossy(&out.stderr)).into());
        }
        let stdout = String::from_utf8(out.stdout)?;
        Ok(serde_json::from_str(stdout.lines().last().ok_or("no stdout")?)?)
    };
    let relative = run("tests/fixtures/multi_token/output_pool", &root)?;
    let absolute = run(&fixtures().join("output_pool").display().to_string(), &root)?;
    assert_eq!(ids(&relative["token_ids"]), ids(&absolute["token_ids"]));
    assert_eq!(ids(&relative["token_ids"]).len(), 3);
    Ok(())
}
