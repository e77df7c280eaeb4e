//! `multitoken eval --benchmark NAME --data FILE (--model DIR | --predictions FILE)`:
//! read the benchmark file, get the answers (asking the model for the ones
//! `--out`'s `predictions.jsonl` lacks, or reading `--predictions`), score
//! them, write the report.

use std::path::PathBuf;

use crate::predict::{
    answer_missing, drop_partial_tail, read_predictions, PromptConfig, PREDICTIONS_FILE,
};
use crate::report::Report;
use crate::score::Predictions;
use crate::{Benchmark, Error, Loaded, Result};

/// What to evaluate and where the results go.
#[derive(Debug, Clone)]
pub struct EvalConfig {
    /// The benchmark.
    pub benchmark: Benchmark,
    /// Its file (TSV or JSON Lines).
    pub data: PathBuf,
    /// A model to ask (greedy); its answers go to `out/predictions.jsonl`.
    pub model: Option<PathBuf>,
    /// Answers to score instead.
    pub predictions: Option<PathBuf>,
    /// Output directory (reports; predictions when prompting).
    pub out: PathBuf,
    /// Only the first N questions (MMBench: originals, with their copies).
    pub limit: Option<usize>,
    /// New-token budget (default: the benchmark's).
    pub max_new_tokens: Option<usize>,
    /// Questions decoded together.
    pub max_batch: usize,
    /// Progress bar on stderr.
    pub progress: bool,
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct EvalOutcome {
    /// The report written to `out`.
    pub report: Report,
    /// Questions the model was asked in this run (0 when scoring only or all were answered).
    pub asked: usize,
}

/// Runs one evaluation (see the module docs).
pub fn run(config: &EvalConfig) -> Result<EvalOutcome> {
    let loaded = Loaded::read(config.benchmark, &config.data)?;
    let keys = loaded.keys(config.limit);
    let (predictions, asked) = match (&config.model, &config.predictions) {
        (Some(_), Some(_)) => {
            return Err(Error::Config(
                "give --model (answers are asked and kept in --out) or --predictions (answers are only scored), not both".into(),
            ))
        }
        (None, None) => {
            return Err(Error::Config("give --model DIR to ask a model, or --predictions FILE to score answers".into()))
        }
        (None, Some(file)) => (read_predictions(file, &loaded)?, 0),
        (Some(model), None) => {
            let file = config.out.join(PREDICTIONS_FILE);
            if file.is_file() && drop_partial_tail(&file)? {
                eprintln!("note: {}: dropped an unfinished last line; that question is asked again", file.display());
            }
            let mut predictions = if file.is_file() { read_predictions(&file, &loaded)? } else { Predictions::default() };
            let prompt = PromptConfig {
                model: model.clone(),
                max_new_tokens: config.max_new_tokens.unwrap_or(config.benchmark.default_max_new_tokens()),
                max_batch: config.max_batch,
                progress: config.progress,
            };
            let asked = answer_missing(&loaded, &keys, &mut predictions, &file, &prompt)?;
            (predictions, asked)
        }
    };
    let scores = loaded.score(&predictions, config.limit)?;
    let report = Report::build(
        config.benchmark,
        &config.data,
        config.model.as_deref(),
        scores,
    );
    report.write(&config.out)?;
    Ok(EvalOutcome { report, asked })
}
