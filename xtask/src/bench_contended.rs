//! `cargo xtask bench lm --contended`: speed with one core taken by another process.
//!
//! ```text
//! cargo xtask bench lm --contended [--threads 2] [--prefill 128] [--decode 64] [--repeat 5]
//!                                  [--no-build] [--busy-cpu N]
//! ```
//!
//! Four workloads, each measured in a child process of its own (the release build of
//! this program), with `--threads` threads (default 2, the issue's setting):
//!
//! - `decode` and `prefill`: SmolLM2-135M-Instruct Q4_1 through
//!   `multitoken_lm::generate`, as `bench lm`'s `ours q4_1` (one pass after a warm-up);
//! - `tower`: a CLIP ViT-B/32-size tower (random weights) forward on a batch of 8;
//! - `train`: a training step of one SmolLM2-sized MLP block on 512 rows with LoRA
//!   (RMS norm, gate/up/down LoRA linears, SiLU gate, backward, gradients of A and B),
//!   the fused training kernels and candle's autograd.
//!
//! Each is measured idle and beside a busy process (a spinning child, `bench
//! busy-child`; pinned to CPU `--busy-cpu` with `taskset` when given), the two in
//! alternating order over `--repeat` rounds, and as the binaries run now (our
//! kernels on `multitoken_kernels::pool`, candle's barrier pool sized to one thread:
//! `CANDLE_NUM_THREADS=1`) and as they ran before (`MULTITOKEN_POOL=candle`,
//! `CANDLE_NUM_THREADS` = `--threads`: everything on candle's barrier pool).
//! The report gives the median (and range) of each, contended / idle (goal >= 0.45)
//! and ours / candle's pool idle (goal: no loss beyond 3 %). The load average is
//! printed with the figures: the machine may be shared.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use serde_json::{json, Value};

use crate::bench::last_json_line;

/// The workloads, in report order: name, JSON key of the child's figure, unit.
const WORKLOADS: [(&str, &str, &str); 4] = [
    ("decode", "decode_tok_s", "tok/s"),
    ("prefill", "prefill_tok_s", "tok/s"),
    ("tower", "images_per_s", "img/s"),
    ("train", "steps_per_s", "step/s"),
];

/// One series of measurements: (workload, pool, contended).
type Key = (&'static str, &'static str, bool);

/// Settings of `bench lm --contended`.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub threads: usize,
    pub prefill: usize,
    pub decode: usize,
    pub repeat: usize,
    pub busy_cpu: Option<usize>,
}

/// The busy process: killed when dropped.
struct Busy(Child);

impl Busy {
    fn start(exe: &Path, cpu: Option<usize>) -> Result<Self> {
        let mut cmd = match cpu {
            Some(cpu) => {
                let mut c = Command::new("taskset");
                c.args(["-c", &cpu.to_string()]).arg(exe);
                c
            }
            None => Command::new(exe),
        };
        cmd.args(["bench", "busy-child"]).stdin(Stdio::null()).stdout(Stdio::null());
        let child = cmd.spawn().with_context(|| format!("starting the busy process {cmd:?}"))?;
        // Let it get going (and, pinned, settle on its CPU) before measuring.
        std::thread::sleep(Duration::from_millis(200));
        Ok(Self(child))
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `bench busy-child`: one thread spinning on arithmetic until killed.
pub(crate) fn busy_child() -> Result<()> {
    let mut x = 1u64;
    loop {
        for _ in 0..1_000_000 {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407));
        }
    }
}

/// The 1-minute load average, to print beside the figures.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

/// Runs the comparison and prints the report; `exe` is the release build of this program,
/// `gguf` and `prompt_file` what `bench lm` prepared.
pub(crate) fn run(s: &Settings, exe: &Path, gguf: &Path, prompt_file: &Path) -> Result<()> {
    let threads = s.threads.to_string();
    let load_before = loadavg();
    let measure = |workload: &str, pool: &str| -> Result<Value> {
        let mut cmd = Command::new(exe);
        match workload {
            "decode" | "prefill" => {
                cmd.args(["bench", "lm-child", "--mode", "q4_1", "--gguf"]).arg(gguf).arg("--prompt-ids").arg(prompt_file);
                cmd.args(["--decode", &s.decode.to_string(), "--repeat", "1"]);
            }
            other => {
                cmd.args(["bench", "contended-child", other]);
            }
        }
        cmd.env("RAYON_NUM_THREADS", &threads).env("MULTITOKEN_POOL", pool);
        if pool == "candle" {
            // Before: candle's barrier pool sized as RAYON_NUM_THREADS, our kernels on it.
            cmd.env("CANDLE_NUM_THREADS", &threads);
        }
        last_json_line(&mut cmd)
    };
    // (key, figures of every round), key = (workload, pool, contended).
    let mut results: Vec<(Key, Vec<f64>)> = Vec::new();
    let mut push = |key: Key, v: f64| match results.iter_mut().find(|(k, _)| *k == key) {
        Some((_, vs)) => vs.push(v),
        None => results.push((key, vec![v])),
    };
    let start = Instant::now();
    for round in 0..s.repeat {
        for pool in ["ours", "candle"] {
            // Idle first on even rounds, contended first on odd ones.
            for contended in [round % 2 == 1, round % 2 == 0] {
                let busy = if contended { Some(Busy::start(exe, s.busy_cpu)?) } else { None };
                for (workload, key, _) in WORKLOADS {
                    // lm-child measures prefill and decode in one run.
                    if workload == "prefill" {
                        continue;
                    }
                    eprintln!(
                        "round {}/{}: {workload}, {pool} pool, {} ...",
                        round + 1,
                        s.repeat,
                        if contended { "contended" } else { "idle" }
                    );
                    let v = measure(workload, pool)?;
                    let figure = |key: &str| v.get(key).and_then(Value::as_f64).with_context(|| format!("no {key} in {v}"));
                    push((workload, pool, contended), figure(key)?);
                    if workload == "decode" {
                        push(("prefill", pool, contended), figure("prefill_tok_s")?);
                    }
                }
                drop(busy);
            }
        }
    }
    let median_of = |key: (&str, &str, bool)| -> (f64, f64, f64) {
        let mut vs = results.iter().find(|(k, _)| *k == key).map(|(_, v)| v.clone()).unwrap_or_default();
        vs.sort_by(f64::total_cmp);
        match vs.len() {
            0 => (f64::NAN, f64::NAN, f64::NAN),
            n => (vs[n / 2], vs[0], vs[n - 1]),
        }
    };
    println!();
    println!(
        "{} threads, one busy process{} beside the contended runs; median (min-max) of {} rounds; \
         load average {} before, {} after ({:.0} s)",
        s.threads,
        s.busy_cpu.map(|c| format!(" pinned to CPU {c}")).unwrap_or_default(),
        s.repeat,
        load_before,
        loadavg(),
        start.elapsed().as_secs_f64()
    );
    println!(
        "decode: SmolLM2-135M Q4_1, {} tokens after a {}-token prompt; tower: CLIP ViT-B/32, batch 8; \
         train: LoRA step of a SmolLM2 MLP block, 512 rows",
        s.decode, s.prefill
    );
    println!(
        "{:<9} {:<7} {:>22} {:>22} {:>11} {:>13}",
        "", "pool", "idle", "contended", "cont/idle", "idle vs cndl"
    );
    let mut summary = Vec::new();
    for (workload, _, unit) in WORKLOADS {
        for pool in ["ours", "candle"] {
            let (idle, idle_lo, idle_hi) = median_of((workload, pool, false));
            let (cont, cont_lo, cont_hi) = median_of((workload, pool, true));
            let (candle_idle, _, _) = median_of((workload, "candle", false));
            let versus = if pool == "ours" { format!("{:+.1}%", (idle / candle_idle - 1.0) * 100.0) } else { String::new() };
            println!(
                "{:<9} {:<7} {:>22} {:>22} {:>10.2}x {:>13}",
                workload,
                pool,
                format!("{idle:.1} ({idle_lo:.1}-{idle_hi:.1}) {unit}"),
                format!("{cont:.1} ({cont_lo:.1}-{cont_hi:.1})"),
                cont / idle,
                versus
            );
            summary.push(json!({
                "workload": workload, "pool": pool, "unit": unit,
                "idle_median": idle, "contended_median": cont, "contended_over_idle": cont / idle,
                "idle": results.iter().find(|(k, _)| *k == (workload, pool, false)).map(|(_, v)| v.clone()),
                "contended": results.iter().find(|(k, _)| *k == (workload, pool, true)).map(|(_, v)| v.clone()),
            }));
        }
    }
    println!("goals: ours contended / idle >= 0.45; ours idle no more than 3% below candle's pool idle");
    println!();
    println!("{}", json!({"threads": s.threads, "busy_cpu": s.busy_cpu, "results": summary}));
    Ok(())
}

/// `bench contended-child tower|train`: one measurement after a warm-up, as JSON.
pub(crate) fn child(args: &[String]) -> Result<()> {
    let value = match args.first().map(String::as_str) {
        Some("tower") => json!({"images_per_s": 8.0 / tower_pass()?}),
        Some("train") => json!({"steps_per_s": 1.0 / train_step()?}),
        other => bail!("contended-child: unknown workload {other:?} (tower or train)"),
    };
    println!("{value}");
    Ok(())
}

/// Seconds of one CLIP ViT-B/32 forward on a batch of 8, after a warm-up.
fn tower_pass() -> Result<f64> {
    use candle_nn::VarBuilder;
    use multitoken_vision::{ClipVisionConfig, ClipVisionTower};
    let config: ClipVisionConfig = serde_json::from_value(json!({
        "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
        "image_size": 224, "patch_size": 32
    }))?;
    // Random weights: the time does not depend on the values.
    let weights = random_weights(&config)?;
    let tower = ClipVisionTower::load(&config, VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu))?;
    let pixels = Tensor::randn(0f32, 1.0, (8, 3, 224, 224), &Device::Cpu)?;
    std::hint::black_box(tower.forward(&pixels, None)?);
    let start = Instant::now();
    std::hint::black_box(tower.forward(&pixels, None)?);
    Ok(start.elapsed().as_secs_f64())
}

/// Random weights for a CLIP tower, detached so that inference tracks no graph.
fn random_weights(config: &multitoken_vision::ClipVisionConfig) -> Result<std::collections::HashMap<String, Tensor>> {
    let map = candle_nn::VarMap::new();
    multitoken_vision::ClipVisionTower::load(config, candle_nn::VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu))?;
    let vars = map.data().lock().map_err(|_| anyhow::anyhow!("the VarMap lock is poisoned"))?;
    Ok(vars.iter().map(|(name, var)| (name.clone(), var.as_tensor().detach())).collect())
}

/// Seconds of one LoRA training step of a SmolLM2-135M MLP block (hidden 576,
/// intermediate 1536, r 64) on 512 rows, after a warm-up step.
fn train_step() -> Result<f64> {
    use multitoken_kernels::train::{lora_linear, rms_norm, silu_mul};
    let (rows, hidden, inter, r) = (512usize, 576usize, 1536usize, 64usize);
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (rows, hidden), &dev)?;
    let norm = Tensor::ones(hidden, DType::F32, &dev)?;
    let frozen = |o: usize, i: usize| Tensor::randn(0f32, 0.05, (o, i), &dev);
    let (w_gate, w_up, w_down) = (frozen(inter, hidden)?, frozen(inter, hidden)?, frozen(hidden, inter)?);
    let lora = |o: usize, i: usize| -> Result<(Var, Var)> {
        Ok((Var::from_tensor(&Tensor::randn(0f32, 0.02, (r, i), &dev)?)?, Var::from_tensor(&Tensor::randn(0f32, 0.02, (o, r), &dev)?)?))
    };
    let (gate, up, down) = (lora(inter, hidden)?, lora(inter, hidden)?, lora(hidden, inter)?);
    let step = || -> Result<()> {
        let h = rms_norm(&x, &norm, 1e-5)?;
        let g = lora_linear(&h, &w_gate, None, gate.0.as_tensor(), gate.1.as_tensor(), 0.25, None)?;
        let u = lora_linear(&h, &w_up, None, up.0.as_tensor(), up.1.as_tensor(), 0.25, None)?;
        let m = silu_mul(&g, &u)?;
        let y = lora_linear(&m, &w_down, None, down.0.as_tensor(), down.1.as_tensor(), 0.25, None)?;
        let loss = (y + &x)?.sqr()?.mean_all()?;
        let grads = loss.backward()?;
        for (a, b) in [&gate, &up, &down] {
            for var in [a, b] {
                std::hint::black_box(grads.get(var.as_tensor()).context("a LoRA matrix got no gradient")?);
            }
        }
        Ok(())
    };
    step()?;
    let start = Instant::now();
    step()?;
    Ok(start.elapsed().as_secs_f64())
}
