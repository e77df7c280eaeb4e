//! `multitoken generate`: one prompt in, one completion out.
//!
//! The contract (flags and the `--json` line) is relied on by scripts and tests
//! outside the repo, so change it only additively.

use std::io::Write;

use anyhow::Result;
use clap::Args;
use multitoken_core::chat_template::Message;
use multitoken_lm::generate::generate_from_ids;
use serde_json::json;

use super::model_args::{encode, encode_chat, ModelArgs, SamplingArgs};

/// Arguments of `multitoken generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// The prompt: the user turn of the chat template, or the whole text with --raw.
    #[arg(long)]
    prompt: String,
    /// Tokenize the prompt as is (with the tokenizer's own special tokens), no chat template.
    #[arg(long)]
    raw: bool,
    /// A system message for the chat template.
    #[arg(long)]
    system: Option<String>,
    /// Print one JSON object on the last stdout line instead of streaming text.
    #[arg(long)]
    json: bool,
}

/// Run `multitoken generate`.
pub fn run(args: GenerateArgs) -> Result<()> {
    let model = args.model.load()?;
    let prompt_ids = if args.raw {
        encode(&model, &args.prompt, true)?
    } else {
        let template = args.model.chat_template(&model)?;
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(Message::new("system", system));
        }
        messages.push(Message::new("user", &args.prompt));
        encode_chat(&model, &template, &messages)?
    };
    let params = args.sampling.params(&model);
    let stream = !args.json;
    let mut stdout = std::io::stdout();
    let output = generate_from_ids(model.model.as_ref(), &model.tokenizer, &prompt_ids, &params, &mut |text| {
        if stream {
            // A closed pipe (e.g. `| head`) ends generation rather than erroring.
            return write!(stdout, "{text}").and_then(|()| stdout.flush()).is_ok();
        }
        true
    })?;
    if args.json {
        let line = json!({
            "text": output.text,
            "token_ids": output.token_ids,
            "prompt_tokens": output.prompt_tokens,
            "finish_reason": output.finish_reason.as_str(),
            "timings": {
                "prefill_tok_s": output.prefill_tok_s,
                "decode_tok_s": output.decode_tok_s,
            },
        });
        println!("{line}");
    } else {
        println!();
    }
    Ok(())
}
