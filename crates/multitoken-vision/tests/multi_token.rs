//! sshh12/multi_token import: `MultimodalModel::load` on the tiny training
//! outputs of `xtask/fixtures/multi_token.py` (base Mistral + PEFT LoRA merged +
//! projector from the bf16 `non_lora_trainables.bin` + CLIP tower; `vision_clip`
//! with its mlp2x_gelu patch projector, `vision_clip_pool` with the 10-token
//! vector projector) must give multi_token's last-position logits (within 1e-4)
//! and greedy ids for one- and two-image chats, and every broken output
//! directory must be a clear error naming the file or key.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use multitoken_core::{Item, ItemsByKey, KvCache, LogitsSelection, Message};
use multitoken_lm::generate::GenerationParams;
use multitoken_lm::loader::LoadOptions;
use multitoken_lm::multimodal::MultimodalModel;
use serde::Deserialize;

type TestResult = Result<(), Box<dyn std::error::Error>>;

#[derive(Deserialize)]
struct Expected {
    builder: String,
    hub_tower: String,
    new_tokens: usize,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    messages: Vec<Message>,
    images: Vec<String>,
    input_ids: Vec<i64>,
    placeholder_id: i64,
    last_logits: Vec<f32>,
    greedy_ids: Vec<u32>,
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/multi_token")
}

fn expected(output: &str) -> Result<Expected, Box<dyn std::error::Error>> {
    let text = std::fs::read_to_string(fixtures().join(output).join("expected.json"))?;
    Ok(serde_json::from_str(&text)?)
}

fn items(files: &[String]) -> ItemsByKey {
    let images = files
        .iter()
        .map(|f| Item::Path(fixtures().join("images").join(f)))
        .collect();
    ItemsByKey::from([("images".to_string(), images)])
}

fn load(dir: &Path) -> multitoken_lm::Result<MultimodalModel> {
    multitoken_vision::link();
    MultimodalModel::load(dir, &LoadOptions::default())
}

fn check_output(output: &str) -> TestResult {
    let expected = expected(output)?;
    let model = load(&fixtures().join(output))?;
    assert_eq!(model.modality_tokens(), vec!["<image>"]);
    assert_eq!(model.modalities[0].modality.name(), expected.builder);
    let mut worst = 0f32;
    for case in &expected.cases {
        let what = format!("{} {:?}", expected.builder, case.images);
        let items = items(&case.images);
        let prepared = model.prepare_chat(&case.messages, &items)?;
        // multi_token's ids: the same text ids, and its placeholder runs exactly at our spans.
        assert_eq!(
            prepared.input_ids.len(),
            case.input_ids.len(),
            "{what}: prompt length"
        );
        for (pos, (ours, theirs)) in prepared.input_ids.iter().zip(&case.input_ids).enumerate() {
            let in_span = prepared
                .spans
                .iter()
                .any(|s| pos >= s.start && pos < s.start + s.len);
            if in_span {
                assert_eq!(
                    *theirs, case.placeholder_id,
                    "{what}: position {pos} is an image position for multi_token"
                );
            } else {
                assert_eq!(i64::from(*ours), *theirs, "{what}: text id at {pos}");
            }
        }
        let placeholders = case
            .input_ids
            .iter()
            .filter(|id| **id == case.placeholder_id)
            .count();
        assert_eq!(
            prepared.spans.iter().map(|s| s.len).sum::<usize>(),
            placeholders,
            "{what}: image positions"
        );

        let embeds = model.embed(&prepared, &items)?;
        let lm = model.language_model();
        let mut cache = KvCache::new(lm.num_layers());
        let logits = lm
            .forward_embeds(&embeds, None, &mut cache, LogitsSelection::Last)?
            .flatten_all()?;
        let want = Tensor::new(case.last_logits.as_slice(), &Device::Cpu)?;
        let diff = logits.sub(&want)?.abs()?.max(0)?.to_scalar::<f32>()?;
        eprintln!("{what}: max |logit diff| vs multi_token = {diff:.3e}");
        worst = worst.max(diff);
        assert!(
            diff < 1e-4,
            "{what}: last-position logits differ from multi_token's by {diff}"
        );

        let params = GenerationParams {
            max_new_tokens: expected.new_tokens,
            eos_token_ids: model.lm.generation.eos_token_ids.clone(),
            ignore_eos: true,
            ..Default::default()
        };
        let out = model.generate(&prepared, &items, &params, &mut |_| true)?;
        assert_eq!(
            out.token_ids, case.greedy_ids,
            "{what}: greedy ids differ from multi_token's"
        );
    }
    eprintln!("{}: worst max |logit diff| = {worst:.3e}", expected.builder);
    Ok(())
}

#[test]
fn vision_clip_output_matches_multi_token() -> TestResult {
    check_output("output")
}

#[test]
fn vision_clip_pool_output_matches_multi_token() -> TestResult {
    check_output("output_pool")
}

/// A scratch copy of the fixture output (with the `../base`, `../clip` paths it
/// names made absolute), changed by `edit`.
fn broken_output(
    name: &str,
    edit: impl FnOnce(&Path) -> std::io::Result<()>,
) -> Result<PathBuf, Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join(format!(
        "multitoken-multi-token-{name}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let source = fixtures().join("output");
    for entry in std::fs::read_dir(&source)? {
        let path = entry?.path();
        if let Some(file) = path.file_name() {
            std::fs::copy(&path, dir.join(file))?;
        }
    }
    let base = fixtures().join("base").canonicalize()?;
    let clip = fixtures().join("clip").canonicalize()?;
    let import = serde_json::json!({"base_model": base, "towers": {"vision_clip": clip}});
    std::fs::write(dir.join("multitoken_import.json"), import.to_string())?;
    edit(&dir)?;
    Ok(dir)
}

/// Loading `dir` fails with an error containing every needle.
fn check_error(dir: &Path, needles: &[&str]) -> TestResult {
    let result = load(dir);
    let _ = std::fs::remove_dir_all(dir);
    let message = match result {
        Ok(_) => {
            return Err(format!(
                "{} loaded, expected an error with {needles:?}",
                dir.display()
            )
            .into())
        }
        Err(e) => e.to_string(),
    };
    for needle in needles {
        assert!(
            message.contains(needle),
            "error `{message}` does not mention `{needle}`"
        );
    }
    Ok(())
}

#[test]
fn missing_non_lora_trainables_is_a_clear_error() -> TestResult {
    let dir = broken_output("missing", |d| {
        std::fs::remove_file(d.join("non_lora_trainables.bin"))
    })?;
    check_error(&dir, &["non_lora_trainables.bin", "missing"])
}

#[test]
fn corrupt_pickles_are_clear_errors() -> TestResult {
    let real = std::fs::read(fixtures().join("output/non_lora_trainables.bin"))?;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "garbage",
            b"definitely not a torch.save zip archive".to_vec(),
        ),
        ("empty", Vec::new()),
        ("truncated", real[..real.len() / 2].to_vec()),
        ("no-tail", real[..real.len() - 30].to_vec()),
        ("flipped", {
            // Corrupt the middle (the pickle program and the tensor data), keep the zip directory.
            let mut bytes = real.clone();
            for b in &mut bytes[40..real.len() / 2] {
                *b ^= 0x5a;
            }
            bytes
        }),
    ];
    for (name, bytes) in cases {
        let dir = broken_output(&format!("corrupt-{name}"), |d| {
            std::fs::write(d.join("non_lora_trainables.bin"), &bytes)
        })?;
        check_error(&dir, &["non_lora_trainables.bin"])?;
    }
    Ok(())
}

#[test]
fn a_missing_projector_key_is_named() -> TestResult {
    let bad = fixtures().join("bad/missing_key.bin");
    let dir = broken_output("missing-key", |d| {
        std::fs::copy(&bad, d.join("non_lora_trainables.bin")).map(|_| ())
    })?;
    check_error(
        &dir,
        &["vision_clip_lmm_projector.2.", "non_lora_trainables.bin"],
    )
}

#[test]
fn a_projector_of_another_modality_is_named() -> TestResult {
    let bad = fixtures().join("bad/unexpected_projector.bin");
    let dir = broken_output("extra-key", |d| {
        std::fs::copy(&bad, d.join("non_lora_trainables.bin")).map(|_| ())
    })?;
    check_error(
        &dir,
        &[
            "audio_whisper_lmm_projector.0.weight",
            "non_lora_trainables.bin",
        ],
    )
}

#[test]
fn an_unresolvable_tower_names_the_hub_name_and_the_override() -> TestResult {
    let hub = expected("output")?.hub_tower;
    let dir = broken_output("no-tower", |d| {
        let base = fixtures().join("base").canonicalize()?;
        std::fs::write(
            d.join("multitoken_import.json"),
            serde_json::json!({"base_model": base}).to_string(),
        )
    })?;
    check_error(
        &dir,
        &[&hub, "multitoken_import.json", "towers.vision_clip"],
    )
}

#[test]
fn an_unresolvable_base_model_names_where_it_came_from() -> TestResult {
    let dir = broken_output("no-base", |d| {
        std::fs::remove_file(d.join("multitoken_import.json"))
    })?;
    check_error(&dir, &["../base", "base_model_name_or_path"])
}

#[test]
fn an_unsupported_builder_lists_the_supported_ones() -> TestResult {
    let dir = broken_output("builder", |d| {
        let path = d.join("config.json");
        let text = std::fs::read_to_string(&path)?.replace(
            "\"modality_builder\": \"vision_clip\"",
            "\"modality_builder\": \"imagebind\"",
        );
        std::fs::write(path, text)
    })?;
    check_error(&dir, &["imagebind", "vision_clip_pool"])
}
