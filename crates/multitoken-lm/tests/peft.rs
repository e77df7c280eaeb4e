//! PEFT LoRA merging: the committed adapters of `xtask/fixtures/llava.py`
//! (safetensors with rank/alpha patterns; pickled `.bin` with rsLoRA) merged
//! into the tiny llama fixture give the greedy ids of PEFT's `merge_and_unload`.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use multitoken_lm::generate::{generate_from_ids, GenerationParams};
use multitoken_lm::hf::{load_hf_dir_with, parse_config};
use multitoken_lm::peft::{LoraAdapter, MergedWeights};
use multitoken_lm::weights::SafetensorsSource;
use serde_json::Value;

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn ids(value: &Value) -> Vec<u32> {
    value
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_u64().map(|x| x as u32))
                .collect()
        })
        .unwrap_or_default()
}

fn check(variant: &str) -> TestResult {
    let base_dir = fixtures().join("lm/llama");
    let adapter_dir = fixtures().join("llava/peft").join(variant);
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(adapter_dir.join("expected.json"))?)?;
    let want = ids(&expected["greedy_ids"]);
    let adapter = LoraAdapter::load(&adapter_dir, DType::F32, &Device::Cpu)?;
    assert!(!adapter.modules().is_empty());
    let config = parse_config(&base_dir.join("config.json"))?;
    let base = SafetensorsSource::from_dir(&base_dir, DType::F32, &Device::Cpu)?;
    let prompt = expected["prompt"].as_str().ok_or("no prompt")?;
    let params = GenerationParams {
        max_new_tokens: want.len(),
        ..GenerationParams::default()
    };
    let run = |model: &multitoken_lm::loader::LoadedModel| -> Result<Vec<u32>, Box<dyn std::error::Error>> {
        let prompt_ids = model.tokenizer.encode(prompt, true).map_err(|e| e.to_string())?.get_ids().to_vec();
        Ok(generate_from_ids(model.model.as_ref(), &model.tokenizer, &prompt_ids, &params, &mut |_| true)?.token_ids)
    };
    let merged = load_hf_dir_with(&base_dir, &config, &MergedWeights::new(&base, &adapter))?;
    assert_eq!(
        run(&merged)?,
        want,
        "{variant}: merged greedy ids differ from PEFT's merge_and_unload"
    );
    let plain = load_hf_dir_with(&base_dir, &config, &base)?;
    assert_ne!(
        run(&plain)?,
        want,
        "{variant}: the adapter must change the output"
    );
    Ok(())
}

#[test]
fn safetensors_adapter_with_patterns_matches_peft() -> TestResult {
    check("safetensors")
}

#[test]
fn pickled_rslora_adapter_matches_peft() -> TestResult {
    check("bin")
}

#[test]
fn missing_adapter_is_a_clear_error() {
    let result = LoraAdapter::load(&fixtures().join("llava/images"), DType::F32, &Device::Cpu);
    assert!(result.is_err_and(|e| e.to_string().contains("adapter_config.json")));
}
