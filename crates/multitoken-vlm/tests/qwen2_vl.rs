//! Qwen2-VL parity: `MultimodalModel::load` on the tiny random checkpoint of
//! `xtask/fixtures/qwen2_vl.py` (transformers 5's layout and the older hub
//! layout; 0, 1 and 2 images per prompt with text after them; images resized
//! up and down, portrait, RGBA, gray, JPEG; a chat-template case) must give
//! transformers' prompt ids, M-RoPE positions (`get_rope_index`) and rope
//! delta, projected image rows, last-position logits (within 1e-4) and greedy
//! ids (KV cache, decode positions shifted by the delta).

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
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/qwen2_vl")
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
fn qwen2_vl_as_transformers_5_saves_it_matches_transformers() -> TestResult {
    check_model("model")
}

#[test]
fn qwen2_vl_in_the_older_layouts_matches_transformers() -> TestResult {
    check_model("hub")
}

/// Tied embeddings, one key/value head for three, sliding-window layers, the
/// default rotary base, another mrope_section and pixel band.
#[test]
fn qwen2_vl_of_another_shape_matches_transformers() -> TestResult {
    check_model("tied")
}

/// Plain positions where M-RoPE positions are due give other logits: the
/// positions matter, so the test above checks them.
#[test]
fn plain_positions_would_not_match() -> TestResult {
    let expected = expected()?;
    let model = load("model")?;
    let case = expected.cases.iter().find(|c| c.images.len() == 2).ok_or("no two-image case")?;
    let items = items(&case.images);
    let prepared = model.prepare_raw(&case.prompt, &items)?;
    let embeds = model.embed(&prepared, &items)?;
    let lm = model.language_model();
    let logits = lm.forward_embeds(&embeds, None, &mut KvCache::new(lm.num_layers()), LogitsSelection::Last)?;
    let want = Tensor::new(case.logits_last.as_slice(), logits.device())?;
    let diff = logits.flatten_all()?.sub(&want)?.abs()?.max(D::Minus1)?.to_scalar::<f32>()?;
    assert!(diff > 1e-3, "plain positions gave transformers' logits (diff {diff})");
    Ok(())
}

/// A text-only LM rejects explicit positions with a clear error.
#[test]
fn positions_for_an_lm_without_mrope_are_an_error() -> TestResult {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/idefics2/split");
    multitoken_vision::link();
    multitoken_vlm::link();
    let model = MultimodalModel::load(&dir, &LoadOptions::default())?;
    let lm = model.language_model();
    let ids = Tensor::new(&[[5u32, 6, 7]], lm.device())?;
    let embeds = lm.embed_tokens(&ids)?;
    let positions = Tensor::zeros((3, 1, 3), candle_core::DType::U32, lm.device())?;
    let mut cache = KvCache::new(lm.num_layers());
    let err = lm.forward_embeds_at(&embeds, None, &mut cache, LogitsSelection::Last, Some(&positions));
    let message = err.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(message.contains("multimodal rotary positions"), "{message}");
    Ok(())
}

/// The checkpoint rewritten as a `multitoken.json` directory (for training)
/// loads through our own layout and gives the same ids.
#[test]
fn exported_directory_gives_the_same_ids() -> TestResult {
    multitoken_vision::link();
    multitoken_vlm::link();
    let expected = expected()?;
    for name in ["model", "hub"] {
        let dir = fixtures().join(name);
        let work = std::env::temp_dir().join(format!("multitoken-qwen2vl-export-{}-{name}", std::process::id()));
        let exported = multitoken_lm::multimodal::export_imported(&dir, &work)?.ok_or("not an importer directory")?;
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

/// In a chat message, `<image>`, Qwen2-VL's own `<|image_pad|>` (what the
/// server writes for an `image_url` part) and the whole
/// `<|vision_start|><|image_pad|><|vision_end|>` all stand for one image part.
#[test]
fn every_spelling_of_an_image_in_a_chat_message_is_one_image_part() -> TestResult {
    let model = load("model")?;
    let items = items(&["land_61x37.png".to_string()]);
    let ids = |text: &str| model.prepare_chat(&[Message::user(text)], &items).map(|p| p.input_ids);
    let want = ids("<image>What?")?;
    assert_eq!(ids("<|image_pad|>What?")?, want);
    assert_eq!(ids("<|vision_start|><|image_pad|><|vision_end|>What?")?, want);
    Ok(())
}

/// Two prompts with different shifts in one left-padded batch (as the server
/// and transformers batch them): the prompt at its `[3, 2, seq]` positions
/// with the attention mask, then each step without positions; every row
/// decodes transformers' greedy ids.
#[test]
fn a_left_padded_batch_decodes_each_row_at_its_own_shift() -> TestResult {
    let expected = expected()?;
    let model = load("model")?;
    let lm = model.language_model();
    let picked: Vec<&Case> = [0usize, 2].iter().filter_map(|&i| expected.cases.get(i)).collect();
    let mut rows = Vec::new();
    for case in &picked {
        let items = items(&case.images);
        let prepared = model.prepare_raw(&case.prompt, &items)?;
        rows.push((model.embed(&prepared, &items)?, prepared.rope_positions()));
    }
    let seq = rows.iter().map(|(_, p)| p.len()).max().ok_or("no rows")?;
    let hidden = lm.hidden_size();
    let mut embeds = Vec::new();
    let mut mask = Vec::new();
    for (row, positions) in &rows {
        let pad = seq - positions.len();
        let zeros = Tensor::zeros((1, pad, hidden), row.dtype(), row.device())?;
        embeds.push(Tensor::cat(&[&zeros, row], 1)?);
        mask.extend(std::iter::repeat_n(0u32, pad).chain(std::iter::repeat_n(1, positions.len())));
    }
    let embeds = Tensor::cat(&embeds, 0)?;
    let mask = Tensor::from_vec(mask, (rows.len(), seq), lm.device())?;
    let positions = multitoken_core::RopePositions::batch_tensor(&rows.iter().map(|(_, p)| p).collect::<Vec<_>>(), seq, lm.device())?;
    let mut cache = KvCache::new(lm.num_layers());
    let mut logits = lm.forward_embeds_at(&embeds, Some(&mask), &mut cache, LogitsSelection::Last, Some(&positions))?;
    assert_eq!(cache.position_shift, Some(picked.iter().map(|c| c.rope_delta).collect()));
    let mut got: Vec<Vec<u32>> = vec![Vec::new(); rows.len()];
    for _ in 0..expected.new_tokens {
        let next: Vec<u32> = logits.argmax(D::Minus1)?.to_vec1()?;
        for (row, id) in got.iter_mut().zip(&next) {
            row.push(*id);
        }
        let ids = Tensor::from_vec(next, (rows.len(), 1), lm.device())?;
        logits = lm.forward_embeds(&lm.embed_tokens(&ids)?, None, &mut cache, LogitsSelection::Last)?;
    }
    for (case, ids) in picked.iter().zip(&got) {
        assert_eq!(ids, &case.greedy_ids, "{:?}", case.images);
    }
    Ok(())
}
