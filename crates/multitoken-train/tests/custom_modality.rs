//! A modality that is none of the built-in ones (`test_sensor`, registered in
//! this test crate) goes through loading, dataset rows and training with no
//! name known to the trainer: its projector comes from the modality, its
//! dataset items are parsed by it (inline JSON numbers, CSV text), a frozen
//! and a trained encoder are saved where the modality says and reload; bad
//! configs and builders are errors naming the modality.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use multitoken_core::{Item, ItemsByKey};
use multitoken_lm::generate::GenerationParams;
use multitoken_lm::loader::LoadOptions;
use multitoken_lm::multimodal::MultimodalModel;
use multitoken_train::model::{TrainParts, TrainableModel};
use multitoken_train::trainer::{train, Stage, TrainConfig};

#[path = "../../../tests/support/sensor_modality.rs"]
mod sensor;

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn temp(name: &str) -> Result<PathBuf, Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join(format!("multitoken-custom-{name}-{}", std::process::id()));
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// The llama fixture plus `test_sensor` with its encoder under `sensor/`
/// (relative, so a saved model must rewrite the path); `entry` is merged into
/// the modality's entry.
fn model_dir(root: &Path, entry: serde_json::Value) -> Result<PathBuf, Box<dyn std::error::Error>> {
    let dir = root.join("model");
    sensor::write_encoder(&dir.join("sensor"))?;
    let mut modality = serde_json::json!({"builder": sensor::NAME, "config": {"encoder": "sensor"}});
    if let (Some(target), Some(extra)) = (modality.as_object_mut(), entry.as_object()) {
        for (k, v) in extra {
            target.insert(k.clone(), v.clone());
        }
    }
    let config = serde_json::json!({
        "base_model": fixtures().join("lm/llama").canonicalize()?.display().to_string(),
        "modalities": [modality]
    });
    std::fs::write(dir.join("multitoken.json"), serde_json::to_string_pretty(&config)?)?;
    Ok(dir)
}

/// Rows whose readings come inline as JSON lists and as CSV text.
fn dataset(root: &Path) -> Result<PathBuf, Box<dyn std::error::Error>> {
    let rows = [
        (serde_json::json!([1, 2, 3]), "low"),
        (serde_json::json!("9, 8, 7"), "high"),
        (serde_json::json!([[5.5, 0.5]]), "mixed"),
        (serde_json::json!("2 2 2"), "flat"),
    ];
    let mut text = String::new();
    for (k, (reading, answer)) in rows.iter().enumerate() {
        let row = serde_json::json!({
            "id": format!("s{k}"),
            "readings": [reading],
            "messages": [
                {"role": "user", "content": "<reading> which?"},
                {"role": "assistant", "content": answer}
            ]
        });
        text.push_str(&row.to_string());
        text.push('\n');
    }
    let path = root.join("rows.jsonl");
    std::fs::write(&path, text)?;
    Ok(path)
}

fn config(root: &Path, steps: usize) -> Result<TrainConfig, Box<dyn std::error::Error>> {
    let mut cfg = TrainConfig::new(model_dir(root, serde_json::json!({}))?, dataset(root)?, root.join("out"));
    cfg.stage = Stage::Projectors;
    cfg.max_steps = Some(steps);
    cfg.per_device_train_batch_size = 2;
    cfg.learning_rate = 1e-2;
    cfg.warmup_steps = Some(0);
    cfg.progress = false;
    Ok(cfg)
}

fn readings(text: &str) -> ItemsByKey {
    ItemsByKey::from([("readings".to_string(), vec![Item::Text(text.to_string())])])
}

/// Loads `dir` and greedily answers a prompt with one reading.
fn answer(dir: &Path) -> Result<Vec<u32>, Box<dyn std::error::Error>> {
    let model = MultimodalModel::load(dir, &LoadOptions::default())?;
    let items = readings("[1, 2, 3]");
    let prepared = model.prepare_raw("a <reading> b", &items)?;
    assert_eq!(prepared.spans.iter().map(|s| s.len).sum::<usize>(), sensor::WIDTH);
    let params = GenerationParams { max_new_tokens: 3, ignore_eos: true, ..Default::default() };
    Ok(model.generate(&prepared, &items, &params, &mut |_| true)?.token_ids)
}

fn saved_entry(out: &Path) -> Result<serde_json::Value, Box<dyn std::error::Error>> {
    let text = std::fs::read_to_string(out.join("multitoken.json"))?;
    let config: serde_json::Value = serde_json::from_str(&text)?;
    Ok(config["modalities"][0].clone())
}

/// Frozen encoder: only the projector (the modality's own `mlp2x_gelu`, as the
/// entry names none) trains; the saved config points at the original encoder
/// by an absolute path and still names no projector; the output loads.
#[test]
fn frozen_encoder_of_a_custom_modality_trains_its_projector_and_reloads() -> TestResult {
    let root = temp("frozen")?;
    let cfg = config(&root, 4)?;
    let summary = train(&cfg)?;
    assert_eq!(summary.log.len(), 4);
    assert!(summary.log.iter().all(|l| l.loss.is_finite() && l.grad_norm > 0.0), "{:?}", summary.log);
    let entry = saved_entry(&cfg.output_dir)?;
    assert!(entry.get("projector").is_none(), "{entry}");
    let encoder = PathBuf::from(entry["config"]["encoder"].as_str().unwrap());
    assert_eq!(encoder, cfg.model.join("sensor").canonicalize()?);
    let model = MultimodalModel::load(&cfg.output_dir, &LoadOptions::default())?;
    assert_eq!(model.modalities[0].projector.spec().kind_name(), "mlp2x_gelu");
    assert_eq!(answer(&cfg.output_dir)?.len(), 3);
    Ok(())
}

/// `--train-encoders test_sensor`: the encoder's weights change and are saved
/// under the modality's key (`encoder` = `encoder-0`, with the source's
/// non-weight files); the output loads with them.
#[test]
fn trained_encoder_of_a_custom_modality_is_saved_under_its_key() -> TestResult {
    let root = temp("trained")?;
    let mut cfg = config(&root, 3)?;
    cfg.train_encoders = sensor::NAME.parse()?;
    train(&cfg)?;
    let entry = saved_entry(&cfg.output_dir)?;
    assert_eq!(entry["config"]["encoder"], "encoder-0");
    let saved = cfg.output_dir.join("encoder-0");
    assert!(saved.join("config.json").is_file());
    let before = candle_core::safetensors::load(cfg.model.join("sensor/model.safetensors"), &candle_core::Device::Cpu)?;
    let after = candle_core::safetensors::load(saved.join("model.safetensors"), &candle_core::Device::Cpu)?;
    let diff = (&before["proj.weight"] - &after["proj.weight"])?.abs()?.sum_all()?.to_scalar::<f32>()?;
    assert!(diff > 0.0, "the encoder did not train");
    assert_eq!(answer(&cfg.output_dir)?.len(), 3);
    Ok(())
}

/// `--train-encoders` on a modality that does not say where its weights live
/// fails at load, before any step (no checkpoint, no output model), naming it.
#[test]
fn an_encoder_without_a_save_location_fails_before_training() -> TestResult {
    let root = temp("nowhere")?;
    let mut cfg = config(&root, 2)?;
    let dir = model_dir(&root, serde_json::json!({"config": {"encoder": "sensor", "hide_weights": true}}))?;
    cfg.model = dir;
    cfg.train_encoders = sensor::NAME.parse()?;
    let err = train(&cfg).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("test_sensor") && err.contains("encoder_weights"), "{err}");
    assert!(!cfg.output_dir.join("multitoken.json").exists());
    assert!(!cfg.output_dir.join("checkpoint-1").exists());
    // Frozen, the same modality trains its projector and saves fine.
    cfg.train_encoders = Default::default();
    train(&cfg)?;
    assert_eq!(saved_entry(&cfg.output_dir)?["config"]["encoder"].as_str().map(|p| p.starts_with('/')), Some(true));
    Ok(())
}

/// Dataset rows: with the model, the modality parses its items (JSON lists
/// and CSV text become inline text); without one, a JSON list is kept as text
/// for a key no built-in file modality reads (refused under `images`), and
/// `dataset check` knows `<reading>` from the modality's `ModalityInfo`.
#[test]
fn dataset_rows_are_parsed_by_the_modality() -> TestResult {
    let root = temp("rows")?;
    let cfg = config(&root, 1)?;
    let model = TrainableModel::load(&cfg.model, TrainParts::default(), &candle_core::Device::Cpu)?;
    let rows = multitoken_train::data::read_jsonl_for(&cfg.dataset, &model.mm)?;
    assert_eq!(rows[0].items["readings"], vec![Item::Text("[1,2,3]".into())]);
    assert_eq!(rows[1].items["readings"], vec![Item::Text("9, 8, 7".into())]);
    for row in &rows {
        model.mm.prepare_training(&row.messages, &row.items)?;
    }
    // Without the model a JSON list is kept as text, and a string is a file
    // path: the CSV row is a missing file, named with its row and item.
    let lists = root.join("lists.jsonl");
    std::fs::write(&lists, std::fs::read_to_string(&cfg.dataset)?.lines().next().unwrap_or_default())?;
    let without_model = multitoken_train::data::read_jsonl(&lists)?;
    assert_eq!(without_model[0].items["readings"], vec![Item::Text("[1,2,3]".into())]);
    let err = multitoken_train::data::read_jsonl(&cfg.dataset).unwrap_err().to_string();
    assert!(err.contains(":2 (id s1)") && err.contains("`readings` item 1") && err.contains("9, 8, 7"), "{err}");
    let images = root.join("images.jsonl");
    std::fs::write(&images, std::fs::read_to_string(&cfg.dataset)?.replace("\"readings\"", "\"images\""))?;
    let err = multitoken_train::data::read_jsonl(&images).unwrap_err().to_string();
    assert!(err.contains("`images` item 1") && err.contains("must be a string"), "{err}");
    let tokens = multitoken_train::data::default_tokens();
    let report = multitoken_train::data::check_with(&cfg.dataset, &tokens, &multitoken_train::data::model_items(&model.mm))?;
    assert_eq!(report.items.get("readings"), Some(&4));
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    // Without the model a string is a file path: the CSV strings are reported
    // as missing files, and nothing else (the token counts agree).
    let report = multitoken_train::data::check(&cfg.dataset, &tokens)?;
    assert_eq!(report.problems.len(), 2, "{:?}", report.problems);
    assert!(report.problems.iter().all(|p| p.contains("`readings` item 1")), "{:?}", report.problems);
    assert_eq!(multitoken_train::data::default_tokens().get("readings").map(String::as_str), Some("<reading>"));
    Ok(())
}

fn load_error(root: &Path, entry: serde_json::Value) -> String {
    let dir = model_dir(root, entry).unwrap();
    match TrainableModel::load(&dir, TrainParts::default(), &candle_core::Device::Cpu) {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

/// A projector in `multitoken.json` that differs from the modality's, a
/// panicking builder, two modalities on one token, an encoder of the wrong
/// width: errors naming the modality (and both projectors).
#[test]
fn bad_custom_modalities_are_clear_errors() -> TestResult {
    let root = temp("bad")?;
    let err = load_error(&root, serde_json::json!({"projector": "linear"}));
    assert!(err.contains("test_sensor") && err.contains("linear") && err.contains("mlp2x_gelu"), "{err}");
    let err = load_error(&root, serde_json::json!({"config": {"panic": true}}));
    assert!(err.contains("test_sensor") && err.contains("panicked") && err.contains("unplugged"), "{err}");

    // The same modality twice: the second one's token is taken.
    let dir = model_dir(&root, serde_json::json!({}))?;
    let text = std::fs::read_to_string(dir.join("multitoken.json"))?;
    let mut config: serde_json::Value = serde_json::from_str(&text)?;
    let entry = config["modalities"][0].clone();
    let mut second = entry.clone();
    second["projector_prefix"] = serde_json::json!("second");
    config["modalities"] = serde_json::json!([entry, second]);
    std::fs::write(dir.join("multitoken.json"), config.to_string())?;
    let err = TrainableModel::load(&dir, TrainParts::default(), &candle_core::Device::Cpu).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("test_sensor") && err.contains("<reading>"), "{err}");

    // Features of the wrong width: an error at encode time naming the modality.
    let dir = model_dir(&root, serde_json::json!({"config": {"encoder": "sensor", "bad_shape": true}}))?;
    let model = TrainableModel::load(&dir, TrainParts::default(), &candle_core::Device::Cpu)?;
    let items = readings("1 2 3");
    let prepared = model.mm.prepare_raw("x <reading>", &items)?;
    let err = model.mm.embed(&prepared, &items).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("test_sensor"), "{err}");
    let err = model.embed(&prepared, &items).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("test_sensor") && err.contains("feature_dim"), "{err}");
    Ok(())
}
