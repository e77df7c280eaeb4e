//! `cargo xtask bench vlm`: a whole vision-language model and a VLM vision
//! tower at real sizes (random weights), ours against transformers in one run.
//!
//! ```text
//! cargo xtask bench vlm [--family smolvlm|qwen2vl|all] [--threads N] [--repeat 3]
//!                       [--new-tokens 32] [--no-python] [--tiny]
//! ```
//!
//! `--family smolvlm`: HuggingFaceTB/SmolVLM-256M-Instruct's config (an
//! `Idefics3ForConditionalGeneration`: Llama text model hidden 576, intermediate
//! 1536, 30 layers, 9 heads / 3 KV heads, vocab 49280, rms_norm_eps 1e-5,
//! rope_theta 100000, max_position_embeddings 8192; SigLIP vision hidden 768,
//! intermediate 3072, 12 layers, 12 heads, patch 16, image_size 512;
//! scale_factor 4, so 64 image tokens per 512 px tile; processor: size
//! longest_edge 2048, max_image_size longest_edge 512, image splitting,
//! image_seq_len 64), written out in `xtask/bench/vlm.py` since the hub is out of
//! reach. One seeded 512×512 PNG is upscaled to 2048 and cut into 4×4 tiles plus
//! the whole image: 17 crops, 1088 image tokens, 1166 prompt tokens with the
//! 20-token question. Measured, each side from the image file: the time to first
//! token (prompt preparation, image preprocessing, vision tower, connector,
//! prefill and the first greedy token) and the decode rate over the other
//! `--new-tokens - 1` greedy tokens with the KV cache, EOS ignored. Ours:
//! `MultimodalModel::load` of the saved directory (the Idefics3 importer), then
//! per pass `prepare_raw` + `MultimodalModel::generate` as `multitoken generate
//! --raw --temperature 0 --ignore-eos` runs them. transformers: `Idefics3Processor` (PIL image
//! processor) + `generate(max_new_tokens = min_new_tokens = N, do_sample=False)`,
//! f32, `torch.no_grad`, timed by a streamer; the saved generation config has no
//! EOS id, so it too runs exactly N tokens. The prompt ids and greedy ids of the
//! two sides are compared.
//!
//! `--family qwen2vl`: Qwen/Qwen2-VL-2B-Instruct's vision tower (depth 32,
//! embed_dim 1280, 16 heads, mlp_ratio 4, quick_gelu, patch 14, temporal patch 2,
//! spatial merge 2, merger to 1536; processor min_pixels 3136, max_pixels
//! 12845056, CLIP mean/std) on one seeded 448×448 PNG: 32×32 patches, 256
//! merged rows. Ours: the `vision_qwen2_vl` modality + its `qwen2_vl_merger`
//! projector through `encode_item` / `project_item`; transformers:
//! `Qwen2VLImageProcessorPil` + `Qwen2VisionTransformerPretrainedModel` (tower
//! and merger). The outputs are compared (max abs difference).
//!
//! Both: `xtask/bench/vlm.py --setup-*` writes the shared inputs once under
//! `target/bench/vlm-<family>/`; ours runs in a child process of this binary
//! (its own peak RSS), transformers in Python on the same thread count; each
//! side reports the best and median of `--repeat` passes after a warm-up, and
//! its peak RSS (whole process, and the passes alone). `--tiny` shrinks the
//! layer counts (and SmolVLM's upscaling, to 5 crops) into
//! `target/bench/vlm-<family>-tiny/` for a quick check of the plumbing. Time the
//! release build on an idle machine (torch collapses under contention, so loaded
//! ratios flatter us): `cargo build --release -p xtask --features models
//! --target-dir target/bench`, then `target/bench/release/xtask bench vlm`
//! (about 4 minutes on 2 cores with `--repeat 3` once the inputs exist: a
//! SmolVLM pass is ~12 s ours, ~16 s transformers; a Qwen2-VL tower pass ~4 s
//! each). Ours also runs
//! one extra SmolVLM pass over the image alone, timed per step, to show where
//! the image's share of the time to first token goes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use multitoken_core::{Item, ItemsByKey};
use multitoken_lm::generate::GenerationParams;
use multitoken_lm::loader::LoadOptions;
use multitoken_lm::multimodal::MultimodalModel;
use serde_json::{json, Value};

use crate::bench::last_json_line;
use crate::bench_vision::{best_median, proc_status_bytes, reset_peak_rss};
use crate::weights::{python, workspace_root};

/// Settings of one `bench vlm` run.
#[derive(Debug, Clone)]
struct Settings {
    families: Vec<Family>,
    threads: usize,
    repeat: usize,
    new_tokens: usize,
    python: bool,
    tiny: bool,
    /// Set in the child process: measure ours on the setup in this directory.
    child: Option<PathBuf>,
}

/// The model families this bench knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    SmolVlm,
    Qwen2Vl,
}

impl Family {
    fn name(self) -> &'static str {
        match self {
            Family::SmolVlm => "smolvlm",
            Family::Qwen2Vl => "qwen2vl",
        }
    }

    /// Where the setup of this family lives.
    fn dir(self, tiny: bool) -> PathBuf {
        let name = format!("vlm-{}{}", self.name(), if tiny { "-tiny" } else { "" });
        workspace_root().join("target").join("bench").join(name)
    }
}

fn parse_settings(args: &[String]) -> Result<Settings> {
    let mut s = Settings {
        families: vec![Family::SmolVlm, Family::Qwen2Vl],
        threads: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        repeat: 3,
        new_tokens: 32,
        python: true,
        tiny: false,
        child: None,
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().with_context(|| format!("{name} needs a value"));
        let number = |name: &str, v: &String| v.parse::<usize>().with_context(|| format!("{name} {v}: not a number"));
        match arg.as_str() {
            "--family" => {
                s.families = match value("--family")?.as_str() {
                    "smolvlm" => vec![Family::SmolVlm],
                    "qwen2vl" => vec![Family::Qwen2Vl],
                    "all" => vec![Family::SmolVlm, Family::Qwen2Vl],
                    other => bail!("unknown --family `{other}` (smolvlm, qwen2vl or all)"),
                }
            }
            "--threads" => s.threads = number("--threads", value("--threads")?)?.max(1),
            "--repeat" => s.repeat = number("--repeat", value("--repeat")?)?.max(1),
            "--new-tokens" => s.new_tokens = number("--new-tokens", value("--new-tokens")?)?.max(2),
            "--no-python" => s.python = false,
            "--tiny" => s.tiny = true,
            "--child" => s.child = Some(PathBuf::from(value("--child")?)),
            other => bail!("unknown argument `{other}`"),
        }
    }
    Ok(s)
}

/// Run `bench vlm`.
pub fn run(args: &[String]) -> Result<()> {
    let s = parse_settings(args)?;
    if let Some(dir) = &s.child {
        return match s.families.as_slice() {
            [Family::SmolVlm] => smolvlm_child(dir, s.repeat, s.new_tokens),
            [Family::Qwen2Vl] => qwen2vl_child(dir, s.repeat),
            _ => bail!("--child needs one --family"),
        };
    }
    if cfg!(debug_assertions) {
        eprintln!("warning: a debug build; time the release one (cargo build --release -p xtask --target-dir target/bench)");
    }
    let mut all = Vec::new();
    for &family in &s.families {
        let dir = setup(&s, family)?;
        let ours = run_child(&s, family, &dir)?;
        let reference = if s.python { Some(run_python(&s, family, &dir)?) } else { None };
        match family {
            Family::SmolVlm => smolvlm_report(&s, &ours, reference.as_ref()),
            Family::Qwen2Vl => qwen2vl_report(&s, &ours, reference.as_ref()),
        }
        all.push(json!({"family": family.name(), "ours": ours, "transformers": reference}));
    }
    println!();
    println!(
        "{}",
        json!({"bench": "vlm", "threads": s.threads, "repeat": s.repeat, "new_tokens": s.new_tokens, "tiny": s.tiny,
               "results": all, "profile": if cfg!(debug_assertions) { "dev" } else { "release" }})
    );
    Ok(())
}

fn script() -> PathBuf {
    workspace_root().join("xtask").join("bench").join("vlm.py")
}

/// Writes (once) the shared inputs of `family`; returns their directory.
fn setup(s: &Settings, family: Family) -> Result<PathBuf> {
    let dir = family.dir(s.tiny);
    if s.python {
        eprintln!("setup: {} (random weights, written once) ...", dir.display());
        let mut cmd = Command::new(python());
        cmd.arg(script()).arg(format!("--setup-{}", family.name())).arg(&dir);
        if s.tiny {
            cmd.arg("--tiny");
        }
        let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
        if !status.success() {
            bail!("{cmd:?} failed (needs torch, transformers, safetensors, pillow)");
        }
    } else if !dir.join("setup.json").is_file() {
        bail!("{} has no setup: run once without --no-python", dir.display());
    }
    Ok(dir)
}

/// Ours on `dir`, in a child process of this binary.
fn run_child(s: &Settings, family: Family, dir: &Path) -> Result<Value> {
    let threads = s.threads.to_string();
    eprintln!("ours: {}, {threads} threads, warm-up + {} passes ...", family.name(), s.repeat);
    let mut cmd = Command::new(std::env::current_exe().context("locating this binary")?);
    cmd.args(["bench", "vlm", "--family", family.name(), "--repeat", &s.repeat.to_string()])
        .args(["--new-tokens", &s.new_tokens.to_string(), "--child"])
        .arg(dir)
        .env("RAYON_NUM_THREADS", &threads);
    last_json_line(&mut cmd)
}

/// transformers on `dir`, with ours' outputs to compare.
fn run_python(s: &Settings, family: Family, dir: &Path) -> Result<Value> {
    let threads = s.threads.to_string();
    eprintln!("transformers: {}, {threads} threads, warm-up + {} passes ...", family.name(), s.repeat);
    let ours = match family {
        Family::SmolVlm => dir.join("ours_ids.json"),
        Family::Qwen2Vl => dir.join("ours_features.safetensors"),
    };
    let mut cmd = Command::new(python());
    cmd.arg(script())
        .arg(format!("--bench-{}", family.name()))
        .arg(dir)
        .arg("--ours")
        .arg(ours)
        .args(["--threads", &threads, "--repeat", &s.repeat.to_string()])
        .args(["--new-tokens", &s.new_tokens.to_string()])
        .env("OMP_NUM_THREADS", &threads)
        .env("MKL_NUM_THREADS", &threads);
    last_json_line(&mut cmd)
}

fn f(v: &Value, k: &str) -> f64 {
    v.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN)
}

/// What a table column shows, and which way is better.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unit {
    /// Seconds: lower is better.
    Seconds,
    /// Per second: higher is better.
    Rate,
    /// Bytes, shown in GB: lower is better.
    Bytes,
}

/// One column of a report table: a header and the JSON key of both sides' value.
struct Column {
    header: &'static str,
    key: &'static str,
    unit: Unit,
}

impl Column {
    fn time(header: &'static str, key: &'static str) -> Self {
        Self { header, key, unit: Unit::Seconds }
    }

    fn rate(header: &'static str, key: &'static str) -> Self {
        Self { header, key, unit: Unit::Rate }
    }

    fn bytes(header: &'static str, key: &'static str) -> Self {
        Self { header, key, unit: Unit::Bytes }
    }

    fn cell(&self, v: &Value) -> String {
        let x = f(v, self.key);
        match self.unit {
            Unit::Seconds if x < 1.0 => format!("{x:.3}"),
            Unit::Seconds => format!("{x:.2}"),
            Unit::Rate => format!("{x:.1}"),
            Unit::Bytes => format!("{:.2}GB", x / 1e9),
        }
    }

    /// How many times better ours is (above 1: ours is faster / smaller).
    fn ratio(&self, ours: &Value, reference: &Value) -> String {
        let (o, r) = (f(ours, self.key), f(reference, self.key));
        let x = if self.unit == Unit::Rate { o / r } else { r / o };
        format!("{x:.2}x")
    }
}

/// Rows ours, transformers and "ours better by" (transformers / ours for times
/// and memory, ours / transformers for rates).
fn table(columns: &[Column], ours: &Value, reference: Option<&Value>) {
    let row = |name: &str, cells: Vec<String>| {
        let cells: Vec<String> = cells.iter().map(|c| format!("{c:>10}")).collect();
        println!("{name:<14}{}", cells.join(""));
    };
    row("", columns.iter().map(|c| c.header.to_string()).collect());
    row("ours", columns.iter().map(|c| c.cell(ours)).collect());
    if let Some(r) = reference {
        row("transformers", columns.iter().map(|c| c.cell(r)).collect());
        row("ours better by", columns.iter().map(|c| c.ratio(ours, r)).collect());
    }
}

/// Peak RSS of the whole process: the larger of the loading and the passes' peaks.
fn peak_of(load_peak: Option<f64>, pass_peak: Option<f64>) -> Option<f64> {
    match (load_peak, pass_peak) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

/// Times of one SmolVLM pass, in seconds.
struct SmolPass {
    /// `prepare_raw`: tokenising the prompt and laying out the image's slots.
    prepare_s: f64,
    /// `prepare_raw` + `embed` (image preprocessing, tower, connector, splice):
    /// the time to first token less the prefill forward.
    to_embeds_s: f64,
    /// Time to first token.
    ttft_s: f64,
    decode_tok_s: f64,
}

/// Ours on the SmolVLM setup in `dir`, in this (child) process: prints one JSON line
/// and writes `ours_ids.json` (prompt ids and greedy ids of the warm-up pass).
fn smolvlm_child(dir: &Path, repeat: usize, new_tokens: usize) -> Result<()> {
    multitoken_vision::link();
    multitoken_vlm::link();
    let setup_path = dir.join("setup.json");
    let setup: Value = serde_json::from_str(&std::fs::read_to_string(&setup_path).with_context(|| format!("{}", setup_path.display()))?)
        .with_context(|| format!("{}", setup_path.display()))?;
    let prompt = setup.get("prompt").and_then(Value::as_str).with_context(|| format!("{} has no prompt", setup_path.display()))?;
    let start = Instant::now();
    let model = MultimodalModel::load(dir, &LoadOptions { dtype: DType::F32, device: Device::Cpu, quantize: None, quantize_towers: None })?;
    let load_s = start.elapsed().as_secs_f64();
    let load_peak = proc_status_bytes("VmHWM:");
    let rss_after_load = proc_status_bytes("VmRSS:");
    let reset = reset_peak_rss();

    let image = Item::Path(dir.join("image.png"));
    let items: ItemsByKey = BTreeMap::from([("images".to_string(), vec![image.clone()])]);
    // What `multitoken generate --raw --temperature 0 --ignore-eos` passes.
    let params = GenerationParams {
        max_new_tokens: new_tokens,
        eos_token_ids: model.lm.generation.eos_token_ids.clone(),
        ignore_eos: true,
        ..GenerationParams::default()
    };
    let one_pass = || -> Result<(SmolPass, Vec<u32>, Vec<u32>)> {
        let t0 = Instant::now();
        let prepared = model.prepare_raw(prompt, &items)?;
        let prepare_s = t0.elapsed().as_secs_f64();
        let out = model.generate(&prepared, &items, &params, &mut |_| true)?;
        let total_s = t0.elapsed().as_secs_f64();
        if out.token_ids.len() != new_tokens || out.decode_tok_s <= 0.0 || out.prefill_tok_s <= 0.0 {
            bail!("generate gave {} new tokens (wanted {new_tokens}) or no timings", out.token_ids.len());
        }
        // generate's rates: the prompt over the prefill forward (first token
        // included), and new tokens - 1 over the time after the first.
        let decode_s = (new_tokens - 1) as f64 / out.decode_tok_s;
        let prefill_s = out.prompt_tokens as f64 / out.prefill_tok_s;
        let ttft_s = total_s - decode_s;
        let pass = SmolPass { prepare_s, to_embeds_s: ttft_s - prefill_s, ttft_s, decode_tok_s: out.decode_tok_s };
        Ok((pass, prepared.input_ids, out.token_ids))
    };
    let (warm, input_ids, token_ids) = one_pass()?;
    let ids_path = dir.join("ours_ids.json");
    std::fs::write(&ids_path, json!({"input_ids": input_ids, "token_ids": token_ids}).to_string())
        .with_context(|| format!("writing {}", ids_path.display()))?;
    let passes = (0..repeat).map(|_| one_pass().map(|p| p.0)).collect::<Result<Vec<_>>>()?;
    let pass_peak = proc_status_bytes("VmHWM:");
    let split = smolvlm_split(&model, &image)?;
    let ttft: Vec<f64> = passes.iter().map(|p| p.ttft_s).collect();
    // Best and median of rates: the negated times' order.
    let decode: Vec<f64> = passes.iter().map(|p| -p.decode_tok_s).collect();
    let (best_ttft, median_ttft) = best_median(&ttft);
    let (best_decode, median_decode) = best_median(&decode);
    let best_to_embeds = best_median(&passes.iter().map(|p| p.to_embeds_s).collect::<Vec<_>>()).0;
    let best_prefill = best_median(&passes.iter().map(|p| p.ttft_s - p.to_embeds_s).collect::<Vec<_>>()).0;
    let result = json!({
        "impl": "ours",
        "threads": candle_core::utils::get_num_threads(),
        "prompt_tokens": input_ids.len(),
        "new_tokens": new_tokens,
        "token_ids": token_ids,
        "load_s": load_s,
        "warmup_ttft_s": warm.ttft_s,
        "ttft_passes_s": ttft,
        "best_ttft_s": best_ttft,
        "median_ttft_s": median_ttft,
        "decode_passes_tok_s": passes.iter().map(|p| p.decode_tok_s).collect::<Vec<_>>(),
        "best_decode_tok_s": -best_decode,
        "median_decode_tok_s": -median_decode,
        "best_to_embeds_s": best_to_embeds,
        "best_prefill_s": best_prefill,
        "best_prepare_s": best_median(&passes.iter().map(|p| p.prepare_s).collect::<Vec<_>>()).0,
        "split_pre_s": split[0],
        "split_vision_s": split[1],
        "split_connector_s": split[2],
        "rss_after_load_bytes": rss_after_load,
        "peak_rss_bytes": peak_of(load_peak, pass_peak),
        "pass_peak_rss_bytes": if reset { pass_peak } else { None },
    });
    println!("{result}");
    Ok(())
}

/// One extra pass over the image alone, timed per step (preprocessing, tower,
/// connector: what transformers' forward hooks split), to show where the
/// image's share of the time to first token goes.
fn smolvlm_split(model: &MultimodalModel, item: &Item) -> Result<[f64; 3]> {
    let runtime = model.modalities.first().context("the model has no modality")?;
    let modality = runtime.modality.as_ref();
    let slots = modality.layout(item)?.slots();
    let t0 = Instant::now();
    let preprocessed = modality.preprocess(item)?;
    let t1 = Instant::now();
    let pieces = modality.encode_item(&preprocessed)?;
    let t2 = Instant::now();
    std::hint::black_box(multitoken_core::project_item(&runtime.projector, &pieces, DType::F32, slots)?);
    let t3 = Instant::now();
    Ok([(t1 - t0).as_secs_f64(), (t2 - t1).as_secs_f64(), (t3 - t2).as_secs_f64()])
}

fn smolvlm_report(s: &Settings, ours: &Value, reference: Option<&Value>) {
    println!();
    println!(
        "SmolVLM-256M-Instruct config{} (random weights), one 512x512 PNG + a 20-token question ({} prompt tokens), \
         {} greedy new tokens, {} threads, f32; best / median of {} after a warm-up",
        if s.tiny { " (TINY: 2 + 2 layers, 5 crops)" } else { "" },
        ours.get("prompt_tokens").unwrap_or(&Value::Null),
        s.new_tokens,
        s.threads,
        s.repeat
    );
    table(
        &[
            Column::time("TTFT s", "best_ttft_s"),
            Column::time("median s", "median_ttft_s"),
            Column::time("embeds s", "best_to_embeds_s"),
            Column::time("prefill s", "best_prefill_s"),
            Column::rate("decode/s", "best_decode_tok_s"),
            Column::rate("median/s", "median_decode_tok_s"),
            Column::time("load s", "load_s"),
            Column::bytes("peak RSS", "peak_rss_bytes"),
            Column::bytes("pass RSS", "pass_peak_rss_bytes"),
        ],
        ours,
        reference,
    );
    if let Some(r) = reference {
        println!(
            "ours / transformers speedup: time to first token {:.2}x best, {:.2}x median (goal >= 1.5); \
             decode {:.2}x best, {:.2}x median (goal >= 1.5)",
            f(r, "best_ttft_s") / f(ours, "best_ttft_s"),
            f(r, "median_ttft_s") / f(ours, "median_ttft_s"),
            f(ours, "best_decode_tok_s") / f(r, "best_decode_tok_s"),
            f(ours, "median_decode_tok_s") / f(r, "median_decode_tok_s"),
        );
        let yes = |k: &str| match r.get(k).and_then(Value::as_bool) {
            Some(true) => "yes",
            Some(false) => "NO",
            None => "?",
        };
        println!(
            "prompt ids equal (image slots aside): {}; first new token equal: {}; greedy ids agree for the first {} of {} \
             (random weights: near-tied logits may part later)",
            yes("input_ids_equal"),
            yes("first_token_equal"),
            r.get("greedy_ids_agree").unwrap_or(&Value::Null),
            s.new_tokens
        );
        println!("(transformers' pixel_values {})", r.get("pixel_values_shape").unwrap_or(&Value::Null));
    }
    let split = |v: &Value, pre: &str, vision: &str, connector: &str| {
        format!("pre {:.3} s, vision tower {:.2} s, connector {:.3} s", f(v, pre), f(v, vision), f(v, connector))
    };
    println!("the image alone: ours {} (one extra pass)", split(ours, "split_pre_s", "split_vision_s", "split_connector_s"));
    if let Some(r) = reference {
        println!("                 transformers {} (best; pre = the whole processor)", split(r, "best_pre_s", "best_vision_s", "best_connector_s"));
    }
    println!("(TTFT: from the image file to the first new token; embeds: everything before the LM; peak RSS: the whole process; pass RSS: the passes alone)");
}

/// Ours on the Qwen2-VL setup in `dir`, in this (child) process: prints one JSON
/// line and writes `ours_features.safetensors` (the warm-up pass's merger output).
fn qwen2vl_child(dir: &Path, repeat: usize) -> Result<()> {
    use candle_nn::VarBuilder;
    use multitoken_core::{encode_item, project_item, ModalityContext, Projector};

    multitoken_vision::link();
    let start = Instant::now();
    let config_path = dir.join("config.json");
    let config: Value = serde_json::from_str(&std::fs::read_to_string(&config_path).with_context(|| format!("{}", config_path.display()))?)
        .with_context(|| format!("{}", config_path.display()))?;
    let out_hidden = config
        .pointer("/vision_config/hidden_size")
        .and_then(Value::as_u64)
        .with_context(|| format!("{} has no vision_config.hidden_size", config_path.display()))? as usize;
    let modality = multitoken_core::build_modality(
        "vision_qwen2_vl",
        &json!({"tower": ".", "weights_prefix": "visual"}),
        &ModalityContext::new(Device::Cpu, DType::F32, dir),
    )?;
    let spec = modality.projector();
    let weights = [dir.join("model.safetensors")];
    // SAFETY: the file is memory-mapped read-only; nobody truncates it during the bench.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&weights, DType::F32, &Device::Cpu)? };
    let projector = Projector::load(spec, modality.feature_dim(), out_hidden, vb.pp("visual.merger"))?;
    drop(vb);
    let load_s = start.elapsed().as_secs_f64();
    let load_peak = proc_status_bytes("VmHWM:");
    let rss_after_load = proc_status_bytes("VmRSS:");
    let reset = reset_peak_rss();

    let item = Item::Path(dir.join("image.png"));
    let slots = modality.layout(&item)?.slots();
    let start = Instant::now();
    let pieces = encode_item(modality.as_ref(), &item)?;
    let features = project_item(&projector, &pieces, DType::F32, slots)?;
    let warmup_s = start.elapsed().as_secs_f64();
    let features_shape = features.dims().to_vec();
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("features".to_string(), features)]),
        dir.join("ours_features.safetensors"),
    )?;
    drop(pieces);
    let (mut total, mut pre, mut tower, mut merger) = (vec![], vec![], vec![], vec![]);
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
        merger.push((t3 - t2).as_secs_f64());
    }
    let pass_peak = proc_status_bytes("VmHWM:");
    let (best_s, median_s) = best_median(&total);
    let result = json!({
        "impl": "ours",
        "threads": candle_core::utils::get_num_threads(),
        "projector": spec.to_string(),
        "features_shape": features_shape,
        "load_s": load_s,
        "warmup_s": warmup_s,
        "passes_s": total,
        "best_s": best_s,
        "median_s": median_s,
        "best_pre_s": best_median(&pre).0,
        "best_tower_s": best_median(&tower).0,
        "best_merger_s": best_median(&merger).0,
        "rss_after_load_bytes": rss_after_load,
        "peak_rss_bytes": peak_of(load_peak, pass_peak),
        "pass_peak_rss_bytes": if reset { pass_peak } else { None },
    });
    println!("{result}");
    Ok(())
}

fn qwen2vl_report(s: &Settings, ours: &Value, reference: Option<&Value>) {
    println!();
    println!(
        "Qwen2-VL-2B vision tower + merger{} (random weights), one 448x448 PNG -> features {}, {} threads, f32; \
         best / median of {} after a warm-up",
        if s.tiny { " (TINY: depth 2)" } else { "" },
        ours.get("features_shape").unwrap_or(&Value::Null),
        s.threads,
        s.repeat
    );
    table(
        &[
            Column::time("best s", "best_s"),
            Column::time("median s", "median_s"),
            Column::time("pre s", "best_pre_s"),
            Column::time("tower s", "best_tower_s"),
            Column::time("merger s", "best_merger_s"),
            Column::time("load s", "load_s"),
            Column::bytes("peak RSS", "peak_rss_bytes"),
            Column::bytes("pass RSS", "pass_peak_rss_bytes"),
        ],
        ours,
        reference,
    );
    if let Some(r) = reference {
        println!(
            "ours / transformers speedup: {:.2}x best, {:.2}x median",
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
            "(transformers' pixel_values {} grid_thw {})",
            r.get("pixel_values_shape").unwrap_or(&Value::Null),
            r.get("grid_thw").unwrap_or(&Value::Null)
        );
    }
    println!("(peak RSS: the whole process, loading included; pass RSS: the peak during the passes alone)");
}
