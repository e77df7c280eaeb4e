//! Generate text from Rust: load any checkpoint (HF directory or GGUF file), render
//! the model's chat template, and stream a greedy answer.
//!
//! ```sh
//! cargo run --release -p multitoken --example generate_text -- path/to/model "Why is the sky blue?"
//! ```

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Result};
use multitoken::core::{ChatTemplate, Message};
use multitoken::lm::generate::{generate_from_ids, GenerationParams};
use multitoken::lm::loader::{load_model, LoadOptions};

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(model_path), Some(question)) = (args.next(), args.next()) else {
        bail!("usage: generate_text MODEL_DIR_OR_GGUF QUESTION");
    };
    let model = load_model(&PathBuf::from(model_path), &LoadOptions::default())?;

    // The model's own template with its own BOS/EOS strings; ChatML when it has none.
    let bos = model.special_tokens.bos_token.clone().unwrap_or_default();
    let eos = model.special_tokens.eos_token.clone().unwrap_or_default();
    let template = match &model.chat_template {
        Some(source) => ChatTemplate::new(model.name.clone(), source.clone(), bos, eos)?,
        None => ChatTemplate::builtin("chatml")?.with_special_tokens(bos, eos),
    };
    let prompt = template.render_prompt(&[Message::user(question)])?;
    let ids = model.tokenizer.encode(prompt, false).map_err(|e| anyhow::anyhow!("{e}"))?.get_ids().to_vec();

    let params = GenerationParams {
        max_new_tokens: 128,
        eos_token_ids: model.generation.eos_token_ids.clone(),
        ..GenerationParams::default()
    };
    let mut stdout = std::io::stdout();
    let output = generate_from_ids(model.model.as_ref(), &model.tokenizer, &ids, &params, &mut |text| {
        write!(stdout, "{text}").and_then(|()| stdout.flush()).is_ok()
    })?;
    println!("\n[{} prompt tokens, {:.1} tok/s decode]", output.prompt_tokens, output.decode_tok_s);
    Ok(())
}
