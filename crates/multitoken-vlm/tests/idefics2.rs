//! Idefics2 and Cephalo MoE parity: `MultimodalModel::load` on the tiny random
//! checkpoints of `xtask/fixtures/idefics2.py` (with and without image splitting,
//! one and two images per prompt, images of several sizes and modes, k = 1 and
//! k = 2 mixtures) must give transformers' prompt ids, last-position logits
//! (within 1e-4) and greedy ids.

use std::path::{Path, PathBuf};

use candle_core::{Tensor, D};
use multitoken_core::{ItemsByKey, KvCache, LogitsSelection, Message};
use multitoken_core::Item;
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
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/idefics2")
}

fn items(files: &[String]) -> ItemsByKey {
    let images = files.iter().map(|f| Item::Path(fixtures().join("images").join(f))).collect();
    ItemsByKey::from([("images".to_string(), images)])
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
            // The user turn as our CLI writes it: the image token, then the text.
            let content = case.prompt.trim_start_matches("User:").split("<end_of_utterance>").next().unwrap_or_default();
            model.prepare_chat(&[Message::user(content)], &items)?
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
        let want = Tensor::new(case.logits_last.as_slice(), logits.device())?;
        let diff = logits.flatten_all()?.sub(&want)?.abs()?.max(D::Minus1)?.to_scalar::<f32>()?;
        // JPEGs decode as Pillow does (libjpeg-turbo's decoder), so every image
        // agrees to f32 precision.
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
fn idefics2_with_image_splitting_matches_transformers() -> TestResult {
    check_model("split")
}

#[test]
fn idefics2_without_splitting_in_the_hub_file_layout_matches_transformers() -> TestResult {
    check_model("nosplit")
}

#[test]
fn cephalo_moe_top1_matches_its_reference() -> TestResult {
    check_model("moe_k1")
}

#[test]
fn cephalo_moe_top2_matches_its_reference() -> TestResult {
    check_model("moe_k2")
}

/// The checkpoint rewritten as a `multitoken.json` directory (for training and
/// `moe build`) loads through our own layout and gives the same ids.
#[test]
fn exported_directories_give_the_same_ids() -> TestResult {
    multitoken_vision::link();
    multitoken_vlm::link();
    for name in ["split", "moe_k2"] {
        let dir = fixtures().join(name);
        let work = std::env::temp_dir().join(format!("multitoken-export-test-{}-{name}", std::process::id()));
        let exported = multitoken_lm::multimodal::export_imported(&dir, &work)?.ok_or("not an importer directory")?;
        assert!(exported.join("multitoken.json").is_file());
        let model = MultimodalModel::load(&exported, &LoadOptions::default())?;
        let expected: Expected = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json"))?)?;
        let case = expected.cases.iter().find(|c| !c.images.is_empty() && c.images.iter().all(|f| f.ends_with(".png"))).ok_or("no case")?;
        let items = items(&case.images);
        let prepared = model.prepare_raw(&case.prompt, &items)?;
        assert_eq!(prepared.input_ids.len(), case.input_ids.len(), "{name}: prompt length");
        let params = GenerationParams { max_new_tokens: expected.new_tokens, eos_token_ids: model.lm.generation.eos_token_ids.clone(), ignore_eos: true, ..GenerationParams::default() };
        let out = model.generate(&prepared, &items, &params, &mut |_| true)?;
        assert_eq!(out.token_ids, case.greedy_ids, "{name} exported");
        // Chat prompts keep Idefics2's BOS through the export.
        let original = MultimodalModel::load(&dir, &LoadOptions::default())?;
        let chat = [Message::user("<image>Describe.")];
        assert_eq!(model.prepare_chat(&chat, &items)?.input_ids, original.prepare_chat(&chat, &items)?.input_ids, "{name}: chat ids");
        // A second export of the same checkpoint reuses the first.
        assert_eq!(multitoken_lm::multimodal::export_imported(&dir, &work)?, Some(exported));
        std::fs::remove_dir_all(&work)?;
    }
    Ok(())
}

/// `moe build` takes Idefics2 bases and experts as they are: a mixture of two
/// copies of the base (k = 2) answers as the base does.
#[test]
fn moe_build_accepts_idefics2_checkpoints() -> TestResult {
    multitoken_vision::link();
    multitoken_vlm::link();
    multitoken_moe::link();
    let dir = fixtures().join("split");
    let work = std::env::temp_dir().join(format!("multitoken-moe-build-idefics2-{}", std::process::id()));
    let out = work.join("moe");
    std::env::set_var("MULTITOKEN_WEIGHTS", &work);
    multitoken_moe::build::build(&multitoken_moe::build::BuildConfig {
        base: dir.clone(),
        experts: vec![dir.clone(), dir.clone()],
        k: 2,
        routing: multitoken_moe::Routing::Cephalo,
        out: out.clone(),
        seed: 7,
        quantize: None,
    })?;
    let model = MultimodalModel::load(&out, &LoadOptions::default())?;
    let expected: Expected = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json"))?)?;
    let case = &expected.cases[0];
    let items = items(&case.images);
    let prepared = model.prepare_raw(&case.prompt, &items)?;
    let params = GenerationParams { max_new_tokens: expected.new_tokens, eos_token_ids: model.lm.generation.eos_token_ids.clone(), ignore_eos: true, ..GenerationParams::default() };
    let out_ids = model.generate(&prepared, &items, &params, &mut |_| true)?.token_ids;
    assert_eq!(out_ids, case.greedy_ids);
    std::fs::remove_dir_all(&work)?;
    Ok(())
}

/// A copy of the `split` fixture whose weights went through `edit`.
fn edited_copy(tag: &str, edit: impl FnOnce(&mut std::collections::HashMap<String, Tensor>)) -> Result<PathBuf, Box<dyn std::error::Error>> {
    let from = fixtures().join("split");
    let dir = std::env::temp_dir().join(format!("multitoken-idefics2-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    for entry in std::fs::read_dir(&from)? {
        let entry = entry?;
        std::fs::copy(entry.path(), dir.join(entry.file_name()))?;
    }
    let mut tensors = candle_core::safetensors::load(from.join("model.safetensors"), &candle_core::Device::Cpu)?;
    edit(&mut tensors);
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))?;
    Ok(dir)
}

fn load_error(dir: &Path) -> String {
    match MultimodalModel::load(dir, &LoadOptions::default()) {
        Ok(_) => "loaded".into(),
        Err(e) => e.to_string(),
    }
}

#[test]
fn missing_or_misshaped_tensors_and_bad_configs_are_named() -> TestResult {
    multitoken_vision::link();
    multitoken_vlm::link();
    let checks: Vec<(&str, Box<dyn FnOnce(&mut std::collections::HashMap<String, Tensor>)>, &str)> = vec![
        ("no-latents", Box::new(|t| { t.remove("model.connector.perceiver_resampler.latents"); }), "perceiver_resampler.latents"),
        ("bad-patch", Box::new(|t| { t.insert("model.vision_model.embeddings.patch_embedding.weight".into(), Tensor::zeros((2, 2), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap_or_else(|_| unreachable!())); }), "patch_embedding.weight"),
        ("no-text", Box::new(|t| { t.remove("model.text_model.embed_tokens.weight"); }), "model.text_model.embed_tokens.weight"),
    ];
    for (tag, edit, expect) in checks {
        let dir = edited_copy(tag, edit)?;
        let error = load_error(&dir);
        assert!(error.contains(expect), "{tag}: {error}");
        std::fs::remove_dir_all(&dir)?;
    }
    // A config whose perceiver cannot split its heads over its key/value heads.
    let dir = edited_copy("bad-heads", |_| {})?;
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json"))?)?;
    config["perceiver_config"]["num_key_value_heads"] = serde_json::json!(3);
    std::fs::write(dir.join("config.json"), config.to_string())?;
    let error = load_error(&dir);
    assert!(error.contains("num_key_value_heads") || error.contains("kv"), "{error}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
