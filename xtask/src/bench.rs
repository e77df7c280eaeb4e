//! `cargo xtask bench lm`: SmolLM2-135M on CPU, ours against transformers in one run.
//!
//! ```text
//! cargo xtask bench lm [--threads N] [--prefill 512] [--decode 128] [--repeat 2]
//!                      [--no-build] [--no-python] [--llama-cpp]
//! cargo xtask bench lm --contended [--threads 2] [--prefill 128] [--decode 64] [--repeat 5]
//!                      [--no-build] [--busy-cpu N]
//! ```
//!
//! `--contended` measures speed with one core taken by a busy process instead
//! (decode, prefill, the CLIP tower and a LoRA training step; see `bench_contended`).
//!
//! Our side is this very program built in release mode (into `target/bench`, so the
//! release build never holds the lock of the normal `target/debug`), each measurement in
//! a child process of its own so that its load time and peak RSS (VmHWM) are its own:
//!
//! - `ours f32`: the GGUF dequantized to f32 (what transformers runs);
//! - `ours bf16`: the GGUF dequantized with `--dtype bf16`: the linears' weights in
//!   bf16 (AMX tiles for the prefill where the CPU has them), activations f32; the
//!   child also runs the f32 model over the prompt and reports how far the bf16
//!   logits are from f32's (max |diff|, and how many positions' argmax agree);
//! - `ours q4_1-bf16`, `ours q8_0-bf16`: the quantized files with `--dtype bf16`: the
//!   prefill's products dequantize each weight to bf16 tiles for AMX (opt-in, not
//!   the exact default), decode keeps the quantized kernels; logits compared likewise
//!   with the same file's exact f32 products;
//! - `ours q4_1`: the GGUF matrices kept quantized (candle's q4_1 x q8_1 kernels);
//! - `ours q8_0`: the same model with every Q4_1 matrix re-quantized to Q8_0, written
//!   once to `target/bench/` (the file both engines read for the 8-bit row);
//! - `ours q4_1-i8`, `ours q8_0-i8`: the same two files with `--int8-activations`
//!   (activations rounded to 8 bits per block for integer dot products, as llama.cpp
//!   does; opt-in, not the exact default);
//! - `transformers`: `xtask/bench/lm.py` with the repo's venv python, f32, the same
//!   thread count (`torch.set_num_threads`), the same prompt ids;
//! - with `--llama-cpp` (opt-in; CI never does it): `xtask/bench/llama_cpp.mjs` under node
//!   on the Q4_1 and the Q8_0 file, same threads, same prompt ids, one-batch prefill. It
//!   drives llama.cpp through npm's `node-llama-cpp` (pinned to [`NODE_LLAMA_CPP`]), whose
//!   prebuilt libraries carry a CPU variant per x86-64 level (AVX2 ... AVX-512 / AMX),
//!   picked at load: installed once into `target/bench/llama-cpp-node` (~30 s, ~700 MB),
//!   where building llama.cpp from source (llama-cpp-python) takes over an hour on 2 cores.
//!
//! Prefill is one forward over a 512-token prompt, decode 128 single-token forwards
//! through the KV cache with greedy argmax and EOS ignored, both through
//! `multitoken_lm::generate` exactly as the CLI runs them; best of `--repeat` after a
//! warm-up. The roofline is the memory bandwidth (a multi-threaded sum over a buffer far
//! larger than the caches) divided by the bytes of weights a decode step reads.
//!
//! `cargo xtask bench lm-parts GGUF [q4_1|f32]` (run it from the release binary,
//! `target/bench/release/xtask bench lm-parts ...`) splits one decode step into its
//! linears, the output projection and the rest, and compares a quantized prefill-sized
//! matmul with dequantize + f32 matmul: the numbers behind optimisation choices.

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use multitoken_lm::generate::{generate_from_ids, GenerationParams};
use multitoken_lm::gguf::{load_gguf_with, GgufWeights};
use multitoken_lm::loader::LoadOptions;
use serde_json::{json, Value};

use crate::weights::{cache_dir, python, workspace_root};

pub(crate) const GGUF: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// Settings of one bench run.
#[derive(Debug, Clone)]
struct Settings {
    threads: usize,
    prefill: usize,
    decode: usize,
    repeat: usize,
    build: bool,
    python: bool,
    /// `--contended`: the busy-process comparison instead (see `bench_contended`).
    contended: bool,
    /// `--busy-cpu N`: pin the busy process to CPU N.
    busy_cpu: Option<usize>,
    /// `--llama-cpp`: llama.cpp (npm's node-llama-cpp) on the same files in the same run.
    llama_cpp: bool,
    /// `--rounds N`: every engine and mode N times, one after another in turn, so
    /// that a host whose speed drifts over minutes slows each of them alike;
    /// the table gives medians and each ratio its per-round median and range.
    rounds: usize,
    /// `--modes a,b`: only these of our modes (default: all).
    modes: Option<Vec<String>>,
    /// `--llama-cpp-threads a,b`: llama.cpp's thread counts (default: `--threads`).
    /// On a VM whose two cores answer each other slowly, llama.cpp's per-op
    /// barriers made its 2-thread decode slower than its 1-thread one (Zen 5 dev
    /// VM, 2026-12-07: 53 against ~100 tokens/s), so a fair anchor also shows
    /// its best count; each extra count is a row `llama.cpp q4_1 @N threads`.
    llama_cpp_threads: Option<Vec<usize>>,
}

impl Settings {
    /// The thread counts llama.cpp runs at (`--llama-cpp-threads`, else `--threads`).
    fn llama_threads(&self) -> Vec<usize> {
        self.llama_cpp_threads.clone().unwrap_or_else(|| vec![self.threads])
    }
}

/// Run this task.
pub fn run(args: &[String]) -> Result<()> {
    // No bench, or `--help` anywhere (`bench lm --help`), prints the usage
    // instead of failing on an unknown argument.
    let Some(bench) = args.first().filter(|_| !args.iter().any(|a| a == "--help" || a == "-h")) else {
        println!("{USAGE}");
        return Ok(());
    };
    match bench.as_str() {
        "lm" => lm(&args[1..]),
        "document" => crate::bench_document::run(&args[1..]),
        "vision" => crate::bench_vision::run(&args[1..]),
        "audio" => crate::bench_audio::run(&args[1..]),
        "train" if args.iter().any(|a| a == "--qlora") => crate::bench_qlora::run(&args[1..]),
        "train" => crate::bench_train::run(&args[1..]),
        "qlora-child" => crate::bench_qlora::child(&args[1..]),
        "serve" => crate::bench_serve::run(&args[1..]),
        "decode-rows" => crate::bench_decode_rows::run(&args[1..]),
        "moe" => crate::bench_moe::run(&args[1..]),
        "vlm" => crate::bench_vlm::run(&args[1..]),
        // Children spawned by `lm`, in the release build.
        "lm-child" => child(&args[1..]),
        "membw-child" => membw_child(&args[1..]),
        "lm-parts" => parts(&args[1..]),
        "busy-child" => crate::bench_contended::busy_child(),
        "contended-child" => crate::bench_contended::child(&args[1..]),
        other => {
            eprintln!("unknown bench `{other}`\n\n{USAGE}");
            std::process::exit(2);
        }
    }
}

/// The benches and their options (`cargo xtask bench --help`); each bench's
/// section in the README says what it measures.
const USAGE: &str = "\
usage: cargo xtask bench <bench> [options]   (the release build; `--no-build` reuses it)

  lm          [--threads N] [--prefill N] [--decode N] [--repeat N] [--no-build] [--no-python]
              [--llama-cpp [--llama-cpp-threads 1,2]] [--rounds N] [--modes f32,bf16,q4_1,q8_0,q4_1-i8,q8_0-i8,q4_1-bf16,q8_0-bf16]
              [--contended [--busy-cpu N]]
  lm-parts    GGUF [f32]   (each linear of the GGUF, its kernel alone)
  decode-rows [--rows 1,4,16,64] [--prompt N] [--steps N] [--mode M] [--threads N]
  serve       [--threads N] [--clients 1,4,16,64] [--tokens N] [--lone-requests N] [--quantized]
              [--bf16] [--model P]
  document    [--threads N] [--sentences N] [--batch N] [--repeat N] [--model P] [--no-python]
  vision      [--family F] [--threads N] [--images N] [--repeat N] [--no-python]
  vlm         [--family smolvlm|qwen2vl|all] [--threads N] [--new-tokens N] [--repeat N]
              [--tiny] [--no-python]
  audio       [--threads N] [--clips N] [--repeat N] [--wav P] [--model P] [--whisper-cpp]
              [--no-python]
  train       [--threads N] [--batch N] [--steps N] [--stages projectors,lora] [--no-build]
              [--no-python] | --qlora [--steps N] [--tokens N] [--no-build]
  moe         [--layers N] [--decode N] [--repeat N] [--dir D]";

fn parse_settings(args: &[String]) -> Result<Settings> {
    let mut s = Settings {
        threads: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        prefill: 512,
        decode: 128,
        repeat: 2,
        build: true,
        python: true,
        contended: false,
        busy_cpu: None,
        llama_cpp: false,
        rounds: 1,
        modes: None,
        llama_cpp_threads: None,
    };
    // `--contended` has its own defaults (the issue's 2 threads, shorter runs, more rounds),
    // which explicit flags override.
    if args.iter().any(|a| a == "--contended") {
        s.contended = true;
        s.threads = 2;
        s.prefill = 128;
        s.decode = 64;
        s.repeat = 5;
    }
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut number = |name: &str| -> Result<usize> {
            let v = it.next().with_context(|| format!("{name} needs a number"))?;
            v.parse().with_context(|| format!("{name} {v}: not a number"))
        };
        match arg.as_str() {
            "--threads" => s.threads = number("--threads")?.max(1),
            "--prefill" => s.prefill = number("--prefill")?.max(1),
            "--decode" => s.decode = number("--decode")?.max(1),
            "--repeat" => s.repeat = number("--repeat")?.max(1),
            "--no-build" => s.build = false,
            "--no-python" => s.python = false,
            "--contended" => {}
            "--llama-cpp" => s.llama_cpp = true,
            "--llama-cpp-threads" => {
                let list = it.next().context("--llama-cpp-threads needs a comma-separated list")?;
                let counts = list
                    .split(',')
                    .map(|t| t.trim().parse::<usize>().ok().filter(|&t| t > 0).with_context(|| format!("--llama-cpp-threads: `{t}` is not a thread count")))
                    .collect::<Result<Vec<_>>>()?;
                s.llama_cpp = true;
                s.llama_cpp_threads = Some(counts);
            }
            "--busy-cpu" => s.busy_cpu = Some(number("--busy-cpu")?),
            "--rounds" => s.rounds = number("--rounds")?.max(1),
            "--modes" => {
                let list = it.next().context("--modes needs a comma-separated list")?;
                let modes: Vec<String> = list.split(',').map(|m| m.trim().to_string()).filter(|m| !m.is_empty()).collect();
                if let Some(bad) = modes.iter().find(|m| !OUR_MODES.contains(&m.as_str())) {
                    bail!("--modes: unknown mode `{bad}` (one of {})", OUR_MODES.join(", "));
                }
                s.modes = Some(modes);
            }
            other => bail!("unknown argument `{other}`"),
        }
    }
    Ok(s)
}

fn lm(args: &[String]) -> Result<()> {
    let s = parse_settings(args)?;
    let root = workspace_root();
    let gguf = cache_dir()?.join("smollm2").join(GGUF);
    if !gguf.is_file() {
        bail!("{} not found: run `cargo xtask weights --only smollm2` first", gguf.display());
    }
    let target = root.join("target").join("bench");
    let exe = target.join("release").join("xtask");
    if s.build || !exe.is_file() {
        build_release("xtask", &target)?;
    }
    std::fs::create_dir_all(&target)?;
    let prompt_file = target.join("prompt_ids.json");
    std::fs::write(&prompt_file, serde_json::to_string(&prompt_ids(s.prefill))?)?;
    if s.contended {
        let settings = crate::bench_contended::Settings {
            threads: s.threads,
            prefill: s.prefill,
            decode: s.decode,
            repeat: s.repeat,
            busy_cpu: s.busy_cpu,
        };
        return crate::bench_contended::run(&settings, &exe, &gguf, &prompt_file);
    }
    let threads = s.threads.to_string();
    let common = |cmd: &mut Command| {
        cmd.env("RAYON_NUM_THREADS", &threads).env("OMP_NUM_THREADS", &threads).env("MKL_NUM_THREADS", &threads);
    };

    // The bandwidth is measured again in every round: the VM's memory speed
    // drifts over minutes (one probe read 39, 46 and 69 GB/s within half an
    // hour on 2026-12-07), so each round's decode is set against its own.
    let measure_bw = || -> Result<Value> {
        eprintln!("measuring memory bandwidth ({} threads) ...", s.threads);
        let mut cmd = Command::new(&exe);
        cmd.args(["bench", "membw-child", "--threads", &threads]);
        common(&mut cmd);
        last_json_line(&mut cmd)
    };
    let mut round_bw: Vec<Value> = Vec::new();

    let gguf_q8 = target.join(GGUF.replace("Q4_1", "Q8_0"));
    if !gguf_q8.is_file() {
        requantize_gguf(&gguf, &gguf_q8, candle_core::quantized::GgmlDType::Q8_0)?;
    }
    // `-i8`: the same files with `--int8-activations` (8-bit activations, as
    // llama.cpp computes; opt-in, not the exact default).
    let wanted = |mode: &str| s.modes.as_ref().is_none_or(|m| m.iter().any(|w| w == mode));
    let mut rounds: Vec<Vec<Value>> = Vec::new();
    let module = if s.llama_cpp { Some(node_llama_cpp(&target)?) } else { None };
    let llama_threads = s.llama_threads();
    for round in 0..s.rounds {
        let mut results = Vec::new();
        let label = if s.rounds > 1 { format!(" (round {} of {})", round + 1, s.rounds) } else { String::new() };
        round_bw.push(measure_bw()?);
        for mode in OUR_MODES.iter().copied().filter(|m| wanted(m)) {
            let file = if mode.starts_with("q8_0") { &gguf_q8 } else { &gguf };
            eprintln!("ours, {mode}{label} ...");
            let mut cmd = Command::new(&exe);
            cmd.args(["bench", "lm-child", "--mode", mode, "--gguf"]).arg(file).arg("--prompt-ids").arg(&prompt_file);
            cmd.args(["--decode", &s.decode.to_string(), "--repeat", &s.repeat.to_string()]);
            common(&mut cmd);
            results.push(last_json_line(&mut cmd)?);
        }
        if let Some(module) = &module {
            for file in [&gguf, &gguf_q8] {
                for &t in &llama_threads {
                    eprintln!("llama.cpp, {}, {t} threads{label} ...", file.display());
                    let mut cmd = Command::new("node");
                    cmd.arg(root.join("xtask").join("bench").join("llama_cpp.mjs")).arg("--gguf").arg(file).arg("--prompt-ids").arg(&prompt_file);
                    cmd.arg("--module").arg(module);
                    cmd.args(["--decode", &s.decode.to_string(), "--threads", &t.to_string(), "--repeat", &s.repeat.to_string()]);
                    common(&mut cmd);
                    let mut v = last_json_line(&mut cmd)?;
                    v["weight_bytes_per_token"] = json!(weight_bytes_per_token(file, false)?);
                    let name = format!("{}{}", v.get("impl").and_then(Value::as_str).unwrap_or("llama.cpp"), llama_suffix(t, s.threads));
                    v["impl"] = json!(name);
                    results.push(v);
                }
            }
        }
        rounds.push(results);
    }
    let results = median_of_rounds(&rounds);
    let reference = if s.python {
        eprintln!("transformers, f32 ...");
        let mut cmd = Command::new(python());
        cmd.arg(root.join("xtask").join("bench").join("lm.py")).arg("--gguf").arg(&gguf).arg("--prompt-ids").arg(&prompt_file);
        cmd.args(["--decode", &s.decode.to_string(), "--threads", &threads, "--repeat", &s.repeat.to_string()]);
        common(&mut cmd);
        Some(last_json_line(&mut cmd)?)
    } else {
        None
    };
    let kv = kv_bytes_per_token(&gguf, s.prefill + s.decode / 2)?;
    // The table's bandwidth: each key's median over the rounds.
    let mut bw = round_bw.first().cloned().unwrap_or(Value::Null);
    for key in ["read_gb_s", "read_gb_s_1t"] {
        bw[key] = json!(median(round_bw.iter().map(|b| f(b, key)).collect()));
    }
    let per_round_gbs: Vec<f64> = round_bw.iter().map(|b| f(b, "read_gb_s")).collect();
    report(&s, &bw, &per_round_gbs, kv, &results, &rounds, reference.as_ref());
    Ok(())
}

/// What a llama.cpp row's name adds for a thread count other than `--threads`.
fn llama_suffix(threads: usize, ours: usize) -> String {
    if threads == ours {
        String::new()
    } else {
        format!(" @{threads} thread{}", if threads == 1 { "" } else { "s" })
    }
}

/// Our modes, in the order they run.
const OUR_MODES: [&str; 8] = ["f32", "bf16", "q4_1", "q8_0", "q4_1-i8", "q8_0-i8", "q4_1-bf16", "q8_0-bf16"];

/// The median of a list (NaN for none), as the other benches take it.
fn median(values: Vec<f64>) -> f64 {
    crate::bench_vision::best_median(&values).1
}

/// Each engine's result with its speeds replaced by their medians over the
/// rounds (the first round's record otherwise: load, memory, logits checks).
fn median_of_rounds(rounds: &[Vec<Value>]) -> Vec<Value> {
    let Some(first) = rounds.first() else { return Vec::new() };
    first
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let mut v = v.clone();
            for key in ["prefill_tok_s", "decode_tok_s", "load_s"] {
                v[key] = json!(median(rounds.iter().filter_map(|r| r.get(i)).map(|r| f(r, key)).collect()));
            }
            v
        })
        .collect()
}

/// Bytes of f32 keys and values one decode step reads at a context of
/// `context` positions (every layer's cache, keys and values): at SmolLM2's
/// 512-token prompt ~5% of the f32 weights' bytes, ~27% of Q4_1's.
fn kv_bytes_per_token(path: &Path, context: usize) -> Result<f64> {
    let mut file = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let content = candle_core::quantized::gguf_file::Content::read(&mut file)?;
    let number = |key: &str| -> Result<f64> {
        let v = content.metadata.get(&format!("llama.{key}")).with_context(|| format!("no llama.{key} in the GGUF"))?;
        Ok(v.to_u32().map(f64::from).or_else(|_| v.to_u64().map(|x| x as f64))?)
    };
    let head_dim = number("embedding_length")? / number("attention.head_count")?;
    Ok(number("block_count")? * 2.0 * number("attention.head_count_kv")? * head_dim * 4.0 * context as f64)
}

/// The node-llama-cpp release the llama.cpp anchor runs (its lock resolves here;
/// newer releases' platform packages are not all served by the registry mirror).
const NODE_LLAMA_CPP: &str = "3.21.1";

/// `target/bench/llama-cpp-node/node_modules/node-llama-cpp`, installed by npm
/// on first use (its install script is not run: the prebuilt libraries it ships
/// are all the bench needs).
fn node_llama_cpp(target: &Path) -> Result<PathBuf> {
    let dir = target.join("llama-cpp-node");
    let module = dir.join("node_modules").join("node-llama-cpp");
    let installed = std::fs::read_to_string(module.join("package.json"))
        .ok()
        .and_then(|text| serde_json::from_str::<Value>(&text).ok())
        .is_some_and(|manifest| manifest["version"] == NODE_LLAMA_CPP);
    if !installed {
        eprintln!("installing node-llama-cpp {NODE_LLAMA_CPP} into {} ...", dir.display());
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("package.json"), "{\"private\": true}\n")?;
        let status = Command::new("npm")
            .args(["install", "--exact", "--ignore-scripts", "--no-audit", "--no-fund"])
            .arg(format!("node-llama-cpp@{NODE_LLAMA_CPP}"))
            .current_dir(&dir)
            .status()
            .context("running npm (the llama.cpp anchor needs node and npm)")?;
        if !status.success() {
            bail!("npm install node-llama-cpp@{NODE_LLAMA_CPP} failed in {}", dir.display());
        }
    }
    Ok(module)
}

/// Writes `src` with every block-quantized matrix re-quantized to `dtype` (f32
/// tensors, and matrices already in `dtype`, copied): one model in two formats,
/// so both engines read the same 8-bit file.
fn requantize_gguf(src: &Path, dst: &Path, dtype: candle_core::quantized::GgmlDType) -> Result<()> {
    use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
    let mut file = std::fs::File::open(src).with_context(|| format!("opening {}", src.display()))?;
    let content = gguf_file::Content::read(&mut file)?;
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    for (name, info) in &content.tensor_infos {
        let t = content.tensor(&mut file, name, &Device::Cpu)?;
        let keep = matches!(info.ggml_dtype, GgmlDType::F32 | GgmlDType::F16) || info.ggml_dtype == dtype;
        tensors.push((name.clone(), if keep { t } else { QTensor::quantize(&t.dequantize(&Device::Cpu)?, dtype)? }));
    }
    let meta: Vec<(&str, &gguf_file::Value)> = content.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tmp = dst.with_extension("gguf.tmp");
    let mut out = std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    gguf_file::write(&mut out, &meta, &refs)?;
    std::fs::rename(&tmp, dst)?;
    Ok(())
}

/// A deterministic prompt of ordinary (non-special) token ids.
pub(crate) fn prompt_ids(n: usize) -> Vec<u32> {
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..n)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            100 + ((state >> 33) % 48_000) as u32
        })
        .collect()
}

/// `cargo build --release -p {package}` into the target directory `target`;
/// returns the path of the package's binary there. xtask itself is built with its
/// `models` feature: the bench children (`lm-child`, ...) live behind it, and a
/// build without it would re-run them through `cargo run` in debug.
pub(crate) fn build_release(package: &str, target: &Path) -> Result<PathBuf> {
    eprintln!("building the release {package} binary into {} ...", target.display());
    let features: &[&str] = if package == "xtask" { &["--features", "models"] } else { &[] };
    let status = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .args(["build", "--release", "-p", package])
        .args(features)
        .env("CARGO_TARGET_DIR", target)
        .current_dir(workspace_root())
        .status()
        .with_context(|| format!("running cargo build --release -p {package}"))?;
    if !status.success() {
        bail!("cargo build --release -p {package} failed ({status})");
    }
    Ok(target.join("release").join(package))
}

/// Runs `cmd` and parses the last stdout line that is a JSON object (the
/// contract of our binaries' and the Python references' `--json` output);
/// a failed run is an error with its stdout and stderr.
pub(crate) fn last_json_line(cmd: &mut Command) -> Result<Value> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("{cmd:?} failed ({}):\n{}\n{}", out.status, stdout, String::from_utf8_lossy(&out.stderr));
    }
    let line = stdout.lines().rev().find(|l| l.trim_start().starts_with('{')).with_context(|| format!("no JSON from {cmd:?}:\n{stdout}"))?;
    serde_json::from_str(line).with_context(|| format!("bad JSON from {cmd:?}: {line}"))
}

fn f(v: &Value, key: &str) -> f64 {
    v.get(key).and_then(Value::as_f64).unwrap_or(f64::NAN)
}

fn report(s: &Settings, bw: &Value, round_gbs: &[f64], kv_bytes: f64, ours: &[Value], rounds: &[Vec<Value>], reference: Option<&Value>) {
    let gbs = f(bw, "read_gb_s");
    println!();
    println!(
        "SmolLM2-135M-Instruct, CPU, {} threads, prefill {} tokens, decode {} tokens (best of {}{})",
        s.threads,
        s.prefill,
        s.decode,
        s.repeat,
        if s.rounds > 1 { format!(" in each of {} rounds; medians over the rounds", s.rounds) } else { String::new() }
    );
    println!("memory bandwidth (multi-threaded read): {gbs:.1} GB/s; single thread {:.1} GB/s", f(bw, "read_gb_s_1t"));
    if round_gbs.len() > 1 {
        let (lo, hi) = round_gbs.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
        println!("(medians of a probe in each round, multi-threaded {lo:.1}-{hi:.1} GB/s; each round's decode is set against its own probe)");
    }
    println!();
    println!(
        "(roofline: decode x weight bytes per token / bandwidth; +KV adds the {:.1} MB of f32 keys and values a step reads at the mean decode context)",
        kv_bytes / 1e6
    );
    println!(
        "{:<14} {:>10} {:>10} {:>9} {:>10} {:>9} {:>9} {:>10} {:>9}",
        "", "prefill/s", "decode/s", "load s", "MB/token", "roofline", "+KV", "peak RSS", "vs tf"
    );
    let tf_decode = reference.map(|r| f(r, "decode_tok_s"));
    let mut rows: Vec<(&str, &Value)> = ours.iter().map(|v| (v.get("impl").and_then(Value::as_str).unwrap_or("ours"), v)).collect();
    if let Some(r) = reference {
        rows.push(("transformers", r));
    }
    for (name, v) in rows {
        let bytes = v.get("weight_bytes_per_token").and_then(Value::as_f64).or_else(|| ours.first().map(|o| f(o, "weight_bytes_per_token")));
        let decode = f(v, "decode_tok_s");
        // Each round's decode over that round's bandwidth, the median of those
        // (one probe when there is one round, or for the Python reference).
        let share = |extra: f64| -> f64 {
            let Some(b) = bytes else { return f64::NAN };
            let per_round: Vec<f64> = rounds
                .iter()
                .zip(round_gbs)
                .filter_map(|(r, &g)| r.iter().find(|x| x.get("impl") == v.get("impl")).map(|x| f(x, "decode_tok_s") * (b + extra) / (g * 1e9)))
                .collect();
            if per_round.len() > 1 { median(per_round) } else { decode * (b + extra) / (gbs * 1e9) }
        };
        let (roofline, with_kv) = (share(0.0), share(kv_bytes));
        let vs = tf_decode.map(|t| format!("{:.2}x", decode / t)).unwrap_or_default();
        println!(
            "{:<14} {:>10.1} {:>10.1} {:>9.2} {:>10.1} {:>8.0}% {:>8.0}% {:>8.0}MB {:>9}",
            name,
            f(v, "prefill_tok_s"),
            decode,
            f(v, "load_s"),
            bytes.unwrap_or(f64::NAN) / 1e6,
            roofline * 100.0,
            with_kv * 100.0,
            f(v, "peak_rss_bytes") / 1e6,
            vs
        );
    }
    if let Some(r) = reference {
        println!();
        let by = |mode: &str| ours.iter().find(|v| v.get("mode").and_then(Value::as_str) == Some(mode));
        let tf = |k: &str| f(r, k);
        if let Some(o) = by("f32") {
            println!("ours f32 / transformers f32: decode {:.2}x (goal >= 1.0), prefill {:.2}x (goal >= 3), load {:.1}x faster (goal >= 5)",
                f(o, "decode_tok_s") / tf("decode_tok_s"), f(o, "prefill_tok_s") / tf("prefill_tok_s"), tf("load_s") / f(o, "load_s"));
        }
        if let Some(o) = by("q4_1") {
            println!("ours q4_1 / transformers f32: decode {:.2}x (goal >= 4), prefill {:.2}x, load {:.1}x faster",
                f(o, "decode_tok_s") / tf("decode_tok_s"), f(o, "prefill_tok_s") / tf("prefill_tok_s"), tf("load_s") / f(o, "load_s"));
        }
        println!("(transformers' f32 roofline uses the f32 bytes per token; its python import took {:.1} s, not counted in load)", tf("import_s"));
    }
    let by_impl = |name: &str| ours.iter().find(|v| v.get("impl").and_then(Value::as_str) == Some(name));
    for (bf16, exact) in [("bf16", "f32"), ("q4_1-bf16", "q4_1"), ("q8_0-bf16", "q8_0")] {
        if let (Some(b), Some(o)) = (by_impl(&format!("ours {bf16}")), by_impl(&format!("ours {exact}"))) {
            let l = &b["logits_vs_f32"];
            let goal = if bf16 == "bf16" { " (goal >= 2 where the CPU has AMX or AVX-512 BF16)" } else { "" };
            println!(
                "ours {bf16} / ours {exact}: prefill {:.2}x{goal}, decode {:.2}x; bf16 kernel here: {}; logits max |diff| {:.4} from {exact}'s (which span {:.1}), argmax equal at {}/{} positions",
                f(b, "prefill_tok_s") / f(o, "prefill_tok_s"),
                f(b, "decode_tok_s") / f(o, "decode_tok_s"),
                b.get("bf16_kernel").and_then(Value::as_str).unwrap_or("?"),
                f(l, "max_abs_diff"),
                f(l, "f32_spread"),
                f(l, "argmax_agree"),
                f(l, "positions"),
            );
        }
    }
    let llama_threads = s.llama_threads();
    for q in ["q4_1", "q8_0"] {
        for (ours_mode, t) in [q.to_string(), format!("{q}-i8"), format!("{q}-bf16")].into_iter().flat_map(|m| llama_threads.iter().map(move |&t| (m.clone(), t))) {
            let (ours_name, llama_name) = (format!("ours {ours_mode}"), format!("llama.cpp {q}{}", llama_suffix(t, s.threads)));
            let Some(l) = by_impl(&llama_name) else { continue };
            if by_impl(&ours_name).is_none() {
                continue;
            }
            // Ratios within each round (the two engines measured minutes apart at
            // most), then their median and range.
            let ratios = |key: &str| -> Vec<f64> {
                rounds
                    .iter()
                    .filter_map(|r| {
                        let find = |name: &str| r.iter().find(|v| v.get("impl").and_then(Value::as_str) == Some(name));
                        Some(f(find(&ours_name)?, key) / f(find(&llama_name)?, key))
                    })
                    .collect()
            };
            let show = |values: Vec<f64>| {
                let (lo, hi) = values.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
                let n = values.len();
                let mid = median(values);
                if n > 1 { format!("{mid:.2}x [{lo:.2}-{hi:.2} over {n} rounds]") } else { format!("{mid:.2}x") }
            };
            println!(
                "ours {ours_mode} / {llama_name}: decode {} (goal >= 1.0), prefill {} (goal >= 0.8); llama.cpp {}",
                show(ratios("decode_tok_s")),
                show(ratios("prefill_tok_s")),
                l.get("version").and_then(Value::as_str).unwrap_or("?")
            );
        }
    }
    let all = json!({"threads": s.threads, "membw": bw, "membw_rounds": round_gbs, "kv_bytes_per_token": kv_bytes, "ours": ours, "rounds": rounds, "transformers": reference});
    println!();
    println!("{all}");
}

/// Bytes of weights one decode step reads: every matrix once (the tied `token_embd`
/// as the output projection), the embedding lookup and norms being negligible.
fn weight_bytes_per_token(path: &Path, dequantized: bool) -> Result<f64> {
    let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let content = candle_core::quantized::gguf_file::Content::read(&mut Cursor::new(&data[..]))?;
    let mut total = 0f64;
    for info in content.tensor_infos.values() {
        let n = info.shape.elem_count();
        total += if dequantized {
            4.0 * n as f64
        } else {
            (n / info.ggml_dtype.block_size() * info.ggml_dtype.type_size()) as f64
        };
    }
    Ok(total)
}

fn peak_rss_bytes() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024.0)
}

/// One measurement of ours, in its own process: `--mode f32|q4_1`.
fn child(args: &[String]) -> Result<()> {
    let mut mode = String::from("q4_1");
    let mut gguf = PathBuf::new();
    let mut prompt_file = PathBuf::new();
    let mut decode = 128usize;
    let mut repeat = 2usize;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let v = it.next().with_context(|| format!("{arg} needs a value"))?;
        match arg.as_str() {
            "--mode" => mode = v.clone(),
            "--gguf" => gguf = PathBuf::from(v),
            "--prompt-ids" => prompt_file = PathBuf::from(v),
            "--decode" => decode = v.parse()?,
            "--repeat" => repeat = v.parse()?,
            other => bail!("unknown argument `{other}`"),
        }
    }
    let weights = match mode.as_str() {
        "f32" | "bf16" => GgufWeights::Dequantized,
        "q4_1" | "q8_0" | "q4_1-bf16" | "q8_0-bf16" => GgufWeights::Quantized,
        "q4_1-i8" | "q8_0-i8" => {
            multitoken_lm::set_int8_activations(true);
            GgufWeights::Quantized
        }
        other => bail!("unknown mode `{other}` (f32, q4_1, q8_0: the file's own blocks; -i8: with 8-bit activations)"),
    };
    let ids: Vec<u32> = serde_json::from_str(&std::fs::read_to_string(&prompt_file)?)?;
    let start = Instant::now();
    let dtype = if mode.ends_with("bf16") { DType::BF16 } else { DType::F32 };
    let model = load_gguf_with(&gguf, &LoadOptions { dtype, device: Device::Cpu, quantize: None, quantize_towers: None }, weights)?;
    let load_s = start.elapsed().as_secs_f64();
    let params = |n: usize| GenerationParams { max_new_tokens: n, ignore_eos: true, ..GenerationParams::default() };
    let lm = model.model.as_ref();
    let short = &ids[..ids.len().min(16)];
    generate_from_ids(lm, &model.tokenizer, short, &params(4), &mut |_| true)?;
    let (mut prefill, mut dec) = (0f64, 0f64);
    for _ in 0..repeat {
        // decode + 1: the first new token comes from the prefill forward.
        let out = generate_from_ids(lm, &model.tokenizer, &ids, &params(decode + 1), &mut |_| true)?;
        prefill = prefill.max(out.prefill_tok_s);
        dec = dec.max(out.decode_tok_s);
    }
    let mut bytes = weight_bytes_per_token(&gguf, weights == GgufWeights::Dequantized)?;
    let mut logits_vs_f32 = Value::Null;
    let peak_rss = peak_rss_bytes();
    if dtype == DType::BF16 {
        // Against the same weights with f32 products (after the peak RSS is read).
        if weights == GgufWeights::Dequantized {
            bytes /= 2.0;
        }
        let f32_model = load_gguf_with(&gguf, &LoadOptions::default(), weights)?;
        logits_vs_f32 = compare_logits(lm, f32_model.model.as_ref(), &ids)?;
    }
    let result = json!({
        "impl": format!("ours {mode}"),
        "mode": mode,
        "threads": candle_core::utils::get_num_threads(),
        "load_s": load_s,
        "prompt_tokens": ids.len(),
        "decode_tokens": decode,
        "prefill_tok_s": prefill,
        "decode_tok_s": dec,
        "weight_bytes_per_token": bytes,
        "peak_rss_bytes": peak_rss,
        "logits_vs_f32": logits_vs_f32,
        "bf16_kernel": format!("{:?}", multitoken_kernels::bf16::kernel()),
    });
    println!("{result}");
    Ok(())
}

/// How far `model`'s logits over every prompt position are from `reference`'s:
/// the largest absolute difference, the logits' own spread (max - min) for
/// scale, and at how many positions the argmax agrees.
fn compare_logits(model: &dyn multitoken_core::LanguageModel, reference: &dyn multitoken_core::LanguageModel, ids: &[u32]) -> Result<Value> {
    use multitoken_core::{KvCache, LogitsSelection};
    let run = |m: &dyn multitoken_core::LanguageModel| -> Result<candle_core::Tensor> {
        let ids = candle_core::Tensor::new(ids, m.device())?.unsqueeze(0)?;
        let mut cache = KvCache::new(m.num_layers());
        Ok(m.forward_embeds(&m.embed_tokens(&ids)?, None, &mut cache, LogitsSelection::All)?.squeeze(0)?.to_dtype(DType::F32)?)
    };
    let (a, b) = (run(model)?, run(reference)?);
    let max_diff = (&a - &b)?.abs()?.max_all()?.to_scalar::<f32>()?;
    let spread = (b.max_all()? - b.min_all()?)?.to_scalar::<f32>()?;
    let (am, bm) = (a.argmax(candle_core::D::Minus1)?.to_vec1::<u32>()?, b.argmax(candle_core::D::Minus1)?.to_vec1::<u32>()?);
    let agree = am.iter().zip(&bm).filter(|(x, y)| x == y).count();
    Ok(json!({"max_abs_diff": max_diff, "f32_spread": spread, "argmax_agree": agree, "positions": am.len()}))
}

/// Read bandwidth: sums over a 512 MiB buffer, one thread and `--threads` threads.
fn membw_child(args: &[String]) -> Result<()> {
    let threads: usize = match args {
        [flag, n] if flag == "--threads" => n.parse()?,
        _ => 1,
    };
    let len = 512usize << 20 >> 3;
    let data: Vec<u64> = (0..len as u64).collect();
    let measure = |n: usize| -> f64 {
        let mut best = f64::INFINITY;
        for _ in 0..5 {
            let start = Instant::now();
            let chunk = data.len().div_ceil(n);
            let sum: u64 = std::thread::scope(|scope| {
                let handles: Vec<_> = data
                    .chunks(chunk)
                    .map(|c| scope.spawn(move || c.iter().fold(0u64, |a, &x| a.wrapping_add(x))))
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap_or(0)).fold(0, u64::wrapping_add)
            });
            std::hint::black_box(sum);
            best = best.min(start.elapsed().as_secs_f64());
        }
        (data.len() * 8) as f64 / best / 1e9
    };
    let single = measure(1);
    let multi = measure(threads.max(1));
    println!("{}", json!({"read_gb_s": multi.max(single), "read_gb_s_1t": single, "threads": threads}));
    Ok(())
}

/// `bench lm-parts GGUF [q4_1|f32]`: time the pieces of one decode step (every linear,
/// the output projection, a whole step) to see where decode time goes.
fn parts(args: &[String]) -> Result<()> {
    use multitoken_lm::WeightSource;
    let gguf = PathBuf::from(args.first().context("lm-parts needs the GGUF path")?);
    let weights = match args.get(1).map(String::as_str) {
        Some("f32") => GgufWeights::Dequantized,
        _ => GgufWeights::Quantized,
    };
    let opts = LoadOptions { dtype: DType::F32, device: Device::Cpu, quantize: None, quantize_towers: None };
    let source = multitoken_lm::gguf::GgufSource::open(&gguf, &opts, weights)?;
    let cfg = source.config()?;
    let (h, kv, ff) = (cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size);
    let mut linears = Vec::new();
    for i in 0..cfg.num_layers {
        let p = format!("model.layers.{i}");
        for (name, inp, out) in [
            ("self_attn.q_proj", h, h), ("self_attn.k_proj", h, kv), ("self_attn.v_proj", h, kv), ("self_attn.o_proj", h, h),
            ("mlp.gate_proj", h, ff), ("mlp.up_proj", h, ff), ("mlp.down_proj", ff, h),
        ] {
            linears.push(source.linear(&format!("{p}.{name}"), inp, out, false)?);
        }
    }
    let head = source.linear("lm_head", h, cfg.vocab_size, false)?;
    let time = |f: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
        f()?;
        let n = 20;
        let start = Instant::now();
        for _ in 0..n {
            f()?;
        }
        Ok(start.elapsed().as_secs_f64() / n as f64 * 1e3)
    };
    let xh = candle_core::Tensor::randn(0f32, 1.0, (1, 1, h), &Device::Cpu)?;
    let xf = candle_core::Tensor::randn(0f32, 1.0, (1, 1, ff), &Device::Cpu)?;
    let lin_ms = time(&mut || {
        for l in &linears {
            l.forward(if l.in_dim() == ff { &xf } else { &xh })?;
        }
        Ok(())
    })?;
    // Per-shape cost of one call, to separate fixed per-call overhead from work.
    for (name, idx) in [("k_proj", 1usize), ("q_proj", 0), ("gate_proj", 4), ("down_proj", 6)] {
        let l = &linears[idx];
        let x = if l.in_dim() == ff { &xf } else { &xh };
        let ms = time(&mut || {
            for _ in 0..10 {
                l.forward(x)?;
            }
            Ok(())
        })? / 10.0;
        let candle_ms = match l.weight() {
            multitoken_lm::LinearWeight::Quantized(q) => time(&mut || {
                for _ in 0..10 {
                    candle_core::Module::forward(q.as_ref(), x)?;
                }
                Ok(())
            })? / 10.0,
            multitoken_lm::LinearWeight::Dense(_) | multitoken_lm::LinearWeight::Bf16(_) => f64::NAN,
        };
        println!("  {name} [{} -> {}]: {:.1} us (candle's QMatMul {:.1} us)", l.in_dim(), l.out_dim(), ms * 1e3, candle_ms * 1e3);
    }
    let head_ms = time(&mut || {
        head.forward(&xh)?;
        Ok(())
    })?;
    // Prefill-shaped input: quantized matmul against dequantize-then-f32-matmul.
    let x512 = candle_core::Tensor::randn(0f32, 1.0, (1, 512, h), &Device::Cpu)?;
    let up = &linears[5];
    let q_ms = time(&mut || {
        up.forward(&x512)?;
        Ok(())
    })?;
    if let multitoken_lm::LinearWeight::Quantized(q) = up.weight() {
        if let candle_core::quantized::QMatMul::QTensor(t) = q.as_ref() {
            let deq_ms = time(&mut || {
                let w = t.dequantize(&Device::Cpu)?;
                x512.broadcast_matmul(&w.t()?)?;
                Ok(())
            })?;
            println!("up_proj on 512 rows: quantized {q_ms:.2} ms, dequantize + f32 matmul {deq_ms:.2} ms");
        }
    }
    let model = load_gguf_with(&gguf, &opts, weights)?;
    let lm = model.model.as_ref();
    let ids: Vec<u32> = prompt_ids(512);
    let p = GenerationParams { max_new_tokens: 65, ignore_eos: true, ..GenerationParams::default() };
    let out = generate_from_ids(lm, &model.tokenizer, &ids, &p, &mut |_| true)?;
    let step_ms = 1e3 / out.decode_tok_s;
    println!(
        "decode step {step_ms:.2} ms (after a 512 prompt): {} linears {lin_ms:.2} ms, lm_head {head_ms:.2} ms, rest {:.2} ms",
        linears.len(), step_ms - lin_ms - head_ms
    );
    Ok(())
}
