//! End-to-end tests of `multitoken embed`: the `--json` contract and bad input.
//! The embedding rows themselves are checked against sentence-transformers in
//! `multitoken-document`'s parity test; here only shape and errors.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_multitoken")).arg("embed").args(args).env("RUST_BACKTRACE", "0").output().unwrap()
}

fn testdata(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../multitoken-document/testdata").join(name).display().to_string()
}

fn minilm() -> Option<PathBuf> {
    let dir = multitoken::document::default_minilm_dir();
    if dir.join("model.safetensors").is_file() {
        Some(dir)
    } else {
        eprintln!("skipped: {} not found; run cargo xtask weights", dir.display());
        None
    }
}

/// Runs `embed args` and checks: success with `rows` rows of `dim` values, or
/// failure whose stderr contains `expect_error`.
fn check(args: &[&str], expect: Result<(usize, usize), &str>) {
    let out = run(args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    match expect {
        Ok((rows, dim)) => {
            assert!(out.status.success(), "{args:?}: {stderr}");
            let line = stdout.lines().last().unwrap();
            let value: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(value["dim"], dim, "{args:?}");
            assert!(value["model"].is_string());
            let embeddings = value["embeddings"].as_array().unwrap();
            assert_eq!(embeddings.len(), rows, "{args:?}");
            for row in embeddings {
                let row: Vec<f32> = serde_json::from_value(row.clone()).unwrap();
                let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
                assert!(row.len() == dim && (norm - 1.0).abs() < 1e-4, "{args:?}: norm {norm}");
            }
        }
        Err(needle) => {
            assert!(!out.status.success(), "{args:?} should fail");
            assert!(stderr.contains(needle), "{args:?}: {stderr}");
            assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        }
    }
}

#[test]
fn embed_contract_and_bad_input() {
    check(&[], Err("nothing to embed"));
    check(&["--text", "hi", "--model", "/nonexistent/model", "--json"], Err("/nonexistent/model: not a directory"));
    let encrypted = testdata("encrypted.pdf");
    check(&[&encrypted, "--json"], Err("encrypted.pdf: encrypted PDF"));
    let no_text = testdata("no_text.pdf");
    check(&[&no_text, "--json"], Err("no_text.pdf: no extractable text"));
    let Some(_) = minilm() else { return };
    let hello = testdata("hello.pdf");
    check(&[&hello, "--text", "A cat sits on the mat.", "--text", "Second text", "--json"], Ok((3, 384)));
}

/// `--json`'s `inputs`: one object per input in the order the command line gave
/// them (texts and files interleaved), each naming its input and kind, with the
/// same embedding as the older `embeddings` rows (files first, then texts).
#[test]
fn json_inputs_follow_the_command_line_order() {
    let Some(_) = minilm() else { return };
    let hello = testdata("hello.pdf");
    let out = run(&["--text", "First text", &hello, "--text", "Second text", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let value: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let inputs = value["inputs"].as_array().unwrap();
    let named: Vec<(&str, &str)> =
        inputs.iter().map(|i| (i["kind"].as_str().unwrap(), i["input"].as_str().unwrap())).collect();
    assert_eq!(named, [("text", "First text"), ("file", hello.as_str()), ("text", "Second text")]);
    let rows = value["embeddings"].as_array().unwrap();
    // `embeddings`: hello.pdf, First text, Second text.
    assert_eq!(inputs[0]["embedding"], rows[1]);
    assert_eq!(inputs[1]["embedding"], rows[0]);
    assert_eq!(inputs[2]["embedding"], rows[2]);
    assert_ne!(rows[1], rows[2]);
    // The plain listing follows the same order.
    let out = run(&["--text", "First text", &hello]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines[0].starts_with("inline text") && lines[1].starts_with(&hello), "{stdout}");
}
