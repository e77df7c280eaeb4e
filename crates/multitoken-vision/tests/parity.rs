//! Parity with Pillow + transformers on the fixtures of `xtask/fixtures/vision.py`:
//! decoded RGB, `CLIPImageProcessorPil` / `LlavaImageProcessorPil` pixel values,
//! and a tiny random `CLIPVisionModel`'s hidden states and pooled output.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use multitoken_core::{Item, ModalityContext};
use multitoken_vision::{
    decode_item, ClipVisionConfig, ClipVisionTower, DecodeLimits, FeatureSelect, ImageProcessorConfig,
};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/vision")
}

fn load(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn image_names() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(fixtures().join("images"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Largest absolute difference between two tensors of the same shape.
fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let a = a.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn decoded_rgb_matches_pillow() {
    let expected = load(&fixtures().join("decoded.safetensors"));
    let mut report = Vec::new();
    for name in image_names() {
        let image = decode_item(&Item::Path(fixtures().join("images").join(&name)), &DecodeLimits::default()).unwrap();
        let want = &expected[&name];
        let (h, w, _) = want.dims3().unwrap();
        assert_eq!((image.height, image.width), (h, w), "{name}: size");
        let got = Tensor::from_vec(image.pixels.clone(), (h, w, 3), &Device::Cpu).unwrap();
        let diff = max_diff(&got, want);
        // Lossless formats are exact, and so is jpeg (libjpeg-turbo's decoder, as
        // Pillow's; CMYK through Pillow's own conversion); 16-bit to 8-bit rounds
        // where Pillow's test conversion shifts.
        let allowed = if name.starts_with("gray16") {
            1.0
        } else {
            0.0
        };
        report.push(format!("{name}: {diff}"));
        assert!(diff <= allowed, "{name}: max diff {diff} > {allowed}; all: {report:?}");
    }
}

#[test]
fn pixel_values_match_transformers_within_one_step() {
    let expected = load(&fixtures().join("processed.safetensors"));
    let decoded = load(&fixtures().join("decoded.safetensors"));
    let configs = std::fs::read_dir(fixtures().join("processor_configs")).unwrap();
    let mut checked = 0;
    for entry in configs {
        let path = entry.unwrap().path();
        let cfg_name = path.file_stem().unwrap().to_string_lossy().into_owned();
        let value: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let config = ImageProcessorConfig::from_json(&value, &cfg_name).unwrap();
        for name in image_names() {
            // Feed Pillow's decode so that this test measures preprocessing alone.
            let rgb = &decoded[&name];
            let (h, w, _) = rgb.dims3().unwrap();
            let image = multitoken_vision::RgbImage {
                width: w,
                height: h,
                pixels: rgb.flatten_all().unwrap().to_vec1::<u8>().unwrap(),
            };
            let (values, oh, ow) = config.preprocess(&image).unwrap();
            let got = Tensor::from_vec(values, (3, oh, ow), &Device::Cpu).unwrap();
            let want = &expected[&format!("{cfg_name}/{name}")];
            let diff = max_diff(&got, want);
            // One 8-bit step after normalization is 1/255/std; we ask for float
            // rounding only, i.e. the resampled bytes are identical.
            assert!(diff < 1e-5, "{cfg_name}/{name}: max diff {diff}");
            checked += 1;
        }
    }
    assert!(checked >= 50, "only {checked} cases");
}

#[test]
fn clip_tower_matches_transformers() {
    let dir = fixtures().join("clip");
    let config: ClipVisionConfig =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let vb = VarBuilder::from_tensors(load(&dir.join("model.safetensors")), DType::F32, &Device::Cpu);
    // transformers 5 saves a CLIPVisionModel without the `vision_model.` prefix.
    let tower = ClipVisionTower::load(&config, vb).unwrap();
    let expected = load(&dir.join("expected.safetensors"));
    let pixels = &expected["pixel_values"];
    let out = tower.forward(pixels, None).unwrap();
    assert_eq!(out.hidden_states.len(), config.num_hidden_layers + 1);
    for (i, h) in out.hidden_states.iter().enumerate() {
        let diff = max_diff(h, &expected[&format!("hidden_{i}")]);
        assert!(diff < 1e-4, "hidden_{i}: {diff}");
    }
    assert!(max_diff(out.pooled.as_ref().unwrap(), &expected["pooled"]) < 1e-4);

    // Feature selection: layer -2 without CLS, [-2, 0] with CLS, pooled.
    let h = |i: usize| expected[&format!("hidden_{i}")].clone();
    let check = |select: FeatureSelect, want: Tensor| {
        let got = select.features(&tower, pixels).unwrap();
        assert_eq!(got.dims(), want.dims(), "{select:?}");
        assert!(max_diff(&got, &want) < 1e-4, "{select:?}");
        assert_eq!(select.output_shape(&config), (want.dim(1).unwrap(), want.dim(2).unwrap()));
    };
    let n = config.num_hidden_layers;
    check(FeatureSelect::Layers { layers: vec![-2], keep_cls: false }, h(n - 1).narrow(1, 1, config.num_patches()).unwrap());
    check(
        FeatureSelect::Layers { layers: vec![-2, 0], keep_cls: true },
        Tensor::cat(&[h(n - 1), h(0)], 2).unwrap(),
    );
    check(FeatureSelect::Pooled, expected["pooled"].unsqueeze(1).unwrap());
}

#[test]
fn vision_clip_builder_loads_the_fixture_tower() {
    let dir = fixtures().join("clip");
    let context = ModalityContext::cpu_f32(&dir);
    let config = serde_json::json!({
        "image_processor": {"size": {"shortest_edge": 30}, "crop_size": {"height": 30, "width": 30}},
        "vision_feature_layer": -2
    });
    let modality = multitoken_core::build_modality("vision_clip", &config, &context).unwrap();
    assert_eq!((modality.token(), modality.data_key()), ("<image>", "images"));
    assert_eq!((modality.token_width(), modality.feature_dim()), (25, 32));
    let pixels = modality
        .preprocess(&Item::Path(fixtures().join("images/rgb_96x64.png")))
        .unwrap();
    assert_eq!(pixels.dims(), &[3, 30, 30]);
    let features = modality.encode(&pixels.unsqueeze(0).unwrap()).unwrap();
    assert_eq!(features.dims(), &[1, 25, 32]);

    // The spatial pool over the whole 5x5 grid is the mean of the patch features.
    let mut pool_config = config.clone();
    pool_config["spatial_pool_stride"] = serde_json::json!(5);
    let pooling = multitoken_core::build_modality("vision_clip", &pool_config, &context).unwrap();
    assert_eq!((pooling.token_width(), pooling.feature_dim()), (1, 32));
    let mean = pooling.encode(&pixels.unsqueeze(0).unwrap()).unwrap();
    assert_eq!(mean.dims(), &[1, 1, 32]);
    assert!(max_diff(&mean, &features.mean_keepdim(1).unwrap()) < 1e-6);

    let pooled = multitoken_core::build_modality("vision_clip_pool", &config, &context).unwrap();
    assert_eq!((pooled.token_width(), pooled.feature_dim()), (10, 32));

    // Configuration errors name what is wrong.
    let err = |config: serde_json::Value| match multitoken_core::build_modality("vision_clip", &config, &context) {
        Ok(_) => "ok".to_string(),
        Err(e) => e.to_string(),
    };
    assert!(err(serde_json::json!({"vision_feature_layer": 7})).contains("layer 7 is outside"));
    assert!(err(serde_json::json!({"vision_feature_select_strategy": "cls"})).contains("`cls`"));
    assert!(err(serde_json::json!({})).contains("makes 224x224 images but the tower takes 30x30"));
    let with = |extra: serde_json::Value| {
        let mut c = config.clone();
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    };
    assert!(err(with(serde_json::json!({"spatial_pool_stride": 2}))).contains("2 does not divide the tower's 5x5"));
    assert!(err(with(serde_json::json!({"spatial_pool_stride": 0}))).contains("at least 1"));
    assert!(err(with(serde_json::json!({"spatial_pool_stride": 5, "vision_feature_select_strategy": "full"})))
        .contains("no CLS"));
}

#[test]
fn spatial_pool_averages_blocks_of_the_patch_grid() {
    // A 4x4 grid of 2-wide features whose values are (row, col): each 2x2 block
    // averages to its centre.
    let values: Vec<f32> = (0..4).flat_map(|r| (0..4).flat_map(move |c| [r as f32, c as f32])).collect();
    let features = Tensor::from_vec(values, (1, 16, 2), &Device::Cpu).unwrap();
    let pooled = multitoken_vision::modality::spatial_pool(&features, 4, 2).unwrap();
    assert_eq!(pooled.dims(), &[1, 4, 2]);
    let got: Vec<f32> = pooled.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(got, vec![0.5, 0.5, 0.5, 2.5, 2.5, 0.5, 2.5, 2.5]);
}
