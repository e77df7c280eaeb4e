//! Idefics2's vision side against transformers: the SigLIP tower's NaViT
//! position ids, `Idefics2ImageProcessorPil`'s pixel values, the tower's last
//! hidden state per crop (fixtures of `xtask/fixtures/siglip.py` and of the
//! whole-model `xtask/fixtures/idefics2.py`), the `vision_siglip` layout, and
//! the errors of bad configs and inputs.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use multitoken_core::{build_modality, Item, LayoutPart, Modality, ModalityContext, TextRule};
use multitoken_vision::{
    decode_item, navit_position_ids, pack_crops, Crop, DecodeLimits, Idefics2ProcessorConfig, VisionSiglip,
    VisionSiglipConfig, FAKE_IMAGE_TOKEN,
};
use serde_json::json;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn siglip_dir() -> PathBuf {
    root().join("siglip")
}

fn load(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

/// A safetensors file with BOOL tensors too (candle reads no BOOL): F32, I64
/// and U8 as they are, BOOL as U8.
fn load_with_bools(path: &Path) -> HashMap<String, Tensor> {
    let bytes = std::fs::read(path).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let data = &bytes[8 + header_len..];
    let mut out = HashMap::new();
    for (name, info) in header.as_object().unwrap() {
        if name == "__metadata__" {
            continue;
        }
        let shape: Vec<usize> = info["shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
        let offsets: Vec<usize> = info["data_offsets"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
        let raw = &data[offsets[0]..offsets[1]];
        let tensor = match info["dtype"].as_str().unwrap() {
            "F32" => {
                let values: Vec<f32> = raw.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
                Tensor::from_vec(values, shape, &Device::Cpu)
            }
            "I64" => {
                let values: Vec<i64> = raw.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect();
                Tensor::from_vec(values, shape, &Device::Cpu)
            }
            "BOOL" | "U8" => Tensor::from_vec(raw.to_vec(), shape, &Device::Cpu),
            other => panic!("{name}: dtype {other}"),
        };
        out.insert(name.clone(), tensor.unwrap());
    }
    out
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

fn error_of<T>(result: multitoken_core::Result<T>) -> String {
    match result {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

/// The tiny tower of `siglip.py` as a modality (4 slots per crop, no split).
fn tower_modality(extra: serde_json::Value, context: &ModalityContext) -> multitoken_core::Result<Box<dyn Modality>> {
    let mut config = json!({
        "tower": "tower",
        "projector": {"kind": "vector_mlp", "num_layers": 1, "num_tokens": 4},
        "image_processor": {"size": {"shortest_edge": 16, "longest_edge": 64}},
    });
    for (k, v) in extra.as_object().unwrap() {
        config[k] = v.clone();
    }
    build_modality("vision_siglip", &config, context)
}

#[test]
fn position_ids_match_transformers() {
    let fixture = read_json(&siglip_dir().join("position_ids.json"));
    let mut checked = 0;
    for entry in fixture["sides"].as_array().unwrap() {
        let side = entry["side"].as_u64().unwrap() as usize;
        for (i, want) in entry["buckets"].as_array().unwrap().iter().enumerate() {
            let n = i + 1;
            let want: Vec<u32> = want.as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
            assert_eq!(navit_position_ids(side, 1, n), want, "side {side}, {n} columns");
            let rows: Vec<u32> = want.iter().map(|b| b * side as u32).collect();
            assert_eq!(navit_position_ids(side, n, 1), rows, "side {side}, {n} rows");
            checked += 1;
        }
    }
    for rect in fixture["rects"].as_array().unwrap() {
        let get = |k: &str| rect[k].as_u64().unwrap() as usize;
        let want: Vec<u32> = rect["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        assert_eq!(navit_position_ids(get("side"), get("rows"), get("cols")), want, "{rect}");
    }
    assert!(checked > 400, "{checked}");
}

/// The normalised value of a 0-255 level under `config` (the reference's levels
/// map back to its floats within 1e-6, checked by the fixture script).
fn level_value(config: &Idefics2ProcessorConfig, level: u8, c: usize) -> f32 {
    let v = (f64::from(level) * config.rescale_factor.unwrap()) as f32;
    let (mean, std) = config.normalize.unwrap();
    (v - mean[c]) / std[c]
}

#[test]
fn processor_pixels_match_transformers() {
    let expected = load(&siglip_dir().join("processed.safetensors"));
    let mut report = Vec::new();
    let mut worst = 0f32;
    for (key, levels) in &expected {
        let Some(stem) = key.strip_suffix(".levels") else { continue };
        let (cfg_name, image_name) = stem.split_once('/').unwrap();
        let cfg_path = siglip_dir().join("processor_configs").join(format!("{cfg_name}.json"));
        let config = Idefics2ProcessorConfig::from_json(&read_json(&cfg_path), cfg_name).unwrap();
        let image = decode_item(&Item::Path(siglip_dir().join("images").join(image_name)), &DecodeLimits::default()).unwrap();
        let crops = config.preprocess(&image).unwrap();
        assert_eq!(
            config.crop_sizes(image.width, image.height).unwrap(),
            crops.iter().map(|c| (c.width, c.height)).collect::<Vec<_>>()
        );
        let (data, n, h, w) = pack_crops(&crops);
        let levels = levels.to_dtype(DType::U8).unwrap();
        assert_eq!(levels.dims(), [n, 3, h, w], "{key}: crops and padded size");
        let mask = expected[&format!("{stem}.mask")].to_dtype(DType::F32).unwrap();
        let ours = Tensor::from_vec(data, (n, 4, h, w), &Device::Cpu).unwrap();
        assert_eq!(max_diff(&ours.narrow(1, 3, 1).unwrap().squeeze(1).unwrap(), &mask), 0.0, "{key}: mask");
        let levels = levels.flatten_all().unwrap().to_vec1::<u8>().unwrap();
        let mask = to_vec(&mask);
        let ours = to_vec(&ours.narrow(1, 0, 3).unwrap());
        let plane = h * w;
        let mut diff = 0f32;
        for (i, (&level, &got)) in levels.iter().zip(&ours).enumerate() {
            let (crop, c, at) = (i / (3 * plane), i / plane % 3, i % plane);
            let want = if mask[crop * plane + at] > 0.5 { level_value(&config, level, c) } else { 0.0 };
            diff = diff.max((got - want).abs());
        }
        report.push(format!("{key}: {diff}"));
        worst = worst.max(diff);
    }
    assert!(report.len() >= 10, "{report:?}");
    // Pillow-exact resampling: the same levels, so the same floats.
    assert!(worst <= 1e-6, "max diff {worst}: {report:#?}");
}

/// The crops of a fixture's preprocessed `[crops, 4, H, W]`, as given.
fn crop_from(pixels: &Tensor) -> Crop {
    let (_, height, width) = pixels.dims3().unwrap();
    Crop { height, width, values: to_vec(pixels) }
}

#[test]
fn tower_matches_transformers_per_crop() {
    let expected = load(&siglip_dir().join("tower").join("expected.safetensors"));
    let context = ModalityContext::cpu_f32(siglip_dir());
    let modality = tower_modality(json!({}), &context).unwrap();
    let mut crops: Vec<Crop> = (0..3).map(|i| crop_from(&expected[&format!("crop{i}.pixels")])).collect();
    // An all-zero padding crop (mask 0): transformers drops it, so do we.
    crops.push(Crop { height: 4, width: 4, values: vec![0.0; 48] });
    let (data, n, h, w) = pack_crops(&crops);
    let mut packed = Tensor::from_vec(data, (n, 4, h, w), &Device::Cpu).unwrap();
    packed = packed.slice_assign(&[3..4, 3..4, 0..4, 0..4], &Tensor::zeros((1, 1, 4, 4), DType::F32, &Device::Cpu).unwrap()).unwrap();
    let pieces = modality.encode_item(&packed).unwrap();
    assert_eq!(pieces.len(), 3);
    let mut worst = 0f32;
    for (i, piece) in pieces.iter().enumerate() {
        let want = &expected[&format!("crop{i}.hidden")];
        let diff = max_diff(&piece.squeeze(0).unwrap(), want);
        worst = worst.max(diff);
        let grid = expected[&format!("crop{i}.grid")].to_vec1::<i64>().unwrap();
        let ids = expected[&format!("crop{i}.position_ids")].to_vec1::<i64>().unwrap();
        let ours: Vec<i64> = navit_position_ids(35, grid[0] as usize, grid[1] as usize).into_iter().map(i64::from).collect();
        assert_eq!(ours, ids, "crop {i}: position ids");
    }
    assert!(worst <= 1e-4, "tower max abs diff {worst}");
    eprintln!("siglip tower fixture: max abs diff {worst:e}");
}

#[test]
fn trainable_tower_gives_the_same_numbers_and_gradients() {
    let expected = load(&siglip_dir().join("tower").join("expected.safetensors"));
    let mut context = ModalityContext::cpu_f32(siglip_dir());
    let map = candle_nn::VarMap::new();
    context.trainable = Some(map.clone());
    let modality = tower_modality(json!({}), &context).unwrap();
    // Only the tower's tensors became variables.
    let vars = map.data().lock().unwrap().len();
    assert_eq!(vars, 5 + 2 * 16, "{vars} variables");
    let crop = crop_from(&expected["crop0.pixels"]);
    let (data, n, h, w) = pack_crops(&[crop]);
    let packed = Tensor::from_vec(data, (n, 4, h, w), &Device::Cpu).unwrap();
    let pieces = modality.encode_item(&packed).unwrap();
    let diff = max_diff(&pieces[0].squeeze(0).unwrap(), &expected["crop0.hidden"]);
    assert!(diff <= 1e-4, "trainable tower max abs diff {diff}");
    let grads = pieces[0].sqr().unwrap().sum_all().unwrap().backward().unwrap();
    let data = map.data().lock().unwrap();
    let patch = &data["vision_model.embeddings.patch_embedding.weight"];
    assert!(grads.get(patch.as_tensor()).is_some(), "no gradient for the patch embedding");
}

/// Pieces of one fixture case's images, in order.
fn case_images(dir: &Path, case: &serde_json::Value) -> Vec<PathBuf> {
    case["images"].as_array().unwrap().iter().map(|n| dir.join("../images").join(n.as_str().unwrap())).collect()
}

/// Indexes of the true entries of a bool (u8) tensor, flattened.
fn true_indexes(mask: &Tensor) -> Vec<u32> {
    to_vec(mask).iter().enumerate().filter(|(_, &m)| m > 0.5).map(|(i, _)| i as u32).collect()
}

#[test]
fn idefics2_checkpoints_encode_as_transformers() {
    let mut report = Vec::new();
    for name in ["split", "nosplit"] {
        let dir = root().join("idefics2").join(name);
        if !dir.join("intermediates.safetensors").is_file() {
            panic!("{} is missing: run `cargo xtask fixtures idefics2`", dir.display());
        }
        let expected = read_json(&dir.join("expected.json"));
        let tensors = load_with_bools(&dir.join("intermediates.safetensors"));
        let config = read_json(&dir.join("config.json"));
        let p = config["vision_config"]["patch_size"].as_u64().unwrap() as usize;
        let side = config["vision_config"]["image_size"].as_u64().unwrap() as usize / p;
        // Everything from the checkpoint directory: no builder settings at all.
        let modality = build_modality("vision_siglip", &json!({}), &ModalityContext::cpu_f32(&dir)).unwrap();
        let seq_len = expected["image_seq_len"].as_u64().unwrap() as usize;
        let crops_per_image = if expected["do_image_splitting"].as_bool().unwrap() { 5 } else { 1 };
        assert_eq!(modality.token_width(), seq_len * crops_per_image, "{name}: token width");
        assert_eq!(modality.feature_dim(), config["vision_config"]["hidden_size"].as_u64().unwrap() as usize);
        for (c, case) in expected["cases"].as_array().unwrap().iter().take(2).enumerate() {
            let get = |key: &str| tensors[&format!("case{c}.{key}")].clone();
            let pixels = get("pixel_values").squeeze(0).unwrap();
            let mask = get("pixel_attention_mask").squeeze(0).unwrap().to_dtype(DType::F32).unwrap();
            let (patch_mask, hidden, positions) = (get("patch_attention_mask"), get("vision_hidden"), get("position_ids"));
            let mut k = 0;
            let (mut pixel_diff, mut jpeg_diff, mut hidden_diff, mut end_to_end) = (0f32, 0f32, 0f32, 0f32);
            for path in case_images(&dir, case) {
                let jpeg = path.extension().is_some_and(|e| e == "jpg");
                let pre = modality.preprocess(&Item::Path(path.clone())).unwrap();
                let (n, _, h, w) = pre.dims4().unwrap();
                assert_eq!(n, crops_per_image);
                // Their crops of this item, cut from the batch's padding to ours,
                // with their mask as channel 3: the tower alone on their pixels.
                let theirs = pixels.narrow(0, k, n).unwrap().narrow(2, 0, h).unwrap().narrow(3, 0, w).unwrap();
                let their_mask = mask.narrow(0, k, n).unwrap();
                let cut_mask = their_mask.narrow(1, 0, h).unwrap().narrow(2, 0, w).unwrap();
                assert_eq!(max_diff(&pre.narrow(1, 3, 1).unwrap().squeeze(1).unwrap(), &cut_mask), 0.0, "{name} case {c}: masks");
                let real_pixels = to_vec(&their_mask).iter().sum::<f32>();
                assert_eq!(real_pixels, to_vec(&cut_mask).iter().sum::<f32>(), "{name} case {c}: mask beyond our crops");
                let diff = max_diff(&pre.narrow(1, 0, 3).unwrap(), &theirs);
                if jpeg {
                    jpeg_diff = jpeg_diff.max(diff);
                } else {
                    pixel_diff = pixel_diff.max(diff);
                }
                let their_item = Tensor::cat(&[&theirs, &cut_mask.unsqueeze(1).unwrap()], 1).unwrap();
                let pieces = modality.encode_item(&their_item).unwrap();
                let ours = modality.encode_item(&pre).unwrap();
                assert_eq!((pieces.len(), ours.len()), (n, n));
                for j in 0..n {
                    // Compare at the real patches only.
                    let real = true_indexes(&patch_mask.get(k + j).unwrap());
                    let index = Tensor::new(real.as_slice(), &Device::Cpu).unwrap();
                    let want = hidden.get(k + j).unwrap().index_select(&index, 0).unwrap();
                    hidden_diff = hidden_diff.max(max_diff(&pieces[j].squeeze(0).unwrap(), &want));
                    if !jpeg {
                        end_to_end = end_to_end.max(max_diff(&ours[j].squeeze(0).unwrap(), &want));
                    }
                    let column = patch_mask.get(k + j).unwrap().narrow(1, 0, 1).unwrap();
                    let rows = true_indexes(&column).len();
                    let want_ids = positions.get(k + j).unwrap().index_select(&index, 0).unwrap().to_vec1::<i64>().unwrap();
                    let ours_ids: Vec<i64> =
                        navit_position_ids(side, rows, real.len() / rows).into_iter().map(i64::from).collect();
                    assert_eq!(ours_ids, want_ids, "{name} case {c} crop {}: position ids", k + j);
                }
                k += n;
            }
            assert_eq!(k, pixels.dim(0).unwrap(), "{name} case {c}: crops");
            report.push(format!(
                "{name} case {c}: pixels {pixel_diff:e} (jpeg {jpeg_diff:e}), tower on their pixels {hidden_diff:e}, \
                 end to end {end_to_end:e}"
            ));
            // Lossless images: Pillow-exact. JPEG: decoders differ (zune-jpeg vs
            // libjpeg-turbo, up to 12 levels in parity.rs), 0.5 std: 2/255 a level.
            assert!(pixel_diff <= 1e-6, "{report:?}");
            assert!(jpeg_diff <= 12.0 * 2.0 / 255.0, "{report:?}");
            assert!(hidden_diff <= 1e-4 && end_to_end <= 1e-4, "{report:?}");
        }
    }
    eprintln!("idefics2 fixtures: {report:#?}");
}

/// `Idefics2Processor`'s prompt string for one image: the expansion, then
/// doubled fake tokens written once.
fn processor_string(seq_len: usize, split: bool) -> String {
    let one = format!("{FAKE_IMAGE_TOKEN}{}{FAKE_IMAGE_TOKEN}", "<image>".repeat(seq_len));
    let all = if split { one.repeat(5) } else { one };
    all.replace(&format!("{FAKE_IMAGE_TOKEN}{FAKE_IMAGE_TOKEN}"), FAKE_IMAGE_TOKEN)
}

#[test]
fn layout_is_the_processors_prompt() {
    for name in ["split", "nosplit"] {
        let dir = root().join("idefics2").join(name);
        let expected = read_json(&dir.join("expected.json"));
        let modality = build_modality("vision_siglip", &json!({}), &ModalityContext::cpu_f32(&dir)).unwrap();
        let seq_len = expected["image_seq_len"].as_u64().unwrap() as usize;
        let split = expected["do_image_splitting"].as_bool().unwrap();
        // No pixel is read: a path that does not exist still has its layout.
        let layout = modality.layout(&Item::Path(dir.join("no-such-image.png"))).unwrap();
        let rendered: String = layout
            .parts()
            .iter()
            .map(|part| match part {
                LayoutPart::Text(text) => text.clone(),
                LayoutPart::Slots(n) => "<image>".repeat(*n),
            })
            .collect();
        assert_eq!(rendered, processor_string(seq_len, split), "{name}");
        assert_eq!(layout.slots(), seq_len * if split { 5 } else { 1 });
        assert_eq!(
            layout.text_rules(),
            [
                TextRule::CollapseRepeats(FAKE_IMAGE_TOKEN.to_string()),
                TextRule::SpaceAfter(FAKE_IMAGE_TOKEN.to_string())
            ]
        );
        // Against the ids transformers made for case 0 (one image).
        let case = &expected["cases"][0];
        assert_eq!(case["images"].as_array().unwrap().len(), 1);
        let ids: Vec<u64> = case["input_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
        let count = |id: &serde_json::Value| ids.iter().filter(|&&x| x == id.as_u64().unwrap()).count();
        assert_eq!(count(&expected["image_token_id"]), layout.slots(), "{name}: image tokens");
        let texts = layout.parts().iter().filter(|p| matches!(p, LayoutPart::Text(_))).count();
        assert_eq!(count(&expected["fake_image_token_id"]), texts, "{name}: fake tokens");
    }
}

#[test]
fn builder_config_reads_from_files_or_inline() {
    let dir = root().join("idefics2").join("nosplit");
    let config: VisionSiglipConfig = serde_json::from_value(json!({
        "tower_config": read_json(&dir.join("config.json"))["vision_config"],
        "weights_prefix": "model.vision_model",
        "image_processor": {"do_image_splitting": true, "size": {"shortest_edge": 20, "longest_edge": 40}},
        "image_seq_len": 3,
        "fake_image_token": "<fake>",
    }))
    .unwrap();
    let modality = VisionSiglip::from_config(&config, &ModalityContext::cpu_f32(&dir)).unwrap();
    assert_eq!(modality.token_width(), 15);
    let layout = modality.image_layout().unwrap();
    assert_eq!(layout.parts().first(), Some(&LayoutPart::Text("<fake>".into())));
    assert_eq!(layout.parts().len(), 11);
    assert_eq!(modality.projector().output_width(7), 3, "projector from config.json's perceiver_config");

    // Cephalo's MoE checkpoints nest everything under `model.`: the tower is
    // found at `model.model.vision_model` with no settings.
    let moe = root().join("idefics2").join("moe_k1");
    let modality = build_modality("vision_siglip", &json!({}), &ModalityContext::cpu_f32(&moe)).unwrap();
    let item = Item::Path(root().join("idefics2").join("images").join("a_40x30.png"));
    let pieces = modality.encode_item(&modality.preprocess(&item).unwrap()).unwrap();
    assert_eq!(pieces.len(), 5);
    assert_eq!(modality.token_width(), 15);
}

#[test]
fn bad_configs_and_inputs_give_clear_errors() {
    let context = ModalityContext::cpu_f32(siglip_dir());
    let bad = |extra: serde_json::Value, expect: &str| {
        let message = error_of(tower_modality(extra.clone(), &context));
        assert!(message.contains(expect), "{extra}: {message:?} lacks {expect:?}");
    };
    let tower = read_json(&siglip_dir().join("tower").join("config.json"));
    let with = |key: &str, value: serde_json::Value| {
        let mut t = tower.clone();
        t[key] = value;
        json!({ "tower_config": t })
    };
    bad(with("hidden_act", json!("relu6")), "hidden_act `relu6` is not supported");
    bad(with("patch_size", json!(0)), "patch_size must be at least 1");
    bad(with("hidden_size", json!(0)), "hidden_size must be at least 1");
    bad(with("num_attention_heads", json!(5)), "not divisible by num_attention_heads");
    bad(with("num_channels", json!(1)), "num_channels is 1");
    // A config that does not fit the checkpoint: the key is named.
    bad(with("image_size", json!(60)), "position_embedding.weight");
    bad(with("num_hidden_layers", json!(3)), "vision_model.encoder.layers.2.self_attn.q_proj.weight");
    bad(json!({"weights_prefix": "model.vision_model"}), "model.vision_model.embeddings.patch_embedding.weight");
    bad(json!({"tower": "images", "tower_config": tower.clone()}), "holds no *.safetensors");
    bad(json!({"image_seq_len": 5}), "image_seq_len is 5 but the projector");
    bad(json!({"projector": "mlp2x_gelu"}), "one position per patch");
    bad(json!({"projector": null}), "needs `projector`");
    bad(json!({"image_processor": {"size": {"longest_edge": 64}}}), "needs both `shortest_edge` and `longest_edge`");
    bad(json!({"image_processor": {"resample": 0}}), "not supported");
    bad(json!({"image_processor": {"image_std": [0.5, 0.0, 0.5]}}), "image_std");
    bad(json!({"fake_image_token": ""}), "must not be empty");
    bad(json!({"no_such_field": 1}), "no_such_field");

    let image = siglip_dir().join("images").join("land_211x97.png");
    let tiny = siglip_dir().join("images").join("odd_75x3.png");
    // Too small for one 2x2 patch without resizing (3 pixel rows split in 1 and 2).
    let m = tower_modality(json!({"image_processor": {"do_resize": false, "do_image_splitting": true}}), &context).unwrap();
    let message = error_of(m.preprocess(&Item::Path(tiny.clone())));
    assert!(message.contains("smaller than one 2x2 patch"), "{message}");
    // A one-pixel side cannot be split.
    let one_row = multitoken_vision::RgbImage::filled(9, 1, [10, 20, 30]);
    let split = Idefics2ProcessorConfig { do_image_splitting: true, ..Default::default() };
    assert!(split.preprocess(&one_row).unwrap_err().to_string().contains("cannot be split"));
    // The decompression-bomb limit.
    let m = tower_modality(json!({"max_pixels": 1000}), &context).unwrap();
    let message = error_of(m.preprocess(&Item::Path(image.clone())));
    assert!(message.contains("exceeds the limit of 1000 pixels"), "{message}");
    // Inline text is not an image, in the layout as in preprocessing.
    let m = tower_modality(json!({}), &context).unwrap();
    assert!(error_of(m.layout(&Item::Text("hi".into()))).contains("not an image"));
    assert!(error_of(m.preprocess(&Item::Text("hi".into()))).contains("not an image"));
    assert!(error_of(m.preprocess(&Item::Bytes(b"not an image".to_vec()))).contains("not a recognised image"));
    // encode_item takes what preprocess returns.
    let wrong = Tensor::zeros((2, 3, 8, 8), DType::F32, &Device::Cpu).unwrap();
    assert!(error_of(m.encode_item(&wrong)).contains("[crops, 4, H, W]"));
    let blank = Tensor::zeros((1, 4, 8, 8), DType::F32, &Device::Cpu).unwrap();
    assert!(error_of(m.encode_item(&blank)).contains("no real crop"));
    // A real crop smaller than a patch (one pixel row of mask).
    let mut thin = Tensor::zeros((1, 4, 8, 8), DType::F32, &Device::Cpu).unwrap();
    thin = thin.slice_assign(&[0..1, 0..4, 0..1, 0..8], &Tensor::ones((1, 4, 1, 8), DType::F32, &Device::Cpu).unwrap()).unwrap();
    assert!(error_of(m.encode_item(&thin)).contains("smaller than one 2x2 patch"));
    // A missing tensor in a copy of the checkpoint is named.
    let tmp = std::env::temp_dir().join(format!("multitoken-siglip-{}", std::process::id()));
    std::fs::create_dir_all(tmp.join("tower")).unwrap();
    let mut weights = load(&siglip_dir().join("tower").join("model.safetensors"));
    weights.remove("vision_model.encoder.layers.1.mlp.fc2.bias");
    candle_core::safetensors::save(&weights, tmp.join("tower").join("model.safetensors")).unwrap();
    std::fs::copy(siglip_dir().join("tower").join("config.json"), tmp.join("tower").join("config.json")).unwrap();
    let message = error_of(tower_modality(json!({}), &ModalityContext::cpu_f32(&tmp)));
    assert!(message.contains("vision_model.encoder.layers.1.mlp.fc2.bias"), "{message}");
    std::fs::remove_dir_all(&tmp).unwrap();
}
