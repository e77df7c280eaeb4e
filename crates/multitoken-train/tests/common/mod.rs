//! What the trainer's end-to-end tests share: the fixture paths, a scratch
//! directory, the tiny llama + CLIP model directory and an eight-row image
//! dataset.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// A fresh temporary directory for one test.
pub fn temp(name: &str) -> Result<PathBuf, Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join(format!("multitoken-train-{name}-{}", std::process::id()));
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Model dir: the tiny llama + the tiny CLIP tower, no projector weights yet.
pub fn model_dir(root: &Path) -> Result<PathBuf, Box<dyn std::error::Error>> {
    model_dir_on(root, &fixtures().join("lm/llama").canonicalize()?)
}

/// [`model_dir`] with `base` (an HF directory or a GGUF file) as the LM.
pub fn model_dir_on(root: &Path, base: &Path) -> Result<PathBuf, Box<dyn std::error::Error>> {
    multitoken_vision::link();
    let dir = root.join("model");
    std::fs::create_dir_all(&dir)?;
    let config = serde_json::json!({
        "base_model": base.display().to_string(),
        "modalities": [{
            "builder": "vision_clip",
            "config": {
                "tower": fixtures().join("vision/clip").canonicalize()?.display().to_string(),
                "image_processor": {"size": {"shortest_edge": 30}, "crop_size": {"height": 30, "width": 30}}
            },
            "projector": "mlp2x_gelu"
        }]
    });
    std::fs::write(
        dir.join("multitoken.json"),
        serde_json::to_string_pretty(&config)?,
    )?;
    Ok(dir)
}

/// Eight rows: four fixture images, each with its own one-word answer.
pub fn dataset(root: &Path) -> Result<PathBuf, Box<dyn std::error::Error>> {
    let images = fixtures().join("vision/images").canonicalize()?;
    let pairs = [
        ("rgb_64x48.jpg", "alpha"),
        ("gray_33x47.png", "beta"),
        ("rgba_40x30.png", "gamma"),
        ("rgb_96x64.png", "delta"),
    ];
    let mut text = String::new();
    for round in 0..2 {
        for (k, (image, answer)) in pairs.iter().enumerate() {
            let row = serde_json::json!({
                "id": format!("r{round}{k}"),
                "images": [images.join(image).display().to_string()],
                "messages": [
                    {"role": "user", "content": "<image> name?"},
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
