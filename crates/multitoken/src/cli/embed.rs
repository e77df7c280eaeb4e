//! `multitoken embed`: sentence embeddings of documents and texts.
//!
//! ```text
//! multitoken embed FILE... [--text T]... [--model DIR] [--json]
//! ```
//!
//! One row per input, pooled and normalised as the model's sentence-transformers
//! config says. A document longer than the encoder's window is chunked and its
//! chunk embeddings averaged (never truncated). With `--json` the last stdout line
//! is `{"model", "dim", "inputs": [{"input", "kind", "embedding"}, ...], "embeddings":
//! [[...], ...]}`: `inputs` has one object per input in the order the command line
//! gave them (FILEs and `--text`s interleaved as typed), each naming its input (the
//! path as given, or the text itself) and its kind (`file` or `text`);
//! `embeddings` is the older form, FILEs first then each `--text`. This contract
//! is relied on by scripts outside the repo: change it only additively.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::{ArgMatches, Args};
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
    /// The inputs in command-line order, as (is a file, index in `files` or
    /// `texts`); empty when the arguments were not parsed from a command line
    /// (then FILEs come first, then the texts).
    #[arg(skip)]
    order: Vec<(bool, usize)>,
}

impl EmbedArgs {
    /// Records the order in which the command line gave FILEs and `--text`s
    /// (clap keeps positional and option values apart; their indices say which came first).
    pub fn record_order(&mut self, matches: &ArgMatches) {
        let mut order: Vec<(usize, (bool, usize))> = Vec::new();
        if let Some(indices) = matches.indices_of("files") {
            order.extend(indices.enumerate().map(|(i, at)| (at, (true, i))));
        }
        if let Some(indices) = matches.indices_of("texts") {
            order.extend(indices.enumerate().map(|(i, at)| (at, (false, i))));
        }
        order.sort_by_key(|(at, _)| *at);
        if order.len() == self.files.len() + self.texts.len() {
            self.order = order.into_iter().map(|(_, input)| input).collect();
        }
    }

    /// (is a file, index) of every input, in the order given.
    fn inputs_in_order(&self) -> Vec<(bool, usize)> {
        if !self.order.is_empty() {
            return self.order.clone();
        }
        (0..self.files.len()).map(|i| (true, i)).chain((0..self.texts.len()).map(|i| (false, i))).collect()
    }
}

/// Run `multitoken embed`.
pub fn run(args: EmbedArgs) -> Result<()> {
    if args.files.is_empty() && args.texts.is_empty() {
        bail!("nothing to embed: give FILE arguments and/or --text");
    }
    let extract = ExtractConfig::with_max_bytes(args.max_bytes);
    let mut names = Vec::new();
    let items = args
        .files
        .iter()
        .map(|path| Item::Path(path.clone()))
        .chain(args.texts.iter().map(|text| Item::Text(text.clone())));
    let items: Vec<Item> = items.collect();
    for item in &items {
        names.push(multitoken_document::describe_item(item));
    }
    let dir = match &args.model {
        Some(model) => crate::hub::resolve_model_arg(model)?,
        None => multitoken_document::default_minilm_dir(),
    };
    let (embeddings, dim) = embed_items_with(&dir, &items, &extract, args.overlap)?;
    // `embeddings` (and `names`) hold the files first, then the texts.
    let row_of = |(is_file, i): (bool, usize)| if is_file { i } else { args.files.len() + i };
    let ordered = args.inputs_in_order();
    if args.json {
        let inputs: Vec<serde_json::Value> = ordered
            .iter()
            .map(|&(is_file, i)| {
                let input = if is_file { args.files[i].display().to_string() } else { args.texts[i].clone() };
                json!({
                    "input": input,
                    "kind": if is_file { "file" } else { "text" },
                    "embedding": embeddings.get(row_of((is_file, i))),
                })
            })
            .collect();
        let line = json!({
            "model": dir.display().to_string(),
            "dim": dim,
            "inputs": inputs,
            "embeddings": embeddings,
        });
        println!("{line}");
    } else {
        let rows = ordered.iter().filter_map(|&input| Some((names.get(row_of(input))?, embeddings.get(row_of(input))?)));
        for (name, row) in rows {
            let head: Vec<String> = row.iter().take(4).map(|v| format!("{v:.4}")).collect();
            println!("{name}: [{}, ...] ({} values)", head.join(", "), row.len());
        }
    }
    Ok(())
}

/// Sentence embeddings of items (files, bytes or inline text; the default
/// extraction limits) with the sentence-transformers model in `dir`: one row per
/// item, and the width. `multitoken embed` and the Python module call this.
pub fn embed_items(dir: &Path, items: &[Item], overlap: usize) -> Result<(Vec<Vec<f32>>, usize)> {
    embed_items_with(dir, items, &ExtractConfig::default(), overlap)
}

fn embed_items_with(dir: &Path, items: &[Item], extract: &ExtractConfig, overlap: usize) -> Result<(Vec<Vec<f32>>, usize)> {
    let mut texts = Vec::with_capacity(items.len());
    for item in items {
        texts.push(extract_item(item, extract)?);
    }
    let encoder = SentenceEncoder::load(dir, &Device::Cpu, DType::F32)?;
    let chunking = ChunkConfig { max_tokens: None, overlap };
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let embeddings = encoder
        .embed_texts(&refs, &chunking)
        .with_context(|| format!("embedding with {}", dir.display()))?;
    Ok((embeddings, encoder.dim()))
}
