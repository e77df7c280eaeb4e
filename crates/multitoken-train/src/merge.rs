//! `multitoken merge-lora`: fold a PEFT LoRA adapter into the LM's weights
//! (through [`multitoken_lm::peft`], PEFT's `merge_and_unload`) and write a
//! model directory that needs no adapter.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use multitoken_lm::multimodal::{read_config, MULTIMODAL_CONFIG_FILE};
use multitoken_lm::peft::LoraAdapter;
use multitoken_lm::weights::SafetensorsSource;

use crate::data::write_atomic;
use crate::model::{ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE};
use crate::{Error, Result};

/// Merges the adapter in `adapter` (default: `model` itself, as `multitoken
/// train --stage lora` writes it) into the LM of `model` and writes `out`.
///
/// A multimodal `model` gives `out/multitoken.json` (with `base_model: "lm"`),
/// its other files and `out/lm/` with the merged weights; a text-only HF
/// directory gives an HF directory.
pub fn merge_lora(model: &Path, adapter: Option<&Path>, out: &Path) -> Result<PathBuf> {
    let adapter_dir = adapter.unwrap_or(model);
    if !adapter_dir.join(ADAPTER_CONFIG_FILE).is_file() {
        return Err(Error::Config(format!(
            "{}: no {ADAPTER_CONFIG_FILE}",
            adapter_dir.display()
        )));
    }
    let config_path = model.join(MULTIMODAL_CONFIG_FILE);
    let multimodal = config_path.is_file();
    let mut config = if multimodal {
        Some(read_config(&config_path)?)
    } else {
        None
    };
    let lm_path = match config.as_ref().and_then(|c| c.base_model.clone()) {
        Some(base) if Path::new(&base).is_absolute() => PathBuf::from(base),
        Some(base) => model.join(base),
        None => model.to_path_buf(),
    };
    if !lm_path.join("config.json").is_file() {
        return Err(Error::Config(format!(
            "{}: merge-lora needs the LM as an HF directory (config.json + safetensors)",
            lm_path.display()
        )));
    }
    let device = Device::Cpu;
    let lora = LoraAdapter::load(adapter_dir, DType::F32, &device)?;
    let base = SafetensorsSource::from_dir(&lm_path, DType::F32, &device)?;
    let lm_out = if multimodal {
        out.join("lm")
    } else {
        out.to_path_buf()
    };
    std::fs::create_dir_all(&lm_out).map_err(|e| Error::io(&lm_out, e))?;
    let modules: std::collections::HashSet<String> =
        lora.modules().iter().map(|m| m.to_string()).collect();
    let mut merged: HashMap<String, Tensor> = HashMap::new();
    let mut touched = 0;
    for name in base.names() {
        let weight = base.get(name)?;
        let new = lora.merge(name, &weight)?;
        if name.ends_with(".weight") && modules.contains(name.trim_end_matches(".weight")) {
            touched += 1;
        }
        merged.insert(name.to_string(), new);
    }
    if touched == 0 {
        return Err(Error::Config(format!(
            "{}: the adapter touches none of {}'s weights (module names differ?)",
            adapter_dir.display(),
            lm_path.display()
        )));
    }
    copy_files(&lm_path, &lm_out, &[])?;
    let tmp = crate::data::temp_path(&lm_out.join("model.safetensors"));
    crate::data::save_safetensors(&merged, &tmp)?;
    std::fs::rename(&tmp, lm_out.join("model.safetensors")).map_err(|e| Error::io(&lm_out, e))?;
    if let Some(config) = config.as_mut() {
        copy_files(
            model,
            out,
            &[
                ADAPTER_CONFIG_FILE,
                ADAPTER_WEIGHTS_FILE,
                MULTIMODAL_CONFIG_FILE,
            ],
        )?;
        for entry in std::fs::read_dir(model).map_err(|e| Error::io(model, e))? {
            let path = entry.map_err(|e| Error::io(model, e))?.path();
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if path.is_dir() && name.starts_with("encoder-") {
                copy_files(&path, &out.join(&name), &[])?;
            }
        }
        config.base_model = Some("lm".into());
        // The copied `encoder-*` directories keep their relative names; every
        // other path the model's config names (relative to `model`, e.g. a
        // frozen tower inside the run directory) is made absolute, since `out`
        // is elsewhere.
        let refer = |p: &Path| -> String {
            match p.strip_prefix(model).ok().and_then(|rel| {
                let first = rel.components().next()?.as_os_str().to_string_lossy().into_owned();
                first.starts_with("encoder-").then(|| rel.display().to_string())
            }) {
                Some(rel) => rel,
                None => crate::run::resolved(p).display().to_string(),
            }
        };
        for entry in &mut config.modalities {
            crate::model::rewrite_paths(model, &mut entry.config, &refer);
        }
        let text =
            serde_json::to_string_pretty(config).map_err(|e| Error::Config(e.to_string()))?;
        write_atomic(&out.join(MULTIMODAL_CONFIG_FILE), text.as_bytes())?;
    }
    Ok(lm_out)
}

/// Copies the plain files of `from` into `to`, except weights indexes, GGUF
/// files, `model.safetensors` shards of an LM and the names in `skip`.
fn copy_files(from: &Path, to: &Path, skip: &[&str]) -> Result<()> {
    std::fs::create_dir_all(to).map_err(|e| Error::io(to, e))?;
    for entry in std::fs::read_dir(from).map_err(|e| Error::io(from, e))? {
        let path = entry.map_err(|e| Error::io(from, e))?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !path.is_file() || skip.contains(&name.as_str()) || is_lm_weight(&name) {
            continue;
        }
        std::fs::copy(&path, to.join(&name)).map_err(|e| Error::io(&path, e))?;
    }
    Ok(())
}

fn is_lm_weight(name: &str) -> bool {
    (name.starts_with("model") && name.ends_with(".safetensors"))
        || name.ends_with(".safetensors.index.json")
        || name.ends_with(".gguf")
}
