//! The multimodal pipeline end to end with a test modality: `multitoken.json`
//! loading, the registry, projectors from `projectors.safetensors`, the splice,
//! generation, and the errors a user can cause.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, D};
use multitoken_core::{
    Item, ItemsByKey, Modality, ModalityBuilder, ModalityContext, ProjectorSpec, Result as CoreResult,
};
use multitoken_lm::generate::GenerationParams;
use multitoken_lm::loader::LoadOptions;
use multitoken_lm::multimodal::MultimodalModel;

type TestResult = Result<(), Box<dyn std::error::Error>>;

const FEATURES: usize = 5;
const WIDTH: usize = 3;

/// Features derived from the item's bytes: `[WIDTH, FEATURES]` of byte values / 255.
struct ByteSensor;

impl Modality for ByteSensor {
    fn name(&self) -> &str {
        "test_bytes"
    }
    fn token(&self) -> &str {
        "<blob>"
    }
    fn data_key(&self) -> &str {
        "blobs"
    }
    fn token_width(&self) -> usize {
        WIDTH
    }
    fn feature_dim(&self) -> usize {
        FEATURES
    }
    fn preprocess(&self, item: &Item) -> CoreResult<Tensor> {
        let Item::Bytes(bytes) = item else {
            return Err(multitoken_core::Error::msg("test_bytes reads bytes only"));
        };
        if bytes.is_empty() {
            return Err(multitoken_core::Error::msg("empty blob"));
        }
        let values: Vec<f32> =
            (0..WIDTH * FEATURES).map(|i| f32::from(bytes[i % bytes.len()]) / 255.0).collect();
        Ok(Tensor::from_vec(values, (WIDTH, FEATURES), &Device::Cpu)?)
    }
    fn encode(&self, batch: &Tensor) -> CoreResult<Tensor> {
        Ok(batch.clone())
    }
    fn projector(&self) -> ProjectorSpec {
        ProjectorSpec::MlpGelu { depth: 2 }
    }
}

fn build_byte_sensor(_config: &serde_json::Value, _context: &ModalityContext) -> CoreResult<Box<dyn Modality>> {
    Ok(Box::new(ByteSensor))
}

multitoken_core::inventory::submit! {
    ModalityBuilder { name: "test_bytes", build: build_byte_sensor }
}

fn llama_fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/lm/llama")
}

/// A multimodal model directory around the llama fixture, with random projector weights.
fn model_dir(name: &str, multitoken_json: &str, with_projectors: bool) -> Result<PathBuf, Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join(format!("multitoken-mm-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("multitoken.json"), multitoken_json)?;
    if with_projectors {
        let hidden = 64;
        let dev = Device::Cpu;
        let tensors: HashMap<String, Tensor> = [
            ("test_bytes_lmm_projector.0.weight", Tensor::randn(0f32, 0.5, (hidden, FEATURES), &dev)?),
            ("test_bytes_lmm_projector.0.bias", Tensor::randn(0f32, 0.5, hidden, &dev)?),
            ("test_bytes_lmm_projector.2.weight", Tensor::randn(0f32, 0.2, (hidden, hidden), &dev)?),
            ("test_bytes_lmm_projector.2.bias", Tensor::randn(0f32, 0.2, hidden, &dev)?),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        candle_core::safetensors::save(&tensors, dir.join("projectors.safetensors"))?;
    }
    Ok(dir)
}

fn config_json() -> String {
    serde_json::json!({
        "base_model": llama_fixture(),
        "modalities": [{"builder": "test_bytes", "projector": "mlp2x_gelu"}]
    })
    .to_string()
}

fn blobs(items: &[&[u8]]) -> ItemsByKey {
    BTreeMap::from([("blobs".to_string(), items.iter().map(|b| Item::Bytes(b.to_vec())).collect())])
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32, Box<dyn std::error::Error>> {
    Ok(a.sub(b)?.abs()?.flatten_all()?.max(D::Minus1)?.to_scalar::<f32>()?)
}

/// Spliced rows are the projected items (k-th token, k-th item); the rest are token embeddings.
#[test]
fn items_are_spliced_at_their_spans() -> TestResult {
    let dir = model_dir("splice", &config_json(), true)?;
    let model = MultimodalModel::load(&dir, &LoadOptions::default())?;
    assert_eq!(model.modality_tokens(), vec!["<blob>"]);
    let items = blobs(&[b"first", b"second item"]);
    let prepared = model.prepare_raw("one <blob> two <blob> three", &items)?;
    assert_eq!(prepared.spans.len(), 2);
    let embeds = model.embed(&prepared, &items)?.squeeze(0)?;
    let width = prepared.spans[0].len;
    let projected = [
        model.project_item(0, 0, &Item::Bytes(b"first".to_vec()), width)?,
        model.project_item(0, 1, &Item::Bytes(b"second item".to_vec()), width)?,
    ];
    for span in &prepared.spans {
        let got = embeds.narrow(0, span.start, span.len)?;
        let want = &projected[span.item_index];
        assert!(max_abs_diff(&got, want)? == 0.0, "span {span:?} does not hold item {}", span.item_index);
    }
    let ids = Tensor::new(prepared.input_ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
    let tokens = model.language_model().embed_tokens(&ids)?.squeeze(0)?;
    assert!(max_abs_diff(&embeds.narrow(0, 0, prepared.spans[0].start)?, &tokens.narrow(0, 0, prepared.spans[0].start)?)? == 0.0);
    // The two items differ, so a swapped splice would be caught above.
    assert!(max_abs_diff(&projected[0], &projected[1])? > 0.0);

    let output = model.generate(&prepared, &items, &GenerationParams { max_new_tokens: 4, ignore_eos: true, ..Default::default() }, &mut |_| true)?;
    assert_eq!(output.token_ids.len(), 4);
    assert_eq!(output.prompt_tokens, prepared.input_ids.len());
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// A text-only directory loads as a plain LM, and its embeddings are the token embeddings.
#[test]
fn a_plain_lm_is_a_model_without_modalities() -> TestResult {
    let model = MultimodalModel::load(&llama_fixture(), &LoadOptions { dtype: DType::F32, device: Device::Cpu, quantize: None, quantize_towers: None })?;
    assert!(model.modalities.is_empty());
    let prepared = model.prepare_raw("hello", &ItemsByKey::new())?;
    assert!(prepared.spans.is_empty());
    assert_eq!(model.embed(&prepared, &ItemsByKey::new())?.dims(), &[1, prepared.input_ids.len(), 64]);
    Ok(())
}

fn check_error(name: &str, json: &str, with_projectors: bool, text: &str, items: ItemsByKey, needles: &[&str]) -> TestResult {
    let dir = model_dir(name, json, with_projectors)?;
    let result = MultimodalModel::load(&dir, &LoadOptions::default())
        .and_then(|model| {
            let prepared = model.prepare_raw(text, &items)?;
            model.embed(&prepared, &items)
        });
    std::fs::remove_dir_all(&dir)?;
    let message = match result {
        Ok(_) => return Err(format!("{name}: expected an error").into()),
        Err(e) => e.to_string(),
    };
    for needle in needles {
        assert!(message.contains(needle), "{name}: {message:?} should mention {needle:?}");
    }
    Ok(())
}

#[test]
fn bad_input_is_a_clear_error() -> TestResult {
    let ok = config_json();
    check_error("count", &ok, true, "<blob> and <blob>", blobs(&[b"only one"]), &["2", "1", "<blob>"])?;
    check_error("empty-item", &ok, true, "<blob>", blobs(&[b""]), &["blobs item 1", "empty blob"])?;
    check_error("no-projectors", &ok, false, "x", ItemsByKey::new(), &["projectors.safetensors"])?;
    let unknown = ok.replace("test_bytes", "vision_nonexistent");
    check_error("unknown", &unknown, true, "x", ItemsByKey::new(), &["vision_nonexistent", "test_bytes"])?;
    check_error("malformed", "{\"modalities\": [", true, "x", ItemsByKey::new(), &["multitoken.json"])?;
    // The entry's projector must be the modality's own (one source of truth).
    let wrong_kind = ok.replace("mlp2x_gelu", "mlp3x_gelu");
    check_error("projector-kind", &wrong_kind, true, "x", ItemsByKey::new(), &["test_bytes", "mlp3x_gelu", "mlp2x_gelu"])?;
    let wrong_key = ok.replace("\"projector\":\"mlp2x_gelu\"", "\"projector\":\"mlp2x_gelu\",\"projector_prefix\":\"elsewhere\"");
    check_error("projector-keys", &wrong_key, true, "x", ItemsByKey::new(), &["elsewhere", "test_bytes"])?;
    Ok(())
}

/// A text modality: each `<caps>` token becomes its `captions` item's text in capitals.
struct Capitals;

impl multitoken_core::TextModality for Capitals {
    fn name(&self) -> &str {
        "test_capitals"
    }
    fn token(&self) -> &str {
        "<caps>"
    }
    fn data_key(&self) -> &str {
        "captions"
    }
    fn to_text(&self, item: &Item) -> CoreResult<String> {
        match item {
            Item::Text(text) => Ok(text.to_uppercase()),
            _ => Err(multitoken_core::Error::msg("test_capitals reads text items only")),
        }
    }
}

fn build_capitals(
    _config: &serde_json::Value,
    _context: &ModalityContext,
) -> CoreResult<Box<dyn multitoken_core::TextModality>> {
    Ok(Box::new(Capitals))
}

multitoken_core::inventory::submit! {
    multitoken_core::TextModalityBuilder { name: "test_capitals", build: build_capitals }
}

/// A text modality listed in `multitoken.json` (no projector) replaces its
/// tokens before tokenising, beside an embedding modality, in chat and raw
/// prompts; the counts must agree, and tokens may not clash.
#[test]
fn text_modalities_from_multitoken_json_substitute_their_items() -> TestResult {
    let config = serde_json::json!({
        "base_model": llama_fixture(),
        "modalities": [
            {"builder": "test_bytes", "projector": "mlp2x_gelu"},
            {"builder": "test_capitals"}
        ]
    });
    let dir = model_dir("text", &config.to_string(), true)?;
    let model = MultimodalModel::load(&dir, &LoadOptions::default())?;
    assert_eq!(model.text_modalities().map(|m| m.name()).collect::<Vec<_>>(), vec!["test_capitals"]);
    let mut items = blobs(&[b"pixels"]);
    items.insert("captions".into(), vec![Item::Text("hello there".into()), Item::Text("bye".into())]);
    let prepared = model.prepare_raw("a <blob> said <caps> then <caps>", &items)?;
    let plain = model.prepare_raw("a <blob> said HELLO THERE then BYE", &blobs(&[b"pixels"]))?;
    assert_eq!(prepared.input_ids, plain.input_ids);
    assert_eq!(prepared.spans, plain.spans);
    // The embedding modality's items still splice with the full item map.
    model.embed(&prepared, &items)?;
    let captions_only: ItemsByKey = items.iter().filter(|(k, _)| *k == "captions").map(|(k, v)| (k.clone(), v.clone())).collect();
    let chat = model.prepare_chat(&[multitoken_core::Message::user("say <caps> <caps>")], &captions_only)?;
    let chat_plain = model.prepare_chat(&[multitoken_core::Message::user("say HELLO THERE BYE")], &ItemsByKey::new())?;
    assert_eq!(chat.input_ids, chat_plain.input_ids);

    let err = model.prepare_raw("only one <caps>", &items).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("<caps>") && err.contains('1') && err.contains('2'), "count mismatch: {err}");
    let mut clashing = MultimodalModel::load(&dir, &LoadOptions::default())?;
    assert!(clashing.add_text_modality(Box::new(Capitals)).is_err(), "a second `<caps>` is refused");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// Issue 23: a prompt longer than the context was cut to it by the preparer and
/// then refused with the cut length ("the prompt has 256 tokens"); the error now
/// gives the prompt's own length.
#[test]
fn an_over_long_prompt_reports_its_real_length() -> TestResult {
    let model = MultimodalModel::load(&llama_fixture(), &LoadOptions { dtype: DType::F32, device: Device::Cpu, quantize: None, quantize_towers: None })?;
    let context = model.lm.model.max_context();
    let prepared = model.prepare_raw(&"hello ".repeat(2 * context), &ItemsByKey::new())?;
    let full = prepared.truncated_from.ok_or("the prompt was not cut")?;
    assert!(full > context, "{full} <= {context}");
    let params = multitoken_lm::generate::GenerationParams::default();
    let err = model.generate(&prepared, &ItemsByKey::new(), &params, &mut |_| true).err().ok_or("generated")?;
    assert_eq!(
        err.to_string(),
        format!("the prompt has {full} tokens, which leaves no room in the model's context of {context}")
    );
    Ok(())
}
