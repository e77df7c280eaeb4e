//! An Idefics3 / SmolVLM checkpoint rewritten as a `multitoken.json` model
//! directory, so that training (`train --stage projectors|lora`) works on it.
//!
//! ```text
//! out/
//!   multitoken.json          base_model "lm"; one `vision_idefics3` entry whose
//!                            projector is `idefics3_connector`, prefix `connector`
//!   projectors.safetensors   connector.*            (from model.connector.*)
//!   vision/model.safetensors vision_model.*         (from model.vision_model.*)
//!   lm/                      a Llama HF directory (model.*, lm_head.weight) with the
//!                            tokenizer, generation and chat-template files
//!   preprocessor_config.json / processor_config.json   copied
//! ```
//!
//! Tensors are copied byte for byte from the memory-mapped files.

use std::path::Path;

use safetensors::tensor::TensorView;
use safetensors::SafeTensors;
use serde_json::{json, Value};

use super::{add_tokenizer_tokens, builder_config};
use super::config::Idefics3Config;
use super::VISION_BUILDER;
use crate::idefics2::export::{copy_if_present, io_error, map_checkpoint, write_json, write_tensors, LM_FILES, PROCESSOR_FILES};
use crate::Result;

/// Writes `dir`'s Idefics3 / SmolVLM checkpoint to `out` as a `multitoken.json`
/// model directory (created; must not hold a model already).
pub fn export_idefics3(dir: &Path, out: &Path) -> Result<()> {
    let cfg = Idefics3Config::read(&dir.join("config.json"))?;
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
    let mut lm: Vec<(String, TensorView<'_>)> = Vec::new();
    let mut vision = Vec::new();
    let mut connector = Vec::new();
    for file in &files {
        for name in file.names() {
            let view = file.tensor(name).map_err(|e| io_error(dir, &format!("{name}: {e}")))?;
            if let Some(rest) = name.strip_prefix("model.text_model.") {
                lm.push((format!("model.{rest}"), view));
            } else if let Some(rest) = name.strip_prefix("lm_head.") {
                lm.push((format!("lm_head.{rest}"), view));
            } else if let Some(rest) = name.strip_prefix("model.vision_model.") {
                vision.push((format!("vision_model.{rest}"), view));
            } else if let Some(rest) = name.strip_prefix("model.connector.") {
                connector.push((format!("connector.{rest}"), view));
            }
        }
    }
    for (what, list) in [("text model", &lm), ("vision model", &vision), ("connector", &connector)] {
        if list.is_empty() {
            return Err(io_error(dir, &format!("the checkpoint has no {what} tensors under `model.`")));
        }
    }
    let tied = !lm.iter().any(|(name, _)| name == "lm_head.weight");

    let lm_dir = out.join("lm");
    std::fs::create_dir_all(&lm_dir).map_err(|e| io_error(&lm_dir, &e.to_string()))?;
    std::fs::create_dir_all(out.join("vision")).map_err(|e| io_error(out, &e.to_string()))?;
    write_tensors(lm, &lm_dir.join("model.safetensors"))?;
    write_tensors(vision, &out.join("vision").join("model.safetensors"))?;
    write_tensors(connector, &out.join("projectors.safetensors"))?;

    let mut text_config = cfg.text_config.clone();
    if let Value::Object(map) = &mut text_config {
        map.insert("architectures".into(), json!(["LlamaForCausalLM"]));
        map.insert("tie_word_embeddings".into(), json!(tied));
    }
    write_json(&lm_dir.join("config.json"), &text_config)?;
    for file in LM_FILES {
        copy_if_present(&dir.join(file), &lm_dir.join(file))?;
    }
    for file in PROCESSOR_FILES {
        copy_if_present(&dir.join(file), &out.join(file))?;
    }
    let spec = cfg.connector_spec();
    let mut config = builder_config(&cfg, "vision", "vision_model");
    add_tokenizer_tokens(&mut config, dir);
    let manifest = json!({
        "base_model": "lm",
        // The processor tokenises the rendered chat with the tokenizer's leading tokens.
        "chat_adds_bos": true,
        "modalities": [{
            "builder": VISION_BUILDER,
            "config": config,
            "projector": spec,
            "projector_prefix": "connector",
        }],
    });
    write_json(&out.join("multitoken.json"), &manifest)
}
