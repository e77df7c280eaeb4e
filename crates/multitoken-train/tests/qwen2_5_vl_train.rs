//! `train --stage projectors` on a Qwen2.5-VL checkpoint as transformers saves
//! it (`tests/fixtures/qwen2_5_vl/model`, rewritten once as a `multitoken.json`
//! directory under a temporary `MULTITOKEN_WEIGHTS`): the RMSNorm patch merger
//! gets gradients through the window-attention tower's rows at M-RoPE
//! positions, the loss is finite and falls, and the output loads with its
//! `<|image_pad|>` modality.

use std::path::{Path, PathBuf};

use multitoken_lm::loader::LoadOptions;
use multitoken_lm::multimodal::MultimodalModel;
use multitoken_train::trainer::{train, Stage, TrainConfig};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/qwen2_5_vl")
}

/// Eight rows: four fixture images (landscape, portrait, one beyond
/// max_pixels, an RGBA), each with its own one-word answer.
fn dataset(root: &Path) -> Result<PathBuf, Box<dyn std::error::Error>> {
    let images = fixtures().join("images").canonicalize()?;
    let pairs = [("land_61x37.png", "alpha"), ("port_29x70.png", "beta"), ("big_203x117.png", "gamma"), ("rgba_40x33.png", "delta")];
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

#[test]
fn qwen2_5_vl_projector_stage_trains_the_merger() -> TestResult {
    multitoken_vision::link();
    multitoken_vlm::link();
    let root = std::env::temp_dir().join(format!("multitoken-qwen2-5-vl-train-{}", std::process::id()));
    if root.exists() {
        std::fs::remove_dir_all(&root)?;
    }
    std::fs::create_dir_all(&root)?;
    // The only test in this process, so setting the process-wide variable is safe.
    std::env::set_var("MULTITOKEN_WEIGHTS", root.join("weights"));
    let mut cfg = TrainConfig::new(fixtures().join("model"), dataset(&root)?, root.join("out"));
    cfg.stage = Stage::Projectors;
    cfg.max_steps = Some(12);
    cfg.per_device_train_batch_size = 4;
    cfg.learning_rate = 1e-2;
    cfg.warmup_steps = Some(0);
    cfg.progress = false;
    let summary = train(&cfg)?;
    let losses: Vec<f64> = summary.log.iter().map(|l| l.loss).collect();
    eprintln!("qwen2.5-vl projectors losses {losses:?}");
    assert_eq!(losses.len(), 12);
    assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");
    assert!(summary.log.iter().all(|l| l.grad_norm > 0.0), "no gradient: {:?}", summary.log);
    let (first, last) = (mean(&losses[..3]), mean(&losses[9..]));
    assert!(last < first, "loss did not fall: {first} -> {last} ({losses:?})");
    let model = MultimodalModel::load(&cfg.output_dir, &LoadOptions::default())?;
    assert_eq!(model.modality_tokens(), vec!["<|image_pad|>"]);
    std::fs::remove_dir_all(&root)?;
    Ok(())
}
