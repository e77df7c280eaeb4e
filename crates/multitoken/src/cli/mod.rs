//! Subcommands of the `multitoken` binary, one file each.

mod chat;
mod embed;
mod generate;
mod model_args;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// Large multimodal models in Rust: chat, generate, train, serve.
#[derive(Debug, Parser)]
#[command(name = "multitoken", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate a completion for one prompt.
    Generate(generate::GenerateArgs),
    /// Chat in the terminal; answers stream as they are generated.
    Chat(chat::ChatArgs),
    /// Sentence embeddings of documents and texts (one JSON row per input with --json).
    Embed(embed::EmbedArgs),
}

/// Run the parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    // Keep the document modality's registry entries in the binary.
    multitoken_document::link();
    match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Chat(args) => chat::run(args),
        Command::Embed(args) => embed::run(args),
    }
}
