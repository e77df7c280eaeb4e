//! End-to-end tests of `multitoken generate` as scripts run it: the binary, its
//! flags and its `--json` line, on the committed tiny transformers fixtures.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn multitoken(args: &[&str]) -> Result<Output, std::io::Error> {
    Command::new(env!("CARGO_BIN_EXE_multitoken")).args(args).env("RUST_BACKTRACE", "0").output()
}

/// The JSON object on the last stdout line.
fn last_json_line(output: &Output) -> Result<Value, Box<dyn std::error::Error>> {
    let stdout = String::from_utf8(output.stdout.clone())?;
    let last = stdout.lines().last().ok_or("no stdout")?;
    Ok(serde_json::from_str(last)?)
}

fn ids(value: &Value) -> Vec<u64> {
    value.as_array().map(|a| a.iter().filter_map(Value::as_u64).collect()).unwrap_or_default()
}

/// `generate --raw --json` reproduces transformers' greedy ids for each family.
#[test]
fn greedy_ids_match_transformers() -> TestResult {
    for family in ["llama", "mistral", "qwen2", "phi2"] {
        let dir = fixtures().join("lm").join(family);
        let expected: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("parity/expected.json"))?)?;
        let prompt = expected["prompt"].as_str().ok_or("fixture has no prompt")?;
        let want = ids(&expected["greedy_ids"]);
        let max_new = want.len().to_string();
        let dir_arg = dir.to_string_lossy().into_owned();
        let output = multitoken(&[
            "generate", "--model", &dir_arg, "--raw", "--prompt", prompt, "--max-new-tokens", &max_new, "--json",
        ])?;
        assert!(output.status.success(), "{family}: {}", String::from_utf8_lossy(&output.stderr));
        let got = last_json_line(&output)?;
        assert_eq!(ids(&got["token_ids"]), want, "{family}: greedy ids differ from transformers");
        assert_eq!(
            got["prompt_tokens"].as_u64(),
            Some(ids(&expected["prompt_ids"]).len() as u64),
            "{family}: prompt tokenized differently"
        );
        assert!(got["timings"]["prefill_tok_s"].as_f64().is_some(), "{family}: timings missing: {got}");
        assert!(got["text"].is_string(), "{family}: text missing: {got}");
    }
    Ok(())
}

/// `--ignore-eos` generates exactly `--max-new-tokens`; sampling with a seed is
/// reproducible.
#[test]
fn ignore_eos_and_seeded_sampling() -> TestResult {
    let dir = fixtures().join("lm").join("llama").to_string_lossy().into_owned();
    let run = |seed: &str| {
        multitoken(&[
            "generate", "--model", &dir, "--raw", "--prompt", "hello", "--max-new-tokens", "12", "--ignore-eos",
            "--temperature", "1.0", "--top-k", "20", "--top-p", "0.9", "--seed", seed, "--json",
        ])
    };
    let a = last_json_line(&run("7")?)?;
    let b = last_json_line(&run("7")?)?;
    assert_eq!(ids(&a["token_ids"]).len(), 12, "{a}");
    assert_eq!(a["token_ids"], b["token_ids"], "same seed, different tokens");
    Ok(())
}

/// Bad input: a clear error naming the problem, a failing exit status, no panic.
#[test]
fn bad_input_is_a_clear_error() -> TestResult {
    let tmp = std::env::temp_dir().join(format!("multitoken-cli-bad-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let broken = tmp.join("broken");
    std::fs::create_dir_all(&broken)?;
    std::fs::write(broken.join("config.json"), "{ not json")?;
    let unknown = tmp.join("unknown");
    std::fs::create_dir_all(&unknown)?;
    std::fs::write(unknown.join("config.json"), r#"{"model_type": "mamba"}"#)?;
    let fake_gguf = tmp.join("fake.gguf");
    std::fs::write(&fake_gguf, b"GGUF but not really")?;
    let llama = fixtures().join("lm").join("llama").to_string_lossy().into_owned();
    let long_prompt = "a ".repeat(600);
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--model".into(), tmp.join("missing").to_string_lossy().into_owned()], "missing"),
        (vec!["--model".into(), broken.to_string_lossy().into_owned()], "config.json"),
        (vec!["--model".into(), unknown.to_string_lossy().into_owned()], "mamba"),
        (vec!["--model".into(), fake_gguf.to_string_lossy().into_owned()], "fake.gguf"),
        (vec!["--model".into(), llama.clone(), "--dtype".into(), "f8".into()], "f8"),
        (vec!["--model".into(), llama, "--raw".into(), "--prompt".into(), long_prompt], "context"),
    ];
    for (mut args, needle) in cases {
        let mut full = vec!["generate".to_string()];
        full.append(&mut args);
        if !full.iter().any(|a| a == "--prompt") {
            full.extend(["--prompt".to_string(), "hi".to_string()]);
        }
        let refs: Vec<&str> = full.iter().map(String::as_str).collect();
        let output = multitoken(&refs)?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{full:?} should fail");
        assert!(!stderr.contains("panicked"), "{full:?} panicked: {stderr}");
        assert!(stderr.contains(needle), "{full:?}: error should mention {needle:?}: {stderr}");
    }
    std::fs::remove_dir_all(&tmp)?;
    Ok(())
}

/// `--profile` prints where the time went for the prefill and the decode steps
/// (parts per token, the overhead, the total) without changing the answer.
#[test]
fn profile_tables_the_phases_and_keeps_the_ids() -> TestResult {
    let dir = fixtures().join("lm/phi2").to_string_lossy().into_owned();
    let args = ["generate", "--model", &dir, "--raw", "--prompt", "hello world", "--max-new-tokens", "6", "--ignore-eos", "--json"];
    let plain = multitoken(&args)?;
    let profiled = multitoken(&[&args[..], &["--profile"]].concat())?;
    assert!(profiled.status.success(), "{}", String::from_utf8_lossy(&profiled.stderr));
    assert_eq!(last_json_line(&profiled)?["token_ids"], last_json_line(&plain)?["token_ids"]);
    let stderr = String::from_utf8(profiled.stderr)?;
    assert!(stderr.contains("prefill: ") && stderr.contains("decode: 5 tokens in"), "{stderr}");
    for part in ["matmul", "head", "attention", "norms", "rope", "activation", "sampling", "overhead", "total"] {
        assert!(stderr.lines().any(|l| l.starts_with(part)), "no `{part}` row: {stderr}");
    }
    // A decode step of the phi-2 fixture: one embedding lookup and one sampling each.
    let calls = |part: &str| -> Option<f64> {
        let decode = stderr.split("decode: ").nth(1)?;
        decode.lines().find(|l| l.starts_with(part))?.split_whitespace().last()?.parse().ok()
    };
    assert_eq!((calls("embedding"), calls("sampling"), calls("head")), (Some(1.0), Some(1.0), Some(1.0)), "{stderr}");
    assert!(!String::from_utf8(plain.stderr)?.contains("µs/token"));
    Ok(())
}
