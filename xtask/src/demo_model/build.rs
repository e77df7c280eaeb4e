//! `cargo xtask demo-model build`: the whole recipe, start to finish — the
//! synthetic data, the random skeleton, training with our own `multitoken
//! train` binary in two phases (settings in `xtask/demo-model.toml` and
//! `xtask/demo-model-2.toml`), packaging into a
//! self-contained directory (default `examples/demo-model`) and the held-out
//! evaluation whose figures go into that directory's README.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use multitoken_datasets::Style;

use super::{eval, root, Args};

/// The training phases of the demo model (TOML, `multitoken train --config`):
/// phase 1 from the skeleton, phase 2 from phase 1's packaged model. The
/// classic style trains its tower with the LM; the others pretrain it
/// ([`super::tower`]) and keep it frozen.
fn recipes(style: Style) -> [PathBuf; 2] {
    let names = match style {
        Style::Classic => ["demo-model.toml", "demo-model-2.toml"],
        _ => ["demo-model-styled.toml", "demo-model-styled-2.toml"],
    };
    names.map(|name| root().join("xtask").join(name))
}

/// Builds the release `multitoken` binary (into `$CARGO_TARGET_DIR`, else the
/// workspace's `target/`) and returns its path.
fn multitoken_binary() -> Result<PathBuf> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"));
    crate::bench::build_release("multitoken", &target)
}

/// Runs every step; `args.model` is where the packaged model goes.
pub fn run(args: &Args) -> Result<()> {
    let started = Instant::now();
    let train_file = args.data.join("train.jsonl");
    if !train_file.is_file() {
        super::data(args)?;
    }
    let work = root().join("target/demo-model");
    let init = work.join("init");
    let texts = super::training_text(&train_file)?;
    let tower = super::skeleton::tower_for(args.style);
    super::skeleton::write(&init, &texts, args.seed, tower)?;
    if args.style != Style::Classic {
        super::tower::pretrain_cached(
            &init.join("vision"),
            super::tower::Pretrain::for_tower(tower, args.seed, args.tower_steps, args.tower_lr),
            &work.join("towers"),
        )?;
    }
    let exe = multitoken_binary()?;
    // A curriculum for the non-classic styles: phase 1 on the classic rows,
    // phase 2 on the styled ones. Trained on the varied rows from the start,
    // the LM settled on the answers' marginals (loss flat at 0.135 from step
    // 1,200 of phase 1; audio, documents and shapes at chance after it) and
    // never learned to read the items; the classic rows teach that first.
    let phase_files = if args.style == Style::Classic {
        [train_file.clone(), train_file.clone()]
    } else {
        let classic = args.data.join("classic");
        let classic_file = classic.join("train.jsonl");
        if !classic_file.is_file() {
            super::data(&Args {
                data: classic.clone(),
                style: Style::Classic,
                heldout: 0,
                ..args.clone()
            })?;
        }
        [classic_file, train_file.clone()]
    };
    let train_started = Instant::now();
    let mut model = init;
    let mut trained = PathBuf::new();
    for ((phase, recipe), phase_file) in recipes(args.style).iter().enumerate().zip(&phase_files) {
        trained = work.join(format!("run-{}", phase + 1));
        if trained.exists() {
            std::fs::remove_dir_all(&trained)
                .with_context(|| format!("removing the previous run {}", trained.display()))?;
        }
        // Frozen encoders' features are computed once and reused by later phases and runs.
        let status = Command::new(&exe)
            .arg("train")
            .arg("--config")
            .arg(recipe)
            .arg("--model")
            .arg(&model)
            .arg("--dataset")
            .arg(phase_file)
            .arg("--output-dir")
            .arg(&trained)
            .arg("--seed")
            .arg(args.seed.to_string())
            .arg("--feature-cache")
            .arg(work.join("features"))
            .status()
            .with_context(|| format!("running {} train", exe.display()))?;
        if !status.success() {
            bail!("multitoken train (phase {}) failed ({status})", phase + 1);
        }
        model = work.join(format!("phase-{}", phase + 1));
        package(&trained, &model, &[])?;
    }
    let train_secs = train_started.elapsed().as_secs_f64();
    let report = package_and_evaluate(&trained, args, Some(train_secs))?;
    println!(
        "demo model in {} (training {:.0} s, all steps {:.0} s, held-out accuracy {:.1}%)",
        args.model.display(),
        train_secs,
        started.elapsed().as_secs_f64(),
        100.0 * report.accuracy()
    );
    Ok(())
}

/// [`package`]s the run in `run` into `args.model` and evaluates it on the
/// held-out split. After a whole `build` (`train_secs`: the training time,
/// measured by this process), the package also gets the recipe's phase
/// configs and a README with the figures; a single run packaged by hand
/// (`demo-model package`) gets neither, since its phases are not the recipe's
/// (the embedded model keeps its own hand-written README and `train-N.toml`).
pub fn package_and_evaluate(
    run: &Path,
    args: &Args,
    train_secs: Option<f64>,
) -> Result<eval::Report> {
    let recipes = match train_secs {
        Some(_) => recipes(args.style).to_vec(),
        None => Vec::new(),
    };
    package(run, &args.model, &recipes)?;
    let heldout = args.data.join("heldout.jsonl");
    let report = eval::evaluate(&args.model, &heldout, args.limit, false)?;
    eval::print(&report);
    if let Some(secs) = train_secs {
        write_readme(&args.model, &report, secs)?;
    }
    Ok(report)
}

/// Files of a training output that a packaged model keeps (no checkpoints).
const KEEP: [&str; 5] = [
    "multitoken.json",
    "projectors.safetensors",
    "preprocessor_config.json",
    "metrics.jsonl",
    "loss.png",
];

/// Copies the trained model in `run` into `out` as a self-contained directory:
/// the LM (`lm/`) as it is, each trained encoder (`encoder-N/`) under the name
/// of its modality (`vision/`, `audio/`, `document/`: the first word of its
/// builder), every frozen encoder the config points at with an absolute path
/// copied in under its own name, so the directory can be committed and moved,
/// and `recipes` as `train-1.toml`, `train-2.toml`...
pub fn package(run: &Path, out: &Path, recipes: &[PathBuf]) -> Result<()> {
    if out.exists() {
        std::fs::remove_dir_all(out).with_context(|| format!("removing {}", out.display()))?;
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    for name in KEEP {
        let from = run.join(name);
        if from.is_file() {
            copy(&from, &out.join(name))?;
        }
    }
    for entry in std::fs::read_dir(run).with_context(|| format!("reading {}", run.display()))? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if path.is_dir() && name == "lm" {
            copy_dir(&path, &out.join(name))?;
        }
    }
    let config_path = out.join("multitoken.json");
    let text = std::fs::read_to_string(&config_path)
        .with_context(|| format!("reading {}", config_path.display()))?;
    let mut config: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("parsing {}", config_path.display()))?;
    if let Some(base) = config.get("base_model").and_then(|v| v.as_str()) {
        if Path::new(base).is_absolute() {
            bail!("the LM was not trained ({base} is outside the run): the demo recipe trains it fully");
        }
    }
    if let Some(modalities) = config.get_mut("modalities").and_then(|m| m.as_array_mut()) {
        for modality in modalities {
            let kind = modality
                .get("builder")
                .and_then(|b| b.as_str())
                .and_then(|b| b.split('_').next())
                .unwrap_or("encoder")
                .to_string();
            let Some(settings) = modality.get_mut("config").and_then(|c| c.as_object_mut()) else {
                continue;
            };
            for value in settings.values_mut() {
                let Some(path) = value.as_str().map(PathBuf::from) else {
                    continue;
                };
                // An encoder trained in this run: `encoder-N` in the run.
                let in_run = run.join(&path);
                let trained = path.is_relative()
                    && path.to_str().is_some_and(|p| p.starts_with("encoder-"))
                    && in_run.is_dir();
                if trained {
                    if out.join(&kind).exists() {
                        bail!("two encoders of the run would be packaged as {kind}/");
                    }
                    copy_dir(&in_run, &out.join(&kind))?;
                    *value = serde_json::Value::String(kind.clone());
                    continue;
                }
                if !(path.is_absolute() && path.is_dir()) {
                    continue;
                }
                let name = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .with_context(|| format!("encoder directory {}", path.display()))?
                    .to_string();
                copy_dir(&path, &out.join(&name))?;
                *value = serde_json::Value::String(name);
            }
        }
    }
    let text = serde_json::to_string_pretty(&config)? + "\n";
    std::fs::write(&config_path, text).with_context(|| format!("writing {}", config_path.display()))?;
    for (phase, recipe) in recipes.iter().enumerate() {
        copy(recipe, &out.join(format!("train-{}.toml", phase + 1)))?;
    }
    Ok(())
}

fn copy(from: &Path, to: &Path) -> Result<()> {
    std::fs::copy(from, to)
        .map(|_| ())
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))
}

/// Copies the directory `from` into `to` (created), recursively.
pub(super) fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    for entry in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let path = entry?.path();
        let target = to.join(path.file_name().unwrap_or_default());
        if path.is_dir() {
            copy_dir(&path, &target)?;
        } else {
            copy(&path, &target)?;
        }
    }
    Ok(())
}

/// `README.md` of the packaged model: what it is, how it was made, how well it does.
fn write_readme(out: &Path, report: &eval::Report, train_secs: f64) -> Result<()> {
    let mut rows = String::new();
    for (task, (correct, total)) in &report.by_task {
        rows.push_str(&format!("| {task} | {correct}/{total} |\n"));
    }
    let text = format!(
        "# The embedded demo model\n\n\
         A tiny multimodal model trained from scratch by `cargo xtask demo-model build`\n\
         with our own `multitoken train` in two phases (settings in `train-1.toml`,\n\
         `train-2.toml`) on the synthetic\n\
         shapes / beeps / topic-documents data of `datasets/shapes`: a llama-arch LM\n\
         (`lm/`, tokenizer trained with `tokenizers`), a CLIP-arch vision tower, a\n\
         Whisper-arch audio encoder and a BERT sentence encoder, with their projectors.\n\
         It is the default model of `multitoken chat`, `generate` and `serve`.\n\n\
         Training took {train_secs:.0} s on this machine's CPU. Loss curve: `loss.png`,\n\
         every 10th step: `metrics.jsonl`.\n\n\
         Held-out accuracy (greedy answers judged by `multitoken_datasets::judge`):\n\
         **{:.1}%**\n\n| task | correct |\n|---|---|\n{rows}",
        100.0 * report.accuracy()
    );
    let path = out.join("README.md");
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
}
