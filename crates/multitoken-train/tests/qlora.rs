//! QLoRA on the tiny llama: LoRA adapters train over a base quantized at load
//! (`quantize = "q4_1"`), the loss falls, the adapter is written in PEFT's
//! format, and a resumed run repeats the uninterrupted run's losses exactly;
//! full fine-tuning of a quantized base is a clear error. The same over a
//! Q4_1 GGUF file (the tiny llama written by `tests/support/tiny_gguf.rs`). A
//! QLoRA adapter means to peft what it means to us (`tests/fixtures/qlora/`).

use std::path::{Path, PathBuf};

use multitoken_train::trainer::{train, Stage, TrainConfig};

#[path = "../../../tests/support/tiny_gguf.rs"]
mod tiny_gguf;

mod common;
use common::{dataset, fixtures, model_dir, model_dir_on};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// A scratch directory of its own (the e2e tests' names are theirs).
fn temp(name: &str) -> Result<PathBuf, Box<dyn std::error::Error>> {
    common::temp(&format!("qlora-{name}"))
}

fn config(
    root: &Path,
    steps: usize,
    quantize: &str,
) -> Result<TrainConfig, Box<dyn std::error::Error>> {
    let mut cfg = config_on(model_dir(root)?, root, steps)?;
    cfg.quantize = Some(quantize.to_string());
    Ok(cfg)
}

/// LoRA r4 on the model at `model`, batch 4, `steps` steps.
fn config_on(model: PathBuf, root: &Path, steps: usize) -> Result<TrainConfig, Box<dyn std::error::Error>> {
    let mut cfg = TrainConfig::new(model, dataset(root)?, root.join("out"));
    cfg.stage = Stage::Lora;
    cfg.max_steps = Some(steps);
    cfg.per_device_train_batch_size = 4;
    cfg.learning_rate = 1e-2;
    cfg.warmup_steps = Some(0);
    cfg.progress = false;
    cfg.lora_r = 4;
    cfg.lora_alpha = 8.0;
    cfg.lora_dropout = 0.1;
    Ok(cfg)
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len() as f64
}

#[test]
fn lora_over_a_q4_1_base_trains_and_writes_a_peft_adapter() -> TestResult {
    let root = temp("train")?;
    let cfg = config(&root, 16, "q4_1")?;
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
    let weights = candle_core::safetensors::load(
        out.join("adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )?;
    assert_eq!(
        weights.len(),
        28,
        "{:?}",
        weights.keys().collect::<Vec<_>>()
    );
    // Layer 0's adapters only move if the gradient went back through layer 1's
    // quantized linears.
    let b = weights
        .get("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight")
        .ok_or("lora_B of layers.0.self_attn.q_proj missing")?;
    assert!(
        b.abs()?.max_all()?.to_scalar::<f32>()? > 0.0,
        "layer 0's lora_B never moved"
    );
    Ok(())
}

#[test]
fn qlora_resume_repeats_the_uninterrupted_run() -> TestResult {
    let setup = |root: &Path| -> Result<TrainConfig, Box<dyn std::error::Error>> {
        let mut cfg = config(root, 6, "q8_0")?;
        // The frozen CLIP tower's linears as blocks too (--quantize-towers).
        cfg.quantize_towers = Some("q4_1".into());
        cfg.gradient_accumulation_steps = 2;
        cfg.per_device_train_batch_size = 3;
        cfg.warmup_steps = Some(2);
        cfg.learning_rate = 3e-3;
        Ok(cfg)
    };
    let full = train(&setup(&temp("resume-a")?)?)?;
    let mut b = setup(&temp("resume-b")?)?;
    b.save_steps = 3;
    train(&b)?;
    std::fs::remove_dir_all(b.output_dir.join("checkpoint-6"))?;
    b.resume = Some(PathBuf::from("latest"));
    let resumed = train(&b)?;
    let la: Vec<f64> = full.log.iter().map(|l| l.loss).collect();
    let lb: Vec<f64> = resumed.log.iter().map(|l| l.loss).collect();
    assert_eq!(la, lb, "losses after resume differ");
    // The same checkpoint over another quantization is refused, not resumed.
    b.quantize = Some("q4_1".into());
    let err = train(&b)
        .err()
        .ok_or("resuming over another quantization was accepted")?
        .to_string();
    assert!(err.contains("--quantize"), "{err}");
    // And over towers kept in another form.
    b.quantize = Some("q8_0".into());
    b.quantize_towers = None;
    let err = train(&b)
        .err()
        .ok_or("resuming with f32 towers over a run with q4_1 towers was accepted")?
        .to_string();
    assert!(err.contains("--quantize-towers"), "{err}");
    Ok(())
}

#[test]
fn bad_quantize_settings_are_clear_errors() -> TestResult {
    let root = temp("bad")?;
    let mut cfg = config(&root, 2, "q3_k")?;
    let err = train(&cfg).err().ok_or("q3_k was accepted")?.to_string();
    assert!(err.contains("q8_0, q4_1, q4_k"), "{err}");
    cfg.quantize = Some("q4_1".into());
    cfg.stage = Stage::Full;
    let err = train(&cfg)
        .err()
        .ok_or("full fine-tuning of a quantized base was accepted")?
        .to_string();
    assert!(err.contains("full fine-tuning needs a dense"), "{err}");
    cfg.stage = Stage::Lora;
    cfg.quantize_towers = Some("q4_k".into());
    let err = train(&cfg).err().ok_or("q4_k towers were accepted")?.to_string();
    assert!(err.contains("quantize_towers") && err.contains("q8_0 or q4_1"), "{err}");
    cfg.quantize_towers = Some("q8_0".into());
    cfg.train_encoders = multitoken_train::model::EncoderChoice::All;
    let err = train(&cfg).err().ok_or("quantized towers that train were accepted")?.to_string();
    assert!(err.contains("--quantize-towers") && err.contains("vision_clip"), "{err}");
    Ok(())
}

/// QLoRA over a GGUF file's own Q4_1 blocks: the loss falls, layer 0's
/// adapters move (the gradient crossed layer 1's quantized linears), the
/// adapter is PEFT's format with transformers' names, and a resumed run
/// repeats the uninterrupted one exactly.
#[test]
fn lora_over_a_q4_1_gguf_trains_resumes_and_writes_a_peft_adapter() -> TestResult {
    let root = temp("gguf")?;
    let gguf = root.join("tiny.Q4_1.gguf");
    tiny_gguf::write_chat_gguf(&gguf, candle_core::quantized::GgmlDType::Q4_1, 512);
    let cfg = config_on(model_dir_on(&root, &gguf)?, &root, 16)?;
    let summary = train(&cfg)?;
    let losses: Vec<f64> = summary.log.iter().map(|l| l.loss).collect();
    assert!(mean(&losses[12..]) < 0.7 * mean(&losses[..4]), "loss did not fall: {losses:?}");
    let out = &cfg.output_dir;
    let adapter: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json"))?)?;
    assert_eq!(adapter["peft_type"], "LORA");
    let weights = candle_core::safetensors::load(out.join("adapter_model.safetensors"), &candle_core::Device::Cpu)?;
    assert_eq!(weights.len(), 2 * 7 * tiny_gguf::LAYERS, "{:?}", weights.keys().collect::<Vec<_>>());
    let b = weights
        .get("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight")
        .ok_or("lora_B of layers.0.self_attn.q_proj missing")?;
    assert_eq!(b.dims(), &[tiny_gguf::HIDDEN, 4]);
    assert!(b.abs()?.max_all()?.to_scalar::<f32>()? > 0.0, "layer 0's lora_B never moved");

    let setup = |dir: &str| -> Result<TrainConfig, Box<dyn std::error::Error>> {
        let run = temp(dir)?;
        let mut cfg = config_on(model_dir_on(&run, &gguf)?, &run, 6)?;
        cfg.gradient_accumulation_steps = 2;
        cfg.per_device_train_batch_size = 3;
        cfg.warmup_steps = Some(2);
        cfg.learning_rate = 3e-3;
        Ok(cfg)
    };
    let full = train(&setup("gguf-resume-a")?)?;
    let mut b = setup("gguf-resume-b")?;
    b.save_steps = 3;
    train(&b)?;
    std::fs::remove_dir_all(b.output_dir.join("checkpoint-6"))?;
    b.resume = Some(PathBuf::from("latest"));
    let resumed = train(&b)?;
    let la: Vec<f64> = full.log.iter().map(|l| l.loss).collect();
    let lb: Vec<f64> = resumed.log.iter().map(|l| l.loss).collect();
    assert_eq!(la, lb, "losses after resume differ");
    Ok(())
}

/// The adapter a QLoRA run wrote (`tests/fixtures/qlora/`, trained over the
/// llama fixture quantized to Q4_1 at load), applied by us over that quantized
/// base, gives the logits peft gives on the base quantized and dequantized the
/// same way (`xtask/fixtures/qlora_peft.py`): the adapter means the same to
/// both, up to summation order.
#[test]
fn peft_on_the_dequantized_base_gives_our_logits() -> TestResult {
    use candle_core::{DType, Device, Tensor};
    use multitoken_core::{KvCache, LanguageModel, LogitsSelection};
    use multitoken_lm::lora::{LoraDropout, LoraLayer};
    let dir = fixtures().join("qlora");
    let expected: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json"))?)?;
    let adapter_config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json"))?)?;
    let scale = adapter_config["lora_alpha"].as_f64().ok_or("no lora_alpha")? / adapter_config["r"].as_f64().ok_or("no r")?;
    let adapter = candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &Device::Cpu)?;

    let base = fixtures().join("lm/llama");
    let hf = multitoken_lm::hf::parse_config(&base.join("config.json"))?;
    let dense = multitoken_lm::weights::SafetensorsSource::from_dir(&base, DType::F32, &Device::Cpu)?;
    let quantized = multitoken_lm::quantize::QuantizingSource::new(&dense, multitoken_lm::quantize::Quantization::Q4_1);
    let mut model = multitoken_lm::model::CausalLm::load(&hf.model, &quantized)?;
    let mut adapted = 0;
    for (name, linear) in model.decoder_linears_mut() {
        let key = |m: &str| format!("base_model.model.{name}.lora_{m}.weight");
        let (Some(a), Some(b)) = (adapter.get(&key("A")), adapter.get(&key("B"))) else { continue };
        linear.set_lora(Some(LoraLayer { a: a.clone(), b: b.clone(), scale, dropout: 0.0, rng: LoraDropout::new(0) }))?;
        adapted += 1;
    }
    assert_eq!(adapted, adapter.len() / 2);

    let ids: Vec<u32> = expected["ids"].as_array().ok_or("no ids")?.iter().filter_map(|v| v.as_u64()).map(|v| v as u32).collect();
    let input = Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
    let embeds = model.embed_tokens(&input)?;
    let ours = model.forward_embeds(&embeds, None, &mut KvCache::new(model.num_layers()), LogitsSelection::All)?;
    let ours: Vec<Vec<f32>> = ours.squeeze(0)?.to_vec2()?;
    let theirs: Vec<Vec<f64>> = serde_json::from_value(expected["logits"].clone())?;
    let (mut worst, mut largest) = (0f64, 0f64);
    for (a, b) in ours.iter().flatten().zip(theirs.iter().flatten()) {
        worst = worst.max((f64::from(*a) - b).abs());
        largest = largest.max(b.abs());
    }
    assert!(worst < 1e-4, "ours and peft's logits differ by {worst} (largest {largest})");
    // The adapter matters: without it our logits are far from peft's.
    for (_, linear) in model.decoder_linears_mut() {
        linear.set_lora(None)?;
    }
    let bare: Vec<Vec<f32>> = model
        .forward_embeds(&embeds, None, &mut KvCache::new(model.num_layers()), LogitsSelection::All)?
        .squeeze(0)?
        .to_vec2()?;
    let without = bare.iter().flatten().zip(theirs.iter().flatten()).map(|(a, b)| (f64::from(*a) - b).abs()).fold(0f64, f64::max);
    assert!(without > 100.0 * worst.max(1e-6), "the adapter changes nothing: {without} vs {worst}");
    eprintln!("QLoRA adapter, ours vs peft on the dequantized base: max |diff| {worst:.2e} (largest logit {largest:.2})");
    Ok(())
}

/// Gradient checkpointing recomputes each layer in the backward pass: the same
/// losses and adapter as without it up to float rounding (a layer input's two
/// gradient contributions may be summed in the other order), dropout included
/// (its masks are replayed), over a quantized and a dense base; other stages
/// refuse it.
#[test]
fn gradient_checkpointing_changes_nothing_but_memory() -> TestResult {
    for quantize in [Some("q4_1"), None] {
        let run = |checkpointing: bool| -> Result<(Vec<f64>, std::collections::HashMap<String, candle_core::Tensor>), Box<dyn std::error::Error>> {
            let root = temp(&format!("ckpt-{}-{checkpointing}", quantize.unwrap_or("f32")))?;
            let mut cfg = config_on(model_dir(&root)?, &root, 4)?;
            cfg.quantize = quantize.map(String::from);
            cfg.gradient_accumulation_steps = 2;
            cfg.gradient_checkpointing = checkpointing;
            let summary = train(&cfg)?;
            let adapter = candle_core::safetensors::load(cfg.output_dir.join("adapter_model.safetensors"), &candle_core::Device::Cpu)?;
            Ok((summary.log.iter().map(|l| l.loss).collect(), adapter))
        };
        let (plain_losses, plain) = run(false)?;
        let (losses, adapter) = run(true)?;
        assert_eq!(losses.len(), plain_losses.len());
        for (a, b) in losses.iter().zip(&plain_losses) {
            assert!((a - b).abs() <= 1e-6 * b.abs(), "{quantize:?}: losses differ with checkpointing: {losses:?} vs {plain_losses:?}");
        }
        assert_eq!(adapter.len(), plain.len());
        for (name, t) in &adapter {
            let scale = plain[name].abs()?.max_all()?.to_scalar::<f32>()?;
            let diff = (t - &plain[name])?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff <= 1e-4 * scale.max(1e-3), "{quantize:?}: {name} differs by {diff} (largest {scale})");
        }
    }
    let root = temp("ckpt-stage")?;
    let mut cfg = config(&root, 2, "q4_1")?;
    cfg.quantize = None;
    cfg.stage = Stage::Projectors;
    cfg.gradient_checkpointing = true;
    let err = train(&cfg).err().ok_or("checkpointing a projector stage was accepted")?.to_string();
    assert!(err.contains("gradient_checkpointing applies to --stage lora"), "{err}");
    Ok(())
}
