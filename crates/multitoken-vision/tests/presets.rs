//! The named presets build modalities of the recipes' widths (random weights):
//! LLaVA-1.5 576 × 1024 -> 4096, Jñāna 49 × 768 -> 2560 (towers cut to two
//! layers: the widths come from the hidden size, image size and patch size).

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use multitoken_core::{Modality, ModalityContext, Projector};
use multitoken_vision::presets::{names, Preset};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn check(name: &str, width: usize, dim: usize, hidden: usize, dtype: DType) -> TestResult {
    let mut preset = Preset::by_name(name)?;
    assert_eq!(preset.lm_hidden_size, hidden);
    // Widths do not depend on depth: two layers keep the random init to a fraction of a second.
    preset.config["tower_config"]["num_hidden_layers"] = 2.into();
    // An empty directory of its own: the system temp dir may hold other
    // processes' *.safetensors, which the builder would load as the tower.
    let dir = std::env::temp_dir().join(format!("multitoken-presets-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut context = ModalityContext::new(Device::Cpu, dtype, &dir);
    context.trainable = Some(VarMap::new());
    let modality = preset.build(&context)?;
    assert_eq!(
        (modality.token_width(), modality.feature_dim()),
        (width, dim),
        "{name}"
    );
    assert_eq!(modality.projector(), preset.projector()?, "{name}");
    let map = VarMap::new();
    let projector = Projector::load(
        preset.projector()?,
        dim,
        hidden,
        VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu),
    )?;
    let features = Tensor::zeros((1, width, dim), DType::F32, &Device::Cpu)?;
    assert_eq!(
        projector.forward(&features)?.dims(),
        &[1, width, hidden],
        "{name}"
    );
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn llava_1_5_preset_widths() -> TestResult {
    check("llava-1.5", 576, 1024, 4096, DType::BF16)
}

#[test]
fn jnana_preset_widths_and_end_of_image_text() -> TestResult {
    check("jnana", 49, 768, 2560, DType::F32)?;
    let preset = Preset::by_name("jnana")?;
    let suffix = preset
        .image_suffix
        .clone()
        .ok_or("jnana has an end-of-image text")?;
    // Jñāna's README (stage 1): "We used the text *"caption image:"* as end-of-image string".
    assert_eq!(suffix, "caption image:");
    assert_eq!(
        preset.apply_image_suffix("a <image> b"),
        format!("a <image>{suffix} b")
    );
    Ok(())
}

#[test]
fn unknown_preset_lists_the_known_ones() {
    let err = Preset::by_name("llava-9")
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.contains("llava-9") && names().iter().all(|n| err.contains(n)),
        "{err}"
    );
}
