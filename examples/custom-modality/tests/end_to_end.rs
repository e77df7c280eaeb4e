//! The example modality end to end, through the example's own binary (built on
//! `multitoken::cli::main()`): list it, add it to the embedded demo model,
//! train its projector, evaluate, and answer prompts mixing `<image>` and
//! `<series>` through `generate`, `/generate` and the OpenAI endpoint.
//!
//! One test: every step works on the model the steps before it wrote.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use base64::Engine as _;
use serde_json::{json, Value};

/// The example's binary, which cargo builds for this test.
const BIN: &str = env!("CARGO_BIN_EXE_sensor-multitoken");

const SERIES_QUESTION: &str = "Does the temperature end high or low?";

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `examples/`, the directory the demo model, shapes and this crate share.
fn examples_dir() -> PathBuf {
    crate_dir().join("..")
}

fn demo_model() -> PathBuf {
    examples_dir().join("demo-model")
}

fn series(name: &str) -> PathBuf {
    crate_dir().join("data/series").join(format!("{name}.csv"))
}

fn red_circle() -> PathBuf {
    examples_dir().join("shapes/red-circle.png")
}

/// Runs the binary; (success, stdout, stderr).
fn run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {BIN}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs the binary, which must succeed; its stdout.
fn ok(args: &[&str]) -> String {
    let (success, stdout, stderr) = run(args);
    assert!(success, "{args:?} failed:\n{stderr}");
    stdout
}

/// Runs the binary, which must fail with `expect` in its message.
fn fails(args: &[&str], expect: &str) {
    let (success, _, stderr) = run(args);
    assert!(!success, "{args:?} should have failed");
    assert!(stderr.contains(expect), "{args:?}: expected {expect:?} in:\n{stderr}");
}

fn s(path: &Path) -> &str {
    path.to_str().expect("test paths are UTF-8")
}

/// The last stdout line of `generate --json`.
fn generate(model: &Path, series_item: &Path, prompt: &str) -> Value {
    let item = format!("series={}", s(series_item));
    let stdout = ok(&[
        "generate", "--model", s(model), "--image", s(&red_circle()), "--item", &item,
        "--prompt", prompt, "--max-new-tokens", "8", "--json",
    ]);
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("not JSON ({e}): {last}"))
}

/// `eval`'s exact-match accuracy on the example's rows.
fn accuracy(model: &Path, out: &Path) -> f64 {
    let rows = crate_dir().join("data/rows.jsonl");
    ok(&["eval", "--model", s(model), "--dataset", s(&rows), "--max-new-tokens", "8", "--output", s(out)]);
    let report: Value = serde_json::from_str(&std::fs::read_to_string(out).unwrap()).unwrap();
    assert_eq!(report["rows"], 32, "{report}");
    report["exact_match"].as_f64().unwrap()
}

#[test]
fn series_modality_added_trained_and_served() {
    let work = std::env::temp_dir().join(format!("custom-modality-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();

    // The builder is linked in: `modality list` builds it with its default config.
    let listed = ok(&["modality", "list", "--json"]);
    let row: Value = listed
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .find(|row| row["builder"] == "sensor_series")
        .unwrap_or_else(|| panic!("sensor_series not listed:\n{listed}"));
    assert_eq!((row["token"].as_str(), row["data_key"].as_str()), (Some("<series>"), Some("series")));
    assert_eq!((row["token_width"].as_u64(), row["feature_dim"].as_u64()), (Some(4), Some(32)));
    assert_eq!(row["projector"], "mlp2x_gelu");

    // `modality add`: bad requests first.
    let model = work.join("model");
    let demo = demo_model();
    fails(&["modality", "add", "--model", s(&demo), "--builder", "sensor_nope", "--out", s(&model)], "sensor_series");
    fails(&["modality", "add", "--model", s(&demo), "--builder", "sensor_series", "--out", s(&demo)], "is the --model directory");
    fails(
        &["modality", "add", "--model", s(&demo), "--builder", "sensor_series", "--config", r#"{"window": 5}"#, "--out", s(&model)],
        "window 5 does not divide length 32",
    );
    ok(&["modality", "add", "--model", s(&demo), "--builder", "sensor_series", "--out", s(&model)]);
    fails(&["modality", "add", "--model", s(&demo), "--builder", "sensor_series", "--out", s(&model)], "--overwrite");
    fails(
        &["modality", "add", "--model", s(&model), "--builder", "sensor_series", "--out", s(&work.join("twice"))],
        "already has a `sensor_series` modality",
    );

    // One more entry, fresh projector weights next to the demo model's own (kept as they were).
    let config: Value = serde_json::from_str(&std::fs::read_to_string(model.join("multitoken.json")).unwrap()).unwrap();
    let builders: Vec<&str> = config["modalities"].as_array().unwrap().iter().filter_map(|m| m["builder"].as_str()).collect();
    assert_eq!(builders, ["vision_clip", "audio_whisper", "document_minilm", "sensor_series"]);
    let lm: Value = serde_json::from_str(&std::fs::read_to_string(demo.join("lm/config.json")).unwrap()).unwrap();
    let hidden = lm["hidden_size"].as_u64().unwrap() as usize;
    let cpu = candle_core::Device::Cpu;
    let fresh = candle_core::safetensors::load(model.join("projectors.safetensors"), &cpu).unwrap();
    let before = candle_core::safetensors::load(demo.join("projectors.safetensors"), &cpu).unwrap();
    assert_eq!(fresh["sensor_series_lmm_projector.0.weight"].dims(), [hidden, 32]);
    assert_eq!(fresh["sensor_series_lmm_projector.2.weight"].dims(), [hidden, hidden]);
    assert_eq!(fresh.len(), before.len() + 4);
    for (name, tensor) in &before {
        let diff = (tensor - &fresh[name]).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(diff, 0.0, "{name} changed");
    }

    // `dataset check` knows `series` without a model (the ModalityInfo registration).
    let rows = crate_dir().join("data/rows.jsonl");
    ok(&["dataset", "check", s(&rows)]);

    // Before training the projector reads nothing: the model answers one way.
    let untrained = accuracy(&model, &work.join("eval-before.json"));

    // `train --stage projectors`: the loss falls, the model reads the series.
    let trained = work.join("trained");
    ok(&[
        "train", "--model", s(&model), "--stage", "projectors", "--dataset", s(&rows), "--output-dir", s(&trained),
        "--max-steps", "40", "--learning-rate", "3e-3", "--logging-steps", "1", "--seed", "0",
    ]);
    let losses: Vec<f64> = std::fs::read_to_string(trained.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok()?.get("loss")?.as_f64())
        .collect();
    assert_eq!(losses.len(), 40, "{losses:?}");
    // 32 rows in batches of 4: an epoch is 8 steps, so the first and last 8 see the same rows.
    let mean = |xs: &[f64]| xs.iter().sum::<f64>() / xs.len() as f64;
    let (first, last) = (mean(&losses[..8]), mean(&losses[32..]));
    assert!(last < 0.5 * first, "loss {first:.3} -> {last:.3}: {losses:?}");
    let accuracy_after = accuracy(&trained, &work.join("eval-after.json"));
    assert!(
        accuracy_after >= 0.8 && accuracy_after > untrained + 0.25,
        "exact match {untrained:.3} before training, {accuracy_after:.3} after"
    );

    // `generate` with `<image>` and `<series>`: the answer depends on the series.
    let prompt = format!("<image> <series> {SERIES_QUESTION}");
    let rising = generate(&trained, &series("rising-00"), &prompt);
    let falling = generate(&trained, &series("falling-01"), &prompt);
    let (rising_text, falling_text) = (rising["text"].as_str().unwrap(), falling["text"].as_str().unwrap());
    assert!(!rising_text.trim().is_empty(), "{rising}");
    assert_eq!(rising["prompt_tokens"], falling["prompt_tokens"]);
    // Over all 16 series (8 rising, 8 falling) the answers follow the series:
    // one answer for all would get 8 right. (Not one pair: after 40 projector
    // steps a few series are still misread beside an image, as in `eval`.)
    let mut right = 0;
    let mut answers = Vec::new();
    for i in 0..16 {
        let (name, want) = if i % 2 == 0 { (format!("rising-{i:02}"), "High.") } else { (format!("falling-{i:02}"), "Low.") };
        let got = generate(&trained, &series(&name), &prompt);
        let text = got["text"].as_str().unwrap().trim().to_string();
        right += usize::from(text == want);
        answers.push(format!("{name}: {text}"));
    }
    assert!(right >= 12, "the answers ignore the series ({right}/16 right): {answers:?} ({rising_text:?} / {falling_text:?})");
    // Two `<series>` tokens need two series items.
    let item = format!("series={}", s(&series("rising-00")));
    fails(
        &["generate", "--model", s(&trained), "--item", &item, "--prompt", "<series> <series>", "--max-new-tokens", "2"],
        "2 `<series>` token(s) but 1 series item(s)",
    );

    // `chat`: items from flags, then interactively with `/image` and `/series` (any data key).
    let answer = ok(&[
        "chat", "--model", s(&trained), "--image", s(&red_circle()), "--item", &item, "--prompt", &prompt,
        "--max-new-tokens", "8",
    ]);
    assert_eq!(answer.trim(), rising_text.trim(), "chat and generate differ");
    let mut chat = Command::new(BIN)
        .args(["chat", "--model", s(&trained), "--max-new-tokens", "8"])
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let script = format!(
        // The modality by its builder name (its data key `/series` and bare
        // token `/series` work alike); a mistyped command is not sent as a question.
        "/image {}\n/sensor_series {}\n/bogus x\n{prompt}\n/exit\n",
        s(&red_circle()),
        s(&series("rising-00"))
    );
    chat.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
    let out = chat.wait_with_output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && !stderr.contains("error"), "{stderr}");
    assert!(stderr.contains("unknown command /bogus") && stderr.contains("/series PATH"), "{stderr}");
    assert!(stdout.contains(rising_text.trim()), "interactive chat answered {stdout:?}");

    // A trained encoder: saved under the new model, which the config then names.
    let encoder = work.join("trained-encoder");
    ok(&[
        "train", "--model", s(&model), "--stage", "projectors", "--train-encoders", "sensor_series", "--dataset",
        s(&rows), "--output-dir", s(&encoder), "--max-steps", "8", "--learning-rate", "3e-3", "--seed", "0",
    ]);
    let config: Value = serde_json::from_str(&std::fs::read_to_string(encoder.join("multitoken.json")).unwrap()).unwrap();
    let dir = config["modalities"][3]["config"]["encoder"].as_str().unwrap_or_default().to_string();
    let weights = candle_core::safetensors::load(encoder.join(&dir).join("model.safetensors"), &cpu).unwrap();
    assert_eq!(weights["encoder.weight"].dims(), [32, 10], "{dir}");
    let reply = generate(&encoder, &series("falling-01"), &prompt);
    assert!(!reply["text"].as_str().unwrap_or_default().trim().is_empty(), "{reply}");

    // `serve`: /generate (a dataset row) and the OpenAI endpoint (a generic item part).
    let mut server = Server::start(&trained);
    let row = json!({
        "messages": [{"role": "user", "content": prompt}],
        "images": ["shapes/red-circle.png"],
        "series": ["custom-modality/data/series/rising-00.csv"],
        "max_new_tokens": 8,
        "temperature": 0.0,
    });
    let (status, body) = server.post("/generate", &row);
    assert_eq!(status, 200, "{body}");
    let output: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(output["output"].as_str(), Some(rising_text), "/generate and `generate` differ");

    let too_few = json!({"messages": [{"role": "user", "content": "<series> <series>"}], "series": ["custom-modality/data/series/rising-00.csv"]});
    let (status, body) = server.post("/generate", &too_few);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("series"), "{body}");

    let csv = std::fs::read(series("falling-01")).unwrap();
    let image = std::fs::read(red_circle()).unwrap();
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
    let chat = json!({
        "model": "trained",
        "max_tokens": 8,
        "temperature": 0.0,
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{}", b64(&image))}},
            {"type": "input_item", "modality": "series", "data": format!("data:text/csv;base64,{}", b64(&csv))},
            {"type": "text", "text": SERIES_QUESTION},
        ]}],
    });
    let (status, body) = server.post("/v1/chat/completions", &chat);
    assert_eq!(status, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).unwrap();
    let content = answer["choices"][0]["message"]["content"].as_str().unwrap_or_default();
    assert!(!content.trim().is_empty(), "{answer}");
    assert!(answer["usage"]["prompt_tokens"].as_u64().unwrap_or(0) > 4, "{answer}");

    // An inline series (the modality takes inline items): a JSON array, named by the token.
    let inline = json!({
        "max_tokens": 4,
        "messages": [{"role": "user", "content": [
            {"type": "input_item", "modality": "<series>", "data": [1.0, 2.0, 3.5, 5.0, 8.0]},
            {"type": "text", "text": SERIES_QUESTION},
        ]}],
    });
    let (status, body) = server.post("/v1/chat/completions", &inline);
    assert_eq!(status, 200, "{body}");
    let unknown = json!({"messages": [{"role": "user", "content": [{"type": "input_item", "modality": "smell", "data": "x"}]}]});
    let (status, body) = server.post("/v1/chat/completions", &unknown);
    assert_eq!(status, 400, "{body}");
    server.stop();

    let _ = std::fs::remove_dir_all(&work);
}

/// `serve --port 0` on a model, stopped when dropped.
struct Server {
    child: Child,
    address: String,
}

impl Server {
    fn start(model: &Path) -> Self {
        let mut child = Command::new(BIN)
            .args(["serve", "--model", s(model), "--port", "0", "--allow-files", s(&examples_dir())])
            .env("RUST_BACKTRACE", "0")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let mut lines = BufReader::new(stderr).lines();
        let mut seen = String::new();
        let address = loop {
            let Some(Ok(line)) = lines.next() else {
                let _ = child.kill();
                panic!("serve exited before listening:\n{seen}");
            };
            if let Some(rest) = line.split("on http://").nth(1) {
                break rest.split('/').next().unwrap_or_default().to_string();
            }
            seen.push_str(&line);
            seen.push('\n');
        };
        // Keep draining its log so that it never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        Self { child, address }
    }

    /// POSTs JSON; (status, body). HTTP/1.1 by hand: the example needs no client crate.
    fn post(&self, path: &str, body: &Value) -> (u16, String) {
        let body = body.to_string();
        let mut stream = TcpStream::connect(&self.address).unwrap();
        write!(
            stream,
            "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.address,
            body.len()
        )
        .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        let status = response.split(' ').nth(1).and_then(|code| code.parse().ok()).unwrap_or(0);
        let (head, rest) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
        let chunked = head.to_ascii_lowercase().contains("transfer-encoding: chunked");
        (status, if chunked { dechunk(rest) } else { rest.to_string() })
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The body of a chunked HTTP/1.1 response.
fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else { break };
        if size == 0 || after.len() < size {
            break;
        }
        out.push_str(&after[..size]);
        rest = after[size..].trim_start_matches("\r\n");
    }
    out
}
