//! Hub ids: `--model org/name[@revision]` from a cache that `huggingface_hub` wrote
//! (`tests/fixtures/hf-cache`, made by `cargo xtask fixtures hf_cache`), offline
//! errors, and downloads from a local server that speaks the hub's `resolve` URL
//! scheme through `HF_ENDPOINT` (a redirect to a CDN path, a transfer cut off
//! halfway that resumes, a 401 without the token).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use multitoken::hub::{resolve, HubConfig, HubId};
use serde_json::Value;

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// The commit `huggingface_hub` recorded for the tiny llama (refs/main, refs/v1).
const TINY_LLAMA_COMMIT: &str = "8b4dde805ec23a936a7ef19efff09ea829c8dc73";

/// `multitoken ARGS` with the fixture cache and the network off.
fn multitoken_offline(args: &[&str], cache: &Path) -> Result<Output, std::io::Error> {
    Command::new(env!("CARGO_BIN_EXE_multitoken"))
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .env("HF_HUB_CACHE", cache)
        .env("HF_HUB_OFFLINE", "1")
        // A reachable-looking endpoint that nothing listens on: offline must not try it.
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .output()
}

fn greedy_ids(output: &Output) -> Result<Vec<u64>, Box<dyn std::error::Error>> {
    let stdout = String::from_utf8(output.stdout.clone())?;
    let last: Value = serde_json::from_str(stdout.lines().last().ok_or("no stdout")?)?;
    Ok(last["token_ids"].as_array().ok_or("no token_ids")?.iter().filter_map(Value::as_u64).collect())
}

/// The llama fixture's prompt and transformers' greedy ids.
fn llama_expected() -> Result<(String, Vec<u64>), Box<dyn std::error::Error>> {
    let text = std::fs::read_to_string(fixtures().join("lm/llama/parity/expected.json"))?;
    let expected: Value = serde_json::from_str(&text)?;
    let prompt = expected["prompt"].as_str().ok_or("no prompt")?.to_string();
    let ids = expected["greedy_ids"].as_array().ok_or("no greedy_ids")?.iter().filter_map(Value::as_u64).collect();
    Ok((prompt, ids))
}

/// The CLI loads a hub id, a tag and a commit hash from the cache huggingface_hub
/// wrote, offline, and generates transformers' greedy ids.
#[test]
fn cli_loads_hub_ids_from_the_hf_cache_offline() -> TestResult {
    let (prompt, want) = llama_expected()?;
    let max_new = want.len().to_string();
    let cache = fixtures().join("hf-cache");
    let with_commit = format!("multitoken-fixtures/tiny-llama@{TINY_LLAMA_COMMIT}");
    for model in ["multitoken-fixtures/tiny-llama", "multitoken-fixtures/tiny-llama@v1", with_commit.as_str()] {
        let args = ["generate", "--model", model, "--raw", "--prompt", prompt.as_str(), "--max-new-tokens", max_new.as_str(), "--json"];
        let output = multitoken_offline(&args, &cache)?;
        assert!(output.status.success(), "{model}: {}", String::from_utf8_lossy(&output.stderr));
        assert_eq!(greedy_ids(&output)?, want, "{model}");
    }
    Ok(())
}

/// Offline, a hub id the cache lacks, a revision it lacks, and a cache entry with
/// only config.json are refused with what is missing and how to get it.
#[test]
fn cli_offline_errors_say_what_is_missing_and_how_to_get_it() -> TestResult {
    let cache = fixtures().join("hf-cache");
    let check = |model: &str, expect: &[&str]| -> TestResult {
        let output = multitoken_offline(&["generate", "--model", model, "--prompt", "hi"], &cache)?;
        assert!(!output.status.success(), "{model} must fail");
        let stderr = String::from_utf8_lossy(&output.stderr);
        for needle in expect {
            assert!(stderr.contains(needle), "{model}: {needle:?} not in {stderr}");
        }
        Ok(())
    };
    check("nobody/nothing", &["model nobody/nothing@main is not in the Hugging Face cache", "no models--nobody--nothing", "HF_HUB_OFFLINE", "hf download nobody/nothing"])?;
    check("multitoken-fixtures/tiny-llama@v9", &["no revision \"v9\"", "--revision v9"])?;
    check("multitoken-fixtures/partial", &["lacks weights (*.safetensors)"])?;
    Ok(())
}

/// Copies a directory tree keeping symlinks as symlinks (the cache's snapshots).
fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        let kind = entry.file_type()?;
        if kind.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(entry.path())?, &target)?;
        } else if kind.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

fn scratch(name: &str) -> std::io::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("multitoken-hub-{name}-{}", std::process::id()));
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn offline_config(cache_dir: PathBuf) -> HubConfig {
    HubConfig { cache_dir, endpoint: "http://127.0.0.1:9".into(), token: None, offline: true, retries: 0, progress: false }
}

/// A snapshot whose weights link to a blob that is gone (never finished, or
/// pruned) is not used.
#[test]
fn a_snapshot_link_to_a_missing_blob_is_not_used() -> TestResult {
    let cache = scratch("dangling")?;
    copy_tree(&fixtures().join("hf-cache"), &cache)?;
    let id = HubId::parse("multitoken-fixtures/tiny-llama").ok_or("not a hub id")?;
    assert!(resolve(&offline_config(cache.clone()), &id).is_ok(), "the intact copy resolves");
    let link = cache.join("models--multitoken-fixtures--tiny-llama/snapshots").join(TINY_LLAMA_COMMIT).join("model.safetensors");
    std::fs::remove_file(link.parent().ok_or("no parent")?.join(std::fs::read_link(&link)?))?;
    let error = format!("{:#}", resolve(&offline_config(cache.clone()), &id).err().ok_or("must fail")?);
    assert!(error.contains("lacks model.safetensors"), "{error}");
    std::fs::remove_dir_all(&cache)?;
    Ok(())
}

/// What the test hub serves and what it saw.
struct Hub {
    files: HashMap<String, Vec<u8>>,
    /// Request lines with their Range header, in order.
    seen: Mutex<Vec<String>>,
    /// Whether the first full transfer of the big file was already cut.
    cut_done: Mutex<bool>,
}

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
const SECRET: &str = "hf_test_secret";

impl Hub {
    fn start(files: HashMap<String, Vec<u8>>) -> std::io::Result<(Arc<Hub>, String)> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let endpoint = format!("http://{}", listener.local_addr()?);
        let hub = Arc::new(Hub { files, seen: Mutex::new(Vec::new()), cut_done: Mutex::new(false) });
        let server = Arc::clone(&hub);
        let base = endpoint.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let hub = Arc::clone(&server);
                let base = base.clone();
                std::thread::spawn(move || {
                    let _ = hub.answer(stream, &base);
                });
            }
        });
        Ok((hub, endpoint))
    }

    fn answer(&self, mut stream: TcpStream, base: &str) -> std::io::Result<()> {
        let mut reader = BufReader::new(stream.try_clone()?);
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
        let mut headers = HashMap::new();
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header)? == 0 || header.trim().is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_string());
            }
        }
        let range = headers.get("range").cloned().unwrap_or_default();
        if let Ok(mut seen) = self.seen.lock() {
            seen.push(format!("{path} {range}"));
        }
        // The private repository wants the token on every request, as the hub does.
        if path.contains("org/private") && headers.get("authorization").map(String::as_str) != Some(format!("Bearer {SECRET}").as_str()) {
            return respond(&mut stream, "401 Unauthorized", &[], b"");
        }
        if let Some(repo_rev) = path.strip_prefix("/api/models/") {
            let repo = repo_rev.split("/revision/").next().unwrap_or("");
            let mut names: Vec<&String> = self.files.keys().collect();
            names.sort();
            let siblings: Vec<Value> = names
                .iter()
                .map(|n| serde_json::json!({ "rfilename": n }))
                .chain([serde_json::json!({ "rfilename": "pytorch_model.bin" }), serde_json::json!({ "rfilename": "README.md" })])
                .collect();
            let body = serde_json::json!({ "id": repo, "sha": COMMIT, "siblings": siblings }).to_string();
            return respond(&mut stream, "200 OK", &[("Content-Type", "application/json".into())], body.as_bytes());
        }
        // The big file is stored on a "CDN": the resolve URL redirects there with the
        // hub's linked etag and size, as the hub does for LFS files.
        if let Some((_, name)) = path.split_once("/resolve/main/") {
            let Some(data) = self.files.get(name) else {
                return respond(&mut stream, "404 Not Found", &[], b"");
            };
            let etag = format!("\"{:016x}{}\"", data.len(), name.len());
            if name == "model.safetensors" {
                let headers = [
                    ("Location", format!("{base}/cdn/{name}")),
                    ("X-Repo-Commit", COMMIT.into()),
                    ("X-Linked-Etag", etag),
                    ("X-Linked-Size", data.len().to_string()),
                ];
                return respond(&mut stream, "302 Found", &headers, b"");
            }
            return self.send_range(&mut stream, data, &range, &[("X-Repo-Commit", COMMIT.into()), ("ETag", etag)], false);
        }
        if let Some(name) = path.strip_prefix("/cdn/") {
            let Some(data) = self.files.get(name) else {
                return respond(&mut stream, "404 Not Found", &[], b"");
            };
            let full_transfer = range == "bytes=0-";
            let cut = full_transfer && self.cut_done.lock().map(|mut done| !std::mem::replace(&mut *done, true)).unwrap_or(false);
            return self.send_range(&mut stream, data, &range, &[], cut);
        }
        respond(&mut stream, "404 Not Found", &[], b"")
    }

    /// A `Range: bytes=A-[B]` answer (206), or the whole file (200); with `cut`, the
    /// headers promise the whole range and the connection closes halfway.
    fn send_range(&self, stream: &mut TcpStream, data: &[u8], range: &str, extra: &[(&str, String)], cut: bool) -> std::io::Result<()> {
        let Some(spec) = range.strip_prefix("bytes=") else {
            return respond(stream, "200 OK", extra, data);
        };
        let (start, end) = spec.split_once('-').unwrap_or((spec, ""));
        let start: usize = start.parse().unwrap_or(0);
        let end: usize = if end.is_empty() { data.len().saturating_sub(1) } else { end.parse().unwrap_or(0) };
        if start >= data.len() || end < start {
            return respond(stream, "416 Range Not Satisfiable", extra, b"");
        }
        let end = end.min(data.len() - 1);
        let mut headers = extra.to_vec();
        headers.push(("Content-Range", format!("bytes {start}-{end}/{}", data.len())));
        let body = &data[start..=end];
        if cut {
            let head = header_block("206 Partial Content", &headers, body.len());
            stream.write_all(head.as_bytes())?;
            stream.write_all(&body[..body.len() / 2])?;
            stream.flush()?;
            return stream.shutdown(std::net::Shutdown::Both);
        }
        respond(stream, "206 Partial Content", &headers, body)
    }
}

fn header_block(status: &str, headers: &[(&str, String)], length: usize) -> String {
    let mut head = format!("HTTP/1.1 {status}\r\nContent-Length: {length}\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    head
}

fn respond(stream: &mut TcpStream, status: &str, headers: &[(&str, String)], body: &[u8]) -> std::io::Result<()> {
    stream.write_all(header_block(status, headers, body.len()).as_bytes())?;
    stream.write_all(body)?;
    stream.flush()
}

fn llama_files() -> std::io::Result<HashMap<String, Vec<u8>>> {
    let dir = fixtures().join("lm/llama");
    let mut files = HashMap::new();
    for name in ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"] {
        let mut data = Vec::new();
        std::fs::File::open(dir.join(name))?.read_to_end(&mut data)?;
        files.insert(name.to_string(), data);
    }
    Ok(files)
}

fn online_config(cache_dir: PathBuf, endpoint: &str, token: Option<&str>) -> HubConfig {
    HubConfig { cache_dir, endpoint: endpoint.into(), token: token.map(str::to_string), offline: false, retries: 3, progress: false }
}

/// A download through HF_ENDPOINT: only the files a model needs, the big one through
/// a redirect and resumed after the connection drops halfway; then the same id
/// resolves offline from what was written, and the model loads.
#[test]
fn downloads_follow_the_redirect_resume_the_cut_transfer_and_fill_the_cache() -> TestResult {
    let files = llama_files()?;
    let (hub, endpoint) = Hub::start(files.clone())?;
    let cache = scratch("download")?;
    let id = HubId::parse("org/tiny").ok_or("not a hub id")?;
    let dir = resolve(&online_config(cache.clone(), &endpoint, None), &id)?;
    assert_eq!(dir, cache.join("models--org--tiny/snapshots").join(COMMIT));
    for (name, data) in &files {
        assert_eq!(&std::fs::read(dir.join(name))?, data, "{name}");
    }
    let seen = hub.seen.lock().map_err(|_| "poisoned")?.clone();
    let half = files["model.safetensors"].len() / 2;
    assert!(seen.iter().any(|r| r == "/cdn/model.safetensors bytes=0-"), "{seen:?}");
    assert!(seen.contains(&format!("/cdn/model.safetensors bytes={half}-")), "the transfer resumed at {half}: {seen:?}");
    assert!(!seen.iter().any(|r| r.contains("pytorch_model.bin") || r.contains("README")), "only what a model needs: {seen:?}");
    // Cache first: offline now, and no request more.
    let before = seen.len();
    assert_eq!(resolve(&offline_config(cache.clone()), &id)?, dir);
    assert_eq!(resolve(&online_config(cache.clone(), &endpoint, None), &id)?, dir);
    assert_eq!(hub.seen.lock().map_err(|_| "poisoned")?.len(), before, "a complete cache entry needs no request");
    multitoken::lm::multimodal::MultimodalModel::load(&dir, &Default::default())?;
    std::fs::remove_dir_all(&cache)?;
    Ok(())
}

/// A private repository: 401 without a token is an error that says to set HF_TOKEN;
/// with the token the download works.
#[test]
fn a_401_asks_for_hf_token_and_the_token_opens_the_repository() -> TestResult {
    let (_hub, endpoint) = Hub::start(llama_files()?)?;
    let cache = scratch("private")?;
    let id = HubId::parse("org/private").ok_or("not a hub id")?;
    let error = format!("{:#}", resolve(&online_config(cache.clone(), &endpoint, None), &id).err().ok_or("must fail")?);
    assert!(error.contains("401") && error.contains("HF_TOKEN") && error.contains("org/private"), "{error}");
    let dir = resolve(&online_config(cache.clone(), &endpoint, Some(SECRET)), &id)?;
    assert!(dir.join("model.safetensors").is_file());
    std::fs::remove_dir_all(&cache)?;
    Ok(())
}

#[path = "../../../tests/support/tiny_gguf.rs"]
mod tiny_gguf;

/// A GGUF repository with several quantizations: `org/name:QUANT` fetches that one
/// file only and resolves to it (then offline too); without a quantization and no
/// Q4_K_M to default to, the error lists the choices; a quantization not fetched is
/// not in the cache offline.
#[test]
fn a_named_quantization_of_a_gguf_repository_is_the_one_fetched() -> TestResult {
    let scratch_dir = scratch("gguf-files")?;
    let mut files = HashMap::new();
    for (name, dtype) in [("tiny.Q8_0.gguf", candle_core::quantized::GgmlDType::Q8_0), ("tiny.F32.gguf", candle_core::quantized::GgmlDType::F32)] {
        let path = scratch_dir.join(name);
        tiny_gguf::write_gguf(&path, dtype, tiny_gguf::Breakage::None);
        files.insert(name.to_string(), std::fs::read(&path)?);
    }
    let (hub, endpoint) = Hub::start(files.clone())?;
    let cache = scratch("gguf-cache")?;
    let online = online_config(cache.clone(), &endpoint, None);
    let id = HubId::parse("org/tiny-GGUF:q8_0").ok_or("not a hub id")?;
    let path = resolve(&online, &id)?;
    assert_eq!(path, cache.join("models--org--tiny-GGUF/snapshots").join(COMMIT).join("tiny.Q8_0.gguf"));
    assert_eq!(std::fs::read(&path)?, files["tiny.Q8_0.gguf"]);
    let seen = hub.seen.lock().map_err(|_| "poisoned")?.clone();
    assert!(!seen.iter().any(|r| r.contains("tiny.F32.gguf")), "only the named quantization: {seen:?}");
    assert_eq!(resolve(&offline_config(cache.clone()), &id)?, path);
    multitoken::lm::multimodal::MultimodalModel::load(&path, &Default::default())?;

    // Cache first: the one quantization cached is the model, offline or not.
    let unnamed = HubId::parse("org/tiny-GGUF").ok_or("not a hub id")?;
    assert_eq!(resolve(&offline_config(cache.clone()), &unnamed)?, path);
    let fresh = scratch("gguf-cache-fresh")?;
    let online_fresh = online_config(fresh.clone(), &endpoint, None);
    let error = format!("{:#}", resolve(&online_fresh, &unnamed).err().ok_or("two quantizations and no default must fail")?);
    assert!(error.contains("org/name:QUANT") && error.contains("Q8_0") && error.contains("F32"), "{error}");
    let other = HubId::parse("org/tiny-GGUF:F32").ok_or("not a hub id")?;
    let error = format!("{:#}", resolve(&offline_config(cache.clone()), &other).err().ok_or("F32 was never fetched")?);
    assert!(error.contains("no F32 .gguf") && error.contains("HF_HUB_OFFLINE"), "{error}");
    std::fs::remove_dir_all(&cache)?;
    std::fs::remove_dir_all(&fresh)?;
    std::fs::remove_dir_all(&scratch_dir)?;
    Ok(())
}

/// Every subcommand that reads a model takes a hub id, offline from the fixture
/// cache: `train` through its TOML file's `model`, `merge-lora` (model and adapter),
/// `moe build` (base and experts), `dataset check --model` and `modality add`.
#[test]
fn every_subcommand_that_reads_a_model_takes_a_hub_id() -> TestResult {
    let cache = fixtures().join("hf-cache");
    let work = scratch("subcommands")?;
    let run = |args: &[&str]| -> Result<String, Box<dyn std::error::Error>> {
        let output = Command::new(env!("CARGO_BIN_EXE_multitoken"))
            .args(args)
            .current_dir(&work)
            .env("RUST_BACKTRACE", "0")
            .env("HF_HUB_CACHE", &cache)
            .env("HF_HUB_OFFLINE", "1")
            .env("HF_ENDPOINT", "http://127.0.0.1:9")
            .output()?;
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        if !output.status.success() {
            return Err(format!("multitoken {args:?} failed: {stderr}").into());
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned() + &stderr)
    };
    std::fs::write(
        work.join("rows.jsonl"),
        concat!(
            r#"{"id":"a","messages":[{"role":"user","content":"hello there"},{"role":"assistant","content":"hi"}]}"#,
            "\n",
            r#"{"id":"b","messages":[{"role":"user","content":"how are you"},{"role":"assistant","content":"fine"}]}"#,
            "\n"
        ),
    )?;
    std::fs::write(
        work.join("train.toml"),
        "model = \"multitoken-fixtures/tiny-llama@v1\"\ndataset = \"rows.jsonl\"\noutput_dir = \"adapter\"\nstage = \"lora\"\nmax_steps = 1\nlora_r = 2\n",
    )?;
    run(&["train", "--config", "train.toml", "--no-progress"])?;
    let trained: Value = serde_json::from_str(&std::fs::read_to_string(work.join("adapter/multitoken.json"))?)?;
    let base = trained["base_model"].as_str().unwrap_or_default().to_string();
    assert!(base.contains("models--multitoken-fixtures--tiny-llama"), "the run's base is the cached snapshot: {trained}");

    run(&["merge-lora", "--model", "multitoken-fixtures/tiny-llama", "--adapter", "adapter", "--output", "merged"])?;
    assert!(work.join("merged/config.json").is_file());
    run(&["moe", "build", "--base", "multitoken-fixtures/tiny-llama", "--experts", "adapter", "multitoken-fixtures/tiny-llama@v1", "--out", "moe"])?;
    assert!(work.join("moe/moe.json").is_file());
    let checked = run(&["dataset", "check", "rows.jsonl", "--model", "multitoken-fixtures/tiny-llama"])?;
    assert!(checked.contains("2 rows, no problems"), "{checked}");
    run(&["modality", "add", "--model", "multitoken-fixtures/tiny-llama", "--builder", "document_minilm", "--out", "with-documents"])?;
    assert!(work.join("with-documents/multitoken.json").is_file());

    // And each says so when the id is not in the cache.
    for args in [
        vec!["merge-lora", "--model", "nobody/nothing", "--output", "x"],
        vec!["moe", "build", "--base", "multitoken-fixtures/tiny-llama", "--experts", "nobody/nothing", "--out", "x"],
        vec!["modality", "add", "--model", "nobody/nothing", "--builder", "document_minilm", "--out", "x"],
    ] {
        let error = run(&args).err().ok_or("an id not in the cache must fail")?.to_string();
        assert!(error.contains("nobody/nothing@main is not in the Hugging Face cache"), "{args:?}: {error}");
    }
    std::fs::remove_dir_all(&work)?;
    Ok(())
}
