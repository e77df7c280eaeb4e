//! One prompt mixing an image, a speech clip, a document and a transcript, from Rust.
//!
//! ```sh
//! cargo run --release -p multitoken --example audio_prompt -- MODEL_DIR \
//!     --image a.png --audio b.wav --document report.pdf --transcript c.wav \
//!     --prompt "Look <image>, listen <speech>, read <document>. She said: <transcript>"
//! ```
//!
//! `MODEL_DIR` holds a `multitoken.json` whose modalities read `<image>` (`images`),
//! `<speech>` (`speech_audios`) and `<document>` (`documents`); the k-th flag of a kind
//! fills the k-th token of that kind. `<transcript>` is replaced by the clip's greedy
//! transcript (Whisper base from `cargo xtask weights`) before tokenising.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use multitoken::audio::{DecodeConfig, WhisperTranscript, TRANSCRIPT_DATA_KEY};
use multitoken::core::preparer::substitute_text_items;
use multitoken::core::{Item, ItemsByKey, Message};
use multitoken::lm::generate::GenerationParams;
use multitoken::lm::loader::LoadOptions;
use multitoken::lm::multimodal::MultimodalModel;

fn main() -> Result<()> {
    // Keep every modality's registry entry in this binary.
    multitoken::audio::link();
    multitoken::document::link();
    multitoken::vision::link();

    let mut args = std::env::args().skip(1);
    let Some(model_dir) = args.next() else {
        bail!("usage: audio_prompt MODEL_DIR [--image P] [--audio P] [--document P] [--transcript P] --prompt TEXT");
    };
    let mut items = ItemsByKey::new();
    let mut prompt = None;
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .with_context(|| format!("{flag} needs a value"))?;
        let key = match flag.as_str() {
            "--prompt" => {
                prompt = Some(value);
                continue;
            }
            "--image" => "images",
            "--audio" => "speech_audios",
            "--document" => "documents",
            "--transcript" => TRANSCRIPT_DATA_KEY,
            other => bail!("unknown flag {other}"),
        };
        items
            .entry(key.to_string())
            .or_default()
            .push(Item::Path(PathBuf::from(value)));
    }
    let prompt = prompt.context("--prompt is required")?;
    let mut messages = vec![Message::user(prompt)];

    // Text modalities first: `<transcript>` becomes words, its items leave `items`.
    if items.contains_key(TRANSCRIPT_DATA_KEY) {
        let whisper_dir = multitoken::audio::default_whisper_dir();
        let whisper = WhisperTranscript::load(
            &whisper_dir,
            &candle_core::Device::Cpu,
            DecodeConfig::default(),
        )?;
        substitute_text_items(&mut messages, &mut items, &[&whisper])?;
    }

    let model = MultimodalModel::load(&PathBuf::from(&model_dir), &LoadOptions::default())?;
    let prepared = model.prepare_chat(&messages, &items)?;
    for span in &prepared.spans {
        let name = model.modalities[span.modality].modality.token();
        eprintln!("{name} #{}: positions {:?}", span.item_index, span.range());
    }
    let params = GenerationParams {
        max_new_tokens: 64,
        ..Default::default()
    };
    let mut stdout = std::io::stdout();
    model.generate(&prepared, &items, &params, &mut |text| {
        write!(stdout, "{text}")
            .and_then(|()| stdout.flush())
            .is_ok()
    })?;
    println!();
    Ok(())
}
