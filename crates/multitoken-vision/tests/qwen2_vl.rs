//! Qwen2-VL's image path against transformers (fixtures of
//! `xtask/fixtures/qwen2_vl_vision.py`): `smart_resize`,
//! `Qwen2VLImageProcessorPil`'s pixel values and grids, the vision tower's
//! output before the merger, the `qwen2_vl_merger` projector, the
//! `vision_qwen2_vl` layout, and the errors of bad configs and inputs.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use multitoken_core::{build_modality, Item, LayoutPart, Modality, ModalityContext, Projector, ProjectorSpec};
use multitoken_vision::{decode_item, smart_resize, vision_position_ids, window_order, DecodeLimits, Qwen2VlProcessorConfig};
use serde_json::json;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/qwen2_vl_vision")
}

fn image(name: &str) -> PathBuf {
    dir().join("images").join(name)
}

fn load(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn to_vec(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    to_vec(a).iter().zip(&to_vec(b)).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn grid_of(t: &Tensor) -> [usize; 3] {
    let v = t.to_vec1::<i64>().unwrap();
    [v[0] as usize, v[1] as usize, v[2] as usize]
}

fn error_of<T>(result: multitoken_core::Result<T>) -> String {
    match result {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

fn modality() -> Box<dyn Modality> {
    build_modality("vision_qwen2_vl", &json!({}), &ModalityContext::cpu_f32(dir())).unwrap()
}

/// The merger of the fixture checkpoint (`visual.merger.*`).
fn merger() -> Projector {
    let files = [dir().join("model.safetensors")];
    // SAFETY: the fixture file is not modified while the test runs.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, DType::F32, &Device::Cpu) }.unwrap();
    let spec: ProjectorSpec = serde_json::from_value(json!({"kind": "qwen2_vl_merger", "spatial_merge_size": 2})).unwrap();
    Projector::load(spec, 32, 24, vb.pp("visual.merger")).unwrap()
}

#[test]
fn smart_resize_matches_transformers() {
    let cases = read_json(&dir().join("smart_resize.json"));
    let mut checked = 0;
    for case in cases.as_array().unwrap() {
        let n = |k: &str| case[k].as_u64().unwrap();
        let got = smart_resize(n("h") as usize, n("w") as usize, n("factor") as usize, n("min"), n("max"));
        match case["out"].as_array() {
            Some(out) => {
                let want = (out[0].as_u64().unwrap() as usize, out[1].as_u64().unwrap() as usize);
                assert_eq!(got.unwrap(), want, "{case}");
            }
            None => {
                let error = got.unwrap_err().to_string();
                assert!(error.contains("aspect ratio"), "{case}: {error}");
            }
        }
        checked += 1;
    }
    assert!(checked > 100, "{checked} cases");
}

#[test]
fn processor_pixels_match_transformers() {
    let processed = load(&dir().join("processed.safetensors"));
    let mut checked = 0;
    for key in processed.keys().filter(|k| k.ends_with(".levels")) {
        let base = key.strip_suffix(".levels").unwrap();
        let (config_name, image_name) = base.split_once('/').unwrap();
        let path = dir().join("processor_configs").join(format!("{config_name}.json"));
        let config = Qwen2VlProcessorConfig::from_json(&read_json(&path), config_name).unwrap();
        let picture = decode_item(&Item::Path(image(image_name)), &DecodeLimits::default()).unwrap();
        let patches = config.preprocess(&picture).unwrap();
        assert_eq!(patches.grid, grid_of(&processed[&format!("{base}.grid")]), "{base}: grid");
        assert_eq!(config.grid(picture.width, picture.height).unwrap(), patches.grid, "{base}");
        // The reference values, from the recorded 0-255 levels in numpy's arithmetic.
        let levels = &processed[key];
        let (rows, width) = levels.dims2().unwrap();
        assert_eq!((rows, width), (patches.rows(), patches.row_width), "{base}: shape");
        let (mean, std) = config.normalize.unwrap();
        let per_channel = width / 3;
        let levels = levels.flatten_all().unwrap().to_vec1::<u8>().unwrap();
        let worst = levels
            .iter()
            .zip(&patches.values)
            .enumerate()
            .map(|(i, (&level, &got))| {
                let c = (i % width) / per_channel;
                let want = ((f64::from(level) / 255.0) as f32 - mean[c]) / std[c];
                (got - want).abs()
            })
            .fold(0.0, f32::max);
        assert!(worst <= 1e-5, "{base}: max abs diff {worst}");
        checked += 1;
    }
    assert_eq!(checked, 14);
}

#[test]
fn legacy_and_size_forms_read_the_same_bounds() {
    let legacy = Qwen2VlProcessorConfig::from_json(&read_json(&dir().join("processor_configs/legacy.json")), "legacy").unwrap();
    assert_eq!((legacy.min_pixels, legacy.max_pixels, legacy.patch_size), (1024, 2304, 4));
    let small = Qwen2VlProcessorConfig::from_json(&read_json(&dir().join("processor_configs/small.json")), "small").unwrap();
    assert_eq!((small.min_pixels, small.max_pixels), (256, 4096));
    // Top-level bounds win over `size`, as in transformers' constructor.
    let both = json!({"size": {"shortest_edge": 10, "longest_edge": 20}, "max_pixels": 99});
    let both = Qwen2VlProcessorConfig::from_json(&both, "both").unwrap();
    assert_eq!((both.min_pixels, both.max_pixels), (10, 99));
    let defaults = Qwen2VlProcessorConfig::from_json(&json!({}), "defaults").unwrap();
    assert_eq!(defaults, Qwen2VlProcessorConfig::default());
    assert_eq!((defaults.min_pixels, defaults.max_pixels), (3136, 1_003_520));
}

#[test]
fn tower_and_merger_match_transformers() {
    let expected = load(&dir().join("expected.safetensors"));
    let names = ["land_61x37.png", "port_29x70.png", "tiny_9x6.png", "big_203x117.png", "rgba_40x33.png"];
    let modality = modality();
    assert_eq!(modality.name(), "vision_qwen2_vl");
    assert_eq!(modality.token(), "<|image_pad|>");
    assert_eq!(modality.feature_dim(), 32);
    let merger = merger();
    for (i, name) in names.iter().enumerate() {
        let item = Item::Path(image(name));
        let grid = grid_of(&expected[&format!("img{i}.grid")]);
        let pre = modality.preprocess(&item).unwrap();
        assert_eq!(pre.dims(), &[grid[0], grid[1], grid[2], 96], "{name}: preprocessed shape");
        let rows = pre.reshape((grid.iter().product::<usize>(), 96)).unwrap();
        let diff = max_diff(&rows, &expected[&format!("img{i}.pixels")]);
        assert!(diff <= 1e-5, "{name}: pixel values max abs diff {diff}");

        let pos: Vec<i64> = expected[&format!("img{i}.pos_ids")].flatten_all().unwrap().to_vec1().unwrap();
        let ours: Vec<i64> = vision_position_ids(grid, 2).iter().flat_map(|p| p.map(i64::from)).collect();
        assert_eq!(ours, pos, "{name}: rotary position ids");

        let pieces = modality.encode_item(&pre).unwrap();
        assert_eq!(pieces.len(), 1);
        let hidden = pieces[0].squeeze(0).unwrap();
        let diff = max_diff(&hidden, &expected[&format!("img{i}.hidden")]);
        eprintln!("{name}: tower output max abs diff {diff}");
        assert!(diff <= 1e-4, "{name}: tower output max abs diff {diff}");

        let merged = multitoken_core::project_item(&merger, &pieces, DType::F32, grid.iter().product::<usize>() / 4).unwrap();
        let diff = max_diff(&merged, &expected[&format!("img{i}.merged")]);
        eprintln!("{name}: merger output max abs diff {diff}");
        assert!(diff <= 1e-4, "{name}: merger output max abs diff {diff}");

        let layout = modality.layout(&item).unwrap();
        assert_eq!(layout.parts(), &[LayoutPart::Slots(merged.dim(0).unwrap())], "{name}: layout");
        assert_eq!(layout.grid(), Some([grid[0], grid[1] / 2, grid[2] / 2]), "{name}: position grid");
    }
}

#[test]
fn qwen2_5_tower_and_merger_match_transformers() {
    let root = dir().join("qwen2_5");
    let expected = load(&root.join("expected.safetensors"));
    let modality = build_modality("vision_qwen2_vl", &json!({}), &ModalityContext::cpu_f32(&root)).unwrap();
    assert_eq!(modality.feature_dim(), 32);
    let spec = modality.projector();
    assert_eq!(spec.to_string(), "qwen2_vl_merger(spatial_merge_size=2, norm=rms_norm)");
    let files = [root.join("model.safetensors")];
    // SAFETY: the fixture file is not modified while the test runs.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, DType::F32, &Device::Cpu) }.unwrap();
    let merger = Projector::load(spec, 32, 24, vb.pp("visual.merger")).unwrap();
    for (i, name) in ["land_61x37.png", "port_29x70.png", "tiny_9x6.png", "big_203x117.png"].iter().enumerate() {
        let item = Item::Path(image(name));
        let grid = grid_of(&expected[&format!("img{i}.grid")]);
        let pre = modality.preprocess(&item).unwrap();
        let rows = pre.reshape((grid.iter().product::<usize>(), 96)).unwrap();
        assert!(max_diff(&rows, &expected[&format!("img{i}.pixels")]) <= 1e-5, "{name}: pixel values");
        let pieces = modality.encode_item(&pre).unwrap();
        let diff = max_diff(&pieces[0].squeeze(0).unwrap(), &expected[&format!("img{i}.hidden")]);
        eprintln!("{name}: Qwen2.5-VL tower output max abs diff {diff}");
        assert!(diff <= 1e-4, "{name}: Qwen2.5-VL tower output max abs diff {diff}");
        let slots = grid.iter().product::<usize>() / 4;
        let merged = multitoken_core::project_item(&merger, &pieces, DType::F32, slots).unwrap();
        let diff = max_diff(&merged, &expected[&format!("img{i}.merged")]);
        eprintln!("{name}: Qwen2.5-VL merger output max abs diff {diff}");
        assert!(diff <= 1e-4, "{name}: Qwen2.5-VL merger output max abs diff {diff}");
        assert_eq!(modality.layout(&item).unwrap().grid(), Some([grid[0], grid[1] / 2, grid[2] / 2]));
    }
}

#[test]
fn windows_follow_transformers_order() {
    // 5x8 merged patches in windows of 2: 3 rows x 4 columns of windows, the
    // last row of windows one merged patch tall.
    let (order, lengths) = window_order([1, 10, 16], 2, 2);
    assert_eq!(lengths, vec![16, 16, 16, 16, 16, 16, 16, 16, 8, 8, 8, 8]);
    assert_eq!(&order[..8], &[0, 1, 8, 9, 2, 3, 10, 11]);
    assert_eq!(&order[32..], &[32, 33, 34, 35, 36, 37, 38, 39]);
    let mut sorted = order.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..40).collect::<Vec<_>>());
}

#[test]
fn batches_of_one_grid_encode_as_single_items() {
    let modality = modality();
    let a = modality.preprocess(&Item::Path(image("land_61x37.png"))).unwrap();
    let bytes = std::fs::read(image("land_61x37.png")).unwrap();
    let b = modality.preprocess(&Item::Bytes(bytes)).unwrap();
    let batch = Tensor::stack(&[&a, &b], 0).unwrap();
    let out = modality.encode(&batch).unwrap();
    let alone = modality.encode_item(&a).unwrap().remove(0);
    assert_eq!(out.dim(0).unwrap(), 2);
    assert!(max_diff(&out.get(1).unwrap(), &alone.squeeze(0).unwrap()) <= 1e-6);
}

#[test]
fn trainable_tower_gives_the_same_numbers_and_gradients() {
    let expected = load(&dir().join("expected.safetensors"));
    let mut context = ModalityContext::cpu_f32(dir());
    let map = candle_nn::VarMap::new();
    context.trainable = Some(map.clone());
    let modality = build_modality("vision_qwen2_vl", &json!({}), &context).unwrap();
    let vars = map.data().lock().unwrap().len();
    assert_eq!(vars, 1 + 2 * 12, "only the tower's tensors become variables");
    let pre = modality.preprocess(&Item::Path(image("tiny_9x6.png"))).unwrap();
    let pieces = modality.encode_item(&pre).unwrap();
    let diff = max_diff(&pieces[0].squeeze(0).unwrap(), &expected["img2.hidden"]);
    assert!(diff <= 1e-4, "trainable tower max abs diff {diff}");
    let grads = pieces[0].sqr().unwrap().sum_all().unwrap().backward().unwrap();
    let data = map.data().lock().unwrap();
    let patch = &data["visual.patch_embed.proj.weight"];
    assert!(grads.get(patch.as_tensor()).is_some(), "no gradient for the patch embedding");
}

#[test]
fn merger_spec_round_trips_and_checks_its_input() {
    let spec: ProjectorSpec = serde_json::from_value(json!({"kind": "qwen2_vl_merger", "spatial_merge_size": 2})).unwrap();
    assert_eq!(spec.kind_name(), "qwen2_vl_merger");
    assert_eq!(spec.output_width(160), 40);
    let back: ProjectorSpec = serde_json::from_value(serde_json::to_value(spec).unwrap()).unwrap();
    assert_eq!(back, spec);
    assert!(serde_json::from_value::<ProjectorSpec>(json!("qwen2_vl_merger")).is_err());
    assert!(serde_json::from_value::<ProjectorSpec>(json!({"kind": "qwen2_vl_merger", "spatial_merge_size": 0})).is_err());
    let error = merger().forward(&Tensor::zeros((1, 6, 32), DType::F32, &Device::Cpu).unwrap()).unwrap_err().to_string();
    assert!(error.contains("6 rows"), "{error}");
}

/// A PNG of `w × h` grey pixels.
fn png(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_pixel(w, h, image::Rgb([90, 120, 150]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

#[test]
fn bad_configs_and_inputs_give_clear_errors() {
    let context = ModalityContext::cpu_f32(dir());
    let modality = modality();
    // Not an image.
    let error = error_of(modality.preprocess(&Item::Bytes(b"not an image".to_vec())));
    assert!(error.contains("not a recognised image"), "{error}");
    let error = error_of(modality.layout(&Item::Text("hello".into())));
    assert!(error.contains("not an image"), "{error}");
    // An aspect ratio over 200, refused as transformers refuses it.
    let error = error_of(modality.preprocess(&Item::Bytes(png(402, 2))));
    assert!(error.contains("aspect ratio") && error.contains("402x2"), "{error}");
    // A resize past memory is refused, not attempted.
    let error = error_of(build_modality(
        "vision_qwen2_vl",
        &json!({"image_processor": {"min_pixels": 1u64 << 40, "max_pixels": 1u64 << 41, "patch_size": 4}}),
        &context,
    )
    .and_then(|m| m.preprocess(&Item::Bytes(png(8, 8)))));
    assert!(error.contains("lower min_pixels"), "{error}");
    // A tiny image grows to min_pixels; a 1x1 one too.
    let pre = modality.preprocess(&Item::Bytes(png(1, 1))).unwrap();
    assert_eq!(pre.dims(), &[1, 4, 4, 96]);
    // The processor must cut the tower's patches.
    let error = error_of(build_modality("vision_qwen2_vl", &json!({"image_processor": {"patch_size": 14}}), &context));
    assert!(error.contains("patch_size is 14") && error.contains("tower's is 4"), "{error}");
    // Qwen2.5-VL: blocks named in fullatt_block_indexes must exist; windows hold a merged patch.
    let mut vision = read_json(&dir().join("qwen2_5/config.json"))["vision_config"].clone();
    vision["fullatt_block_indexes"] = json!([1, 3]);
    let error = error_of(build_modality("vision_qwen2_vl", &json!({"tower": "qwen2_5", "tower_config": vision}), &context));
    assert!(error.contains("block 3"), "{error}");
    let mut vision = read_json(&dir().join("qwen2_5/config.json"))["vision_config"].clone();
    vision["window_size"] = json!(7);
    let error = error_of(build_modality("vision_qwen2_vl", &json!({"tower": "qwen2_5", "tower_config": vision}), &context));
    assert!(error.contains("window_size 7"), "{error}");
    // A bad activation names itself.
    let mut vision = read_json(&dir().join("config.json"))["vision_config"].clone();
    vision["hidden_act"] = json!("relu6");
    let error = error_of(build_modality("vision_qwen2_vl", &json!({"tower_config": vision}), &context));
    assert!(error.contains("relu6"), "{error}");
    // Missing tensors are named.
    let mut vision = read_json(&dir().join("config.json"))["vision_config"].clone();
    vision["depth"] = json!(3);
    let error = error_of(build_modality("vision_qwen2_vl", &json!({"tower_config": vision}), &context));
    assert!(error.contains("visual.blocks.2."), "{error}");
    // Bounds without room for one block, and unknown fields.
    let error = error_of(build_modality("vision_qwen2_vl", &json!({"image_processor": {"size": {"shortest_edge": 0}}}), &context));
    assert!(error.contains("pixel bounds"), "{error}");
    let error = error_of(build_modality("vision_qwen2_vl", &json!({"towers": "x"}), &context));
    assert!(error.contains("towers"), "{error}");
    // A merger of another window than the tower's.
    let error = error_of(build_modality(
        "vision_qwen2_vl",
        &json!({"projector": {"kind": "qwen2_vl_merger", "spatial_merge_size": 3}}),
        &context,
    ));
    assert!(error.contains("spatial_merge_size is 2"), "{error}");
}
