//! `--quantize` and `--dtype bf16` mean the same for every multimodal loader
//! as for a plain HF directory (`LoadOptions::with_lm_weights`): llava,
//! multi_token, Idefics2 (and its Cephalo MoE), Idefics3 / SmolVLM, Qwen2-VL
//! and LLaVA-NeXT each load their LM's linears quantized, or in bf16 with f32
//! activations on the CPU, and the answer to one image moves a little, not at
//! all (a flag silently ignored) and not far (a broken load).

use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor, D};
use multitoken_core::{Item, ItemsByKey, KvCache, LogitsSelection, Message};
use multitoken_lm::loader::LoadOptions;
use multitoken_lm::multimodal::MultimodalModel;
use multitoken_lm::quantize::Quantization;

type TestResult = Result<(), Box<dyn std::error::Error>>;
type BoxError = Box<dyn std::error::Error>;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// Last-position logits for one image and a question, through the model's chat template.
fn answer_logits(model: &MultimodalModel) -> Result<Tensor, BoxError> {
    let image = Item::Path(fixtures().join("idefics2/images/c_64x64.jpg"));
    let modality = &model
        .modalities
        .first()
        .ok_or("the model has no modality")?
        .modality;
    let items = ItemsByKey::from([(modality.data_key().to_string(), vec![image])]);
    let question = format!("{}\nWhat is in the picture?", modality.token());
    let prepared = model.prepare_chat(&[Message::user(question)], &items)?;
    let embeds = model.embed(&prepared, &items)?;
    let lm = model.language_model();
    let mut cache = KvCache::new(lm.num_layers());
    Ok(lm.forward_embeds(&embeds, None, &mut cache, LogitsSelection::Last)?)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32, BoxError> {
    Ok(a.to_dtype(DType::F32)?
        .sub(&b.to_dtype(DType::F32)?)?
        .abs()?
        .flatten_all()?
        .max(D::Minus1)?
        .to_scalar::<f32>()?)
}

fn span(a: &Tensor) -> Result<f32, BoxError> {
    let flat = a.flatten_all()?;
    Ok(flat.max(D::Minus1)?.to_scalar::<f32>()? - flat.min(D::Minus1)?.to_scalar::<f32>()?)
}

#[test]
fn every_multimodal_loader_honours_quantize_and_bf16() -> TestResult {
    multitoken_vision::link();
    multitoken_vlm::link();
    // (fixture, whether its LM's rows are whole 32-weight blocks). Where they
    // are not, `--quantize` must be refused naming a tensor (it reached the
    // LM), not ignored.
    let models = [
        ("llava/llama_default", false),
        ("multi_token/output", true),
        ("idefics2/split", false),
        ("idefics2/moe_k2", false),
        ("idefics3/smolvlm", true),
        ("qwen2_vl/model", true),
        ("llava_next/next", false),
        ("llava_next/next_phi", true),
    ];
    let mut failures = Vec::new();
    for (name, quantizable) in models {
        let dir = fixtures().join(name);
        let exact = answer_logits(&MultimodalModel::load(&dir, &LoadOptions::default())?)?;
        let spread = span(&exact)?;

        let q8 = LoadOptions {
            quantize: Some(Quantization::Q8_0),
            ..LoadOptions::default()
        };
        let mut q8_diff = f32::NAN;
        match MultimodalModel::load(&dir, &q8) {
            Ok(model) if quantizable => {
                q8_diff = max_abs_diff(&answer_logits(&model)?, &exact)?;
                // Q8_0 keeps 8 bits per weight: the logits move by a fraction of their spread.
                if !(q8_diff > 0.0 && q8_diff < 0.05 * spread) {
                    failures.push(format!(
                        "{name}: --quantize q8_0 moved the logits by {q8_diff} (spread {spread})"
                    ));
                }
            }
            Ok(_) => failures.push(format!(
                "{name}: --quantize q8_0 loaded rows that are not whole blocks"
            )),
            Err(e)
                if !quantizable
                    && e.to_string()
                        .contains("not a multiple of the 32-weight block") => {}
            Err(e) => failures.push(format!("{name}: --quantize q8_0: {e}")),
        }

        let bf16 = LoadOptions {
            dtype: DType::BF16,
            ..LoadOptions::default()
        };
        let model = MultimodalModel::load(&dir, &bf16)?;
        if model.language_model().dtype() != DType::F32 {
            failures.push(format!(
                "{name}: --dtype bf16 on the CPU left the activations in {:?}",
                model.language_model().dtype()
            ));
        }
        let mixed = answer_logits(&model)?;
        let bf16_diff = max_abs_diff(&mixed, &exact)?;
        if !(bf16_diff > 0.0 && bf16_diff < 0.05 * spread) {
            failures.push(format!(
                "{name}: --dtype bf16 moved the logits by {bf16_diff} (spread {spread})"
            ));
        }
        println!("{name}: spread {spread:.4}, q8_0 {q8_diff:.2e}, bf16 {bf16_diff:.2e}");
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}
