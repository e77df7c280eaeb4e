//! `multitoken generate`: one prompt in, one completion out.
//!
//! The contract (flags and the `--json` line) is relied on by scripts and tests
//! outside the repo, so change it only additively.

use std::io::Write;

use anyhow::Result;
use clap::Args;
use multitoken_core::Message;
use serde_json::json;

use super::model_args::{ItemArgs, ModelArgs, SamplingArgs};

/// Arguments of `multitoken generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    #[command(flatten)]
    items: ItemArgs,
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
    let items = args.items.collect()?;
    let model = args.model.load()?;
    let prepared = if args.raw {
        model.prepare_raw(&args.prompt, &items)?
    } else {
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(Message::system(system));
        }
        messages.push(Message::user(&args.prompt));
        model.prepare_chat(&messages, &items)?
    };
    let params = args.sampling.params(&model);
    let stream = !args.json;
    let mut stdout = std::io::stdout();
    let output = model.generate(&prepared, &items, &params, &mut |text| {
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
