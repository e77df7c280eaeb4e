//! What every benchmark's scorer returns: one scored unit per question (an
//! MMBench question with all its circular copies is one unit), extra metrics
//! (POPE's precision, recall, ...), and notes worth printing.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use crate::table::RowKey;
use crate::{Error, Result};

/// One scored question.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Scored {
    /// The question's row key (MMBench: the original's index).
    pub index: RowKey,
    /// 0..1 (VQA gives thirds; the others 0 or 1).
    pub score: f64,
    /// Category (MMBench `l2-category`, MMMU domain, POPE `category`, VQA `answer_type`).
    pub category: Option<String>,
    /// Sub-category (MMBench `category`, MMMU subject, VQA `question_type`).
    pub sub_category: Option<String>,
    /// The row's `split` (MMBench dev/test, MMMU dev/validation), if any.
    pub split: Option<String>,
    /// The reference answer.
    pub answer: String,
    /// The model's answer (MMBench: every rotation's, joined by ` || `).
    pub prediction: String,
    /// What the rules read from it (an option letter, a normalised answer).
    pub parsed: Option<String>,
    /// No answer could be read from the prediction (counted, scored wrong).
    pub unparsed: bool,
}

/// A benchmark's scores.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Scores {
    /// Every question.
    pub rows: Vec<Scored>,
    /// Extra metrics by name, each in [0, 1].
    pub metrics: BTreeMap<String, f64>,
    /// Warnings (circular copies without their original, ...).
    pub notes: Vec<String>,
}

/// The predictions of one file, by row key.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Predictions {
    /// Prediction text by key.
    pub by_key: HashMap<RowKey, String>,
}

impl Predictions {
    /// The prediction for `key`, or an error saying how to get it.
    pub fn get(&self, key: &RowKey) -> Option<&str> {
        self.by_key.get(key).map(String::as_str)
    }
}

/// Fails unless every key in `needed` has a prediction, naming the first
/// missing ones and their count.
pub fn require_predictions(predictions: &Predictions, needed: &[RowKey]) -> Result<()> {
    let missing: Vec<&RowKey> = needed
        .iter()
        .filter(|k| !predictions.by_key.contains_key(k))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let shown: Vec<String> = missing.iter().take(5).map(|k| k.to_string()).collect();
    Err(Error::Config(format!(
        "{} of {} rows have no prediction (index {}{}); score the rows that have one with --limit, or fill them with --model",
        missing.len(),
        needed.len(),
        shown.join(", "),
        if missing.len() > shown.len() { ", ..." } else { "" }
    )))
}

/// Mean of `values` (0 for none).
pub fn mean(values: impl IntoIterator<Item = f64>) -> f64 {
    let (sum, n) = values
        .into_iter()
        .fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    if n == 0 {
        0.0
    } else {
        sum / n as f64
    }
}
