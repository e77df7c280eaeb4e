//! A Qwen2-VL or Qwen2.5-VL checkpoint rewritten as a `multitoken.json` model directory, so
//! that training (`train --stage projectors|lora`) works on it in our layout.
//!
//! ```text
//! out/
//!   multitoken.json          base_model "lm"; one `vision_qwen2_vl` entry whose
//!                            projector is `qwen2_vl_merger` (RMSNorm for Qwen2.5-VL),
//!                            prefix `merger`; the tower config carries the family's model_type
//!   projectors.safetensors   merger.*               (from visual.merger.* / model.visual.merger.*)
//!   vision/model.safetensors visual.*               (the tower, merger left out)
//!   lm/                      a `qwen2_vl_text` HF directory (model.*, lm_head.weight; M-RoPE in
//!                            its config) with the tokenizer, generation and chat-template files
//!   preprocessor_config.json / processor_config.json   copied
//! ```
//!
//! Tensors are copied byte for byte from the memory-mapped files.

use std::path::Path;

use safetensors::tensor::TensorView;
use safetensors::SafeTensors;
use serde_json::{json, Value};

use super::{family_of, text_config, IMAGE_TOKEN, VISION_BUILDER};
use crate::idefics2::export::{copy_if_present, io_error, map_checkpoint, write_json, write_tensors, LM_FILES, PROCESSOR_FILES};
use crate::Result;

/// Writes `dir`'s Qwen2-VL or Qwen2.5-VL checkpoint to `out` as a `multitoken.json` model
/// directory (created; must not hold a model already).
pub fn export_qwen2_vl(dir: &Path, out: &Path) -> Result<()> {
    let config_path = dir.join("config.json");
    let root = super::read_config(&config_path)?;
    let family = family_of(&root, &config_path)?;
    let vision_config = family.vision_config(&root).ok_or_else(|| io_error(&config_path, "no `vision_config` object"))?;
    if out.join("multitoken.json").exists() {
        return Err(io_error(out, "already holds a multitoken.json; choose an empty directory"));
    }
    let maps = map_checkpoint(dir)?;
    let files: Vec<SafeTensors<'_>> = maps
        .iter()
        .map(|(path, map)| {
            SafeTensors::deserialize(map).map_err(|e| io_error(path, &format!("not a safetensors file: {e}")))
        })
        .collect::<Result<_>>()?;
    let names: Vec<(usize, String)> = files
        .iter()
        .enumerate()
        .flat_map(|(index, file)| file.names().into_iter().map(move |name| (index, name.to_string())))
        .collect();
    let has = |key: &str| names.iter().any(|(_, n)| n == key);
    let (text, vision) = if has("model.embed_tokens.weight") {
        ("model.", "visual.")
    } else if has("model.language_model.embed_tokens.weight") {
        ("model.language_model.", "model.visual.")
    } else {
        let message = format!("no `model.embed_tokens.weight` or `model.language_model.embed_tokens.weight` ({})", family.name());
        return Err(io_error(dir, &message));
    };

    let mut lm: Vec<(String, TensorView<'_>)> = Vec::new();
    let mut tower = Vec::new();
    let mut merger = Vec::new();
    for (index, name) in &names {
        let view = files[*index].tensor(name).map_err(|e| io_error(dir, &format!("{name}: {e}")))?;
        if let Some(rest) = name.strip_prefix(&format!("{vision}merger.")) {
            merger.push((format!("merger.{rest}"), view));
        } else if let Some(rest) = name.strip_prefix(vision) {
            tower.push((format!("visual.{rest}"), view));
        } else if let Some(rest) = name.strip_prefix(text) {
            lm.push((format!("model.{rest}"), view));
        } else if name.starts_with("lm_head.") {
            lm.push((name.clone(), view));
        }
    }
    for (what, list) in [("language model", &lm), ("vision tower", &tower), ("patch merger", &merger)] {
        if list.is_empty() {
            return Err(io_error(dir, &format!("the checkpoint has no {what} tensors")));
        }
    }
    let tied = !lm.iter().any(|(name, _)| name == "lm_head.weight");

    let lm_dir = out.join("lm");
    std::fs::create_dir_all(&lm_dir).map_err(|e| io_error(&lm_dir, &e.to_string()))?;
    std::fs::create_dir_all(out.join("vision")).map_err(|e| io_error(out, &e.to_string()))?;
    write_tensors(lm, &lm_dir.join("model.safetensors"))?;
    write_tensors(tower, &out.join("vision").join("model.safetensors"))?;
    write_tensors(merger, &out.join("projectors.safetensors"))?;

    let mut lm_config = text_config(&root);
    if let Value::Object(map) = &mut lm_config {
        map.insert("tie_word_embeddings".into(), json!(tied));
    }
    write_json(&lm_dir.join("config.json"), &lm_config)?;
    for file in LM_FILES {
        copy_if_present(&dir.join(file), &lm_dir.join(file))?;
    }
    for file in PROCESSOR_FILES {
        copy_if_present(&dir.join(file), &out.join(file))?;
    }
    let spec = family.merger_spec(&vision_config);
    let manifest = json!({
        "base_model": "lm",
        "modalities": [{
            "builder": VISION_BUILDER,
            "config": {
                "tower": "vision",
                "tower_config": vision_config,
                "weights_prefix": "visual",
                "image_token": IMAGE_TOKEN,
                "projector": spec,
            },
            "projector": spec,
            "projector_prefix": "merger",
        }],
    });
    write_json(&out.join("multitoken.json"), &manifest)
}
