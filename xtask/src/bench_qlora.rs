//! `cargo xtask bench train --qlora`: a LoRA r16 training step over an f32, a
//! Q8_0 and a Q4_1 frozen base, on SmolLM2-135M and on a random-weight model of
//! Phi-2's sizes (2.7B), each in a child process of its own so that its peak RSS
//! is its own.
//!
//! ```text
//! cargo xtask bench train --qlora [--models smollm2,phi2] [--bases f32,q8_0,q4_1]
//!                                 [--tokens 256] [--steps 3] [--no-build]
//! ```
//!
//! A base written `q4_1+ckpt` (any base) runs the same step with gradient
//! checkpointing (`CausalLm::set_gradient_checkpointing`: each layer recomputed in
//! the backward pass, one tensor a layer kept): `--bases f32,q4_1,q4_1+ckpt`.
//!
//! - SmolLM2-135M: `cargo xtask weights`' Q4_1 GGUF. The Q4_1 base is the file's own
//!   blocks; the f32 base is the file dequantized; the Q8_0 base is that f32
//!   model quantized at load (`QuantizingSource`, as `--quantize q8_0` does).
//! - Phi-2 size (hidden 2560, MLP 10240, 32 layers, vocab 51200, partial rotary
//!   0.4, biases): seeded random weights generated one matrix at a time and, for a
//!   quantized base, quantized straight away, so the f32 model never exists.
//!   The f32 run needs about 11 GB for its weights and ~6 GB for the step's
//!   activations and gradients; it is skipped (and says so, with the estimate)
//!   when `MemAvailable` is under 1.3x that.
//!
//! A step is forward (batch 1 x `--tokens` random ids), cross-entropy, backward
//! and an SGD update of the LoRA vars (r 16, alpha 32, every decoder linear, no
//! dropout); the table shows the fastest of steps 2..N and the process's peak
//! RSS (`VmHWM`) after the last step. The load average is printed: the machine
//! may be shared.

use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Tensor, Var};
use multitoken_core::{KvCache, LanguageModel, LogitsSelection};
use multitoken_lm::gguf::{GgufSource, GgufWeights};
use multitoken_lm::loader::LoadOptions;
use multitoken_lm::lora::{LoraDropout, LoraLayer};
use multitoken_lm::model::CausalLm;
use multitoken_lm::quantize::{quantize_matrix, Quantization, QuantizingSource};
use multitoken_lm::{Activation, Family, Linear, ModelConfig, RopeStyle, WeightSource};
use serde_json::{json, Value};

use crate::bench_vision::proc_status_bytes;
use crate::weights::cache_dir;

/// LoRA rank of the benchmark.
const RANK: usize = 16;

/// Runs the parent: one child per (model, base), then the table.
pub fn run(args: &[String]) -> Result<()> {
    let mut models = vec!["smollm2".to_string(), "phi2".to_string()];
    let mut bases = vec!["f32".to_string(), "q8_0".to_string(), "q4_1".to_string()];
    let mut tokens = 256usize;
    let mut steps = 3usize;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .cloned()
                .with_context(|| format!("{name} needs a value"))
        };
        match arg.as_str() {
            "--qlora" | "--no-build" => {}
            "--models" => models = value("--models")?.split(',').map(String::from).collect(),
            "--bases" => bases = value("--bases")?.split(',').map(String::from).collect(),
            "--tokens" => tokens = value("--tokens")?.parse()?,
            "--steps" => steps = value("--steps")?.parse()?,
            other => bail!("unknown argument {other:?} for `bench train --qlora`"),
        }
    }
    if steps < 2 {
        bail!("--steps must be at least 2 (step 1 is a warm-up)");
    }
    let exe = std::env::current_exe()?;
    let mut rows = Vec::new();
    for model in &models {
        for base in &bases {
            if model == "phi2" && base == "f32" {
                let need = phi2_f32_bytes();
                let available = mem_available().unwrap_or(0.0);
                if available < 1.3 * need {
                    println!(
                        "phi2 f32: skipped, needs ~{:.1} GB (weights, activations, gradients), {:.1} GB available",
                        need / 1e9,
                        available / 1e9
                    );
                    rows.push(
                        json!({"model": model, "base": base, "skipped": true, "need_bytes": need}),
                    );
                    continue;
                }
            }
            let out = Command::new(&exe)
                .args([
                    "bench",
                    "qlora-child",
                    model,
                    base,
                    &tokens.to_string(),
                    &steps.to_string(),
                ])
                .output()
                .with_context(|| format!("running the {model} {base} child"))?;
            let text = String::from_utf8_lossy(&out.stdout);
            let line = text.lines().rev().find(|l| l.starts_with('{'));
            match line.map(serde_json::from_str::<Value>) {
                Some(Ok(v)) if out.status.success() => {
                    println!("{v}");
                    rows.push(v);
                }
                _ => {
                    println!(
                        "{model} {base}: failed: {}",
                        String::from_utf8_lossy(&out.stderr)
                            .lines()
                            .last()
                            .unwrap_or("")
                    );
                    rows.push(json!({"model": model, "base": base, "failed": true}));
                }
            }
        }
    }
    println!(
        "\nload average: {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    println!("| model | base | step (best of 2..{steps}) | peak RSS | step / f32 | RSS / f32 |");
    println!("|---|---|---|---|---|---|");
    for row in &rows {
        let model = row["model"].as_str().unwrap_or("");
        let f32_row = rows
            .iter()
            .find(|r| r["model"] == model && r["base"] == "f32" && r["step_s"].is_number());
        let ratio = |key: &str| match (row[key].as_f64(), f32_row.and_then(|r| r[key].as_f64())) {
            (Some(a), Some(b)) => format!("{:.2}", a / b),
            _ => "-".into(),
        };
        let step = row["step_s"]
            .as_f64()
            .map_or("skipped".to_string(), |s| format!("{s:.3} s"));
        let rss = row["peak_rss_bytes"]
            .as_f64()
            .map_or("-".to_string(), |b| format!("{:.2} GB", b / 1e9));
        println!(
            "| {model} | {} | {step} | {rss} | {} | {} |",
            row["base"].as_str().unwrap_or(""),
            ratio("step_s"),
            ratio("peak_rss_bytes")
        );
    }
    Ok(())
}

/// The child: builds one model, times its steps, prints one JSON line.
pub fn child(args: &[String]) -> Result<()> {
    let [model, base, tokens, steps] = args else {
        bail!("qlora-child MODEL BASE TOKENS STEPS")
    };
    let tokens: usize = tokens.parse()?;
    let steps: usize = steps.parse()?;
    let (format_name, checkpointing) = match base.strip_suffix("+ckpt") {
        Some(name) => (name, true),
        None => (base.as_str(), false),
    };
    let format = match format_name {
        "f32" => None,
        other => Some(other.parse::<Quantization>()?),
    };
    let start = Instant::now();
    let mut lm = match model.as_str() {
        "smollm2" => smollm2(format)?,
        "phi2" => random_model(&phi2_config(), format)?,
        other => bail!("unknown model {other:?} (smollm2, phi2)"),
    };
    let load_s = start.elapsed().as_secs_f64();
    // What the model itself holds, before any step.
    let rss_after_load = proc_status_bytes("VmRSS:");
    let peak_after_load = proc_status_bytes("VmHWM:");
    let vars = attach_lora(&mut lm)?;
    lm.set_gradient_checkpointing(checkpointing);
    let vocab = lm.config().vocab_size as u32;
    let ids: Vec<u32> = (0..tokens as u32)
        .map(|i| (i * 7919 + 13) % vocab)
        .collect();
    let mut times = Vec::new();
    let mut losses = Vec::new();
    let mut phases = Vec::new();
    for k in 0..steps {
        let t = Instant::now();
        losses.push(step(&lm, &ids, &vars, &mut phases, k + 1)?);
        times.push(t.elapsed().as_secs_f64());
    }
    // The phases reset `VmHWM`, so the process's peak is the largest of theirs
    // (and of the load's); `VmHWM` now covers only the last phase.
    let peak = phases
        .iter()
        .map(|(_, v)| *v)
        .chain(peak_after_load)
        .chain(proc_status_bytes("VmHWM:"))
        .fold(f64::NAN, f64::max);
    let phase_peaks: serde_json::Map<String, Value> = phases.into_iter().map(|(k, v)| (k, json!(v))).collect();
    let best = times[1..].iter().copied().fold(f64::INFINITY, f64::min);
    let line = json!({
        "model": model, "base": base, "tokens": tokens, "rank": RANK,
        "load_s": load_s, "step_s": best, "step_times_s": times, "losses": losses,
        "peak_rss_bytes": peak,
        "rss_after_load_bytes": rss_after_load, "peak_rss_after_load_bytes": peak_after_load,
        "phase_rss_bytes": phase_peaks,
    });
    println!("{line}");
    Ok(())
}

/// One forward + backward + SGD step; returns the loss. `phases` gets each
/// phase's peak RSS and the RSS at its end (the peak is reset between
/// phases), keyed `step{k}.{phase}.peak|end`: where a step's memory goes.
fn step(lm: &CausalLm, ids: &[u32], vars: &[Var], phases: &mut Vec<(String, f64)>, k: usize) -> Result<f32> {
    let mut phase = |name: &str| {
        phases.push((format!("step{k}.{name}.peak"), proc_status_bytes("VmHWM:").unwrap_or(f64::NAN)));
        phases.push((format!("step{k}.{name}.end"), proc_status_bytes("VmRSS:").unwrap_or(f64::NAN)));
        crate::bench_vision::reset_peak_rss();
    };
    crate::bench_vision::reset_peak_rss();
    let n = ids.len();
    let input = Tensor::new(ids, &Device::Cpu)?.unsqueeze(0)?;
    let embeds = lm.embed_tokens(&input)?;
    let mut cache = KvCache::new(lm.num_layers());
    let logits = lm.forward_embeds(&embeds, None, &mut cache, LogitsSelection::All)?;
    phase("forward");
    let logits = logits.reshape((n, ()))?.narrow(0, 0, n - 1)?;
    let targets = Tensor::new(&ids[1..], &Device::Cpu)?;
    let loss = candle_nn::loss::cross_entropy(&logits, &targets)?;
    phase("loss");
    let grads = loss.backward()?;
    phase("backward");
    for var in vars {
        // With checkpointing the adapters' gradients come from the side store.
        let side = multitoken_lm::model::checkpoint::take_grad(var.as_tensor());
        if let Some(g) = grads.get(var.as_tensor()).or(side.as_ref()) {
            var.set(&(var.as_tensor() - (g * 1e-4)?)?)?;
        }
    }
    drop(grads);
    phase("update");
    Ok(loss.to_scalar::<f32>()?)
}

/// LoRA r16 on every decoder linear: `A` small random, `B` zero.
fn attach_lora(lm: &mut CausalLm) -> Result<Vec<Var>> {
    let mut vars = Vec::new();
    let rng = LoraDropout::new(0);
    for (k, (_, linear)) in lm.decoder_linears_mut().into_iter().enumerate() {
        let a = Var::from_tensor(&seeded(&[RANK, linear.in_dim()], k as u64, 0.01)?)?;
        let b = Var::from_tensor(&Tensor::zeros(
            (linear.out_dim(), RANK),
            DType::F32,
            &Device::Cpu,
        )?)?;
        linear.set_lora(Some(LoraLayer {
            a: a.as_tensor().clone(),
            b: b.as_tensor().clone(),
            scale: 2.0,
            dropout: 0.0,
            rng: rng.clone(),
        }))?;
        vars.push(a);
        vars.push(b);
    }
    Ok(vars)
}

fn smollm2(format: Option<Quantization>) -> Result<CausalLm> {
    let path = cache_dir()?.join("smollm2").join(crate::bench_train::GGUF);
    if !path.is_file() {
        bail!(
            "{} not found; run `cargo xtask weights --only smollm2`",
            path.display()
        );
    }
    let opts = LoadOptions::default();
    Ok(match format {
        Some(Quantization::Q4_1) => {
            let source =
                GgufSource::open(&path, &opts, GgufWeights::Quantized)?.with_transformers_rows();
            CausalLm::load(&source.config()?, &source)?
        }
        Some(format) => {
            let source =
                GgufSource::open(&path, &opts, GgufWeights::Dequantized)?.with_transformers_rows();
            CausalLm::load(&source.config()?, &QuantizingSource::new(&source, format))?
        }
        None => {
            let source =
                GgufSource::open(&path, &opts, GgufWeights::Dequantized)?.with_transformers_rows();
            CausalLm::load(&source.config()?, &source)?
        }
    })
}

/// Phi-2's sizes (microsoft/phi-2 `config.json`).
fn phi2_config() -> ModelConfig {
    ModelConfig {
        family: Family::Phi2,
        vocab_size: 51200,
        hidden_size: 2560,
        intermediate_size: 10240,
        num_layers: 32,
        num_heads: 32,
        num_kv_heads: 32,
        head_dim: 80,
        max_position_embeddings: 2048,
        rope_theta: 10_000.0,
        rope_scaling: None,
        rope_style: RopeStyle::Half,
        partial_rotary_factor: 0.4,
        norm_eps: 1e-5,
        hidden_act: Activation::GeluTanh,
        qkv_bias: true,
        o_bias: true,
        mlp_bias: true,
        sliding_window: None,
        tie_word_embeddings: false,
        mrope_section: None,
    }
}

/// What the f32 Phi-2-size run needs: 2.78e9 weights in f32, plus the step's
/// activations and their gradients at 1 x 256 tokens (candle keeps every node's
/// gradient until the backward pass ends), measured as the Q4_1 run's peak RSS
/// (8.2 GB) less its weights and embeddings (~2.3 GB): about 6 GB.
fn phi2_f32_bytes() -> f64 {
    2.78e9 * 4.0 + 6e9
}

fn mem_available() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<f64>().ok()? * 1024.0)
}

fn random_model(cfg: &ModelConfig, format: Option<Quantization>) -> Result<CausalLm> {
    Ok(CausalLm::load(cfg, &RandomSource { format })?)
}

/// Seeded uniform values in ±`scale` (an LCG: fast, and the same on every run).
fn seeded(dims: &[usize], seed: u64, scale: f32) -> Result<Tensor> {
    let n: usize = dims.iter().product();
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let values: Vec<f32> = (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect();
    Ok(Tensor::from_vec(values, dims, &Device::Cpu)?)
}

/// Random weights by name, linears quantized as they are made.
struct RandomSource {
    format: Option<Quantization>,
}

fn name_seed(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

impl WeightSource for RandomSource {
    fn describe(&self) -> String {
        "random Phi-2-size weights".into()
    }

    fn contains(&self, name: &str) -> bool {
        !name.starts_with("lm_head") || name == "lm_head.weight"
    }

    fn tensor(&self, name: &str, shape: &[usize]) -> multitoken_lm::Result<Tensor> {
        if name.contains("layernorm") && name.ends_with(".weight") {
            return Ok(Tensor::ones(shape, DType::F32, &Device::Cpu)?);
        }
        seeded(shape, name_seed(name), 0.02).map_err(|e| multitoken_lm::Error::Msg(e.to_string()))
    }

    fn linear(
        &self,
        prefix: &str,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
    ) -> multitoken_lm::Result<Linear> {
        let name = format!("{prefix}.weight");
        let scale = 1.0 / (in_dim as f32).sqrt();
        let w = seeded(&[out_dim, in_dim], name_seed(&name), scale)
            .map_err(|e| multitoken_lm::Error::Msg(e.to_string()))?;
        let b = if bias {
            Some(Tensor::zeros(out_dim, DType::F32, &Device::Cpu)?)
        } else {
            None
        };
        match self.format {
            None => Linear::dense(w, b),
            Some(format) => {
                let q: QMatMul = quantize_matrix(&name, &w, format)?;
                drop(w);
                Ok(Linear::quantized(q, in_dim, out_dim, b))
            }
        }
    }
}
