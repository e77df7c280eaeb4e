//! No silent data loss, on the tiny llama + CLIP fixtures with the real trainer:
//! an output directory holding a run is refused unless `--overwrite-output-dir`
//! (which leaves no old checkpoint behind, and nothing removed when the new run
//! cannot start); `--resume` refuses another run's checkpoint; an output path
//! that resolves to the source model (`..`, symlinks) is refused; a run whose
//! base model lies inside it can be moved and still loads; a missing item file
//! is an error naming the row and the item; `loss.png` is a readable chart.

use std::path::{Path, PathBuf};

use multitoken_lm::loader::LoadOptions;
use multitoken_lm::multimodal::MultimodalModel;
use multitoken_train::trainer::{train, Stage, TrainConfig};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// A fresh temporary directory for one test.
fn temp(name: &str) -> Result<PathBuf, Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join(format!("multitoken-safety-{name}-{}", std::process::id()));
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir)?;
    Ok(dir.canonicalize()?)
}

/// `root/model`: a multitoken.json naming `lm` and `tower` (the fixtures by default).
fn model_dir(root: &Path, lm: &Path, tower: &Path) -> Result<PathBuf, Box<dyn std::error::Error>> {
    multitoken_vision::link();
    let dir = root.join("model");
    std::fs::create_dir_all(&dir)?;
    let config = serde_json::json!({
        "base_model": lm.display().to_string(),
        "modalities": [{
            "builder": "vision_clip",
            "config": {
                "tower": tower.display().to_string(),
                "image_processor": {"size": {"shortest_edge": 30}, "crop_size": {"height": 30, "width": 30}}
            },
            "projector": "mlp2x_gelu"
        }]
    });
    std::fs::write(dir.join("multitoken.json"), serde_json::to_string_pretty(&config)?)?;
    Ok(dir)
}

/// Four rows, one per fixture image; `answers` decides what they say.
fn dataset(root: &Path, name: &str, answers: [&str; 4]) -> Result<PathBuf, Box<dyn std::error::Error>> {
    let images = fixtures().join("vision/images").canonicalize()?;
    let files = ["rgb_64x48.jpg", "gray_33x47.png", "rgba_40x30.png", "rgb_96x64.png"];
    let mut text = String::new();
    for (k, (image, answer)) in files.iter().zip(answers).enumerate() {
        let row = serde_json::json!({
            "id": format!("r{k}"),
            "images": [images.join(image).display().to_string()],
            "messages": [
                {"role": "user", "content": "<image> name?"},
                {"role": "assistant", "content": answer}
            ]
        });
        text.push_str(&row.to_string());
        text.push('\n');
    }
    let path = root.join(name);
    std::fs::write(&path, text)?;
    Ok(path)
}

const ANSWERS: [&str; 4] = ["alpha", "beta", "gamma", "delta"];

fn config(root: &Path, steps: usize) -> Result<TrainConfig, Box<dyn std::error::Error>> {
    let lm = fixtures().join("lm/llama").canonicalize()?;
    let tower = fixtures().join("vision/clip").canonicalize()?;
    let mut cfg = TrainConfig::new(
        model_dir(root, &lm, &tower)?,
        dataset(root, "train.jsonl", ANSWERS)?,
        root.join("out"),
    );
    cfg.max_steps = Some(steps);
    cfg.per_device_train_batch_size = 2;
    cfg.learning_rate = 1e-2;
    cfg.warmup_steps = Some(0);
    cfg.save_steps = 1;
    cfg.progress = false;
    Ok(cfg)
}

fn error_of(cfg: &TrainConfig) -> String {
    match train(cfg) {
        Ok(_) => String::from("(no error)"),
        Err(e) => e.to_string(),
    }
}

fn names(dir: &Path) -> Result<Vec<String>, Box<dyn std::error::Error>> {
    let mut names: Vec<String> = std::fs::read_dir(dir)?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()?;
    names.sort();
    Ok(names)
}

#[test]
fn an_existing_run_is_refused_and_overwrite_replaces_it_whole() -> TestResult {
    let root = temp("overwrite")?;
    let mut cfg = config(&root, 3)?;
    train(&cfg)?;
    let out = cfg.output_dir.clone();
    std::fs::write(out.join("notes.txt"), "mine")?;
    assert!(out.join("checkpoint-3").is_dir() && out.join("checkpoint-1").is_dir());

    // Again into the same directory: refused, nothing touched.
    let err = error_of(&cfg);
    assert!(
        err.contains("already holds a training run") && err.contains("--overwrite-output-dir") && err.contains("checkpoint-1"),
        "{err}"
    );
    assert!(out.join("checkpoint-3").is_dir());

    // --overwrite-output-dir, but the new run cannot start (bad dataset): the old run stays.
    cfg.overwrite_output_dir = true;
    let good_dataset = cfg.dataset.clone();
    cfg.dataset = root.join("missing.jsonl");
    let err = error_of(&cfg);
    assert!(err.contains("missing.jsonl"), "{err}");
    assert!(out.join("checkpoint-3").is_dir() && out.join("metrics.jsonl").is_file(), "a failed start removed the old run");

    // --overwrite-output-dir with --resume is a contradiction.
    cfg.dataset = good_dataset;
    cfg.resume = Some(PathBuf::from("latest"));
    assert!(error_of(&cfg).contains("exclude each other"));
    cfg.resume = None;

    // A shorter run over it: no checkpoint of the old run is left, the metrics are new.
    cfg.max_steps = Some(1);
    cfg.save_steps = 0;
    let summary = train(&cfg)?;
    assert_eq!(summary.steps, 1);
    let left = names(&out)?;
    let checkpoints: Vec<&String> = left.iter().filter(|n| n.starts_with("checkpoint-")).collect();
    assert_eq!(checkpoints, vec!["checkpoint-1"], "{left:?}");
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("checkpoint-1/trainer_state.json"))?)?;
    assert_eq!(state["total_steps"], 1, "checkpoint-1 is the old run's");
    assert_eq!(std::fs::read_to_string(out.join("metrics.jsonl"))?.lines().count(), 1);
    assert_eq!(std::fs::read_to_string(out.join("notes.txt"))?, "mine", "a file the run did not write was removed");
    MultimodalModel::load(&out, &LoadOptions::default())?;
    Ok(())
}

#[test]
fn resume_refuses_another_runs_checkpoint() -> TestResult {
    let root = temp("resume")?;
    let cfg = config(&root, 2)?;
    train(&cfg)?;
    let theirs = cfg.output_dir.join("checkpoint-1");

    // Another dataset, resuming from the first run's checkpoint (given as DIR, or as
    // the latest one of the same output directory).
    let mut other = cfg.clone();
    other.dataset = dataset(&root, "other.jsonl", ["one", "two", "three", "four"])?;
    other.output_dir = root.join("other");
    other.resume = Some(theirs.clone());
    other.max_steps = Some(4);
    let err = error_of(&other);
    assert!(err.contains("another run") && err.contains("dataset") && err.contains("checkpoint-1"), "{err}");
    assert!(!other.output_dir.join("checkpoint-2").exists());
    other.output_dir = cfg.output_dir.clone();
    other.resume = Some(PathBuf::from("latest"));
    let err = error_of(&other);
    assert!(err.contains("another run") && err.contains("dataset") && err.contains("checkpoint-2"), "{err}");

    // Another stage: the setup differs (checked before any weight is read).
    let mut lora = cfg.clone();
    lora.stage = Stage::Lora;
    lora.lora_r = 2;
    lora.resume = Some(PathBuf::from("latest"));
    lora.max_steps = Some(4);
    let err = error_of(&lora);
    assert!(err.contains("another run") && err.contains("training setup"), "{err}");

    // The same run resumes.
    let mut same = cfg.clone();
    same.resume = Some(theirs.clone());
    same.max_steps = Some(3);
    assert_eq!(train(&same)?.steps, 3);

    // A checkpoint without an identity (an older version's) is refused too.
    let state_path = theirs.join("trainer_state.json");
    let mut state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&state_path)?)?;
    state.as_object_mut().ok_or("state")?.remove("run");
    std::fs::write(&state_path, state.to_string())?;
    let err = error_of(&same);
    assert!(err.contains("records no run identity"), "{err}");
    Ok(())
}

#[test]
fn output_that_resolves_to_the_source_model_is_refused() -> TestResult {
    let root = temp("source")?;
    let mut cfg = config(&root, 1)?;
    let model = cfg.model.clone();
    let before = names(&model)?;
    std::fs::create_dir_all(root.join("sub"))?;
    std::os::unix::fs::symlink(&model, root.join("link"))?;
    for out in [
        root.join("sub/../model"),
        root.join("no-such-dir/../model"),
        root.join("link"),
        root.join("link/."),
    ] {
        cfg.output_dir = out.clone();
        let err = error_of(&cfg);
        assert!(err.contains("is the source model directory"), "{}: {err}", out.display());
    }
    // The model given through the symlink, the output as the real path.
    cfg.model = root.join("link");
    cfg.output_dir = model.clone();
    let err = error_of(&cfg);
    assert!(err.contains("is the source model directory"), "{err}");
    // The model's LM directory is refused too.
    let lm_copy = root.join("lm");
    copy_dir(&fixtures().join("lm/llama"), &lm_copy)?;
    let tower = fixtures().join("vision/clip").canonicalize()?;
    let inner = temp("source-lm")?;
    cfg.model = model_dir(&inner, &lm_copy, &tower)?;
    cfg.output_dir = root.join("sub/../lm");
    let err = error_of(&cfg);
    assert!(err.contains("language model directory"), "{err}");
    assert_eq!(names(&model)?, before, "the model directory changed");
    assert!(!lm_copy.join("multitoken.json").exists());
    Ok(())
}

fn copy_dir(from: &Path, to: &Path) -> Result<(), Box<dyn std::error::Error>> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let path = entry?.path();
        if let Some(name) = path.file_name() {
            if path.is_file() {
                std::fs::copy(&path, to.join(name))?;
            }
        }
    }
    Ok(())
}

/// The LM and the tower live inside the output directory: the trained model and
/// its checkpoints name them relative to themselves, so the directory moves.
#[test]
fn a_run_with_its_base_inside_can_be_moved() -> TestResult {
    let root = temp("move")?;
    let out = root.join("out");
    copy_dir(&fixtures().join("lm/llama"), &out.join("base-lm"))?;
    copy_dir(&fixtures().join("vision/clip"), &out.join("tower"))?;
    let mut cfg = config(&root, 2)?;
    cfg.model = model_dir(&root, &out.join("base-lm"), &out.join("tower"))?;
    cfg.output_dir = out.clone();
    train(&cfg)?;
    let saved: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("multitoken.json"))?)?;
    assert_eq!(saved["base_model"], "base-lm");
    assert_eq!(saved["modalities"][0]["config"]["tower"], "tower");
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("checkpoint-1/multitoken.json"))?)?;
    assert_eq!(saved["base_model"], "../base-lm");
    assert_eq!(saved["modalities"][0]["config"]["tower"], "../tower");

    // A LoRA run over it: the adapter names its base relative too.
    let lora_out = root.join("lora");
    copy_dir(&fixtures().join("lm/llama"), &lora_out.join("base-lm"))?;
    let mut lora = cfg.clone();
    lora.stage = Stage::Lora;
    lora.lora_r = 2;
    lora.model = temp("move-lora-model").and_then(|r| model_dir(&r, &lora_out.join("base-lm"), &out.join("tower")))?;
    lora.output_dir = lora_out.clone();
    train(&lora)?;
    let adapter: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(lora_out.join("adapter_config.json"))?)?;
    assert_eq!(adapter["base_model_name_or_path"], "base-lm");

    let moved = root.join("moved");
    std::fs::rename(&out, &moved)?;
    std::fs::remove_dir_all(&cfg.model)?;
    for dir in [moved.clone(), moved.join("checkpoint-1"), moved.join("checkpoint-2")] {
        let model = MultimodalModel::load(&dir, &LoadOptions::default())
            .map_err(|e| format!("{} after the move: {e}", dir.display()))?;
        assert_eq!(model.modality_tokens(), vec!["<image>"]);
    }
    // Full fine-tuning writes the LM into the run (`lm`): moved too, it loads.
    let mut full = config(&temp("move-full")?, 1)?;
    full.stage = Stage::Full;
    train(&full)?;
    let moved_full = full.output_dir.with_file_name("moved-full");
    std::fs::rename(&full.output_dir, &moved_full)?;
    MultimodalModel::load(&moved_full, &LoadOptions::default())?;
    Ok(())
}

#[test]
fn a_missing_item_file_names_the_row_and_the_item() -> TestResult {
    let root = temp("missing")?;
    let mut cfg = config(&root, 1)?;
    let text = std::fs::read_to_string(&cfg.dataset)?;
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let mut row: serde_json::Value = serde_json::from_str(&lines[2])?;
    row["documents"] = serde_json::json!([{"text": "inline text is fine"}, "notes/missing.txt"]);
    row["messages"][0]["content"] = serde_json::json!("<image> <document> <document> name?");
    lines[2] = row.to_string();
    let path = root.join("docs.jsonl");
    std::fs::write(&path, lines.join("\n"))?;
    cfg.dataset = path.clone();
    let err = error_of(&cfg);
    assert!(
        err.contains("docs.jsonl:3 (id r2)") && err.contains("`documents` item 2") && err.contains("missing.txt")
            && err.contains("{\"text\""),
        "{err}"
    );
    // `dataset check` (without a model) reports it too, and reads the inline one as text.
    let report = multitoken_train::data::check(&path, &multitoken_train::data::default_tokens())?;
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    assert!(report.problems[0].contains("(id r2): `documents` item 2"), "{:?}", report.problems);
    let rows = multitoken_train::data::read_jsonl(&root.join("train.jsonl"))?;
    assert_eq!(rows.len(), 4);
    let inline = root.join("inline.jsonl");
    std::fs::write(&inline, r#"{"id": "d", "documents": [{"text": "a b c"}], "messages": [{"role": "user", "content": "<document>"}, {"role": "assistant", "content": "x"}]}"#)?;
    let rows = multitoken_train::data::read_jsonl(&inline)?;
    assert_eq!(rows[0].items["documents"], vec![multitoken_core::Item::Text("a b c".into())]);
    // A bare string is a path, never the document's text.
    std::fs::write(&inline, r#"{"id": "d", "documents": ["a b c"], "messages": [{"role": "user", "content": "<document>"}, {"role": "assistant", "content": "x"}]}"#)?;
    let err = multitoken_train::data::read_jsonl(&inline).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("`documents` item 1") && err.contains("a b c"), "{err}");
    Ok(())
}

#[test]
fn loss_png_is_a_chart_of_the_run() -> TestResult {
    let root = temp("plot")?;
    let cfg = config(&root, 3)?;
    train(&cfg)?;
    let img = image::open(cfg.output_dir.join("loss.png"))?.to_rgb8();
    assert_eq!(img.dimensions(), (multitoken_train::plot::WIDTH, multitoken_train::plot::HEIGHT));
    let (left, top, right, bottom) = multitoken_train::plot::PLOT;
    let inked = |(x0, y0, x1, y1): (u32, u32, u32, u32)| {
        (y0..y1).flat_map(|y| (x0..x1).map(move |x| (x, y))).filter(|&(x, y)| img.get_pixel(x, y).0.iter().any(|&c| c < 200)).count()
    };
    assert!(inked((0, 0, img.width(), top - 20)) > 100, "no title");
    assert!(inked((0, top, left - 6, bottom)) > 30, "no loss axis labels");
    assert!(inked((right + 6, top, img.width(), bottom)) > 50, "no learning-rate axis labels");
    assert!(inked((left, bottom + 6, right, img.height())) > 30, "no step labels");
    assert!(inked((right - 260, top + 4, right - 4, top + 50)) > 100, "no legend");
    Ok(())
}

/// Issue 23: trained `.safetensors` came out `0600` (safetensors writes a private
/// temporary file), and `--lora-r 100000000` aborted on allocation.
#[test]
fn outputs_follow_the_umask_and_a_huge_lora_rank_is_refused() -> TestResult {
    use std::os::unix::fs::PermissionsExt;
    let root = temp("modes")?;
    let mut cfg = config(&root, 1)?;
    let mut huge = cfg.clone();
    huge.stage = Stage::Lora;
    huge.lora_r = 100_000_000;
    let err = error_of(&huge);
    assert!(err.contains("lora_r 100000000 is larger than") && err.contains("the rank can be at most min(in, out)"), "{err}");
    cfg.stage = Stage::Lora;
    cfg.lora_r = 2;
    train(&cfg)?;
    let status = std::fs::read_to_string("/proc/self/status")?;
    let umask = status
        .lines()
        .find_map(|l| l.strip_prefix("Umask:"))
        .map(|m| u32::from_str_radix(m.trim(), 8))
        .transpose()?
        .unwrap_or(0o022);
    let mut seen = 0;
    let mut dirs = vec![cfg.output_dir.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "safetensors") {
                let mode = std::fs::metadata(&path)?.permissions().mode() & 0o777;
                assert_eq!(mode, 0o666 & !umask, "{} is {mode:o}", path.display());
                seen += 1;
            }
        }
    }
    assert!(seen >= 3, "only {seen} safetensors files");
    Ok(())
}
