//! `multitoken embed`: sentence embeddings of documents and texts.
//!
//! ```text
//! multitoken embed FILE... [--text T]... [--model DIR] [--json]
//! ```
//!
//! One row per input, FILEs first then each `--text`, both in the order given;
//! pooled and normalised as the model's sentence-transformers config says. A
//! document longer than the encoder's window is chunked and its chunk embeddings
//! averaged (never truncated). With `--json` the last stdout line is
//! `{"model", "dim", "embeddings": [[...], ...]}`. This contract is relied on by
//! scripts outside the repo: change it only additively.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::Args;
use multitoken_core::Item;
use multitoken_document::{extract_item, ChunkConfig, ExtractConfig, SentenceEncoder};
use serde_json::json;

/// Arguments of `multitoken embed`.
#[derive(Debug, Args)]
pub struct EmbedArgs {
    /// Documents to embed: PDF, Markdown or text in any encoding.
    files: Vec<PathBuf>,
    /// Text to embed as is (repeatable).
    #[arg(long = "text")]
    texts: Vec<String>,
    /// A sentence-transformers model directory [default: all-MiniLM-L6-v2 from
    /// `cargo xtask weights`].
    #[arg(long)]
    model: Option<PathBuf>,
    /// Tokens shared by consecutive chunks of a long document.
    #[arg(long, default_value_t = ChunkConfig::default().overlap)]
    overlap: usize,
    /// Documents over this many bytes are rejected.
    #[arg(long, default_value_t = multitoken_document::DEFAULT_MAX_BYTES)]
    max_bytes: u64,
    /// Print one JSON object on the last stdout line.
    #[arg(long)]
    json: bool,
}

/// Run `multitoken embed`.
pub fn run(args: EmbedArgs) -> Result<()> {
    if args.files.is_empty() && args.texts.is_empty() {
        bail!("nothing to embed: give FILE arguments and/or --text");
    }
    let extract = ExtractConfig {
        max_bytes: args.max_bytes,
    };
    let mut names = Vec::new();
    let mut texts = Vec::new();
    let items = args
        .files
        .iter()
        .map(|path| Item::Path(path.clone()))
        .chain(args.texts.iter().map(|text| Item::Text(text.clone())));
    for item in items {
        names.push(multitoken_document::describe_item(&item));
        texts.push(extract_item(&item, &extract)?);
    }
    let dir = args.model.clone().unwrap_or_else(multitoken_document::default_minilm_dir);
    let encoder = SentenceEncoder::load(&dir, &Device::Cpu, DType::F32)?;
    let chunking = ChunkConfig {
        max_tokens: None,
        overlap: args.overlap,
    };
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let embeddings = encoder
        .embed_texts(&refs, &chunking)
        .with_context(|| format!("embedding with {}", dir.display()))?;
    if args.json {
        let line = json!({
            "model": dir.display().to_string(),
            "dim": encoder.dim(),
            "embeddings": embeddings,
        });
        println!("{line}");
    } else {
        for (name, row) in names.iter().zip(&embeddings) {
            let head: Vec<String> = row.iter().take(4).map(|v| format!("{v:.4}")).collect();
            println!("{name}: [{}, ...] ({} values)", head.join(", "), row.len());
        }
    }
    Ok(())
}
