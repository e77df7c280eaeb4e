//! End-to-end tests of `multitoken eval --benchmark` as the README runs it: the
//! embedded demo model answering the committed shapes MMBench file through the
//! serve scheduler, resumably, and the reports it writes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn multitoken(args: &[&str]) -> Result<Output, std::io::Error> {
    Command::new(env!("CARGO_BIN_EXE_multitoken"))
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
}

fn scratch(name: &str) -> Result<PathBuf, std::io::Error> {
    let dir =
        std::env::temp_dir().join(format!("multitoken-cli-eval-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn last_json_line(output: &Output) -> Result<Value, Box<dyn std::error::Error>> {
    let stdout = String::from_utf8(output.stdout.clone())?;
    let last = stdout.lines().last().ok_or("no stdout")?;
    Ok(serde_json::from_str(last)?)
}

fn predictions(dir: &Path) -> Result<BTreeMap<String, String>, Box<dyn std::error::Error>> {
    let mut out = BTreeMap::new();
    for line in std::fs::read_to_string(dir.join("predictions.jsonl"))?.lines() {
        let v: Value = serde_json::from_str(line)?;
        out.insert(
            v["index"].to_string(),
            v["prediction"].as_str().ok_or("no prediction")?.to_string(),
        );
    }
    Ok(out)
}

fn eval(out: &Path, extra: &[&str]) -> Result<Output, std::io::Error> {
    let data = root().join("examples/benchmarks/shapes-mmbench.tsv");
    let model = root().join("examples/demo-model");
    let (data, model, out) = (
        data.to_string_lossy().into_owned(),
        model.to_string_lossy().into_owned(),
        out.to_string_lossy().into_owned(),
    );
    let mut args = vec![
        "eval",
        "--benchmark",
        "mmbench",
        "--data",
        &data,
        "--model",
        &model,
        "--out",
        &out,
        "--no-progress",
    ];
    args.extend_from_slice(extra);
    multitoken(&args)
}

/// The README's command with `--limit`: answers, reports, `--json`, and a
/// second run that asks only what is missing; the scores equal a
/// `--predictions` re-scoring of the same answers.
#[test]
fn demo_model_answers_mmbench_and_resumes() -> TestResult {
    let out = scratch("resume")?;
    let first = eval(&out, &["--limit", "2", "--json"])?;
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let summary = last_json_line(&first)?;
    assert_eq!(summary["benchmark"], "mmbench");
    assert_eq!(summary["n"], 2);
    let score = summary["score"].as_f64().ok_or("no score")?;
    assert!((0.0..=1.0).contains(&score));
    assert!(summary["by_category"].is_object(), "{summary}");
    // Two shape questions, three rotations each.
    assert_eq!(predictions(&out)?.len(), 6);
    for file in ["report.json", "report.md", "accuracy.png"] {
        assert!(out.join(file).is_file(), "{file} missing");
    }
    let png = std::fs::read(out.join("accuracy.png"))?;
    assert!(png.starts_with(b"\x89PNG"));

    // A run killed while writing a line leaves half of it: the next run drops it.
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(out.join("predictions.jsonl"))?;
        write!(f, "{{\"index\": 3, \"predic")?;
    }
    let second = eval(&out, &["--limit", "3"])?;
    assert!(
        second.status.success(),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    assert!(String::from_utf8_lossy(&second.stderr).contains("dropped an unfinished last line"));
    let stdout = String::from_utf8(second.stdout)?;
    assert!(
        stdout.contains("asked 3 questions"),
        "only the third question's rotations are new: {stdout}"
    );
    let third = eval(&out, &["--limit", "3", "--json"])?;
    assert!(
        !String::from_utf8(third.stdout.clone())?.contains("asked"),
        "nothing left to ask"
    );
    let by_model = last_json_line(&third)?;

    let rescored = scratch("rescore")?;
    let data = root().join("examples/benchmarks/shapes-mmbench.tsv");
    let output = multitoken(&[
        "eval",
        "--benchmark",
        "mmbench",
        "--data",
        &data.to_string_lossy(),
        "--predictions",
        &out.join("predictions.jsonl").to_string_lossy(),
        "--out",
        &rescored.to_string_lossy(),
        "--limit",
        "3",
        "--json",
    ])?;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(last_json_line(&output)?, by_model);
    Ok(())
}

/// Batched answers equal one-at-a-time answers (the scheduler's guarantee,
/// seen through eval).
#[test]
fn batching_does_not_change_the_answers() -> TestResult {
    let (one, many) = (scratch("batch1")?, scratch("batch8")?);
    for (dir, batch) in [(&one, "1"), (&many, "8")] {
        let output = eval(dir, &["--limit", "4", "--max-batch", batch])?;
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    assert_eq!(predictions(&one)?, predictions(&many)?);
    Ok(())
}

/// Usage errors say what to do.
#[test]
fn usage_errors() -> TestResult {
    let out = scratch("usage")?;
    let data = root()
        .join("examples/benchmarks/shapes-mmbench.tsv")
        .to_string_lossy()
        .into_owned();
    let pope = root()
        .join("examples/benchmarks/shapes-pope.tsv")
        .to_string_lossy()
        .into_owned();
    let out_s = out.to_string_lossy().into_owned();
    let cases: [(&[&str], &str); 4] = [
        (
            &[
                "eval",
                "--benchmark",
                "mmbench",
                "--data",
                &data,
                "--out",
                &out_s,
            ],
            "give --model DIR to ask a model, or --predictions FILE",
        ),
        (
            &["eval", "--benchmark", "gqa", "--data", &data],
            "unknown benchmark `gqa`; known: mmbench, mmmu, pope, vqav2",
        ),
        (
            &[
                "eval",
                "--benchmark",
                "mmbench",
                "--data",
                &pope,
                "--predictions",
                &pope,
            ],
            "not a MMBench file: no column `A`, `B`",
        ),
        (
            &["eval", "--benchmark", "mmbench"],
            "--benchmark mmbench needs --data FILE",
        ),
    ];
    for (args, want) in cases {
        let output = multitoken(args)?;
        assert!(!output.status.success(), "{args:?} succeeded");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(want), "{args:?}: {stderr}");
    }
    Ok(())
}
