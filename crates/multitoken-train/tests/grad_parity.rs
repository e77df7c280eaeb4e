//! One training step against PyTorch (xtask/fixtures/train.py): the loss and the
//! gradients of an mlp2x_gelu projector and of PEFT LoRA adapters on every
//! decoder linear of the tiny llama agree within 1e-4.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use multitoken_core::{Projector, ProjectorSpec};
use multitoken_train::model::{LoraSettings, TrainParts, TrainableModel};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32, Box<dyn std::error::Error>> {
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

#[test]
fn one_step_matches_pytorch() -> TestResult {
    let dev = Device::Cpu;
    let fx = candle_core::safetensors::load(fixtures().join("train/step.safetensors"), &dev)?;
    let get = |k: &str| {
        fx.get(k)
            .cloned()
            .ok_or_else(|| format!("fixture lacks `{k}`"))
    };
    let parts = TrainParts {
        projectors: true,
        lora: Some(LoraSettings {
            r: 4,
            alpha: 8.0,
            dropout: 0.0,
            target_modules: Vec::new(),
            gradient_checkpointing: false,
        }),
        ..Default::default()
    };
    let model = TrainableModel::load(&fixtures().join("lm/llama"), parts, &dev)?;
    let lora_params: Vec<_> = model
        .params()
        .into_iter()
        .filter(|p| p.name.starts_with("lora/"))
        .collect();
    assert_eq!(lora_params.len(), 28);
    for p in &lora_params {
        let key = p.name.trim_start_matches("lora/");
        p.var.set(&get(&format!("lora.{key}"))?)?;
    }
    let map = VarMap::new();
    let projector = Projector::load(
        ProjectorSpec::MlpGelu { depth: 2 },
        5,
        64,
        VarBuilder::from_varmap(&map, DType::F32, &dev),
    )?;
    let projector_vars: Vec<(String, candle_core::Var)> = {
        let data = map.data().lock().map_err(|_| "poisoned")?;
        data.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    };
    for (name, var) in &projector_vars {
        var.set(&get(&format!("projector.{name}"))?)?;
    }

    let ids = get("input.ids")?.to_dtype(DType::U32)?;
    let labels: Vec<i64> = get("input.labels")?.flatten_all()?.to_vec1()?;
    let lm = model.mm.language_model();
    let tokens = lm.embed_tokens(&ids)?;
    let projected = projector.forward(&get("input.features")?)?;
    let len = tokens.dim(1)?;
    let embeds = Tensor::cat(
        &[
            tokens.narrow(1, 0, 2)?,
            projected,
            tokens.narrow(1, 5, len - 5)?,
        ],
        1,
    )?;
    let (loss, _) = model.loss_from_embeds(&[embeds], &[labels.as_slice()])?;
    let expected_loss = get("loss")?.to_vec1::<f32>()?[0];
    let ours = loss.to_scalar::<f32>()?;
    assert!(
        (ours - expected_loss).abs() < 1e-4,
        "loss {ours} vs torch {expected_loss}"
    );

    let grads = loss.backward()?;
    let mut worst = 0f32;
    for (name, var) in &projector_vars {
        let g = grads
            .get(var.as_tensor())
            .ok_or_else(|| format!("no gradient for projector {name}"))?;
        let d = max_diff(g, &get(&format!("grad.projector.{name}"))?)?;
        assert!(d < 1e-4, "projector {name}: gradient differs by {d}");
        worst = worst.max(d);
    }
    for p in &lora_params {
        let key = p.name.trim_start_matches("lora/");
        let g = grads
            .get(p.var.as_tensor())
            .ok_or_else(|| format!("no gradient for {key}"))?;
        let d = max_diff(g, &get(&format!("grad.lora.{key}"))?)?;
        assert!(d < 1e-4, "{key}: gradient differs by {d}");
        worst = worst.max(d);
    }
    println!("loss {ours} (torch {expected_loss}); largest gradient difference {worst:e}");
    Ok(())
}

/// PEFT's `PeftModel.from_pretrained` on an adapter our trainer wrote
/// (xtask/fixtures/train_peft.py) gives the logits our adapted model gives.
#[test]
fn peft_loads_our_adapter() -> TestResult {
    let dev = Device::Cpu;
    let dir = fixtures().join("train");
    let fx = candle_core::safetensors::load(dir.join("peft_logits.safetensors"), &dev)?;
    let ids = fx
        .get("ids")
        .ok_or("fixture lacks ids")?
        .to_dtype(DType::U32)?;
    let expected = fx.get("logits").ok_or("fixture lacks logits")?;
    let parts = TrainParts {
        lora: Some(LoraSettings {
            r: 4,
            alpha: 8.0,
            dropout: 0.0,
            target_modules: Vec::new(),
            gradient_checkpointing: false,
        }),
        ..Default::default()
    };
    let model = TrainableModel::load(&fixtures().join("lm/llama"), parts, &dev)?;
    let adapter =
        candle_core::safetensors::load(dir.join("adapter/adapter_model.safetensors"), &dev)?;
    let mut set = 0;
    for p in model.params() {
        if let Some(key) = p.name.strip_prefix("lora/") {
            p.var.set(
                adapter
                    .get(key)
                    .ok_or_else(|| format!("adapter lacks `{key}`"))?,
            )?;
            set += 1;
        }
    }
    assert_eq!(set, 28);
    let lm = model.mm.language_model();
    let mut cache = multitoken_core::KvCache::new(lm.num_layers());
    let logits = lm.forward_embeds(
        &lm.embed_tokens(&ids)?,
        None,
        &mut cache,
        multitoken_core::LogitsSelection::All,
    )?;
    let d = max_diff(&logits, expected)?;
    assert!(d < 1e-4, "logits differ from peft's by {d}");
    // The adapter matters: the base model's logits are clearly different.
    let base = TrainableModel::load(&fixtures().join("lm/llama"), TrainParts::default(), &dev)?;
    let blm = base.mm.language_model();
    let mut cache = multitoken_core::KvCache::new(blm.num_layers());
    let base_logits = blm.forward_embeds(
        &blm.embed_tokens(&ids)?,
        None,
        &mut cache,
        multitoken_core::LogitsSelection::All,
    )?;
    assert!(
        max_diff(&base_logits, expected)? > 1e-3,
        "the adapter does not change the logits"
    );
    Ok(())
}
