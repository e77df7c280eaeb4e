//! LLaVA-NeXT and LLaVA-OneVision parity: `MultimodalModel::load` on the tiny
//! random checkpoints of `xtask/fixtures/llava_next.py` (CLIP + llama, CLIP +
//! mistral with two feature layers and no projector bias, SigLIP + Qwen2 with
//! `anyres_max_2` pooling, SigLIP 30 px / patch 7 with two layers, `anyres_max_1`,
//! a tied head and the hub's processor files, CLIP + phi; zero, one and two images of several sizes, modes
//! and aspect ratios, a chat case) must give transformers' prompt ids (the
//! processor's token count per image), the projected image features, the
//! last-position logits (within 1e-4) and the greedy ids.

use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor, D};
use multitoken_core::splice::project_item;
use multitoken_core::{Item, ItemsByKey, KvCache, LogitsSelection, Message};
use multitoken_lm::generate::GenerationParams;
use multitoken_lm::loader::LoadOptions;
use multitoken_lm::multimodal::MultimodalModel;
use serde::Deserialize;

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
    input_ids: Vec<u32>,
    greedy_ids: Vec<u32>,
    logits_last: Vec<f32>,
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/llava_next")
}

fn items(files: &[String]) -> ItemsByKey {
    let images = files.iter().map(|f| Item::Path(fixtures().join("images").join(f))).collect();
    ItemsByKey::from([("images".to_string(), images)])
}

fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32, candle_core::Error> {
    a.flatten_all()?.to_dtype(DType::F32)?.sub(&b.flatten_all()?.to_dtype(DType::F32)?)?.abs()?.max(D::Minus1)?.to_scalar::<f32>()
}

fn check_model(name: &str) -> TestResult {
    multitoken_vision::link();
    multitoken_vlm::link();
    let dir = fixtures().join(name);
    let expected: Expected = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json"))?)?;
    let model = MultimodalModel::load(&dir, &LoadOptions::default())?;
    assert_eq!(model.modality_tokens(), vec!["<image>"], "{name}");
    let mut failures = Vec::new();
    for case in &expected.cases {
        let items = items(&case.images);
        let what = format!("{name} {:?} {:?}", case.prompt, case.images);
        let prepared = if case.chat {
            model.prepare_chat(&[Message::user("<image>Describe it.")], &items)?
        } else {
            model.prepare_raw(&case.prompt, &items)?
        };
        assert_eq!(prepared.input_ids.len(), case.input_ids.len(), "{what}: prompt length");
        for (pos, (ours, theirs)) in prepared.input_ids.iter().zip(&case.input_ids).enumerate() {
            let in_span = prepared.spans.iter().any(|s| s.range().contains(&pos));
            if in_span {
                assert_eq!(*theirs, expected.image_token_id, "{what}: position {pos} is an image slot for us only");
            } else {
                assert_eq!(ours, theirs, "{what}: text id at {pos}");
            }
        }
        let embeds = model.embed(&prepared, &items)?;
        let lm = model.language_model();
        let mut cache = KvCache::new(lm.num_layers());
        let logits = lm.forward_embeds(&embeds, None, &mut cache, LogitsSelection::Last)?;
        let diff = max_diff(&logits, &Tensor::new(case.logits_last.as_slice(), logits.device())?)?;
        if diff >= 1e-4 {
            failures.push(format!("{what}: last logits differ by {diff}"));
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

/// Tiles (pixel values) and the packed, projected features of every image of
/// cases 1 and 2 against `get_image_features`.
fn check_intermediates(name: &str) -> TestResult {
    multitoken_vision::link();
    multitoken_vlm::link();
    let dir = fixtures().join(name);
    let expected: Expected = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json"))?)?;
    let model = MultimodalModel::load(&dir, &LoadOptions::default())?;
    let tensors = candle_core::safetensors::load(dir.join("intermediates.safetensors"), &candle_core::Device::Cpu)?;
    let runtime = &model.modalities[0];
    for index in [1usize, 2] {
        let case = &expected.cases[index];
        let (mut pixels, mut features) = (Vec::new(), Vec::new());
        for file in &case.images {
            let item = Item::Path(fixtures().join("images").join(file));
            let pre = runtime.modality.preprocess(&item)?;
            pixels.push(pre.narrow(1, 0, 3)?);
            let slots = runtime.modality.layout(&item)?.slots();
            let pieces = runtime.modality.encode_item(&pre)?;
            features.push(project_item(&runtime.projector, &pieces, DType::F32, slots)?);
        }
        let want_pixels = &tensors[&format!("case{index}.pixel_values")];
        let got_pixels = Tensor::cat(&pixels, 0)?;
        assert_eq!(got_pixels.dims(), want_pixels.dims(), "{name} case {index}: tiles");
        let diff = max_diff(&got_pixels, want_pixels)?;
        assert!(diff < 1e-5, "{name} case {index}: pixel values differ by {diff}");
        let want = &tensors[&format!("case{index}.image_features")];
        let got = Tensor::cat(&features, 0)?;
        assert_eq!(got.dims(), want.dims(), "{name} case {index}: image features");
        let diff = max_diff(&got, want)?;
        assert!(diff < 1e-4, "{name} case {index}: image features differ by {diff}");
    }
    Ok(())
}

#[test]
fn llava_next_over_llama_matches_transformers() -> TestResult {
    check_model("next")
}

#[test]
fn llava_next_with_two_feature_layers_over_mistral_matches_transformers() -> TestResult {
    check_model("next_ml")
}

#[test]
fn llava_onevision_with_anyres_max_pooling_matches_transformers() -> TestResult {
    check_model("ov")
}

#[test]
fn onevision_with_an_odd_tower_size_two_layers_and_a_tied_head_matches_transformers() -> TestResult {
    check_model("ov_odd")
}

#[test]
fn llava_next_over_phi_matches_transformers() -> TestResult {
    check_model("next_phi")
}

#[test]
fn tiles_and_packed_features_match_get_image_features() -> TestResult {
    for name in ["next", "next_ml", "ov", "ov_odd", "next_phi"] {
        check_intermediates(name)?;
    }
    Ok(())
}

/// The checkpoint rewritten as a `multitoken.json` directory (for training)
/// loads through our own layout and gives the same ids, chat prompts included.
#[test]
fn exported_directories_give_the_same_ids() -> TestResult {
    multitoken_vision::link();
    multitoken_vlm::link();
    for name in ["next_ml", "ov", "next_phi"] {
        let dir = fixtures().join(name);
        let work = std::env::temp_dir().join(format!("multitoken-llava-next-export-{}-{name}", std::process::id()));
        let exported = multitoken_lm::multimodal::export_imported(&dir, &work)?.ok_or("not an importer directory")?;
        let model = MultimodalModel::load(&exported, &LoadOptions::default())?;
        let expected: Expected = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json"))?)?;
        let case = &expected.cases[2];
        let items = items(&case.images);
        let prepared = model.prepare_raw(&case.prompt, &items)?;
        assert_eq!(prepared.input_ids.len(), case.input_ids.len(), "{name}: prompt length");
        let params = GenerationParams { max_new_tokens: expected.new_tokens, eos_token_ids: model.lm.generation.eos_token_ids.clone(), ignore_eos: true, ..GenerationParams::default() };
        let out = model.generate(&prepared, &items, &params, &mut |_| true)?;
        assert_eq!(out.token_ids, case.greedy_ids, "{name} exported");
        let original = MultimodalModel::load(&dir, &LoadOptions::default())?;
        let chat = [Message::user("<image>Describe it.")];
        let one = crate::items(&case.images[..1]);
        assert_eq!(model.prepare_chat(&chat, &one)?.input_ids, original.prepare_chat(&chat, &one)?.input_ids, "{name}: chat ids");
        std::fs::remove_dir_all(&work)?;
    }
    Ok(())
}

/// A prompt whose `<image>` count differs from its images is an error naming
/// both numbers, never a panic.
#[test]
fn image_count_mismatch_is_a_clear_error() -> TestResult {
    multitoken_vision::link();
    multitoken_vlm::link();
    let model = MultimodalModel::load(&fixtures().join("next"), &LoadOptions::default())?;
    let items = items(&["a_40x30.png".to_string(), "b_23x61.png".to_string()]);
    let err = match model.prepare_raw("[INST] <image>\nOne? [/INST]", &items) {
        Ok(_) => return Err("two images for one <image> token were accepted".into()),
        Err(e) => e.to_string(),
    };
    assert!(err.contains('1') && err.contains('2'), "{err}");
    Ok(())
}

/// The tower's selected features of every tile (feature layer(s), strategy)
/// against the projector's input in transformers, from transformers' own
/// pixel values.
#[test]
fn tower_features_match_transformers() -> TestResult {
    use multitoken_vlm::llava_next::config::{LlavaNextConfig, ProcessorSettings};
    for name in ["next", "next_ml", "ov", "ov_odd", "next_phi"] {
        let dir = fixtures().join(name);
        let cfg = LlavaNextConfig::read(&dir.join("config.json"))?;
        let processor = ProcessorSettings::read(&dir, cfg.family)?;
        let weights = candle_core::safetensors::load(dir.join("model.safetensors"), &candle_core::Device::Cpu)?;
        let prefix = if weights.contains_key("vision_tower.vision_model.embeddings.patch_embedding.weight") {
            "vision_tower.vision_model"
        } else {
            "vision_tower"
        };
        let builder = multitoken_vlm::llava_next::builder_config(&cfg, &processor, ".", prefix)?;
        let config: multitoken_vision::anyres_modality::VisionAnyResConfig = serde_json::from_value(builder)?;
        let context = multitoken_core::ModalityContext::new(candle_core::Device::Cpu, DType::F32, &dir);
        let modality = multitoken_vision::anyres_modality::VisionAnyRes::from_config(&config, &context)?;
        let tensors = candle_core::safetensors::load(dir.join("intermediates.safetensors"), &candle_core::Device::Cpu)?;
        for index in [1, 2] {
            let got = modality.tile_features(&tensors[&format!("case{index}.pixel_values")])?;
            let want = &tensors[&format!("case{index}.selected")];
            assert_eq!(got.dims(), want.dims(), "{name} case {index}");
            let diff = max_diff(&got, want)?;
            assert!(diff < 1e-4, "{name} case {index}: tower features differ by {diff}");
        }
    }
    Ok(())
}
