//! llava-hf import parity: `MultimodalModel::load` on the tiny random
//! `LlavaForConditionalGeneration` checkpoints of `xtask/fixtures/llava.py`
//! (three key layouts; llama, qwen2 and phi LMs of different sizes, CLIP towers and a
//! SigLIP one as llava-interleave has it, one and two images per prompt)
//! must produce transformers' greedy ids, and the k-th `<image>` must take the
//! k-th image.

use std::path::{Path, PathBuf};

use multitoken_core::{Item, ItemsByKey};
use multitoken_lm::generate::GenerationParams;
use multitoken_lm::loader::LoadOptions;
use multitoken_lm::multimodal::MultimodalModel;
use serde::Deserialize;

type TestResult = Result<(), Box<dyn std::error::Error>>;

#[derive(Deserialize)]
struct Expected {
    layout: String,
    new_tokens: usize,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    prompt: String,
    images: Vec<String>,
    input_ids: Vec<u32>,
    image_tokens: usize,
    greedy_ids: Vec<u32>,
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/llava")
}

fn items(files: &[String]) -> ItemsByKey {
    let images = files
        .iter()
        .map(|f| Item::Path(fixtures().join("images").join(f)))
        .collect();
    ItemsByKey::from([("images".to_string(), images)])
}

fn check_model(name: &str) -> TestResult {
    multitoken_vision::link();
    let dir = fixtures().join(name);
    let expected: Expected =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json"))?)?;
    let model = MultimodalModel::load(&dir, &LoadOptions::default())?;
    assert_eq!(model.modality_tokens(), vec!["<image>"], "{name}");
    for case in &expected.cases {
        let items = items(&case.images);
        let prepared = model.prepare_raw(&case.prompt, &items)?;
        // Same ids outside the image positions, and as many image positions.
        assert_eq!(
            prepared.input_ids.len(),
            case.input_ids.len(),
            "{name} {:?}: prompt length",
            case.images
        );
        let spliced: usize = prepared.spans.iter().map(|s| s.len).sum();
        assert_eq!(spliced, case.image_tokens, "{name}: image positions");
        let image_id = case
            .input_ids
            .iter()
            .copied()
            .max_by_key(|id| case.input_ids.iter().filter(|x| *x == id).count());
        for (pos, (ours, theirs)) in prepared.input_ids.iter().zip(&case.input_ids).enumerate() {
            let in_span = prepared
                .spans
                .iter()
                .any(|s| pos >= s.start && pos < s.start + s.len);
            if in_span {
                assert_eq!(
                    Some(*theirs),
                    image_id,
                    "{name}: position {pos} is an image position for transformers"
                );
            } else {
                assert_eq!(ours, theirs, "{name}: text id at {pos}");
            }
        }
        let params = GenerationParams {
            max_new_tokens: expected.new_tokens,
            eos_token_ids: model.lm.generation.eos_token_ids.clone(),
            ..GenerationParams::default()
        };
        let out = model.generate(&prepared, &items, &params, &mut |_| true)?;
        assert_eq!(
            out.token_ids, case.greedy_ids,
            "{name} ({} layout) {:?} {:?}: greedy ids differ from transformers",
            expected.layout, case.prompt, case.images
        );
    }
    Ok(())
}

#[test]
fn llava_saved_layout_matches_transformers() -> TestResult {
    check_model("llama_default")
}

#[test]
fn llava_hub_layout_list_layers_full_strategy_matches_transformers() -> TestResult {
    check_model("qwen2_full")
}

#[test]
fn llava_module_layout_sharded_matches_transformers() -> TestResult {
    check_model("llama_modules")
}

#[test]
fn llava_over_phi_with_an_unbiased_head_matches_transformers() -> TestResult {
    check_model("phi_full")
}

/// llava-interleave's shape: a SigLIP tower (no CLS position, processor without a
/// crop step) under a qwen2 LM.
#[test]
fn llava_with_a_siglip_tower_matches_transformers() -> TestResult {
    check_model("siglip_qwen2")
}
