//! A LLaVA-NeXT / OneVision checkpoint rewritten as a `multitoken.json` model
//! directory, so training (projector, LoRA) and packaging work on it.
//!
//! ```text
//! out/
//!   multitoken.json          base_model "lm"; one `vision_anyres` entry whose projector is
//!                            `llava_next`, prefix `projector`; chat_adds_bos
//!   projectors.safetensors   projector.linear_{1,2}.*, projector.image_newline
//!   vision/model.safetensors vision_model.*   (from the tower's keys)
//!   lm/                      the LM as an HF directory (model.*, lm_head.*) with the
//!                            tokenizer, generation and chat-template files
//!   preprocessor_config.json / processor_config.json   copied
//! ```
//!
//! Tensors are copied byte for byte from the memory-mapped files.

use std::path::Path;

use safetensors::tensor::TensorView;
use safetensors::SafeTensors;
use serde_json::{json, Value};

use super::config::{LlavaNextConfig, ProcessorSettings};
use super::{builder_config, check_processor, KeyLayout, VISION_BUILDER};
use crate::idefics2::export::{copy_if_present, io_error, map_checkpoint, write_json, write_tensors, LM_FILES, PROCESSOR_FILES};
use crate::Result;

/// Writes `dir`'s checkpoint to `out` as a `multitoken.json` model directory.
pub fn export_llava_next(dir: &Path, out: &Path) -> Result<()> {
    let cfg = LlavaNextConfig::read(&dir.join("config.json"))?;
    let processor = ProcessorSettings::read(dir, cfg.family)?;
    check_processor(&cfg, &processor)?;
    if out.join("multitoken.json").exists() {
        return Err(io_error(out, "already holds a multitoken.json; choose an empty directory"));
    }
    let maps = map_checkpoint(dir)?;
    let files: Vec<SafeTensors<'_>> = maps
        .iter()
        .map(|(path, map)| SafeTensors::deserialize(map).map_err(|e| io_error(path, &format!("not a safetensors file: {e}"))))
        .collect::<Result<_>>()?;
    let names: Vec<(usize, String)> = files
        .iter()
        .enumerate()
        .flat_map(|(index, file)| file.names().into_iter().map(move |name| (index, name.to_string())))
        .collect();
    let layout = KeyLayout::detect(&|name| names.iter().any(|(_, n)| n == name), &dir.display().to_string())?;
    let head = format!("{}.", layout.lm_head);
    let tower = format!("{}.", layout.tower);
    let projector = format!("{}.", layout.projector);

    let (mut lm, mut vision, mut projectors) = (Vec::new(), Vec::new(), Vec::new());
    for (index, name) in &names {
        let view: TensorView<'_> = files[*index].tensor(name).map_err(|e| io_error(dir, &format!("{name}: {e}")))?;
        if let Some(rest) = name.strip_prefix(layout.lm_body) {
            lm.push((format!("model.{rest}"), view));
        } else if let Some(rest) = name.strip_prefix(&head) {
            lm.push((format!("lm_head.{rest}"), view));
        } else if let Some(rest) = name.strip_prefix(&tower) {
            // A tower saved without its `vision_model` level may carry SigLIP's pooling head, unused.
            if !rest.starts_with("head.") {
                vision.push((format!("vision_model.{rest}"), view));
            }
        } else if let Some(rest) = name.strip_prefix(&projector) {
            projectors.push((format!("projector.{rest}"), view));
        } else if name == layout.newline {
            projectors.push(("projector.image_newline".to_string(), view));
        }
    }
    let tied = !lm.iter().any(|(name, _)| name == "lm_head.weight");
    // A phi LM's head has a bias; the model's own head has none: write zeros.
    let phi = cfg.text_config.get("model_type").and_then(Value::as_str) == Some("phi");
    let head_bias_zeros: Vec<u8>;
    if phi && !lm.iter().any(|(name, _)| name == "lm_head.bias") {
        let (dtype, vocab) = match lm.iter().find(|(name, _)| name == "lm_head.weight" || name == "model.embed_tokens.weight") {
            Some((_, view)) => (view.dtype(), view.shape()[0]),
            None => return Err(io_error(dir, "the checkpoint has no LM head or token embeddings")),
        };
        head_bias_zeros = vec![0u8; vocab * dtype.bitsize() / 8];
        let view = TensorView::new(dtype, vec![vocab], &head_bias_zeros).map_err(|e| io_error(dir, &e.to_string()))?;
        lm.push(("lm_head.bias".to_string(), view));
    }
    let lm_dir = out.join("lm");
    std::fs::create_dir_all(&lm_dir).map_err(|e| io_error(&lm_dir, &e.to_string()))?;
    std::fs::create_dir_all(out.join("vision")).map_err(|e| io_error(out, &e.to_string()))?;
    write_tensors(lm, &lm_dir.join("model.safetensors"))?;
    write_tensors(vision, &out.join("vision").join("model.safetensors"))?;
    write_tensors(projectors, &out.join("projectors.safetensors"))?;

    let mut text_config = cfg.text_config.clone();
    let arch = match text_config.get("model_type").and_then(Value::as_str) {
        Some("mistral") => "MistralForCausalLM",
        Some("qwen2") => "Qwen2ForCausalLM",
        _ => "LlamaForCausalLM",
    };
    if let Value::Object(map) = &mut text_config {
        map.insert("architectures".into(), json!([arch]));
        map.insert("tie_word_embeddings".into(), json!(tied));
    }
    write_json(&lm_dir.join("config.json"), &text_config)?;
    for file in LM_FILES {
        copy_if_present(&dir.join(file), &lm_dir.join(file))?;
    }
    for file in PROCESSOR_FILES {
        copy_if_present(&dir.join(file), &out.join(file))?;
    }
    let spec = cfg.projector_spec()?;
    let manifest = json!({
        "base_model": "lm",
        // The processors tokenise the rendered chat with the BOS.
        "chat_adds_bos": true,
        "modalities": [{
            "builder": VISION_BUILDER,
            "config": builder_config(&cfg, &processor, "vision", "vision_model")?,
            "projector": spec,
            "projector_prefix": "projector",
        }],
    });
    write_json(&out.join("multitoken.json"), &manifest)
}
