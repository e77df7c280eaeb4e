//! `cargo xtask bench vision`: image preprocessing and the CLIP tower, ours
//! against transformers in one run.
//!
//! ```text
//! cargo xtask bench vision [--threads N] [--repeat 3] [--no-python]
//! ```
//!
//! Preprocessing: 64 seeded 640×480 JPEGs (written by `xtask/bench/vision.py`
//! under `target/bench/vision_jpegs`) decoded and preprocessed to 336 px
//! tensors (CLIPImageProcessor settings: shortest edge 336, bicubic, crop 336),
//! ours on `--threads` threads (default: every core) against
//! `CLIPImageProcessorPil` and the torchvision-backed `CLIPImageProcessor`.
//! Tower: a CLIP ViT-B/32-size `CLIPVisionModel` (random weights) forward with
//! every hidden state, batch 8, ours (candle) against transformers with the same
//! thread count. Each side reports the best of `--repeat` passes after a warm-up.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use multitoken_vision::{
    decode_bytes, ClipVisionConfig, ClipVisionTower, DecodeLimits, ImageProcessorConfig,
};
use serde_json::{json, Value};

use crate::bench::last_json_line;
use crate::weights::{python, workspace_root};

/// Run `bench vision`.
pub fn run(args: &[String]) -> Result<()> {
    let mut threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mut repeat = 3usize;
    let mut with_python = true;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut number = |name: &str| -> Result<usize> {
            let v = it
                .next()
                .with_context(|| format!("{name} needs a number"))?;
            v.parse()
                .with_context(|| format!("{name} {v}: not a number"))
        };
        match arg.as_str() {
            "--threads" => threads = number("--threads")?.max(1),
            "--repeat" => repeat = number("--repeat")?.max(1),
            "--no-python" => with_python = false,
            other => bail!("unknown argument `{other}`"),
        }
    }
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    let script = workspace_root()
        .join("xtask")
        .join("bench")
        .join("vision.py");
    let images_dir = workspace_root()
        .join("target")
        .join("bench")
        .join("vision_jpegs");
    let status = Command::new(python())
        .arg(&script)
        .arg("--write")
        .arg(&images_dir)
        .status()?;
    if !status.success() {
        bail!(
            "{} --write failed: it writes the test JPEGs (needs numpy + pillow)",
            script.display()
        );
    }
    let files = jpegs(&images_dir)?;

    eprintln!(
        "ours: preprocessing {} JPEGs on {threads} threads ...",
        files.len()
    );
    let pre_s = preprocess_bench(&files, threads, repeat)?;
    eprintln!("ours: CLIP ViT-B/32 tower, batch 8 ...");
    let tower_s = tower_bench(repeat)?;
    let ours = json!({"images_per_s": files.len() as f64 / pre_s, "tower_batch8_s": tower_s, "threads": threads});
    let reference = if with_python {
        eprintln!("transformers: processors and tower, {threads} threads ...");
        let mut cmd = Command::new(python());
        cmd.arg(&script)
            .arg("--images")
            .arg(&images_dir)
            .args([
                "--threads",
                &threads.to_string(),
                "--repeat",
                &repeat.to_string(),
            ])
            .env("OMP_NUM_THREADS", threads.to_string())
            .env("MKL_NUM_THREADS", threads.to_string());
        Some(last_json_line(&mut cmd)?)
    } else {
        None
    };

    let f = |v: &Value, k: &str| v.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN);
    println!();
    println!(
        "preprocessing {} JPEGs 640x480 -> 336 px, {threads} threads (best of {repeat})",
        files.len()
    );
    println!(
        "ours                          {:>8.1} images/s",
        f(&ours, "images_per_s")
    );
    if let Some(r) = &reference {
        println!(
            "CLIPImageProcessor (PIL)      {:>8.1} images/s",
            f(r, "pil_images_per_s")
        );
        println!(
            "CLIPImageProcessor (fast)     {:>8.1} images/s",
            f(r, "fast_images_per_s")
        );
        println!(
            "ours / PIL:  {:.2}x (goal >= 5)",
            f(&ours, "images_per_s") / f(r, "pil_images_per_s")
        );
        println!(
            "ours / fast: {:.2}x (goal >= 2.5)",
            f(&ours, "images_per_s") / f(r, "fast_images_per_s")
        );
    }
    println!("CLIP ViT-B/32 tower forward, batch 8:");
    println!("ours          {:>8.1} ms", f(&ours, "tower_batch8_s") * 1e3);
    if let Some(r) = &reference {
        println!("transformers  {:>8.1} ms", f(r, "tower_batch8_s") * 1e3);
        println!(
            "ours / transformers: {:.2}x (goal >= 1.0)",
            f(r, "tower_batch8_s") / f(&ours, "tower_batch8_s")
        );
    }
    println!();
    println!(
        "{}",
        json!({"ours": ours, "transformers": reference, "profile": if cfg!(debug_assertions) { "dev" } else { "release" }})
    );
    Ok(())
}

fn jpegs(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "jpg"))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("no JPEGs in {}", dir.display());
    }
    Ok(files)
}

/// Best seconds to decode + preprocess every file, split over `threads` threads.
fn preprocess_bench(files: &[PathBuf], threads: usize, repeat: usize) -> Result<f64> {
    let config = ImageProcessorConfig::from_json(
        &json!({"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}}),
        "bench",
    )?;
    let limits = DecodeLimits::default();
    let (config, limits) = (&config, &limits);
    let one_pass = || -> Result<usize> {
        let chunk = files.len().div_ceil(threads);
        std::thread::scope(|scope| {
            let handles: Vec<_> = files
                .chunks(chunk)
                .map(|part| {
                    scope.spawn(move || -> Result<usize> {
                        let mut values = 0;
                        for file in part {
                            let bytes = std::fs::read(file)?;
                            let image = decode_bytes(&bytes, &file.display().to_string(), limits)?;
                            let (pixels, _, _) = config.preprocess(&image)?;
                            values += pixels.len();
                        }
                        Ok(values)
                    })
                })
                .collect();
            let mut total = 0;
            for handle in handles {
                total += handle
                    .join()
                    .map_err(|_| anyhow::anyhow!("a preprocessing thread panicked"))??;
            }
            Ok(total)
        })
    };
    let values = one_pass()?;
    if values != files.len() * 3 * 336 * 336 {
        bail!(
            "preprocessing produced {values} values for {} images",
            files.len()
        );
    }
    let mut best = f64::INFINITY;
    for _ in 0..repeat {
        let start = Instant::now();
        one_pass()?;
        best = best.min(start.elapsed().as_secs_f64());
    }
    Ok(best)
}

/// Best seconds of a ViT-B/32 forward (every hidden state) on a batch of 8.
fn tower_bench(repeat: usize) -> Result<f64> {
    let config: ClipVisionConfig = serde_json::from_value(json!({
        "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
        "image_size": 224, "patch_size": 32
    }))?;
    // Random weights from a VarMap, then detached so that inference tracks no graph.
    let map = VarMap::new();
    ClipVisionTower::load(
        &config,
        VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu),
    )?;
    let weights: std::collections::HashMap<String, Tensor> = {
        let vars = map
            .data()
            .lock()
            .map_err(|_| anyhow::anyhow!("the VarMap lock is poisoned"))?;
        vars.iter()
            .map(|(name, var)| (name.clone(), var.as_tensor().detach()))
            .collect()
    };
    let tower = ClipVisionTower::load(
        &config,
        VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu),
    )?;
    let pixels = Tensor::randn(0f32, 1.0, (8, 3, 224, 224), &Device::Cpu)?;
    std::hint::black_box(tower.forward(&pixels, None)?);
    let mut best = f64::INFINITY;
    for _ in 0..repeat {
        let start = Instant::now();
        std::hint::black_box(tower.forward(&pixels, None)?);
        best = best.min(start.elapsed().as_secs_f64());
    }
    Ok(best)
}
