//! Qwen2.5-VL parity: `MultimodalModel::load` on the tiny random checkpoint of
//! `xtask/fixtures/qwen2_5_vl.py` (window-attention tower with one
//! full-attention block, RMSNorm merger; transformers 5's layout and the hub's
//! flat config with transformers 4.5x keys; 0, 1 and 2 images per prompt with
//! text after them; images resized up and down, portrait, RGBA, gray, JPEG; a
//! chat-template case) must give transformers' prompt ids, M-RoPE positions
//! (`get_rope_index`) and rope delta, projected image rows, last-position
//! logits (within 1e-4) and greedy ids (KV cache, decode positions shifted by
//! the delta); so must a checkpoint of another shape (`tied/`) and the
//! checkpoint exported as a `multitoken.json` directory.

use std::path::{Path, PathBuf};

use candle_core::{Tensor, D};
use multitoken_core::{Item, ItemsByKey, KvCache, LogitsSelection, Message};
use multitoken_lm::generate::GenerationParams;
use multitoken_lm::loader::LoadOptions;
use multitoken_lm::multimodal::MultimodalModel;
use serde::Deserialize;
use serde_json::Value;

type TestResult = Result<(), Box<dyn std::error::Error>>;

#[derive(Deserialize)]
struct Expected {
    new_tokens: usize,
    image_token_id: u32,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    prompt: String,
    images: Vec<String>,
    #[serde(default)]
    chat: bool,
    #[serde(default)]
    messages: Vec<Value>,
    input_ids: Vec<u32>,
    image_grid_thw: Vec<[usize; 3]>,
    position_ids: [Vec<u32>; 3],
    rope_delta: i64,
    greedy_ids: Vec<u32>,
    logits_last: Vec<f32>,
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/qwen2_5_vl")
}

fn expected() -> Result<Expected, Box<dyn std::error::Error>> {
    Ok(serde_json::from_str(&std::fs::read_to_string(fixtures().join("expected.json"))?)?)
}


/// A checkpoint's own expected.json (`tied/`), else the shared one.
fn expected_for(name: &str) -> Result<Expected, Box<dyn std::error::Error>> {
    let own = fixtures().join(name).join("expected.json");
    if own.is_file() {
        return Ok(serde_json::from_str(&std::fs::read_to_string(own)?)?);
    }
    expected()
}

fn items(files: &[String]) -> ItemsByKey {
    let images = files.iter().map(|f| Item::Path(fixtures().join("images").join(f))).collect();
    ItemsByKey::from([("images".to_string(), images)])
}

/// transformers' typed chat messages as our CLI writes them: `<image>` where an
/// image part stands.
fn messages(case: &Case) -> Vec<Message> {
    case.messages
        .iter()
        .map(|message| {
            let content: String = message["content"]
                .as_array()
                .map(|parts| {
                    parts
                        .iter()
                        .map(|part| match part["type"].as_str() {
                            Some("image") => "<image>".to_string(),
                            _ => part["text"].as_str().unwrap_or_default().to_string(),
                        })
                        .collect()
                })
                .unwrap_or_default();
            match message["role"].as_str() {
                Some("assistant") => Message::assistant(content),
                _ => Message::user(content),
            }
        })
        .collect()
}

fn load(name: &str) -> Result<MultimodalModel, Box<dyn std::error::Error>> {
    multitoken_vision::link();
    multitoken_vlm::link();
    Ok(MultimodalModel::load(&fixtures().join(name), &LoadOptions::default())?)
}

fn check_model(name: &str) -> TestResult {
    let expected = expected_for(name)?;
    // The projected rows recorded are the shared checkpoint's.
    let own_cases = fixtures().join(name).join("expected.json").is_file();
    let model = load(name)?;
    assert_eq!(model.modality_tokens(), vec!["<|image_pad|>"], "{name}");
    let projected = candle_core::safetensors::load(fixtures().join("expected.safetensors"), &candle_core::Device::Cpu)?;
    let mut failures = Vec::new();
    for (index, case) in expected.cases.iter().enumerate() {
        let items = items(&case.images);
        let what = format!("{name} case {index} {:?}", case.images);
        let prepared = if case.chat { model.prepare_chat(&messages(case), &items)? } else { model.prepare_raw(&case.prompt, &items)? };
        assert_eq!(prepared.input_ids.len(), case.input_ids.len(), "{what}: prompt length");
        for (pos, (ours, theirs)) in prepared.input_ids.iter().zip(&case.input_ids).enumerate() {
            if prepared.spans.iter().any(|s| s.range().contains(&pos)) {
                assert_eq!(*theirs, expected.image_token_id, "{what}: position {pos} is an image slot for us only");
            } else {
                assert_eq!(ours, theirs, "{what}: text id at {pos}");
            }
        }
        let grids: Vec<[usize; 3]> = prepared.spans.iter().filter_map(|s| s.grid).collect();
        let want_grids: Vec<[usize; 3]> = case.image_grid_thw.iter().map(|[t, h, w]| [*t, h / 2, w / 2]).collect();
        assert_eq!(grids, want_grids, "{what}: position grids");
        let positions = prepared.rope_positions();
        assert_eq!(positions.streams, case.position_ids, "{what}: M-RoPE positions");
        assert_eq!(positions.delta, case.rope_delta, "{what}: rope delta");

        for (k, item) in items.get("images").into_iter().flatten().enumerate() {
            let Some(want) = projected.get(&format!("case{index}.image{k}")).filter(|_| !own_cases) else { continue };
            let span = prepared.spans.iter().find(|s| s.item_index == k).ok_or("no span")?;
            let ours = model.project_item(0, k, item, span.len)?;
            let ours = ours.reshape(want.dims())?;
            let diff = ours.sub(want)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            if diff >= 1e-4 {
                failures.push(format!("{what}: image {k} projected rows differ by {diff}"));
            }
        }

        let embeds = model.embed(&prepared, &items)?;
        let lm = model.language_model();
        let mut cache = KvCache::new(lm.num_layers());
        let at = model.positions(&prepared)?;
        assert_eq!(at.is_some(), !case.images.is_empty(), "{what}: positions only with images");
        let logits = lm.forward_embeds_at(&embeds, None, &mut cache, LogitsSelection::Last, at.as_ref())?;
        let want = Tensor::new(case.logits_last.as_slice(), logits.device())?;
        let diff = logits.flatten_all()?.sub(&want)?.abs()?.max(D::Minus1)?.to_scalar::<f32>()?;
        if diff >= 1e-4 {
            failures.push(format!("{what}: last logits differ by {diff}"));
        }
        if !case.images.is_empty() {
            assert_eq!(cache.position_shift, Some(vec![case.rope_delta]), "{what}: the cache keeps the delta");
        }
        let params = GenerationParams { max_new_tokens: expected.new_tokens, eos_token_ids: model.lm.generation.eos_token_ids.clone(), ignore_eos: true, ..GenerationParams::default() };
        let out = model.generate(&prepared, &items, &params, &mut |_| true)?;
        if out.token_ids != case.greedy_ids {
            failures.push(format!("{what}: greedy ids {:?}, transformers {:?}", out.token_ids, case.greedy_ids));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

#[test]
fn qwen2_5_vl_as_transformers_5_saves_it_matches_transformers() -> TestResult {
    check_model("model")
}

#[test]
fn qwen2_5_vl_in_the_hub_layout_matches_transformers() -> TestResult {
    check_model("hub")
}

/// Tied embeddings, one key/value head for two, another mrope_section and
/// rotary base; a tower whose first block is the full-attention one, with
/// 3x3-patch windows and 12-wide heads; another pixel band.
#[test]
fn qwen2_5_vl_of_another_shape_matches_transformers() -> TestResult {
    check_model("tied")
}

/// The checkpoint rewritten as a `multitoken.json` directory (for training)
/// keeps the Qwen2.5-VL tower and RMSNorm merger and gives the same ids.
#[test]
fn exported_qwen2_5_vl_gives_the_same_ids() -> TestResult {
    multitoken_vision::link();
    multitoken_vlm::link();
    let expected = expected()?;
    for name in ["model", "hub"] {
        let dir = fixtures().join(name);
        let work = std::env::temp_dir().join(format!("multitoken-qwen2-5-vl-export-{}-{name}", std::process::id()));
        let exported = multitoken_lm::multimodal::export_imported(&dir, &work)?.ok_or("not an importer directory")?;
        let manifest: Value = serde_json::from_str(&std::fs::read_to_string(exported.join("multitoken.json"))?)?;
        assert_eq!(manifest["modalities"][0]["projector"]["norm"], "rms_norm", "{name}: {manifest}");
        let model = MultimodalModel::load(&exported, &LoadOptions::default())?;
        for case in expected.cases.iter().filter(|c| c.images.len() == 2 && !c.chat) {
            let items = items(&case.images);
            let prepared = model.prepare_raw(&case.prompt, &items)?;
            assert_eq!(prepared.rope_positions().streams, case.position_ids, "{name} exported: positions");
            let params = GenerationParams { max_new_tokens: expected.new_tokens, eos_token_ids: model.lm.generation.eos_token_ids.clone(), ignore_eos: true, ..GenerationParams::default() };
            let out = model.generate(&prepared, &items, &params, &mut |_| true)?;
            assert_eq!(out.token_ids, case.greedy_ids, "{name} exported");
        }
        std::fs::remove_dir_all(&work)?;
    }
    Ok(())
}
