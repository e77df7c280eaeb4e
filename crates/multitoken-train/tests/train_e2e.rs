//! End to end on tiny models: stage 1 and full fine-tuning (with the CLIP tower)
//! make the loss fall and write a loadable model; a resumed run repeats the
//! uninterrupted run's losses exactly; bad input gives clear errors.

use std::path::{Path, PathBuf};

use multitoken_lm::loader::LoadOptions;
use multitoken_lm::multimodal::MultimodalModel;
use multitoken_train::trainer::{train, Stage, TrainConfig};

mod common;
use common::{dataset, fixtures, model_dir, temp};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn config(
    root: &Path,
    stage: Stage,
    steps: usize,
) -> Result<TrainConfig, Box<dyn std::error::Error>> {
    let mut cfg = TrainConfig::new(model_dir(root)?, dataset(root)?, root.join("out"));
    cfg.stage = stage;
    cfg.max_steps = Some(steps);
    cfg.per_device_train_batch_size = 4;
    cfg.learning_rate = 1e-2;
    cfg.warmup_steps = Some(0);
    cfg.progress = false;
    Ok(cfg)
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len() as f64
}

#[test]
fn stage1_loss_falls_and_output_loads() -> TestResult {
    let root = temp("stage1")?;
    let cfg = config(&root, Stage::Projectors, 16)?;
    let summary = train(&cfg)?;
    let losses: Vec<f64> = summary.log.iter().map(|l| l.loss).collect();
    assert_eq!(losses.len(), 16);
    assert!(
        summary.log.iter().all(|l| l.grad_norm > 0.0),
        "projectors got no gradient: {:?}",
        summary.log
    );
    let (first, last) = (mean(&losses[..4]), mean(&losses[12..]));
    // The LM is a frozen random model: only the projector learns, so the fall is modest.
    assert!(
        last < first - 0.2,
        "loss did not fall enough: {first} -> {last} ({losses:?})"
    );
    let model = MultimodalModel::load(&cfg.output_dir, &LoadOptions::default())?;
    assert_eq!(model.modality_tokens(), vec!["<image>"]);
    assert!(cfg.output_dir.join("metrics.jsonl").is_file());
    let png = std::fs::read(cfg.output_dir.join("loss.png"))?;
    assert_eq!(&png[..4], b"\x89PNG");
    assert!(cfg
        .output_dir
        .join("checkpoint-16/optimizer.safetensors")
        .is_file());
    Ok(())
}

#[test]
fn full_finetuning_with_encoder_trains_everything() -> TestResult {
    let root = temp("full")?;
    let mut cfg = config(&root, Stage::Full, 12)?;
    cfg.train_encoders = true.into();
    cfg.learning_rate = 3e-3;
    let summary = train(&cfg)?;
    let losses: Vec<f64> = summary.log.iter().map(|l| l.loss).collect();
    assert!(
        mean(&losses[8..]) < 0.7 * mean(&losses[..4]),
        "loss did not fall: {losses:?}"
    );
    // The trained LM and tower are written and differ from the originals.
    let out = &cfg.output_dir;
    assert!(out.join("lm/model.safetensors").is_file() && out.join("lm/tokenizer.json").is_file());
    assert!(
        out.join("encoder-0/model.safetensors").is_file()
            && out.join("encoder-0/config.json").is_file()
    );
    let before = candle_core::safetensors::load(
        fixtures().join("vision/clip/model.safetensors"),
        &candle_core::Device::Cpu,
    )?;
    let after = candle_core::safetensors::load(
        out.join("encoder-0/model.safetensors"),
        &candle_core::Device::Cpu,
    )?;
    let key = "vision_model.encoder.layers.0.mlp.fc1.weight";
    let key = if before.contains_key(key) {
        key.to_string()
    } else {
        "encoder.layers.0.mlp.fc1.weight".to_string()
    };
    let (b, a) = (before.get(&key), after.get(&key));
    let (Some(b), Some(a)) = (b, a) else {
        return Err(format!("`{key}` missing from the tower checkpoints").into());
    };
    let diff = (b - a)?.abs()?.max_all()?.to_scalar::<f32>()?;
    assert!(diff > 0.0, "the tower did not change");
    let model = MultimodalModel::load(out, &LoadOptions::default())?;
    assert_eq!(model.modality_tokens(), vec!["<image>"]);
    Ok(())
}

/// `freeze_lm` keeps the named LM parameters (a prefix here) bit for bit
/// while the rest of the LM trains; a name that matches nothing, or freezing
/// outside full fine-tuning, is refused before any step.
#[test]
fn freeze_lm_keeps_the_named_parameters_and_trains_the_rest() -> TestResult {
    let root = temp("freeze-lm")?;
    let mut cfg = config(&root, Stage::Full, 4)?;
    cfg.learning_rate = 3e-3;
    cfg.freeze_lm = vec!["model.embed_tokens".into(), "model.layers.0.mlp.up_proj.weight".into()];
    train(&cfg)?;
    let device = candle_core::Device::Cpu;
    let lm = |dir: &Path| candle_core::safetensors::load(dir.join("model.safetensors"), &device);
    let config_text = std::fs::read_to_string(model_dir(&root)?.join("multitoken.json"))?;
    let multimodal: serde_json::Value = serde_json::from_str(&config_text)?;
    let base = multimodal["base_model"].as_str().ok_or("no base_model")?;
    let base = model_dir(&root)?.join(base);
    let (before, after) = (lm(&base)?, lm(&cfg.output_dir.join("lm"))?);
    let max_diff = |name: &str| -> Result<f32, Box<dyn std::error::Error>> {
        let (Some(b), Some(a)) = (before.get(name), after.get(name)) else {
            return Err(format!("`{name}` missing").into());
        };
        Ok((b - a)?.abs()?.max_all()?.to_scalar::<f32>()?)
    };
    assert_eq!(max_diff("model.embed_tokens.weight")?, 0.0, "the frozen embeddings changed");
    assert_eq!(max_diff("model.layers.0.mlp.up_proj.weight")?, 0.0, "the frozen projection changed");
    assert!(max_diff("model.layers.0.mlp.down_proj.weight")? > 0.0, "the rest of the LM did not train");
    assert!(max_diff("model.layers.0.self_attn.q_proj.weight")? > 0.0, "the rest of the LM did not train");

    let mut typo = config(&temp("freeze-lm-typo")?, Stage::Full, 1)?;
    typo.freeze_lm = vec!["model.embed_token".into()];
    let message = train(&typo).err().ok_or("a misspelt name was accepted")?.to_string();
    assert!(message.contains("model.embed_token") && message.contains("names no LM parameter"), "{message}");
    let mut projectors = config(&temp("freeze-lm-stage")?, Stage::Projectors, 1)?;
    projectors.freeze_lm = vec!["model.embed_tokens".into()];
    let message = train(&projectors).err().ok_or("freeze_lm without --stage full was accepted")?.to_string();
    assert!(message.contains("--stage full"), "{message}");
    Ok(())
}

/// Trains `steps` steps uninterrupted, and again with a checkpoint at step 3
/// from which a second run resumes: the two loss curves must be identical.
fn check_resume(name: &str, stage: Stage, train_encoders: bool) -> TestResult {
    let setup = |root: &Path| -> Result<TrainConfig, Box<dyn std::error::Error>> {
        let mut cfg = config(root, stage, 6)?;
        cfg.gradient_accumulation_steps = 2;
        cfg.per_device_train_batch_size = 3;
        cfg.warmup_steps = Some(2);
        cfg.train_encoders = train_encoders.into();
        cfg.learning_rate = 3e-3;
        if stage == Stage::Lora {
            // Dropout masks come from the seeded generator: a resumed run must draw the same.
            cfg.lora_r = 4;
            cfg.lora_dropout = 0.1;
        }
        Ok(cfg)
    };
    let full = train(&setup(&temp(&format!("{name}-a"))?)?)?;
    let mut b = setup(&temp(&format!("{name}-b"))?)?;
    b.save_steps = 3;
    train(&b)?;
    // Pretend the run died after step 3.
    std::fs::remove_dir_all(b.output_dir.join("checkpoint-6"))?;
    b.resume = Some(PathBuf::from("latest"));
    let resumed = train(&b)?;
    let la: Vec<f64> = full.log.iter().map(|l| l.loss).collect();
    let lb: Vec<f64> = resumed.log.iter().map(|l| l.loss).collect();
    assert_eq!(la, lb, "losses after resume differ");
    Ok(())
}

#[test]
fn resume_repeats_the_uninterrupted_run() -> TestResult {
    check_resume("resume", Stage::Projectors, false)
}

#[test]
fn resume_with_lora_dropout_repeats_the_uninterrupted_run() -> TestResult {
    check_resume("resume-lora", Stage::Lora, false)
}

#[test]
fn resume_with_lm_and_tower_training_repeats_the_uninterrupted_run() -> TestResult {
    check_resume("resume-full", Stage::Full, true)
}

/// Every trained weight (LM, tower, projectors) is read by the forward at its
/// current value: a module holding a load-time copy of a variable (a
/// transposed patch embedding, say) keeps computing with the initial value
/// while the optimiser updates the variable, so the saved model differs from
/// what training saw. Checked by loading checkpoint-3 afresh: its loss on the
/// one-batch dataset must equal the loss the run logged at step 4.
#[test]
fn a_saved_checkpoint_computes_the_loss_training_saw() -> TestResult {
    let root = temp("reload")?;
    let mut cfg = config(&root, Stage::Full, 4)?;
    cfg.train_encoders = true.into();
    cfg.learning_rate = 3e-3;
    cfg.per_device_train_batch_size = 8; // the whole dataset: every step sees the same rows
    cfg.save_steps = 3;
    let run = train(&cfg)?;
    let logged = run.log.get(3).map(|l| l.loss).ok_or("no step 4")?;

    let mut again = TrainConfig::new(
        cfg.output_dir.join("checkpoint-3"),
        cfg.dataset.clone(),
        root.join("again"),
    );
    again.stage = Stage::Full;
    again.train_encoders = true.into();
    again.max_steps = Some(1);
    again.per_device_train_batch_size = 8;
    again.learning_rate = 1e-12;
    again.progress = false;
    let reloaded = train(&again)?.log.first().map(|l| l.loss).ok_or("no step")?;
    assert!(
        (reloaded - logged).abs() < 1e-5,
        "checkpoint-3 reloaded gives loss {reloaded}, training saw {logged}"
    );
    Ok(())
}

#[test]
fn corrupt_checkpoint_is_a_clear_error() -> TestResult {
    let root = temp("corrupt")?;
    let mut cfg = config(&root, Stage::Projectors, 2)?;
    train(&cfg)?;
    std::fs::write(
        cfg.output_dir.join("checkpoint-2/trainable.safetensors"),
        b"not safetensors",
    )?;
    cfg.resume = Some(PathBuf::from("latest"));
    cfg.max_steps = Some(4);
    let err = train(&cfg).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        err.contains("checkpoint") && err.contains("trainable.safetensors"),
        "{err}"
    );
    Ok(())
}

#[test]
fn bad_rows_name_line_and_id() -> TestResult {
    let root = temp("badrows")?;
    let mut cfg = config(&root, Stage::Projectors, 2)?;
    let path = root.join("bad.jsonl");
    let good = std::fs::read_to_string(&cfg.dataset)?;
    let first = good.lines().next().unwrap_or_default();
    std::fs::write(&path, format!("{first}\n{{\"id\": \"x7\", \"messages\": [{{\"role\": \"robot\", \"content\": \"hi\"}}]}}\n"))?;
    cfg.dataset = path;
    let err = train(&cfg).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains(":2 (id x7)") && err.contains("robot"), "{err}");
    Ok(())
}

#[test]
fn lora_stage_trains_adapters_and_writes_peft_files() -> TestResult {
    let root = temp("lora")?;
    let mut cfg = config(&root, Stage::Lora, 16)?;
    cfg.lora_r = 4;
    cfg.lora_alpha = 8.0;
    cfg.lora_dropout = 0.1;
    cfg.learning_rate = 1e-2;
    let summary = train(&cfg)?;
    let losses: Vec<f64> = summary.log.iter().map(|l| l.loss).collect();
    assert!(
        mean(&losses[12..]) < 0.7 * mean(&losses[..4]),
        "loss did not fall: {losses:?}"
    );
    let out = &cfg.output_dir;
    let adapter: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json"))?)?;
    assert_eq!(adapter["peft_type"], "LORA");
    assert_eq!(adapter["r"], 4);
    let weights = candle_core::safetensors::load(
        out.join("adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )?;
    // 2 layers x 7 linears x (A, B).
    assert_eq!(
        weights.len(),
        28,
        "{:?}",
        weights.keys().collect::<Vec<_>>()
    );
    let b = weights
        .get("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight")
        .ok_or("lora_B of layers.1.mlp.down_proj missing")?;
    assert_eq!(b.dims(), &[64, 4]);
    assert!(
        b.abs()?.max_all()?.to_scalar::<f32>()? > 0.0,
        "lora_B never moved"
    );
    let a = weights
        .get("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
        .ok_or("lora_A of layers.0.self_attn.q_proj missing")?;
    assert_eq!(a.dims(), &[4, 64]);
    Ok(())
}

#[test]
fn merged_lora_model_matches_the_adapted_one() -> TestResult {
    let root = temp("merge")?;
    let mut cfg = config(&root, Stage::Lora, 4)?;
    cfg.lora_r = 4;
    cfg.lora_dropout = 0.0;
    train(&cfg)?;
    let merged_dir = root.join("merged");
    multitoken_train::merge::merge_lora(&cfg.output_dir, None, &merged_dir)?;
    // Reference: the adapted model as training sees it (adapters attached, not merged).
    let parts = multitoken_train::model::TrainParts {
        projectors: true,
        lora: Some(multitoken_train::model::LoraSettings {
            r: 4,
            alpha: cfg.lora_alpha,
            dropout: 0.0,
            target_modules: Vec::new(),
            gradient_checkpointing: false,
        }),
        ..Default::default()
    };
    let adapted = multitoken_train::model::TrainableModel::load(
        &cfg.model,
        parts,
        &candle_core::Device::Cpu,
    )?;
    let trained = candle_core::safetensors::load(
        cfg.output_dir.join("adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )?;
    for p in adapted.params() {
        if let Some(key) = p.name.strip_prefix("lora/") {
            p.var.set(trained.get(key).ok_or("adapter key missing")?)?;
        }
    }
    let merged = MultimodalModel::load(&merged_dir, &LoadOptions::default())?;
    let ids = candle_core::Tensor::new(&[[1u32, 5, 9, 20, 33]], &candle_core::Device::Cpu)?;
    let logits = |m: &dyn multitoken_core::LanguageModel| -> Result<candle_core::Tensor, Box<dyn std::error::Error>> {
        let e = m.embed_tokens(&ids)?;
        let mut cache = multitoken_core::KvCache::new(m.num_layers());
        Ok(m.forward_embeds(&e, None, &mut cache, multitoken_core::LogitsSelection::All)?)
    };
    let (a, b) = (
        logits(adapted.mm.language_model())?,
        logits(merged.language_model())?,
    );
    let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
    assert!(diff < 1e-4, "merged logits differ by {diff}");
    Ok(())
}

#[test]
fn nan_loss_stops_and_names_the_last_checkpoint() -> TestResult {
    let root = temp("nan")?;
    let mut cfg = config(&root, Stage::Projectors, 6)?;
    cfg.learning_rate = 1e30;
    cfg.max_grad_norm = 0.0;
    cfg.save_steps = 1;
    let err = train(&cfg).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("training stopped"), "{err}");
    assert!(err.contains("NaN") || err.contains("inf"), "{err}");
    assert!(err.contains("checkpoint-"), "{err}");
    Ok(())
}

#[test]
fn feature_cache_is_written_and_reused() -> TestResult {
    let root = temp("cache")?;
    let mut cfg = config(&root, Stage::Projectors, 2)?;
    cfg.feature_cache = Some(root.join("cache"));
    let first = train(&cfg)?;
    let files: Vec<_> = std::fs::read_dir(root.join("cache"))?.collect::<Result<_, _>>()?;
    assert_eq!(files.len(), 1, "one cache file for the one frozen encoder");
    let model = multitoken_train::model::TrainableModel::load(
        &cfg.model,
        multitoken_train::model::TrainParts::default(),
        &candle_core::Device::Cpu,
    )?;
    assert_eq!(
        model.load_feature_cache(&root.join("cache"))?,
        4,
        "four distinct images"
    );
    // A second run from the cache gives the same losses.
    cfg.output_dir = root.join("out2");
    let second = train(&cfg)?;
    let (a, b): (Vec<f64>, Vec<f64>) = (
        first.log.iter().map(|l| l.loss).collect(),
        second.log.iter().map(|l| l.loss).collect(),
    );
    assert_eq!(a, b);
    Ok(())
}
