//! `multitoken generate`: one prompt in, one completion out.
//!
//! The contract (flags and the `--json` line) is relied on by scripts and tests
//! outside the repo, so change it only additively.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use multitoken_audio::{
    DecodeConfig, WhisperTranscript, AUDIO_WHISPER_TRANSCRIPT, TRANSCRIPT_DATA_KEY, TRANSCRIPT_TOKEN,
};
use multitoken_core::preparer::substitute_text_items;
use multitoken_core::{Item, ItemsByKey, Message};
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
    /// Items whose modality token the prompt lacks are placed before the text, one
    /// token per item on its own line, as `chat` does.
    #[arg(long)]
    prompt: String,
    /// Tokenize the prompt as is (with the tokenizer's own special tokens), no chat
    /// template; it must hold a modality token per item (as transformers' processors
    /// require), nothing is added.
    #[arg(long)]
    raw: bool,
    /// A system message for the chat template.
    #[arg(long)]
    system: Option<String>,
    /// Print one JSON object on the last stdout line instead of streaming text.
    #[arg(long)]
    json: bool,
    /// An audio clip whose transcript replaces the next `<transcript>` token (repeatable).
    #[arg(long = "transcript", value_name = "PATH")]
    transcripts: Vec<PathBuf>,
    /// The HF Whisper directory for `<transcript>` [default: whisper-base from `cargo xtask weights`].
    #[arg(long, value_name = "DIR")]
    whisper: Option<PathBuf>,
    /// Transcribe with whisper.cpp from this ggml model file instead (a binary built
    /// with `--features whisper-cpp`; `cargo xtask weights` writes whisper-base/ggml-base.bin).
    #[arg(long, value_name = "FILE", conflicts_with = "whisper")]
    whisper_ggml: Option<PathBuf>,
    /// Print where the time went to stderr: per kind of work (matmul, attention,
    /// norms, rope, activation, embedding, sampling, overhead), µs per token and
    /// share, for the prefill and the decode steps (also `MULTITOKEN_PROFILE=1`).
    #[arg(long)]
    profile: bool,
}

/// Replaces `<transcript>` tokens with the transcripts of the `--transcript` clips
/// (our candle Whisper, greedy), before the model's preparer sees the messages.
fn substitute_transcripts(
    args: &GenerateArgs,
    messages: &mut [Message],
    items: &mut ItemsByKey,
) -> Result<()> {
    for path in &args.transcripts {
        if let Err(e) = multitoken_core::check_regular_file(path) {
            bail!("{}: {e} (given for --transcript)", path.display());
        }
        items
            .entry(TRANSCRIPT_DATA_KEY.to_string())
            .or_default()
            .push(Item::Path(path.clone()));
    }
    let used = messages
        .iter()
        .any(|m| m.content.contains(TRANSCRIPT_TOKEN));
    if !used && !items.contains_key(TRANSCRIPT_DATA_KEY) {
        return Ok(());
    }
    if let Some(ggml) = &args.whisper_ggml {
        let context = multitoken_core::ModalityContext::cpu_f32(".");
        let config = serde_json::json!({ "ggml_model": ggml });
        let whisper = multitoken_core::build_text_modality(AUDIO_WHISPER_TRANSCRIPT, &config, &context)
            .with_context(|| format!("loading whisper.cpp's model for <transcript> from {}", ggml.display()))?;
        substitute_text_items(messages, items, &[whisper.as_ref()])?;
        return Ok(());
    }
    let dir = args
        .whisper
        .clone()
        .unwrap_or_else(multitoken_audio::default_whisper_dir);
    let whisper = WhisperTranscript::load(&dir, &candle_core::Device::Cpu, DecodeConfig::default())
        .with_context(|| {
            format!(
                "loading the Whisper model for <transcript> from {}",
                dir.display()
            )
        })?;
    substitute_text_items(messages, items, &[&whisper])?;
    Ok(())
}

/// Run `multitoken generate`.
pub fn run(args: GenerateArgs) -> Result<()> {
    let mut items = args.items.collect()?;
    let mut messages = Vec::new();
    if let Some(system) = &args.system {
        messages.push(Message::system(system));
    }
    messages.push(Message::user(&args.prompt));
    substitute_transcripts(&args, &mut messages, &mut items)?;
    let model = args.model.load()?;
    let params = args.sampling.params(&model);
    if args.profile || std::env::var_os("MULTITOKEN_PROFILE").is_some_and(|v| v != "0" && !v.is_empty()) {
        multitoken_lm::profile::enable();
    }
    let stream = !args.json;
    let mut stdout = std::io::stdout();
    let mut on_text = |text: &str| {
        if stream {
            // A closed pipe (e.g. `| head`) ends generation rather than erroring.
            return write!(stdout, "{text}")
                .and_then(|()| stdout.flush())
                .is_ok();
        }
        true
    };
    let output = if args.raw {
        // --raw has no system turn; the prompt is the last message.
        let prompt = messages
            .last()
            .map_or(args.prompt.as_str(), |m| m.content.as_str());
        let prepared = model.prepare_raw(prompt, &items)?;
        model.generate(&prepared, &items, &params, &mut on_text)?
    } else {
        // As `chat`: an item whose token the prompt lacks goes before the text.
        crate::conversation::generate_chat(&model, &mut messages, &items, &params, &mut on_text)?
    };
    for (name, phase) in multitoken_lm::profile::take_phases() {
        eprintln!("\n{}", phase.table(&name));
    }
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
