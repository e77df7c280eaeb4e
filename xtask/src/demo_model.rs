//! `cargo xtask demo-model`: the embedded demo model, built from scratch.
//!
//! ```text
//! cargo xtask demo-model build    [--data DIR] [--model OUT] [--seed N] [--style S] [--tower-steps N]
//! cargo xtask demo-model package  --out RUN_DIR [--model OUT] [--data DIR] [--style S]
//! cargo xtask demo-model data     [--data DIR] [--seed N] [--train N] [--heldout N] [--style S]
//! cargo xtask demo-model skeleton [--data DIR] [--out DIR] [--seed N] [--style S]
//! cargo xtask demo-model tower    [--out DIR] [--style S] [--tower-steps N] [--tower-lr F]
//! cargo xtask demo-model double-resolution --out DIR
//! cargo xtask demo-model grow-lm  --out DIR --layers N [--seed N]
//! cargo xtask demo-model pretrained-lm --gguf FILE [--vocab N] [--model FROM] [--out DIR] [--seed N]
//! cargo xtask demo-model eval     [--model DIR] [--dataset FILE] [--limit N] [--totals-only]
//! cargo xtask demo-model samples  [--out DIR]
//! ```
//!
//! `build` runs the whole recipe (data, skeleton, `multitoken train --config
//! xtask/demo-model.toml`, packaging into `--model`, default
//! `examples/demo-model`, held-out eval into its README);
//! `package` packages one training run (`--out`) into `--model` as a
//! self-contained directory (trained encoders named `vision/`, `audio/`,
//! `document/`) and evaluates it on `--data`'s held-out split, writing no
//! README or recipe (a hand-run phase is not the recipe's);
//! `data` writes the synthetic dataset (`multitoken-datasets`, rows per task;
//! `--style varied` for the varied phrasings and images, `--style unlike` for
//! the test set that shares none of them: see `multitoken_datasets::Style`);
//! with `--style varied` (or unlike) the vision tower is pretrained first
//! (`tower`, cached) and frozen while the LM trains (`xtask/demo-model-styled*.toml`);
//! `tower` pretrains the tower of the skeleton in `--out` in place;
//! `skeleton` trains the tokenizers on its training text and writes a loadable
//! model directory with seeded random weights (tiny llama LM, CLIP tower,
//! Whisper, sentence-transformers BERT, projectors, `multitoken.json`); `eval`
//! answers held-out questions greedily and reports accuracy per task;
//! `pretrained-lm` writes a skeleton whose LM takes a GGUF's vocabulary, cut to
//! `--vocab` pieces, and its embeddings projected to the LM's width (encoders
//! copied from `--model`; see `pretrained`);
//! `grow-lm` appends `--layers` minus the current depth of layers to the LM in
//! `--out` that change no answer until trained (zero output projections; see
//! `grow`);
//! `samples` writes the README's example inputs (default `examples/shapes`).
//! Defaults: data in `target/demo-data`, skeleton in `target/demo-model/init`,
//! eval of `examples/demo-model` on `target/demo-data/heldout.jsonl`.

mod build;
mod eval;
pub(crate) mod grow;
mod pretrained;
mod random;
mod skeleton;
mod tokenizer;
mod tower;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use multitoken_datasets::{GenerateConfig, Row, Style};

/// Seed of the dataset and of the random weights.
pub const SEED: u64 = 20_261_123;

/// Training rows of the two-image task, as a multiple of the other tasks'.
const COMPARE_WEIGHT: usize = 3;

/// How many times more training rows describing a clip gets (phase 15 on).
const AUDIO_DESCRIBE_WEIGHT: usize = 2;

#[derive(Clone)]
struct Args {
    data: PathBuf,
    out: PathBuf,
    model: PathBuf,
    dataset: Option<PathBuf>,
    seed: u64,
    train: usize,
    heldout: usize,
    limit: usize,
    style: Style,
    /// Tower pretraining steps (`tower`, `build`); the default when `None`.
    tower_steps: Option<usize>,
    /// Tower pretraining peak learning rate; the default when `None` (a
    /// lower one suits `tower` on an already trained tower).
    tower_lr: Option<f64>,
    /// `eval`: print the per-task totals only, not each wrong answer (a
    /// blind test set stays blind).
    totals_only: bool,
    /// `pretrained-lm`: the GGUF whose vocabulary and embeddings the LM takes.
    gguf: Option<PathBuf>,
    /// `pretrained-lm`: the LM's vocabulary size.
    vocab: usize,
    /// `grow-lm`: the LM's depth after growing.
    layers: usize,
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn parse(args: &[String]) -> Result<Args> {
    let root = root();
    let mut parsed = Args {
        data: root.join("target/demo-data"),
        out: root.join("target/demo-model/init"),
        model: root.join("examples/demo-model"),
        dataset: None,
        seed: SEED,
        train: GenerateConfig::default().train_per_task,
        heldout: GenerateConfig::default().heldout_per_task,
        limit: usize::MAX,
        style: Style::Classic,
        tower_steps: None,
        tower_lr: None,
        totals_only: false,
        gguf: None,
        vocab: 16384,
        layers: 0,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        if flag == "--totals-only" {
            parsed.totals_only = true;
            continue;
        }
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--data" => parsed.data = PathBuf::from(value()?),
            "--out" => parsed.out = PathBuf::from(value()?),
            "--model" => parsed.model = PathBuf::from(value()?),
            "--dataset" => parsed.dataset = Some(PathBuf::from(value()?)),
            "--seed" => parsed.seed = value()?.parse().context("--seed")?,
            "--train" => parsed.train = value()?.parse().context("--train")?,
            "--heldout" => parsed.heldout = value()?.parse().context("--heldout")?,
            "--limit" => parsed.limit = value()?.parse().context("--limit")?,
            "--gguf" => parsed.gguf = Some(PathBuf::from(value()?)),
            "--vocab" => parsed.vocab = value()?.parse().context("--vocab")?,
            "--layers" => parsed.layers = value()?.parse().context("--layers")?,
            "--tower-steps" => parsed.tower_steps = Some(value()?.parse().context("--tower-steps")?),
            "--tower-lr" => parsed.tower_lr = Some(value()?.parse().context("--tower-lr")?),
            "--style" => {
                let name = value()?;
                parsed.style = Style::from_name(name).with_context(|| {
                    format!("--style: unknown style {name:?} (classic, varied or unlike)")
                })?
            }
            other => bail!("unknown argument {other:?}\n\n{USAGE}"),
        }
    }
    Ok(parsed)
}

/// The commands and options, as the module docs list them.
const USAGE: &str = "\
usage: cargo xtask demo-model <command> [options]

  build    [--data DIR] [--model OUT] [--seed N] [--style S] [--tower-steps N] [--tower-lr F]
  package  --out RUN_DIR [--model OUT] [--data DIR] [--style S]
  data     [--data DIR] [--seed N] [--train N] [--heldout N] [--style S]
  skeleton [--data DIR] [--out DIR] [--seed N] [--style S]
  tower    [--out DIR] [--style S] [--tower-steps N] [--tower-lr F]
  double-resolution --out DIR
  grow-lm  --out DIR --layers N [--seed N]
  pretrained-lm --gguf FILE [--vocab N] [--model FROM] [--out DIR] [--seed N]
  eval     [--model DIR] [--dataset FILE] [--limit N] [--totals-only]
  samples  [--out DIR]

S is classic, varied or unlike; details in xtask/src/demo_model.rs.";

/// Run this task.
pub fn run(args: &[String]) -> Result<()> {
    let (command, rest) = match args.split_first() {
        Some((c, rest)) => (c.as_str(), rest),
        None => {
            println!("{USAGE}");
            return Ok(());
        }
    };
    if matches!(command, "-h" | "--help" | "help") || rest.iter().any(|a| a == "-h" || a == "--help") {
        println!("{USAGE}");
        return Ok(());
    }
    let args = parse(rest)?;
    match command {
        "build" => build::run(&args),
        "package" => build::package_and_evaluate(&args.out, &args, None).map(|_| ()),
        "data" => data(&args),
        "tower" => {
            // Pretrains the tower of the skeleton in --out (see `tower`).
            let tower = skeleton::tower_for(args.style);
            tower::pretrain(
                &args.out.join("vision"),
                tower::Pretrain::for_tower(tower, args.seed, args.tower_steps, args.tower_lr),
            )
            .map(|_| ())
        }
        // Appends layers to the LM in --out that change no answer (see `grow`).
        "grow-lm" => grow::grow_lm(&args.out.join("lm"), args.layers, args.seed),
        // Doubles the resolution of the tower in --out (see `tower::double_resolution`).
        "double-resolution" => tower::double_resolution(&args.out.join("vision")),
        "skeleton" => {
            let texts = training_text(&args.data.join("train.jsonl"))?;
            skeleton::write(&args.out, &texts, args.seed, skeleton::tower_for(args.style))
        }
        // A skeleton whose LM takes a GGUF's vocabulary and embeddings (see `pretrained`).
        "pretrained-lm" => {
            let gguf = args.gguf.as_deref().context("pretrained-lm needs --gguf FILE")?;
            pretrained::write(gguf, args.vocab, &args.model, &args.out, args.seed)
        }
        "eval" => {
            let dataset = args
                .dataset
                .clone()
                .unwrap_or_else(|| args.data.join("heldout.jsonl"));
            let report = eval::evaluate(&args.model, &dataset, args.limit, !args.totals_only)?;
            eval::print(&report);
            Ok(())
        }
        "samples" => {
            let out = if rest.iter().any(|a| a == "--out") {
                args.out.clone()
            } else {
                root().join("examples/shapes")
            };
            samples(&out, args.seed)
        }
        other => {
            bail!("unknown demo-model command {other:?}\n\n{USAGE}")
        }
    }
}

fn data(args: &Args) -> Result<()> {
    let config = GenerateConfig {
        seed: args.seed,
        train_per_task: args.train,
        heldout_per_task: args.heldout,
        // The two-image task needs more examples than the others (measured:
        // its checks stayed at 58-65% with as many rows as the rest), and so
        // does describing a clip (phase 14: the weakest task on every blind
        // set, 52-62%, its misses answering the count or the pitch alone).
        train_weights: vec![
            (multitoken_datasets::Task::ImageCompare, COMPARE_WEIGHT),
            (
                multitoken_datasets::Task::AudioDescribe,
                AUDIO_DESCRIBE_WEIGHT,
            ),
        ],
        style: args.style,
        ..GenerateConfig::default()
    };
    let summary = multitoken_datasets::generate(&args.data, &config)?;
    println!(
        "{}: {} rows; {}: {} rows",
        summary.train_file.display(),
        summary.train_rows,
        summary.heldout_file.display(),
        summary.heldout_rows
    );
    Ok(())
}

/// The README's sample inputs: two images, two beep clips, two documents.
fn samples(out: &Path, seed: u64) -> Result<()> {
    use multitoken_datasets::audio::{self, BeepSpec, Pitch};
    use multitoken_datasets::documents::{self, Topic};
    use multitoken_datasets::images::{self, Colour, Shape, ShapeSpec};
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut rng = multitoken_datasets::Rng::new(seed ^ 0x5341_4d50);
    let write = |name: &str, bytes: &[u8]| -> Result<()> {
        let path = out.join(name);
        std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))
    };
    for (name, shape, colour) in [
        ("red-circle.png", Shape::Circle, Colour::Red),
        ("blue-triangle.png", Shape::Triangle, Colour::Blue),
    ] {
        let spec = ShapeSpec::random(shape, colour, &mut rng);
        let png =
            images::png_bytes(&images::render(&spec, &mut rng)).map_err(anyhow::Error::msg)?;
        write(name, &png)?;
    }
    for (name, count, pitch) in [
        ("three-high-beeps.wav", 3, Pitch::High),
        ("two-low-beeps.wav", 2, Pitch::Low),
    ] {
        let spec = BeepSpec::random(count, pitch, &mut rng);
        write(
            name,
            &audio::wav_bytes(&audio::render(&spec), audio::SAMPLE_RATE),
        )?;
    }
    for (name, topic) in [("cooking.txt", Topic::Cooking), ("space.txt", Topic::Space)] {
        write(name, documents::render(topic, &mut rng).as_bytes())?;
    }
    println!("samples in {}", out.display());
    Ok(())
}

/// Questions, answers and document texts of a split: the tokenizers' corpus.
fn training_text(jsonl: &Path) -> Result<Vec<String>> {
    let base = jsonl.parent().unwrap_or(Path::new("."));
    let text = std::fs::read_to_string(jsonl).with_context(|| {
        format!(
            "reading {} (run `cargo xtask demo-model data` first)",
            jsonl.display()
        )
    })?;
    let mut texts = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let row: Row =
            serde_json::from_str(line).with_context(|| format!("{}:{}", jsonl.display(), n + 1))?;
        for m in &row.messages {
            texts.push(m.content.clone());
        }
        for doc in &row.documents {
            let path = base.join(doc);
            texts.push(
                std::fs::read_to_string(&path)
                    .with_context(|| format!("reading {}", path.display()))?,
            );
        }
    }
    Ok(texts)
}
