//! `cargo xtask bench moe [--decode N] [--repeat N] [--layers N] [--dir DIR]`:
//! decode speed of a 4-expert, k = 1 mixture (issue 9's bench).
//!
//! Builds a random SmolLM2-135M-shaped llama (hidden 576, MLP 1536, 30 layers,
//! 9/3 heads, vocab 49152, f32) as the base, three experts whose MLPs are the
//! base's perturbed, and the MoE of base + 3 experts with `multitoken moe
//! build`'s code. Then times greedy decode (one token per step after a
//! 16-token prefill) for: the dense base model, the MoE with sparse dispatch
//! (only the selected expert runs) and with dense dispatch (every expert runs,
//! as Cephalo's layer does). Goals: sparse ≥ 2.5× faster than dense dispatch,
//! and ≤ 1.3× the base's time per token.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use multitoken_core::{KvCache, LogitsSelection};
use multitoken_lm::hf::parse_config;
use multitoken_lm::loader::LoadOptions;
use multitoken_lm::model::CausalLm;
use multitoken_lm::weights::SafetensorsSource;
use multitoken_moe::build::{build, BuildConfig};
use multitoken_moe::load::load_moe_lm;
use multitoken_moe::{Dispatch, Routing};

/// Run this benchmark.
pub fn run(args: &[String]) -> Result<()> {
    let mut decode = 32usize;
    let mut repeat = 3usize;
    let mut layers = 30usize;
    let mut dir = PathBuf::from("target/bench-moe");
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--decode" => decode = value()?.parse()?,
            "--repeat" => repeat = value()?.parse()?,
            "--layers" => layers = value()?.parse()?,
            "--dir" => dir = PathBuf::from(value()?),
            other => anyhow::bail!("unknown option {other}; usage: cargo xtask bench moe [--decode N] [--repeat N] [--layers N] [--dir DIR]"),
        }
    }
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "all".into());
    println!("bench moe: SmolLM2-135M-shaped random llama, {layers} layers, f32 CPU, threads {threads}; 4 experts, k = 1");
    let _ = std::fs::remove_dir_all(&dir);
    let base = dir.join("base");
    write_random_model(&base, layers)?;
    let mut experts = vec![base.clone()];
    for j in 1..4 {
        let e = dir.join(format!("expert{j}"));
        write_perturbed_mlps(&base, &e, layers, j as u64)?;
        experts.push(e);
    }
    let moe_dir = dir.join("moe");
    let t = Instant::now();
    build(&BuildConfig {
        base: base.clone(),
        experts,
        k: 1,
        routing: Routing::Cephalo,
        out: moe_dir.clone(),
        seed: 1,
        quantize: None,
    })?;
    println!("built the MoE in {:.1} s", t.elapsed().as_secs_f64());

    let opts = LoadOptions::default();
    let cfg = parse_config(&base.join("config.json"))?;
    let base_model = CausalLm::load(
        &cfg.model,
        &SafetensorsSource::from_dir(&base, DType::F32, &Device::Cpu)?,
    )?;
    let sparse = load_moe_lm(&moe_dir, &opts, Dispatch::Sparse)?.model;
    let dense = load_moe_lm(&moe_dir, &opts, Dispatch::Dense)?.model;

    let mut results = Vec::new();
    for (name, model) in [
        ("base (dense LM)", &base_model),
        ("MoE sparse dispatch", &sparse),
        ("MoE all experts", &dense),
    ] {
        let mut best = f64::INFINITY;
        for _ in 0..repeat {
            best = best.min(decode_ms_per_token(model, decode)?);
        }
        println!(
            "{name:<22} {best:8.2} ms/token  {:8.1} tokens/s",
            1000.0 / best
        );
        results.push(best);
    }
    let (b, s, d) = (results[0], results[1], results[2]);
    println!("sparse vs all experts: {:.2}x faster (goal >= 2.5x)", d / s);
    println!(
        "sparse vs base:        {:.2}x the base's time (goal <= 1.3x)",
        s / b
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Best-case ms per decoded token: 16-token prefill, then `n` one-token steps.
fn decode_ms_per_token(model: &CausalLm, n: usize) -> Result<f64> {
    let dev = Device::Cpu;
    let prompt: Vec<u32> = (0..16u32).map(|i| 100 + 37 * i).collect();
    let mut cache = KvCache::default();
    let logits = model.forward_ids(
        &Tensor::new(prompt.as_slice(), &dev)?.unsqueeze(0)?,
        None,
        &mut cache,
        LogitsSelection::Last,
    )?;
    let mut next = logits.argmax(candle_core::D::Minus1)?.to_vec1::<u32>()?[0];
    let start = Instant::now();
    for _ in 0..n {
        let ids = Tensor::new(&[next], &dev)?.unsqueeze(0)?;
        let logits = model.forward_ids(&ids, None, &mut cache, LogitsSelection::Last)?;
        next = logits.argmax(candle_core::D::Minus1)?.to_vec1::<u32>()?[0];
    }
    Ok(start.elapsed().as_secs_f64() * 1000.0 / n as f64)
}

fn config_json(layers: usize) -> serde_json::Value {
    serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": layers, "num_attention_heads": 9, "num_key_value_heads": 3,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
        "hidden_act": "silu", "tie_word_embeddings": true, "bos_token_id": 1, "eos_token_id": 2
    })
}

fn randn(shape: &[usize], std: f64) -> Result<Tensor> {
    Ok(Tensor::randn(0f32, std as f32, shape, &Device::Cpu)?)
}

fn write_random_model(dir: &Path, layers: usize) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("config.json"), config_json(layers).to_string())?;
    let (h, i, v, kv) = (576, 1536, 49152, 192);
    let mut t = std::collections::HashMap::new();
    t.insert(
        "model.embed_tokens.weight".to_string(),
        randn(&[v, h], 0.02)?,
    );
    t.insert(
        "model.norm.weight".to_string(),
        Tensor::ones(h, DType::F32, &Device::Cpu)?,
    );
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        for (name, shape) in crate::demo_model::grow::llama_layer_matrices(h, i, kv) {
            t.insert(format!("{p}.{name}"), randn(&shape, 0.02)?);
        }
        t.insert(
            format!("{p}.input_layernorm.weight"),
            Tensor::ones(h, DType::F32, &Device::Cpu)?,
        );
        t.insert(
            format!("{p}.post_attention_layernorm.weight"),
            Tensor::ones(h, DType::F32, &Device::Cpu)?,
        );
    }
    candle_core::safetensors::save(&t, dir.join("model.safetensors"))?;
    Ok(())
}

/// An expert directory holding only MLP tensors: the base's plus noise.
fn write_perturbed_mlps(base: &Path, dir: &Path, layers: usize, _seed: u64) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("config.json"), config_json(layers).to_string())?;
    let src = SafetensorsSource::from_dir(base, DType::F32, &Device::Cpu)?;
    let mut t = std::collections::HashMap::new();
    for l in 0..layers {
        for m in ["gate_proj", "up_proj", "down_proj"] {
            let name = format!("model.layers.{l}.mlp.{m}.weight");
            let w = src.get(&name)?;
            let noise = w.randn_like(0.0, 0.01)?;
            t.insert(name, (w + noise)?);
        }
    }
    candle_core::safetensors::save(&t, dir.join("model.safetensors"))?;
    Ok(())
}
