//! `train --stage projectors|lora` on LLaVA-NeXT / LLaVA-OneVision checkpoints
//! as transformers saves them (`tests/fixtures/llava_next`, rewritten once as a
//! `multitoken.json` directory under a temporary `MULTITOKEN_WEIGHTS`): the
//! projector with its `image_newline` (stage 1; OneVision's through the
//! `anyres_max` interpolation) or LoRA adapters (stage 2) get gradients, the
//! loss is finite and falls, and the output loads.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use multitoken_lm::loader::LoadOptions;
use multitoken_lm::multimodal::MultimodalModel;
use multitoken_train::trainer::{train, Stage, TrainConfig};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// `MULTITOKEN_WEIGHTS` is process-wide: one test at a time sets and uses it.
static WEIGHTS_ENV: Mutex<()> = Mutex::new(());

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/llava_next")
}

fn temp(name: &str) -> Result<PathBuf, Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join(format!("multitoken-llava-next-train-{name}-{}", std::process::id()));
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Eight rows: four fixture images (landscape, tall portrait, a large one whose
/// OneVision grid is interpolated, an RGBA), each with its own one-word answer.
fn dataset(root: &Path) -> Result<PathBuf, Box<dyn std::error::Error>> {
    let images = fixtures().join("images").canonicalize()?;
    let pairs = [("a_40x30.png", "alpha"), ("b_23x61.png", "beta"), ("f_300x280.png", "gamma"), ("e_33x50_rgba.png", "delta")];
    let mut text = String::new();
    for round in 0..2 {
        for (k, (image, answer)) in pairs.iter().enumerate() {
            let row = serde_json::json!({
                "id": format!("r{round}{k}"),
                "images": [images.join(image).display().to_string()],
                "messages": [
                    {"role": "user", "content": "<image>name?"},
                    {"role": "assistant", "content": answer}
                ]
            });
            text.push_str(&row.to_string());
            text.push('\n');
        }
    }
    let path = root.join("train.jsonl");
    std::fs::write(&path, text)?;
    Ok(path)
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len() as f64
}

fn run(name: &str, stage: Stage) -> TestResult {
    multitoken_vision::link();
    multitoken_vlm::link();
    let _guard = WEIGHTS_ENV.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let root = temp(&format!("{name}-{stage:?}"))?;
    std::env::set_var("MULTITOKEN_WEIGHTS", root.join("weights"));
    let mut cfg = TrainConfig::new(fixtures().join(name), dataset(&root)?, root.join("out"));
    cfg.stage = stage;
    cfg.max_steps = Some(12);
    cfg.per_device_train_batch_size = 4;
    cfg.learning_rate = 1e-2;
    cfg.warmup_steps = Some(0);
    cfg.progress = false;
    if stage == Stage::Lora {
        cfg.lora_r = 4;
        cfg.lora_alpha = 8.0;
    }
    let summary = train(&cfg)?;
    let losses: Vec<f64> = summary.log.iter().map(|l| l.loss).collect();
    eprintln!("{name} {stage:?} losses {losses:?}");
    assert_eq!(losses.len(), 12, "{name} {stage:?}");
    assert!(losses.iter().all(|l| l.is_finite()), "{name} {stage:?}: {losses:?}");
    assert!(summary.log.iter().all(|l| l.grad_norm > 0.0), "{name} {stage:?}: no gradient: {:?}", summary.log);
    let (first, last) = (mean(&losses[..3]), mean(&losses[9..]));
    assert!(last < first, "{name} {stage:?}: loss did not fall: {first} -> {last} ({losses:?})");
    let model = MultimodalModel::load(&cfg.output_dir, &LoadOptions::default())?;
    assert_eq!(model.modality_tokens(), vec!["<image>"]);
    if stage == Stage::Lora {
        assert!(cfg.output_dir.join("adapter_model.safetensors").is_file());
    }
    std::fs::remove_dir_all(&root)?;
    Ok(())
}

#[test]
fn llava_next_projector_stage_trains_the_projector() -> TestResult {
    run("next", Stage::Projectors)
}

#[test]
fn onevision_projector_stage_trains_the_projector() -> TestResult {
    run("ov", Stage::Projectors)
}

#[test]
fn onevision_lora_stage_trains_adapters() -> TestResult {
    run("ov", Stage::Lora)
}
