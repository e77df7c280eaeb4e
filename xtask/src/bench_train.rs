//! `cargo xtask bench train`: a stage-1 (projectors) step and a LoRA step on
//! SmolLM2-135M + a frozen CLIP ViT-B/32-size tower, ours against PyTorch in one run.
//!
//! ```text
//! cargo xtask bench train [--threads N] [--batch 4] [--steps 6] [--stages projectors,lora]
//!                         [--no-build] [--no-python]
//! ```
//!
//! Setup (each piece made once, then reused):
//!
//! - the LM: `cargo xtask weights --only smollm2`'s GGUF, dequantized to an HF
//!   directory `$MULTITOKEN_WEIGHTS/smollm2/hf/` by transformers
//!   (`xtask/bench/train.py --convert-smollm2`): LoRA training needs safetensors;
//!   both sides train from that directory in f32;
//! - the tower: a seeded random `CLIPVisionModel` of ViT-B/32 size (224 px, 49
//!   patches) with its `CLIPImageProcessor`, saved by `train.py --make-tower`;
//! - the data: the single-image `datasets/shapes` tasks (shape, colour, describe),
//!   `batch × steps` rows, every image distinct (so every step runs the tower, as
//!   multi_token does: our feature cache never hits in a first epoch);
//! - the rows as our preparer makes them (SmolLM2's own chat template, 49
//!   placeholders per `<image>`): ids, labels, spans and image paths go to
//!   `rows.json`, which the PyTorch script trains on, so both sides see the same
//!   sequences.
//!
//! Ours is the `multitoken train` release binary (built into `target/bench`,
//! `$CARGO_TARGET_DIR/bench` when that is set) run for `--steps` optimizer steps,
//! `--stage projectors` then `--stage lora` (r 64, alpha 16, dropout 0.05, every
//! decoder linear but `lm_head`, + the projector), constant LR 1e-3, batch `--batch`.
//! A step's time is the gap between two consecutive lines of its `metrics.jsonl`
//! (the trainer appends one per step; polled every 5 ms); its peak RSS is the last
//! `VmHWM` read from `/proc/PID/status` before it exits. The PyTorch side
//! (`xtask/bench/train.py --run`: transformers `LlamaForCausalLM`, `CLIPVisionModel`
//! `hidden_states[-2]` without CLS, `mlp2x_gelu` projector, peft LoRA with the same
//! settings, `torch.optim.AdamW`, `clip_grad_norm_` 1.0) times each step itself and
//! reports its own `VmHWM`. Step 1 is a warm-up on both sides; the table shows the
//! fastest of steps 2..N (every step's time is in the JSON line). Same threads on both sides (`RAYON_NUM_THREADS`,
//! `torch.set_num_threads`). The load average is printed with the figures: the
//! machine may be shared.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use multitoken_core::{Item, ItemsByKey, Message};
use multitoken_datasets::{GenerateConfig, Split, Task};
use multitoken_lm::loader::LoadOptions;
use multitoken_lm::multimodal::MultimodalModel;
use serde_json::{json, Value};

use crate::bench::last_json_line;
use crate::weights::{cache_dir, python, workspace_root};

pub(crate) const GGUF: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// Settings of one run.
#[derive(Debug, Clone)]
struct Settings {
    threads: usize,
    batch: usize,
    steps: usize,
    stages: Vec<String>,
    build: bool,
    python: bool,
}

fn parse(args: &[String]) -> Result<Settings> {
    let mut s = Settings {
        threads: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        batch: 4,
        steps: 6,
        stages: vec!["projectors".into(), "lora".into()],
        build: true,
        python: true,
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| -> Result<String> {
            it.next().cloned().with_context(|| format!("{name} needs a value"))
        };
        let number = |name: &str, v: String| -> Result<usize> {
            v.parse().with_context(|| format!("{name} {v}: not a number"))
        };
        match arg.as_str() {
            "--threads" => s.threads = number("--threads", value("--threads")?)?.max(1),
            "--batch" => s.batch = number("--batch", value("--batch")?)?.max(1),
            "--steps" => s.steps = number("--steps", value("--steps")?)?.max(2),
            "--stages" => {
                s.stages = value("--stages")?.split(',').map(str::to_string).collect();
                if let Some(bad) = s.stages.iter().find(|x| *x != "projectors" && *x != "lora") {
                    bail!("--stages: `{bad}` is not projectors or lora");
                }
            }
            "--no-build" => s.build = false,
            "--no-python" => s.python = false,
            other => bail!(
                "unknown argument `{other}`; usage: cargo xtask bench train [--threads N] [--batch N] [--steps N] [--stages projectors,lora] [--no-build] [--no-python]"
            ),
        }
    }
    Ok(s)
}

/// Run `bench train`.
pub fn run(args: &[String]) -> Result<()> {
    let s = parse(args)?;
    let root = workspace_root();
    let script = root.join("xtask").join("bench").join("train.py");
    let smollm2 = cache_dir()?.join("smollm2");
    let gguf = smollm2.join(GGUF);
    if !gguf.is_file() {
        bail!("{} not found: run `cargo xtask weights --only smollm2` first", gguf.display());
    }
    let lm_dir = smollm2.join("hf");
    if !lm_dir.join("config.json").is_file() {
        eprintln!("dequantizing {GGUF} to {} (transformers) ...", lm_dir.display());
        run_status(Command::new(python()).arg(&script).arg("--convert-smollm2").arg(&gguf).arg(&lm_dir))?;
    }
    let target = match std::env::var_os("CARGO_TARGET_DIR").filter(|d| !d.is_empty()) {
        Some(dir) => std::path::absolute(PathBuf::from(dir))?.join("bench"),
        None => root.join("target").join("bench"),
    };
    let work = target.join("train");
    let tower = work.join("clip-vit-b32");
    if !tower.join("config.json").is_file() {
        eprintln!("writing a random CLIP ViT-B/32 tower to {} ...", tower.display());
        run_status(Command::new(python()).arg(&script).arg("--make-tower").arg(&tower))?;
    }
    let model_dir = work.join("model");
    std::fs::create_dir_all(&model_dir)?;
    let config = json!({
        "base_model": lm_dir.display().to_string(),
        "modalities": [{"builder": "vision_clip", "config": {"tower": tower.display().to_string()}, "projector": "mlp2x_gelu"}]
    });
    std::fs::write(model_dir.join("multitoken.json"), serde_json::to_string_pretty(&config)?)?;
    write_projectors(&model_dir, config_usize(&tower, "hidden_size")?, config_usize(&lm_dir, "hidden_size")?)?;
    let dataset = write_dataset(&work.join("data"), s.batch * s.steps)?;
    let rows_file = work.join("rows.json");
    let positions = dump_rows(&model_dir, &dataset, &rows_file)?;

    let exe = target.join("release").join("multitoken");
    if s.build || !exe.is_file() {
        crate::bench::build_release("multitoken", &target)?;
    }
    let load_before = loadavg();
    let threads = s.threads.to_string();
    let mut results = Vec::new();
    for stage in &s.stages {
        eprintln!("ours: {stage}, {} steps of batch {} ...", s.steps, s.batch);
        let out_dir = work.join(format!("out-{stage}"));
        let _ = std::fs::remove_dir_all(&out_dir);
        let mut cmd = Command::new(&exe);
        cmd.args(["train", "--model"]).arg(&model_dir).arg("--dataset").arg(&dataset).arg("--output-dir").arg(&out_dir);
        cmd.args(["--stage", stage, "--max-steps", &s.steps.to_string()]);
        cmd.args(["--per-device-train-batch-size", &s.batch.to_string(), "--learning-rate", "1e-3"]);
        cmd.args(["--warmup-steps", "0", "--lr-scheduler-type", "constant", "--no-progress", "true"]);
        if stage == "lora" {
            cmd.args(["--lora-r", "64", "--lora-alpha", "16", "--lora-dropout", "0.05"]);
        }
        cmd.env("RAYON_NUM_THREADS", &threads);
        let ours = run_ours(&mut cmd, &out_dir.join("metrics.jsonl"), &work.join(format!("ours-{stage}.log")))?;
        let reference = if s.python {
            eprintln!("pytorch: {stage} ...");
            let mut cmd = Command::new(python());
            cmd.arg(&script).args(["--run", "--stage", stage, "--lm"]).arg(&lm_dir).arg("--tower").arg(&tower);
            cmd.arg("--rows").arg(&rows_file);
            cmd.args(["--batch", &s.batch.to_string(), "--steps", &s.steps.to_string(), "--threads", &threads]);
            cmd.env("OMP_NUM_THREADS", &threads).env("MKL_NUM_THREADS", &threads);
            Some(last_json_line(&mut cmd)?)
        } else {
            None
        };
        results.push((stage.clone(), ours, reference));
    }
    let load_after = loadavg();
    report(&s, &positions, &results, load_before, load_after);
    Ok(())
}

/// `key` of `dir/config.json`.
fn config_usize(dir: &Path, key: &str) -> Result<usize> {
    let path = dir.join("config.json");
    let config: Value = serde_json::from_str(&std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?)?;
    config
        .get(key)
        .and_then(Value::as_u64)
        .map(|v| v as usize)
        .with_context(|| format!("{}: no `{key}`", path.display()))
}

/// A seeded random `mlp2x_gelu` projector (`MultimodalModel::load` needs one; both
/// sides start from random projectors, which is all a timing needs).
fn write_projectors(model_dir: &Path, features: usize, hidden: usize) -> Result<()> {
    use candle_core::{Device, Tensor};
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut random = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.04
            })
            .collect()
    };
    let device = Device::Cpu;
    let prefix = "vision_clip_lmm_projector";
    let mut tensors = std::collections::HashMap::new();
    tensors.insert(format!("{prefix}.0.weight"), Tensor::from_vec(random(hidden * features), (hidden, features), &device)?);
    tensors.insert(format!("{prefix}.0.bias"), Tensor::zeros(hidden, candle_core::DType::F32, &device)?);
    tensors.insert(format!("{prefix}.2.weight"), Tensor::from_vec(random(hidden * hidden), (hidden, hidden), &device)?);
    tensors.insert(format!("{prefix}.2.bias"), Tensor::zeros(hidden, candle_core::DType::F32, &device)?);
    candle_core::safetensors::save(&tensors, model_dir.join("projectors.safetensors"))?;
    Ok(())
}

/// Writes `bench.jsonl` with the first `rows` single-image rows of a shapes train
/// split under `dir` (generated once, regenerated when too small).
fn write_dataset(dir: &Path, rows: usize) -> Result<PathBuf> {
    let tasks = [Task::ImageShape, Task::ImageColour, Task::ImageDescribe];
    let per_task = rows.div_ceil(tasks.len());
    let train = dir.join("train.jsonl");
    let existing = std::fs::read_to_string(&train).map(|t| t.lines().count()).unwrap_or(0);
    if existing < rows {
        let config = GenerateConfig { seed: 7, train_per_task: per_task, heldout_per_task: 0, tasks: tasks.to_vec(), ..GenerateConfig::default() };
        multitoken_datasets::generate_split(dir, Split::Train, per_task, &config)
            .with_context(|| format!("generating shapes rows under {}", dir.display()))?;
    }
    let text = std::fs::read_to_string(&train).with_context(|| format!("reading {}", train.display()))?;
    let lines: Vec<&str> = text.lines().take(rows).collect();
    if lines.len() < rows {
        bail!("{} has {} rows, {rows} needed", train.display(), lines.len());
    }
    let out = dir.join("bench.jsonl");
    std::fs::write(&out, lines.join("\n") + "\n")?;
    Ok(out)
}

/// Prepares every row of `dataset` with our preparer (the model's chat template,
/// placeholders) and writes ids, labels, spans and absolute image paths to `out`.
/// Returns the rows' lengths.
fn dump_rows(model_dir: &Path, dataset: &Path, out: &Path) -> Result<Vec<usize>> {
    multitoken_vision::link();
    let model = MultimodalModel::load(model_dir, &LoadOptions::default())
        .with_context(|| format!("loading {}", model_dir.display()))?;
    let base = dataset.parent().unwrap_or(Path::new("."));
    let text = std::fs::read_to_string(dataset)?;
    let mut rows = Vec::new();
    let mut lengths = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let row: multitoken_datasets::Row =
            serde_json::from_str(line).with_context(|| format!("{}:{}", dataset.display(), n + 1))?;
        let images: Vec<PathBuf> = row.images.iter().map(|p| base.join(p)).collect();
        let mut items = ItemsByKey::new();
        items.insert("images".to_string(), images.iter().cloned().map(Item::Path).collect());
        let messages: Vec<Message> =
            row.messages.iter().map(|m| Message { role: m.role.clone(), content: m.content.clone() }).collect();
        let prepared = model
            .chat_preparer()
            .prepare_training(&messages, &items)
            .with_context(|| format!("preparing row {}", row.id))?;
        lengths.push(prepared.len());
        rows.push(json!({
            "id": row.id,
            "input_ids": prepared.input_ids,
            "labels": prepared.labels,
            "spans": prepared.spans.iter().map(|s| [s.start, s.len]).collect::<Vec<_>>(),
            "images": images.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
        }));
    }
    std::fs::write(out, serde_json::to_string(&rows)?)?;
    Ok(lengths)
}

/// Runs our trainer, timing each step by the arrival of its `metrics.jsonl` line and
/// reading its peak RSS from `/proc`.
fn run_ours(cmd: &mut Command, metrics: &Path, log: &Path) -> Result<Value> {
    let log_file = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let started = Instant::now();
    let mut child = cmd
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .spawn()
        .with_context(|| format!("running {cmd:?}"))?;
    let status_file = PathBuf::from(format!("/proc/{}/status", child.id()));
    let mut arrivals: Vec<f64> = Vec::new();
    let mut peak = 0f64;
    let status = loop {
        if let Some(kb) = std::fs::read_to_string(&status_file).ok().as_deref().and_then(vm_hwm_kb) {
            peak = peak.max(kb * 1024.0);
        }
        let lines = std::fs::read_to_string(metrics).map(|t| t.lines().count()).unwrap_or(0);
        while arrivals.len() < lines {
            arrivals.push(started.elapsed().as_secs_f64());
        }
        if let Some(status) = child.try_wait()? {
            break status;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    if !status.success() {
        let output = std::fs::read_to_string(log).unwrap_or_default();
        bail!("{cmd:?} failed ({status}):\n{output}");
    }
    let text = std::fs::read_to_string(metrics).with_context(|| format!("reading {}", metrics.display()))?;
    let logs: Vec<Value> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let step_s: Vec<f64> = arrivals.windows(2).map(|w| w[1] - w[0]).collect();
    Ok(json!({
        "impl": "ours",
        "first_step_at_s": arrivals.first(),
        "total_s": started.elapsed().as_secs_f64(),
        "step_s": step_s,
        "loss": logs.iter().map(|l| l.get("loss").cloned().unwrap_or(Value::Null)).collect::<Vec<_>>(),
        "peak_rss_bytes": peak,
    }))
}

fn vm_hwm_kb(status: &str) -> Option<f64> {
    status.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()
}

/// The 1-minute load average.
fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|t| t.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(f64::NAN)
}

/// The fastest of steps 2..N (on a shared machine the least disturbed one, as the
/// other benches report the best of their repeats): ours' gaps already start at
/// step 2, PyTorch's list includes step 1.
fn step_time(v: &Value, skip_first: bool) -> f64 {
    let steps: Vec<f64> = v
        .get("step_s")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default();
    steps.into_iter().skip(usize::from(skip_first)).filter(|x| x.is_finite()).reduce(f64::min).unwrap_or(f64::NAN)
}

fn rss(v: &Value) -> f64 {
    v.get("peak_rss_bytes").and_then(Value::as_f64).unwrap_or(f64::NAN)
}

fn report(s: &Settings, lengths: &[usize], results: &[(String, Value, Option<Value>)], before: f64, after: f64) {
    let (min, max) = (lengths.iter().min().copied().unwrap_or(0), lengths.iter().max().copied().unwrap_or(0));
    let loaded = if before.max(after) > 2.0 { "  (loaded: figures are noisy)" } else { "" };
    println!();
    println!(
        "SmolLM2-135M f32 + frozen CLIP ViT-B/32 (random) + mlp2x_gelu, batch {}, rows of {min}-{max} tokens, {} threads, best of steps 2..{}",
        s.batch, s.threads, s.steps
    );
    println!("load average {before:.2} before, {after:.2} after{loaded}");
    println!();
    println!(
        "{:<11} {:>11} {:>11} {:>13} {:>10} {:>10} {:>12}",
        "step", "ours s", "pytorch s", "speed ours/pt", "ours RSS", "pt RSS", "mem ours/pt"
    );
    for (stage, ours, reference) in results {
        let name = if stage == "lora" { "lora r64" } else { "projectors" };
        let o = step_time(ours, false);
        let (p, pr) = reference.as_ref().map(|r| (step_time(r, true), rss(r))).unwrap_or((f64::NAN, f64::NAN));
        println!(
            "{:<11} {:>11.3} {:>11.3} {:>12.2}x {:>8.0}MB {:>8.0}MB {:>11.2}x",
            name,
            o,
            p,
            p / o,
            rss(ours) / 1e6,
            pr / 1e6,
            rss(ours) / pr
        );
    }
    println!("(goal: speed >= 1.0x, memory <= 1.0x; speed = pytorch step time / ours)");
    println!();
    let all: Vec<Value> = results
        .iter()
        .map(|(stage, ours, reference)| json!({"stage": stage, "ours": ours, "pytorch": reference}))
        .collect();
    println!(
        "{}",
        json!({"threads": s.threads, "batch": s.batch, "steps": s.steps, "row_tokens": [min, max], "loadavg": [before, after], "results": all})
    );
}

fn run_status(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status}); it needs the dev venv (torch, transformers, peft, pillow)");
    }
    Ok(())
}
