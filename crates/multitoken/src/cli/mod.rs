//! Subcommands of the `multitoken` binary, one file each.

mod chat;
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
}

/// Run the parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Chat(args) => chat::run(args),
    }
}
