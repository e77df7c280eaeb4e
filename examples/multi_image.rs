//! Two images in one prompt from Rust: the k-th `<image>` token takes the k-th
//! image of the row's `images` list.
//!
//! ```sh
//! cargo run --release -p multitoken --example multi_image -- \
//!     tests/fixtures/llava/llama_default tests/fixtures/llava/images/a_40x30.png \
//!     tests/fixtures/llava/images/c_64x64.jpg
//! ```
//!
//! The model directory is a llava-hf checkpoint or a multitoken model with a
//! `vision_clip` modality; with no arguments the committed tiny llava fixture runs.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Result};
use multitoken::core::{Item, ItemsByKey};
use multitoken::lm::generate::GenerationParams;
use multitoken::lm::loader::LoadOptions;
use multitoken::lm::multimodal::MultimodalModel;

fn main() -> Result<()> {
    // Keep the vision crate's `vision_clip` registration in this binary.
    multitoken::vision::link();
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/llava");
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (model_dir, first, second) = match args.as_slice() {
        [] => (
            fixtures.join("llama_default"),
            fixtures.join("images/a_40x30.png"),
            fixtures.join("images/c_64x64.jpg"),
        ),
        [model, a, b] => (PathBuf::from(model), PathBuf::from(a), PathBuf::from(b)),
        _ => bail!("usage: multi_image [MODEL_DIR FIRST_IMAGE SECOND_IMAGE]"),
    };
    let model = MultimodalModel::load(&model_dir, &LoadOptions::default())?;

    // One `images` list; the prompt's `<image>` tokens take its items in order.
    let items = ItemsByKey::from([(
        "images".to_string(),
        vec![Item::Path(first), Item::Path(second)],
    )]);
    let prepared = model.prepare_raw(
        "USER: <image> and <image>\nCompare them. ASSISTANT:",
        &items,
    )?;
    for span in &prepared.spans {
        println!(
            "image {} -> positions {}..{}",
            span.item_index + 1,
            span.start,
            span.end()
        );
    }

    let params = GenerationParams {
        max_new_tokens: 32,
        eos_token_ids: model.lm.generation.eos_token_ids.clone(),
        ..GenerationParams::default()
    };
    let mut stdout = std::io::stdout();
    let output = model.generate(&prepared, &items, &params, &mut |text| {
        write!(stdout, "{text}")
            .and_then(|()| stdout.flush())
            .is_ok()
    })?;
    println!(
        "\n[{} prompt positions, ids {:?}]",
        output.prompt_tokens, output.token_ids
    );
    Ok(())
}
