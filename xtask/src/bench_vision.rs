//! `cargo xtask bench vision`: image preprocessing and the CLIP tower, ours
//! against transformers in one run; with `--family idefics2`, Idefics2's
//! SigLIP tower + connector end to end.
//!
//! ```text
//! cargo xtask bench vision [--threads N] [--repeat 3] [--no-python]
//! cargo xtask bench vision --family idefics2 [--threads N] [--repeat 3] [--no-python]
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
//!
//! `--family idefics2`: one seeded 980×980 PNG from its file to the connector's
//! output, at HuggingFaceM4/idefics2-8b's sizes with random weights (SigLIP
//! so400m-like tower: 27 layers, hidden 1152, image_size 980, patch 14; connector:
//! SwiGLU 1152 -> 14336 -> 4096 and a 3-layer perceiver to 64 latents). With image
//! splitting (4 quarters + the whole image, longest_edge 980, shortest_edge 378)
//! that is 4 crops of 35×35 patches and one of 70×70, 320 output rows.
//! `xtask/bench/idefics2_vision.py --setup` writes the shared inputs once under
//! `target/bench/idefics2-vision/` (config.json, preprocessor_config.json, a
//! seeded random `Idefics2ForConditionalGeneration`'s `model.vision_model.*` +
//! `model.connector.*` in model.safetensors, image.png); both sides load them.
//! Ours runs in a child process of this binary (its own peak RSS): the
//! `vision_siglip` modality through the registry, `Projector::load` at
//! `model.connector`, `encode_item` + `project_item` as the CLI runs them.
//! transformers: `AutoImageProcessor` (the PIL backend without torchvision) +
//! `Idefics2ForConditionalGeneration.get_image_features`, f32, `torch.no_grad`,
//! the same thread count. Each side: best and median of `--repeat` passes after
//! a warm-up whose features are compared (max abs difference); peak RSS of the
//! whole process and of the passes alone (VmHWM reset after loading). Run the
//! release build: `cargo build --release -p xtask --target-dir target/bench`,
//! then `target/bench/release/xtask bench vision --family idefics2`.

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

/// Run `bench vision`: `--family clip` (the default) or `--family idefics2`.
pub fn run(args: &[String]) -> Result<()> {
    let mut family = String::from("clip");
    let mut rest = Vec::new();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        if arg == "--family" {
            family = it.next().context("--family needs a name (clip or idefics2)")?.clone();
        } else {
            rest.push(arg.clone());
        }
    }
    match family.as_str() {
        "clip" => clip(&rest),
        "idefics2" => idefics2(&rest),
        other => bail!("unknown --family `{other}` (clip or idefics2)"),
    }
}

/// `bench vision --family clip`.
fn clip(args: &[String]) -> Result<()> {
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

/// Settings of `bench vision --family idefics2`.
#[derive(Debug, Clone)]
struct Idefics2Settings {
    threads: usize,
    repeat: usize,
    python: bool,
    /// Set in the child process: measure ours on the setup in this directory.
    child: Option<PathBuf>,
}

fn idefics2_settings(args: &[String]) -> Result<Idefics2Settings> {
    let mut s = Idefics2Settings {
        threads: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        repeat: 3,
        python: true,
        child: None,
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().with_context(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--threads" => {
                let v = value("--threads")?;
                s.threads = v.parse::<usize>().with_context(|| format!("--threads {v}: not a number"))?.max(1);
            }
            "--repeat" => {
                let v = value("--repeat")?;
                s.repeat = v.parse::<usize>().with_context(|| format!("--repeat {v}: not a number"))?.max(1);
            }
            "--no-python" => s.python = false,
            "--child" => s.child = Some(PathBuf::from(value("--child")?)),
            other => bail!("unknown argument `{other}`"),
        }
    }
    Ok(s)
}

/// `bench vision --family idefics2`: the setup (Python), ours in a child
/// process, then transformers, then the report.
fn idefics2(args: &[String]) -> Result<()> {
    let s = idefics2_settings(args)?;
    if let Some(dir) = &s.child {
        return idefics2_child(dir, s.repeat);
    }
    let root = workspace_root();
    let script = root.join("xtask").join("bench").join("idefics2_vision.py");
    let dir = root.join("target").join("bench").join("idefics2-vision");
    if s.python {
        eprintln!("setup: {} (random idefics2-8b vision + connector weights, written once) ...", dir.display());
        let status = Command::new(python()).arg(&script).arg("--setup").arg(&dir).status()?;
        if !status.success() {
            bail!("{} --setup failed (needs torch, transformers, safetensors, pillow)", script.display());
        }
    } else if !dir.join("setup.json").is_file() {
        bail!("{} has no setup: run once without --no-python", dir.display());
    }
    if cfg!(debug_assertions) {
        eprintln!("warning: a debug build; time the release one (cargo build --release -p xtask --target-dir target/bench)");
    }
    let threads = s.threads.to_string();
    let repeat = s.repeat.to_string();
    eprintln!("ours: preprocessing + SigLIP tower + connector, {threads} threads, warm-up + {repeat} passes ...");
    let mut cmd = Command::new(std::env::current_exe().context("locating this binary")?);
    cmd.args(["bench", "vision", "--family", "idefics2", "--repeat", &repeat, "--child"])
        .arg(&dir)
        .env("RAYON_NUM_THREADS", &threads);
    let ours = last_json_line(&mut cmd)?;
    let reference = if s.python {
        eprintln!("transformers: image processor + get_image_features, {threads} threads, warm-up + {repeat} passes ...");
        let mut cmd = Command::new(python());
        cmd.arg(&script)
            .arg("--bench")
            .arg(&dir)
            .arg("--ours")
            .arg(dir.join("ours_features.safetensors"))
            .args(["--threads", &threads, "--repeat", &repeat])
            .env("OMP_NUM_THREADS", &threads)
            .env("MKL_NUM_THREADS", &threads);
        Some(last_json_line(&mut cmd)?)
    } else {
        None
    };
    idefics2_report(&s, &ours, reference.as_ref());
    Ok(())
}

fn idefics2_report(s: &Idefics2Settings, ours: &Value, reference: Option<&Value>) {
    let f = |v: &Value, k: &str| v.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN);
    let gb = |v: &Value, k: &str| f(v, k) / 1e9;
    println!();
    println!(
        "idefics2-8b vision + connector (random weights), one 980x980 PNG split into 4 + 1 crops -> features {}, \
         {} threads, f32; best / median of {} after a warm-up",
        ours.get("features_shape").unwrap_or(&Value::Null),
        s.threads,
        s.repeat
    );
    println!(
        "{:<14} {:>9} {:>9} {:>8} {:>9} {:>10} {:>8} {:>10} {:>10}",
        "", "best s", "median s", "pre s", "tower s", "connect s", "load s", "peak RSS", "pass RSS"
    );
    let mut rows = vec![("ours", ours)];
    if let Some(r) = reference {
        rows.push(("transformers", r));
    }
    for (name, v) in rows {
        println!(
            "{:<14} {:>9.2} {:>9.2} {:>8.3} {:>9.2} {:>10.2} {:>8.1} {:>8.2}GB {:>8.2}GB",
            name,
            f(v, "best_s"),
            f(v, "median_s"),
            f(v, "best_pre_s"),
            f(v, "best_tower_s"),
            f(v, "best_connector_s"),
            f(v, "load_s"),
            gb(v, "peak_rss_bytes"),
            gb(v, "pass_peak_rss_bytes"),
        );
    }
    if let Some(r) = reference {
        println!(
            "ours / transformers: time {:.3} (best), {:.3} (median); speedup {:.2}x best, {:.2}x median (goal >= 1.2)",
            f(ours, "best_s") / f(r, "best_s"),
            f(ours, "median_s") / f(r, "median_s"),
            f(r, "best_s") / f(ours, "best_s"),
            f(r, "median_s") / f(ours, "median_s"),
        );
        match r.get("diff_error").and_then(Value::as_str) {
            Some(e) => println!("features: {e}"),
            None => println!(
                "features vs transformers: max abs diff {:.3e} (max |value| {:.3e}, relative {:.2e}), mean abs diff {:.3e}",
                f(r, "max_abs_diff"),
                f(r, "max_abs_value"),
                f(r, "max_rel_diff"),
                f(r, "mean_abs_diff"),
            ),
        }
        println!(
            "(transformers pads the 4 quarter crops to 980x980 and masks them: pixel_values {})",
            r.get("pixel_values_shape").unwrap_or(&Value::Null)
        );
    }
    println!("(peak RSS: the whole process, loading included; pass RSS: the peak during the passes alone)");
    println!();
    println!(
        "{}",
        json!({"family": "idefics2", "threads": s.threads, "ours": ours, "transformers": reference,
               "profile": if cfg!(debug_assertions) { "dev" } else { "release" }})
    );
}

/// `VmHWM` or `VmRSS` of this process, in bytes.
pub(crate) fn proc_status_bytes(key: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024.0)
}

/// Resets this process's peak RSS (`VmHWM`) to its current RSS (Linux 4.0+).
pub(crate) fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Best and median of `times`.
pub(crate) fn best_median(times: &[f64]) -> (f64, f64) {
    let mut sorted = times.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    let median = if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    };
    (sorted.first().copied().unwrap_or(f64::NAN), median)
}

/// Ours on the setup in `dir`, in this (child) process: prints one JSON line.
fn idefics2_child(dir: &Path, repeat: usize) -> Result<()> {
    use multitoken_core::{encode_item, project_item, Item, ModalityContext, Projector, ProjectorSpec};

    multitoken_vision::link();
    let start = Instant::now();
    let config: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json"))?)
        .with_context(|| format!("{}", dir.join("config.json").display()))?;
    let text_hidden = config
        .pointer("/text_config/hidden_size")
        .and_then(Value::as_u64)
        .context("config.json has no text_config.hidden_size")? as usize;
    // Tower config, preprocessing and projector spec come from the files
    // transformers reads: config.json and preprocessor_config.json.
    let modality = multitoken_core::build_modality(
        "vision_siglip",
        &json!({"tower": ".", "weights_prefix": "model.vision_model", "image_seq_len": 64}),
        &ModalityContext::new(Device::Cpu, DType::F32, dir),
    )?;
    let spec = modality.projector();
    if !matches!(spec, ProjectorSpec::Idefics2Connector(_)) {
        bail!("the modality reports the projector {spec}, not idefics2_connector");
    }
    let weights = [dir.join("model.safetensors")];
    // SAFETY: the file is memory-mapped read-only; nobody truncates it during the bench.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&weights, DType::F32, &Device::Cpu)? };
    let projector = Projector::load(spec, modality.feature_dim(), text_hidden, vb.pp("model.connector"))?;
    drop(vb);
    let load_s = start.elapsed().as_secs_f64();
    let load_peak = proc_status_bytes("VmHWM:");
    let rss_after_load = proc_status_bytes("VmRSS:");
    let reset = reset_peak_rss();

    let item = Item::Path(dir.join("image.png"));
    let slots = modality.token_width();
    // Warm-up through the public entry points; its features are compared.
    let start = Instant::now();
    let pieces = encode_item(modality.as_ref(), &item)?;
    let features = project_item(&projector, &pieces, DType::F32, slots)?;
    let warmup_s = start.elapsed().as_secs_f64();
    let crops: Vec<Vec<usize>> = pieces.iter().map(|p| p.dims().to_vec()).collect();
    let features_shape = features.dims().to_vec();
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("features".to_string(), features)]),
        dir.join("ours_features.safetensors"),
    )?;
    drop(pieces);
    // The timed passes: encode_item's two steps, timed apart.
    let (mut total, mut pre, mut tower, mut connector) = (vec![], vec![], vec![], vec![]);
    for _ in 0..repeat {
        let t0 = Instant::now();
        let preprocessed = modality.preprocess(&item)?;
        let t1 = Instant::now();
        let pieces = modality.encode_item(&preprocessed)?;
        let t2 = Instant::now();
        std::hint::black_box(project_item(&projector, &pieces, DType::F32, slots)?);
        let t3 = Instant::now();
        total.push((t3 - t0).as_secs_f64());
        pre.push((t1 - t0).as_secs_f64());
        tower.push((t2 - t1).as_secs_f64());
        connector.push((t3 - t2).as_secs_f64());
    }
    let pass_peak = proc_status_bytes("VmHWM:");
    let (best_s, median_s) = best_median(&total);
    let result = json!({
        "impl": "ours",
        "threads": candle_core::utils::get_num_threads(),
        "projector": spec.to_string(),
        "crops": crops,
        "features_shape": features_shape,
        "load_s": load_s,
        "warmup_s": warmup_s,
        "passes_s": total,
        "best_s": best_s,
        "median_s": median_s,
        "best_pre_s": best_median(&pre).0,
        "best_tower_s": best_median(&tower).0,
        "best_connector_s": best_median(&connector).0,
        "rss_after_load_bytes": rss_after_load,
        "peak_rss_bytes": match (load_peak, pass_peak) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        },
        "pass_peak_rss_bytes": if reset { pass_peak } else { None },
    });
    println!("{result}");
    Ok(())
}
