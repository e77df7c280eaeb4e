//! Predictions: `predictions.jsonl` (`{"index", "prediction", "benchmark"}` a
//! line) read and checked, and written by prompting a model.
//!
//! Prompting goes through multitoken-serve's continuous-batching
//! [`Scheduler`], the one `serve` uses: each question is prepared and embedded
//! here (the benchmark's prompt as one user turn of the model's chat template,
//! its images as items), then queued; greedy decoding of up to `max_batch`
//! questions runs in one forward per step on the scheduler's thread while the
//! next questions are embedded. Each answer is appended to the file as soon as
//! it is done, so an interrupted run resumes where it stopped: questions that
//! already have a line are not asked again.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use multitoken_core::{Item, ItemsByKey, Message};
use multitoken_lm::generate::GenerationParams;
use multitoken_lm::loader::LoadOptions;
use multitoken_lm::multimodal::MultimodalModel;
use multitoken_serve::metrics::Metrics;
use multitoken_serve::scheduler::{Event, Job, Scheduler};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::score::Predictions;
use crate::table::{as_pandas, column_kind, RowKey, Table};
use crate::{Benchmark, Error, Loaded, Result, IMAGE_TOKEN};

/// The predictions file in the output directory.
pub const PREDICTIONS_FILE: &str = "predictions.jsonl";

/// One line of a predictions file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PredictionLine {
    /// The row's index.
    pub index: RowKey,
    /// The model's answer.
    pub prediction: String,
    /// The benchmark it answers (checked when present).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub benchmark: Option<String>,
}

/// Reads a predictions file for `loaded`: JSON Lines, one object a line with
/// `index` and `prediction` (a string, a number, or null for no answer), or a
/// TSV with `index` and `prediction` columns (VLMEvalKit's result files, read
/// as pandas reads them). A `benchmark` other than this one, an index naming no
/// row of the benchmark file, or one index with two different answers is an
/// error naming the line.
pub fn read_predictions(path: &Path, loaded: &Loaded) -> Result<Predictions> {
    let known: HashSet<RowKey> = loaded.all_keys().into_iter().collect();
    let benchmark = loaded.benchmark();
    let mut by_key: HashMap<RowKey, String> = HashMap::new();
    let mut unknown = Vec::new();
    for (line, value) in prediction_rows(path)? {
        let row_error = |message: String| Error::Row {
            file: path.to_path_buf(),
            line,
            message,
        };
        let index = value
            .get("index")
            .and_then(RowKey::from_json)
            .ok_or_else(|| row_error("no `index` (a number or a string)".into()))?;
        let prediction = match value.get("prediction") {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(n @ serde_json::Value::Number(_)) => n.to_string(),
            // A missing answer (pandas' NaN, written as null) reads as no answer:
            // scored wrong and counted as unparsed, as VLMEvalKit scores `str(nan)`.
            Some(serde_json::Value::Null) => String::new(),
            _ => return Err(row_error(format!("index {index}: no `prediction` string"))),
        };
        if let Some(other) = value.get("benchmark").and_then(|b| b.as_str()) {
            if other.parse::<Benchmark>().ok() != Some(benchmark) {
                return Err(row_error(format!(
                    "a prediction for benchmark `{other}`, but this is {benchmark}: a predictions file of another benchmark?"
                )));
            }
        }
        if !known.contains(&index) {
            unknown.push((line, index));
            continue;
        }
        if let Some(previous) = by_key.get(&index) {
            if *previous != prediction {
                return Err(row_error(format!(
                    "index {index} again, with another prediction"
                )));
            }
        }
        by_key.insert(index, prediction);
    }
    if let Some((line, index)) = unknown.first() {
        return Err(Error::Row {
            file: path.to_path_buf(),
            line: *line,
            message: format!(
                "index {index} names no row of the {benchmark} file ({} such line{}): predictions for another benchmark or file?",
                unknown.len(),
                if unknown.len() == 1 { "" } else { "s" }
            ),
        });
    }
    Ok(Predictions { by_key })
}

/// The rows of a predictions file as JSON objects with their line numbers.
fn prediction_rows(path: &Path) -> Result<Vec<(usize, serde_json::Value)>> {
    let is_tsv = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("tsv"));
    if is_tsv {
        let table = Table::read(path)?;
        table.require("predictions", &["index", "prediction"])?;
        let kind = column_kind(&table, "prediction");
        return Ok(table
            .rows
            .iter()
            .map(|r| {
                let prediction = r
                    .text("prediction")
                    .map(|p| serde_json::Value::String(as_pandas(&kind, p)))
                    .unwrap_or(serde_json::Value::Null);
                let index = r.value("index").cloned().unwrap_or(serde_json::Value::Null);
                (
                    r.line,
                    serde_json::json!({"index": index, "prediction": prediction}),
                )
            })
            .collect());
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value = serde_json::from_str(line).map_err(|e| Error::Row {
            file: path.to_path_buf(),
            line: i + 1,
            message: format!("not JSON: {e}"),
        })?;
        rows.push((i + 1, value));
    }
    Ok(rows)
}

/// Drops an unfinished last line of a predictions file (the run was killed
/// while writing it), so that resuming asks that question again instead of
/// failing on half a JSON object. Returns whether a line was dropped.
pub fn drop_partial_tail(path: &Path) -> Result<bool> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    if bytes.is_empty() || bytes.ends_with(b"\n") {
        return Ok(false);
    }
    let keep = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    file.set_len(keep as u64).map_err(|e| Error::io(path, e))?;
    Ok(true)
}

/// How to prompt.
#[derive(Debug, Clone)]
pub struct PromptConfig {
    /// The model directory.
    pub model: PathBuf,
    /// New-token budget per answer.
    pub max_new_tokens: usize,
    /// Questions decoded together.
    pub max_batch: usize,
    /// Show a progress bar with ETA on stderr.
    pub progress: bool,
}

/// Asks the model every question of `keys` that `predictions` lacks,
/// appending each answer to `file` and to `predictions`. Returns how many it asked.
pub fn answer_missing(
    loaded: &Loaded,
    keys: &[RowKey],
    predictions: &mut Predictions,
    file: &Path,
    config: &PromptConfig,
) -> Result<usize> {
    let missing: Vec<&RowKey> = keys
        .iter()
        .filter(|k| !predictions.by_key.contains_key(k))
        .collect();
    if missing.is_empty() {
        return Ok(0);
    }
    let model = MultimodalModel::load(&config.model, &LoadOptions::default())?;
    let image_token = model
        .modality_for_key("images")
        .map(|(_, m)| m.modality.token().to_string());
    // Up to two batches are queued: the next questions are embedded while these decode.
    let window = config.max_batch.max(1) * 2;
    let scheduler = Scheduler::start(
        model.lm.model.clone(),
        model.lm.tokenizer.clone(),
        Arc::new(Metrics::default()),
        config.max_batch,
        window + 1,
    )
    .map_err(|e| Error::Model(e.to_string()))?;
    let params = GenerationParams {
        max_new_tokens: config.max_new_tokens,
        eos_token_ids: model.lm.generation.eos_token_ids.clone(),
        ..GenerationParams::default()
    };
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let mut out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(file)
        .map_err(|e| Error::io(file, e))?;
    let bar = progress_bar(config.progress, keys.len(), keys.len() - missing.len());
    let mut queued: VecDeque<(RowKey, UnboundedReceiver<Event>)> = VecDeque::new();
    let mut next = 0;
    let mut asked = 0;
    while next < missing.len() || !queued.is_empty() {
        while next < missing.len() && queued.len() < window {
            let key = missing[next];
            let job = prepare(loaded, &model, key, image_token.as_deref(), &params)?;
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            scheduler
                .submit(Job { events: tx, ..job })
                .map_err(|e| Error::Model(e.to_string()))?;
            queued.push_back((key.clone(), rx));
            next += 1;
        }
        let Some((key, mut rx)) = queued.pop_front() else {
            break;
        };
        let answer = collect(&mut rx).map_err(|e| Error::Model(format!("index {key}: {e}")))?;
        let line = PredictionLine {
            index: key.clone(),
            prediction: answer.clone(),
            benchmark: Some(loaded.benchmark().name().into()),
        };
        let json = serde_json::to_string(&line).map_err(|e| Error::Config(e.to_string()))?;
        writeln!(out, "{json}")
            .and_then(|_| out.flush())
            .map_err(|e| Error::io(file, e))?;
        predictions.by_key.insert(key, answer);
        asked += 1;
        if let Some(bar) = &bar {
            bar.inc(1);
        }
    }
    if let Some(bar) = bar {
        bar.finish();
    }
    Ok(asked)
}

/// The job for one question (its event sender is filled in by the caller).
fn prepare(
    loaded: &Loaded,
    model: &MultimodalModel,
    key: &RowKey,
    image_token: Option<&str>,
    params: &GenerationParams,
) -> Result<Job> {
    let prompt = loaded.prompt(key)?;
    let named = |e: String| Error::Model(format!("index {key}: {e}"));
    let mut items = ItemsByKey::new();
    let text = if prompt.images.is_empty() {
        prompt.text
    } else {
        let token = image_token.ok_or_else(|| {
            named(
                "the question has images, but this model reads none (no `images` modality)".into(),
            )
        })?;
        items.insert(
            "images".into(),
            prompt.images.into_iter().map(Item::Bytes).collect(),
        );
        prompt.text.replace(IMAGE_TOKEN, token)
    };
    let messages = vec![Message::user(text)];
    let prepared = model
        .prepare_chat(&messages, &items)
        .map_err(|e| named(e.to_string()))?;
    let max_context = model.lm.model.max_context();
    if prepared.input_ids.len() >= max_context {
        return Err(named(format!(
            "the prompt takes {} positions, which leaves no room in the model's context of {max_context}",
            prepared.input_ids.len()
        )));
    }
    let embeds = model
        .embed(&prepared, &items)
        .map_err(|e| named(e.to_string()))?;
    let positions = model
        .positions(&prepared)
        .map_err(|e| named(e.to_string()))?;
    let (events, _) = tokio::sync::mpsc::unbounded_channel();
    Ok(Job {
        embeds,
        prompt_ids: prepared.input_ids,
        positions,
        params: params.clone(),
        events,
        // Benchmarks have no client to time out.
        deadline: Instant::now() + Duration::from_secs(365 * 24 * 3600),
    })
}

/// The whole answer of one job.
fn collect(rx: &mut UnboundedReceiver<Event>) -> std::result::Result<String, String> {
    let mut text = String::new();
    loop {
        match rx.blocking_recv() {
            Some(Event::Text(t)) => text.push_str(&t),
            Some(Event::Done(_)) => return Ok(text),
            Some(Event::Error(e)) => return Err(e),
            None => return Err("the scheduler stopped before the answer was done".into()),
        }
    }
}

fn progress_bar(enabled: bool, total: usize, done: usize) -> Option<indicatif::ProgressBar> {
    if !enabled {
        return None;
    }
    let bar = indicatif::ProgressBar::new(total as u64);
    let style = indicatif::ProgressStyle::with_template(
        "{bar:30} {pos}/{len} questions [{elapsed_precise}<{eta_precise}, {per_sec}]",
    )
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_position(done as u64);
    bar.reset_eta();
    Some(bar)
}
