//! Subcommands of the `multitoken` binary, one file each.

mod chat;
mod embed;
mod generate;
mod mel;
mod model_args;
mod transcribe;

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
    /// Print Whisper's log-mel spectrogram of an audio file.
    Mel(mel::MelArgs),
    /// Transcribe an audio file with Whisper (greedy).
    Transcribe(transcribe::TranscribeArgs),
    /// Train projectors, LoRA adapters or the whole model on a dataset.
    Train(multitoken_train::cli::TrainArgs),
    /// Convert and check datasets.
    Dataset(multitoken_train::cli::DatasetArgs),
    /// Merge a PEFT LoRA adapter into the base model's weights.
    MergeLora(multitoken_train::cli::MergeLoraArgs),
    /// Accuracy of a model on a held-out dataset.
    Eval(multitoken_train::cli::EvalArgs),
    /// Build and tune a mixture of experts from fine-tuned models.
    Moe(multitoken_moe::cli::MoeArgs),
    /// Serve a model over HTTP (/generate, OpenAI-compatible API, web chat page).
    Serve(multitoken_serve::cli::ServeArgs),
}

/// Run the parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    // Keep the document modality's registry entries in the binary.
    multitoken_document::link();
    // Keep the audio modality's registry entry in the binary.
    multitoken_audio::link();
    // Keep the vision modality's registry entries in the binary.
    multitoken_vision::link();
    // Keep the MoE directory loader's registration in the binary.
    multitoken_moe::link();
    // Keep the VLM importers (Idefics2, Cephalo MoE) in the binary.
    multitoken_vlm::link();
    match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Chat(args) => chat::run(args),
        Command::Embed(args) => embed::run(args),
        Command::Mel(args) => mel::run(args),
        Command::Transcribe(args) => transcribe::run(args),
        Command::Train(args) => multitoken_train::cli::train(args),
        Command::Dataset(args) => multitoken_train::cli::dataset(args),
        Command::MergeLora(args) => multitoken_train::cli::merge_lora(args),
        Command::Eval(args) => multitoken_train::cli::eval(args),
        Command::Moe(args) => multitoken_moe::cli::run(args),
        Command::Serve(args) => multitoken_serve::cli::run(args),
    }
}
