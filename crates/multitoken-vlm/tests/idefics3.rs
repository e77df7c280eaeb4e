//! Idefics3 and SmolVLM parity: `MultimodalModel::load` on the tiny random
//! checkpoints of `xtask/fixtures/idefics3.py` (Idefics3 with and without image
//! splitting, SmolVLM with `scale_factor` 3, tiles that are no multiple of the
//! patch; one and two images per prompt,
//! images of several sizes and modes, a chat-template case) must give
//! transformers' prompt ids, pixel values, tower outputs, connector outputs,
//! last-position logits (within 1e-4) and greedy ids.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor, D};
use multitoken_core::{Item, ItemsByKey, KvCache, LogitsSelection, Message, ModalityContext, Projector};
use multitoken_lm::generate::GenerationParams;
use multitoken_lm::loader::LoadOptions;
use multitoken_lm::multimodal::MultimodalModel;
use serde::Deserialize;

type TestResult = Result<(), Box<dyn std::error::Error>>;

#[derive(Deserialize)]
struct Expected {
    new_tokens: usize,
    image_token_id: u32,
    image_seq_len: usize,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    prompt: String,
    images: Vec<String>,
    #[serde(default)]
    chat: bool,
    #[serde(default)]
    user_content: String,
    #[serde(default)]
    rows: Vec<usize>,
    #[serde(default)]
    cols: Vec<usize>,
    input_ids: Vec<u32>,
    greedy_ids: Vec<u32>,
    logits_last: Vec<f32>,
}

const MODELS: [&str; 4] = ["split", "nosplit", "smolvlm", "odd"];

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/idefics3")
}

fn image(name: &str) -> Item {
    Item::Path(fixtures().join("images").join(name))
}

fn items(files: &[String]) -> ItemsByKey {
    ItemsByKey::from([("images".to_string(), files.iter().map(|f| image(f)).collect())])
}

fn expected(name: &str) -> Result<Expected, Box<dyn std::error::Error>> {
    Ok(serde_json::from_str(&std::fs::read_to_string(fixtures().join(name).join("expected.json"))?)?)
}

fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32, Box<dyn std::error::Error>> {
    assert_eq!(a.dims(), b.dims());
    Ok(a.sub(b)?.abs()?.flatten_all()?.max(D::Minus1)?.to_scalar::<f32>()?)
}

fn check_model(name: &str) -> TestResult {
    multitoken_vision::link();
    multitoken_vlm::link();
    let dir = fixtures().join(name);
    let expected = expected(name)?;
    let model = MultimodalModel::load(&dir, &LoadOptions::default())?;
    assert_eq!(model.modality_tokens(), vec!["<image>"], "{name}");
    let mut failures = Vec::new();
    for case in &expected.cases {
        let items = items(&case.images);
        let what = format!("{name} {:?} {:?}", case.prompt, case.images);
        let prepared = if case.chat {
            model.prepare_chat(&[Message::user(case.user_content.as_str())], &items)?
        } else {
            model.prepare_raw(&case.prompt, &items)?
        };
        assert_eq!(prepared.input_ids.len(), case.input_ids.len(), "{what}: prompt length");
        let mut slots = 0;
        for (pos, (ours, theirs)) in prepared.input_ids.iter().zip(&case.input_ids).enumerate() {
            if prepared.spans.iter().any(|s| s.range().contains(&pos)) {
                slots += 1;
                assert_eq!(*theirs, expected.image_token_id, "{what}: position {pos} is an image slot for us only");
            } else {
                assert_eq!(ours, theirs, "{what}: text id at {pos}");
            }
        }
        let tiles: usize = case.rows.iter().zip(&case.cols).map(|(r, c)| r * c + 1).sum();
        assert_eq!(slots, tiles * expected.image_seq_len, "{what}: slots");
        let embeds = model.embed(&prepared, &items)?;
        let lm = model.language_model();
        let mut cache = KvCache::new(lm.num_layers());
        let logits = lm.forward_embeds(&embeds, None, &mut cache, LogitsSelection::Last)?;
        let want = Tensor::new(case.logits_last.as_slice(), logits.device())?;
        let diff = max_diff(&logits.flatten_all()?, &want)?;
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

#[test]
fn idefics3_with_image_splitting_matches_transformers() -> TestResult {
    check_model("split")
}

#[test]
fn idefics3_without_splitting_matches_transformers() -> TestResult {
    check_model("nosplit")
}

#[test]
fn smolvlm_matches_transformers() -> TestResult {
    check_model("smolvlm")
}

/// Tiles that are not a multiple of the patch and differ from the vision
/// `image_size`, bicubic, tied embeddings.
#[test]
fn idefics3_with_odd_tiles_and_tied_embeddings_matches_transformers() -> TestResult {
    check_model("odd")
}

/// Layer by layer on the recorded intermediates of cases 0 and 1 (`odd`: 0): the
/// processor's pixel values (per image, in prompt order), the tower's last
/// hidden state and the connector's output.
#[test]
fn processor_tower_and_connector_match_the_intermediates() -> TestResult {
    multitoken_vision::link();
    for name in MODELS {
        let dir = fixtures().join(name);
        let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json"))?)?;
        let cfg = multitoken_vlm::idefics3::config::Idefics3Config::from_value(&config, &dir.join("config.json"))?;
        let context = ModalityContext::new(Device::Cpu, candle_core::DType::F32, &dir);
        let builder = serde_json::json!({"tower": ".", "tower_config": cfg.vision_config, "projector": cfg.connector_spec()});
        let modality = multitoken_core::build_modality("vision_idefics3", &builder, &context)?;
        let weights = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)?;
        let connector: std::collections::HashMap<String, Tensor> = weights
            .iter()
            .filter_map(|(k, v)| k.strip_prefix("model.connector.").map(|rest| (rest.to_string(), v.clone())))
            .collect();
        let text_hidden = config["text_config"]["hidden_size"].as_u64().ok_or("hidden")? as usize;
        let vb = candle_nn::VarBuilder::from_tensors(connector, candle_core::DType::F32, &Device::Cpu);
        let projector = Projector::load(cfg.connector_spec(), modality.feature_dim(), text_hidden, vb)?;
        let inter = candle_core::safetensors::load(dir.join("intermediates.safetensors"), &Device::Cpu)?;
        let expected = expected(name)?;
        for (i, case) in expected.cases.iter().take(2).enumerate() {
            if !inter.contains_key(&format!("case{i}.pixel_values")) {
                assert!(i > 0, "{name}: no intermediates");
                continue;
            }
            let get = |key: &str| inter.get(&format!("case{i}.{key}")).cloned().ok_or(format!("{name}: no case{i}.{key}"));
            let pixels: Vec<Tensor> = case.images.iter().map(|f| modality.preprocess(&image(f))).collect::<Result<_, _>>()?;
            let pixels = Tensor::cat(&pixels, 0)?;
            let want_pixels = get("pixel_values")?.squeeze(0)?;
            let diff = max_diff(&pixels, &want_pixels)?;
            assert!(diff == 0.0, "{name} case {i}: pixel values differ by {diff}");
            let hidden = modality.encode_item(&pixels)?.remove(0);
            let diff = max_diff(&hidden, &get("vision_hidden")?)?;
            assert!(diff < 1e-4, "{name} case {i}: tower output differs by {diff}");
            let features = projector.forward(&get("vision_hidden")?)?;
            let diff = max_diff(&features, &get("image_features")?)?;
            assert!(diff < 1e-5, "{name} case {i}: connector output differs by {diff}");
        }
    }
    Ok(())
}

/// The checkpoint rewritten as a `multitoken.json` directory (for training)
/// loads through our own layout and gives the same ids, chat ids included.
#[test]
fn exported_directories_give_the_same_ids() -> TestResult {
    multitoken_vision::link();
    multitoken_vlm::link();
    for name in ["split", "smolvlm"] {
        let dir = fixtures().join(name);
        let work = std::env::temp_dir().join(format!("multitoken-export-idefics3-{}-{name}", std::process::id()));
        let exported = multitoken_lm::multimodal::export_imported(&dir, &work)?.ok_or("not an importer directory")?;
        let model = MultimodalModel::load(&exported, &LoadOptions::default())?;
        let expected = expected(name)?;
        let case = &expected.cases[1];
        let items = self::items(&case.images);
        let prepared = model.prepare_raw(&case.prompt, &items)?;
        assert_eq!(prepared.input_ids.len(), case.input_ids.len(), "{name}: prompt length");
        let params = GenerationParams { max_new_tokens: expected.new_tokens, eos_token_ids: model.lm.generation.eos_token_ids.clone(), ignore_eos: true, ..GenerationParams::default() };
        let out = model.generate(&prepared, &items, &params, &mut |_| true)?;
        assert_eq!(out.token_ids, case.greedy_ids, "{name} exported");
        let original = MultimodalModel::load(&dir, &LoadOptions::default())?;
        let chat = [Message::user("<image>Describe.")];
        let one = self::items(&case.images[..1]);
        assert_eq!(model.prepare_chat(&chat, &one)?.input_ids, original.prepare_chat(&chat, &one)?.input_ids, "{name}: chat ids");
        std::fs::remove_dir_all(&work)?;
    }
    Ok(())
}

#[test]
fn a_token_count_that_differs_from_the_images_or_a_broken_image_is_a_clear_error() -> TestResult {
    multitoken_vision::link();
    multitoken_vlm::link();
    let model = MultimodalModel::load(&fixtures().join("split"), &LoadOptions::default())?;
    let one = items(&["a_40x30.png".to_string()]);
    let error = match model.prepare_raw("User:<image><image>Two?", &one) {
        Ok(_) => "prepared".to_string(),
        Err(e) => e.to_string(),
    };
    assert!(error.contains('2') && error.contains('1') && error.contains("<image>"), "{error}");
    // Broken images are errors naming the item, never a panic.
    let png = std::fs::read(fixtures().join("images/a_40x30.png"))?;
    for (bytes, expect) in [(png[..300].to_vec(), "end of file"), (b"not an image".to_vec(), "not a recognised image")] {
        let broken = ItemsByKey::from([("images".to_string(), vec![Item::Bytes(bytes)])]);
        let error = match model.prepare_raw("User:<image>x", &broken).and_then(|p| model.embed(&p, &broken).map(|_| ())) {
            Ok(()) => "accepted".to_string(),
            Err(e) => e.to_string(),
        };
        assert!(error.contains(expect) && error.contains("bytes"), "{error}");
    }
    Ok(())
}

/// A copy of the `split` fixture with `edit` applied to its config.
fn edited_config(tag: &str, edit: impl FnOnce(&mut serde_json::Value)) -> Result<PathBuf, Box<dyn std::error::Error>> {
    let from = fixtures().join("split");
    let dir = std::env::temp_dir().join(format!("multitoken-idefics3-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    for entry in std::fs::read_dir(&from)? {
        let entry = entry?;
        std::fs::copy(entry.path(), dir.join(entry.file_name()))?;
    }
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json"))?)?;
    edit(&mut config);
    std::fs::write(dir.join("config.json"), config.to_string())?;
    Ok(dir)
}

#[test]
fn bad_configs_are_named() -> TestResult {
    multitoken_vision::link();
    multitoken_vlm::link();
    type Edit = Box<dyn FnOnce(&mut serde_json::Value)>;
    let checks: Vec<(&str, Edit, &str)> = vec![
        // 4x4 patches per tile cannot be shuffled by 3.
        ("scale3", Box::new(|c| c["scale_factor"] = serde_json::json!(3)), "scale_factor 3"),
        // The connector's input width no longer matches the tower.
        ("scale1", Box::new(|c| c["scale_factor"] = serde_json::json!(1)), "image_seq_len is 4"),
        ("gpt2", Box::new(|c| c["text_config"]["model_type"] = serde_json::json!("gpt2")), "not supported"),
    ];
    for (tag, edit, expect) in checks {
        let dir = edited_config(tag, edit)?;
        let error = match MultimodalModel::load(&dir, &LoadOptions::default()) {
            Ok(_) => "loaded".to_string(),
            Err(e) => e.to_string(),
        };
        assert!(error.contains(expect), "{tag}: {error}");
        std::fs::remove_dir_all(&dir)?;
    }
    Ok(())
}

/// `vision_siglip`'s `patch_rule`: Idefics2's "all" (default) counts a patch
/// as real when all its pixels are, "any" (Idefics3's rule) when one is. The
/// quarter crops of `a_40x30.png` in the Idefics2 `split` fixture are 28x28
/// pixels padded to 40x30: 3x3 whole patches of 8, but 3x4 touched ones (the
/// padded height allows only 3 patch rows).
#[test]
fn vision_siglip_patch_rule_is_a_config_option() -> TestResult {
    multitoken_vision::link();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/idefics2/split");
    let context = ModalityContext::new(Device::Cpu, candle_core::DType::F32, &dir);
    let item = Item::Path(dir.join("../images/a_40x30.png"));
    let mut patches = Vec::new();
    for rule in [None, Some("all"), Some("any")] {
        let config = match rule {
            Some(rule) => serde_json::json!({"patch_rule": rule}),
            None => serde_json::json!({}),
        };
        let modality = multitoken_core::build_modality("vision_siglip", &config, &context)?;
        let pieces = modality.encode_item(&modality.preprocess(&item)?)?;
        patches.push(pieces.iter().map(|p| p.dim(1)).collect::<Result<Vec<_>, _>>()?);
    }
    assert_eq!(patches[0], patches[1], "the default is Idefics2's rule");
    assert_eq!(patches[1][0], 9, "{patches:?}");
    assert_eq!(patches[2][0], 12, "{patches:?}");
    Ok(())
}
