//! `multitoken eval`: a model's score on a benchmark, or on held-out rows.
//!
//! ```text
//! multitoken eval --benchmark mmbench|mmmu|pope|vqav2 --data FILE
//!     (--model DIR | --predictions FILE) [--out DIR] [--limit N] [--json]
//!     [--max-new-tokens N] [--max-batch N] [--no-progress]
//! multitoken eval --model DIR --dataset heldout.jsonl [--limit N] [--output FILE]
//! ```
//!
//! With `--benchmark` the file is the benchmark's own format (VLMEvalKit's TSV,
//! or the Hugging Face fields as JSON Lines) and the answers are scored by the
//! reference rules (multitoken-eval); `--out` gets `predictions.jsonl` (with
//! `--model`; kept, so a second run asks only what is missing), `report.json`,
//! `report.md` and `accuracy.png`. With `--json` the last stdout line is
//! `{"benchmark", "score", "n", "unparsed", "by_category": {...}, "metrics": {...}}`
//! (scores in [0, 1]). Without `--benchmark`: multi_token JSONL rows, the
//! greedy reply against the last assistant turn (exact match / contains).

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;

/// Arguments of `multitoken eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Benchmark: mmbench, mmmu, pope or vqav2 (reads --data). Without it, --dataset rows are evaluated.
    #[arg(long)]
    benchmark: Option<String>,
    /// The benchmark file (VLMEvalKit TSV, or JSON Lines with the Hugging Face dataset's fields).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Model directory to ask (greedy, batched as `serve` batches).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Score these answers (JSON Lines `{"index", "prediction"}`) instead of asking a model.
    #[arg(long)]
    predictions: Option<PathBuf>,
    /// Output directory for predictions.jsonl and the reports [default: eval-BENCHMARK].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Print the summary as JSON (the last stdout line).
    #[arg(long)]
    json: bool,
    /// Questions decoded together.
    #[arg(long, default_value_t = 8)]
    max_batch: usize,
    /// No progress bar.
    #[arg(long)]
    no_progress: bool,
    /// JSONL rows; the last assistant message of each is the reference (without --benchmark).
    #[arg(long)]
    dataset: Option<PathBuf>,
    /// Longest reply [default: 32; with --benchmark the benchmark's: MMBench 64, MMMU and POPE 128, VQAv2 16].
    #[arg(long)]
    max_new_tokens: Option<usize>,
    /// Evaluate only the first N questions (MMBench: N originals with their circular copies).
    #[arg(long)]
    limit: Option<usize>,
    /// Write every row's prediction as JSON to this file (without --benchmark).
    #[arg(long)]
    output: Option<PathBuf>,
}

/// Runs `multitoken eval`.
pub fn run(mut args: EvalArgs) -> Result<()> {
    if let Some(model) = &args.model {
        args.model = Some(crate::hub::resolve_model_arg(model)?);
    }
    let Some(name) = &args.benchmark else {
        let (Some(model), Some(dataset)) = (args.model, args.dataset) else {
            bail!("give --benchmark NAME --data FILE, or --model DIR --dataset FILE for held-out rows");
        };
        return multitoken_train::cli::eval(multitoken_train::cli::EvalArgs {
            model,
            dataset,
            max_new_tokens: args.max_new_tokens.unwrap_or(32),
            limit: args.limit,
            output: args.output,
        });
    };
    let benchmark: multitoken_eval::Benchmark = name.parse()?;
    let Some(data) = args.data else {
        bail!("--benchmark {benchmark} needs --data FILE (the benchmark's TSV or JSON Lines file)");
    };
    if args.dataset.is_some() || args.output.is_some() {
        bail!(
            "--dataset and --output are for held-out rows; with --benchmark use --data and --out"
        );
    }
    let config = multitoken_eval::EvalConfig {
        benchmark,
        data,
        model: args.model,
        predictions: args.predictions,
        out: args
            .out
            .unwrap_or_else(|| PathBuf::from(format!("eval-{benchmark}"))),
        limit: args.limit,
        max_new_tokens: args.max_new_tokens,
        max_batch: args.max_batch,
        progress: !args.no_progress && !args.json,
    };
    let outcome = multitoken_eval::run(&config)?;
    let report = &outcome.report;
    if outcome.asked > 0 {
        println!(
            "asked {} questions; answers in {}",
            outcome.asked,
            config.out.join("predictions.jsonl").display()
        );
    }
    println!(
        "{benchmark}: {:.2}% over {} questions ({} unparsed)",
        100.0 * report.score,
        report.n,
        report.unparsed
    );
    for (category, group) in &report.by_category {
        println!("  {category}: {:.2}% ({})", 100.0 * group.score, group.n);
    }
    for (metric, value) in &report.metrics {
        println!("  {metric}: {:.2}%", 100.0 * value);
    }
    for note in &report.notes {
        eprintln!("note: {note}");
    }
    println!("report: {}", config.out.join("report.md").display());
    if args.json {
        println!("{}", report.summary_json());
    }
    Ok(())
}
