//! An Idefics2 (or Cephalo MoE) checkpoint rewritten as a `multitoken.json`
//! model directory, so that everything that works on our own layout (training
//! the connector or LoRA adapters, `moe build`, packaging) works on it too.
//!
//! ```text
//! out/
//!   multitoken.json          base_model "lm"; one `vision_siglip` entry whose
//!                            projector is `idefics2_connector`, prefix `connector`
//!   projectors.safetensors   connector.*            (from model.connector.*)
//!   vision/model.safetensors vision_model.*         (from model.vision_model.*)
//!   lm/                      a Mistral HF directory (model.*, lm_head.weight) with the
//!                            tokenizer, generation and chat-template files; for Cephalo's
//!                            MoE, multitoken-moe's layout (mlp.experts.{e}.*, mlp.gate.*)
//!                            and its moe.json (routing `cephalo`)
//!   preprocessor_config.json / processor_config.json   copied
//! ```
//!
//! Tensors are copied byte for byte from the memory-mapped files, in their own
//! dtype: nothing is converted and no f32 copy of the model is made.

use std::collections::HashMap;
use std::path::Path;

use memmap2::Mmap;
use safetensors::tensor::TensorView;
use safetensors::SafeTensors;
use serde_json::{json, Value};

use super::config::Idefics2Config;
use super::{FAKE_IMAGE_TOKEN, VISION_BUILDER};
use crate::{Error, Result};

/// Files copied from the checkpoint into `out/lm/` when present.
pub(crate) const LM_FILES: [&str; 7] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "added_tokens.json",
];
/// Processor files copied into `out/` when present.
pub(crate) const PROCESSOR_FILES: [&str; 2] = ["preprocessor_config.json", "processor_config.json"];

/// Writes `dir`'s Idefics2 checkpoint to `out` as a `multitoken.json` model
/// directory (created; must not hold a model already).
pub fn export_idefics2(dir: &Path, out: &Path) -> Result<()> {
    let cfg = Idefics2Config::read(&dir.join("config.json"))?;
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
    let root = ["model.model.", "model."]
        .into_iter()
        .find(|root| names.iter().any(|(_, n)| *n == format!("{root}text_model.embed_tokens.weight")))
        .ok_or_else(|| io_error(dir, "no `model.text_model.embed_tokens.weight` (Idefics2) or `model.model.…` (Cephalo)"))?;
    let head = if root == "model.model." { "model.lm_head." } else { "lm_head." };
    let moe = cfg.moe.is_some();

    let mut lm: Vec<(String, TensorView<'_>)> = Vec::new();
    let mut vision = Vec::new();
    let mut connector = Vec::new();
    for (index, name) in &names {
        let view = files[*index].tensor(name).map_err(|e| io_error(dir, &format!("{name}: {e}")))?;
        if let Some(rest) = name.strip_prefix(&format!("{root}text_model.")) {
            let rest = if moe { rest.replace(".mlp.gating_layer.gate.", ".mlp.gate.") } else { rest.to_string() };
            lm.push((format!("model.{rest}"), view));
        } else if let Some(rest) = name.strip_prefix(head) {
            lm.push((format!("lm_head.{rest}"), view));
        } else if let Some(rest) = name.strip_prefix(&format!("{root}vision_model.")) {
            vision.push((format!("vision_model.{rest}"), view));
        } else if let Some(rest) = name.strip_prefix(&format!("{root}connector.")) {
            connector.push((format!("connector.{rest}"), view));
        }
    }
    for (what, list) in [("text model", &lm), ("vision model", &vision), ("connector", &connector)] {
        if list.is_empty() {
            return Err(io_error(dir, &format!("the checkpoint has no {what} tensors under `{root}`")));
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
        map.insert("architectures".into(), json!(["MistralForCausalLM"]));
        map.insert("tie_word_embeddings".into(), json!(tied));
    }
    write_json(&lm_dir.join("config.json"), &text_config)?;
    if let Some(settings) = cfg.moe {
        let moe = json!({"format": "multitoken-moe", "k": settings.k, "num_expert_models": settings.num_expert_models,
                         "routing": "cephalo", "base": dir.display().to_string()});
        write_json(&lm_dir.join(multitoken_moe::config::MOE_CONFIG_FILE), &moe)?;
    }
    for file in LM_FILES {
        copy_if_present(&dir.join(file), &lm_dir.join(file))?;
    }
    for file in PROCESSOR_FILES {
        copy_if_present(&dir.join(file), &out.join(file))?;
    }
    let spec = cfg.connector_spec()?;
    let manifest = json!({
        "base_model": "lm",
        // Idefics2's processor tokenises the rendered chat with the BOS.
        "chat_adds_bos": true,
        "modalities": [{
            "builder": VISION_BUILDER,
            "config": {
                "tower": "vision",
                "tower_config": cfg.vision_config,
                "weights_prefix": "vision_model",
                "image_seq_len": cfg.image_seq_len(dir)?,
                "fake_image_token": FAKE_IMAGE_TOKEN,
                "projector": spec,
            },
            "projector": spec,
            "projector_prefix": "connector",
        }],
    });
    write_json(&out.join("multitoken.json"), &manifest)
}

/// Every safetensors file of the checkpoint (the index's shards, or
/// `model.safetensors`), memory-mapped.
pub(crate) fn map_checkpoint(dir: &Path) -> Result<Vec<(std::path::PathBuf, Mmap)>> {
    let index = dir.join("model.safetensors.index.json");
    let mut paths = Vec::new();
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|e| io_error(&index, &e.to_string()))?;
        let value: Value = serde_json::from_str(&text).map_err(|e| io_error(&index, &format!("malformed JSON: {e}")))?;
        let mut shards: Vec<String> = value["weight_map"]
            .as_object()
            .map(|map| map.values().filter_map(Value::as_str).map(str::to_string).collect())
            .unwrap_or_default();
        shards.sort();
        shards.dedup();
        paths.extend(shards.into_iter().map(|s| dir.join(s)));
    } else {
        paths.push(dir.join("model.safetensors"));
    }
    paths
        .into_iter()
        .map(|path| {
            let file = std::fs::File::open(&path).map_err(|e| io_error(&path, &e.to_string()))?;
            // SAFETY: read-only mapping; like every mmap-based loader we rely on
            // the checkpoint not being modified while it is exported.
            let map = unsafe { Mmap::map(&file) }.map_err(|e| io_error(&path, &e.to_string()))?;
            Ok((path, map))
        })
        .collect()
}

/// Writes `tensors` to `path` through a temporary file and a rename.
pub(crate) fn write_tensors(tensors: Vec<(String, TensorView<'_>)>, path: &Path) -> Result<()> {
    let tmp = path.with_extension("safetensors.tmp");
    let metadata: HashMap<String, String> = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(tensors, Some(metadata), &tmp).map_err(|e| io_error(path, &e.to_string()))?;
    std::fs::rename(&tmp, path).map_err(|e| io_error(path, &e.to_string()))
}

pub(crate) fn write_json(path: &Path, value: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| io_error(path, &e.to_string()))?;
    std::fs::write(path, text).map_err(|e| io_error(path, &e.to_string()))
}

pub(crate) fn copy_if_present(from: &Path, to: &Path) -> Result<()> {
    if from.is_file() {
        std::fs::copy(from, to).map_err(|e| io_error(from, &e.to_string()))?;
    }
    Ok(())
}

pub(crate) fn io_error(path: &Path, message: &str) -> Error {
    Error::Config { path: path.to_path_buf(), message: message.to_string() }
}
