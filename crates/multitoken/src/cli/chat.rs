//! `multitoken chat`: an interactive terminal chat that streams tokens.
//!
//! Each turn re-renders the whole conversation with the model's chat template,
//! so what the model sees is exactly what transformers' `apply_chat_template`
//! would give it.

use std::io::{BufRead, Write};

use anyhow::Result;
use clap::Args;
use multitoken_core::chat_template::Message;
use multitoken_lm::generate::generate_from_ids;

use super::model_args::{encode_chat, ModelArgs, SamplingArgs};

/// Arguments of `multitoken chat`.
#[derive(Debug, Args)]
pub struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// A system message that opens the conversation.
    #[arg(long)]
    system: Option<String>,
}

/// Run `multitoken chat` until end of input or `/exit`.
pub fn run(args: ChatArgs) -> Result<()> {
    let model = args.model.load()?;
    let template = args.model.chat_template(&model)?;
    let params = args.sampling.params(&model);
    let mut messages: Vec<Message> = Vec::new();
    if let Some(system) = &args.system {
        messages.push(Message::new("system", system));
    }
    let stdin = std::io::stdin();
    let mut stdout = std::io::stdout();
    eprintln!("multitoken chat with {} — /reset clears the conversation, /exit (or Ctrl-D) quits", model.name);
    loop {
        write!(stdout, "> ")?;
        stdout.flush()?;
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        let line = line.trim();
        match line {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                messages.retain(|m| m.role == "system");
                continue;
            }
            _ => {}
        }
        messages.push(Message::new("user", line));
        let ids = encode_chat(&model, &template, &messages)?;
        let output = generate_from_ids(model.model.as_ref(), &model.tokenizer, &ids, &params, &mut |text| {
            write!(stdout, "{text}").and_then(|()| stdout.flush()).is_ok()
        });
        writeln!(stdout)?;
        match output {
            Ok(output) => messages.push(Message::new("assistant", output.text.trim())),
            Err(e) => {
                // Keep the conversation usable: drop the turn that failed.
                messages.pop();
                eprintln!("error: {e}");
            }
        }
    }
    Ok(())
}
