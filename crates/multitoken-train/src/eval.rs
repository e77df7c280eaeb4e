//! `multitoken eval`: accuracy of a model on held-out rows.
//!
//! Each row's last assistant message is the reference; the messages before it
//! (and the row's items) are the prompt. The greedy reply is compared after
//! normalisation (lower case, punctuation and extra spaces removed): exact
//! match, and "contains" (the reference occurs in the reply).

use std::path::Path;

use multitoken_lm::generate::GenerationParams;
use multitoken_lm::loader::LoadOptions;
use multitoken_lm::multimodal::MultimodalModel;
use serde::Serialize;

use crate::{Error, Result};

/// One evaluated row.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EvalRow {
    /// Row id.
    pub id: String,
    /// The reference answer.
    pub reference: String,
    /// The model's reply.
    pub prediction: String,
    /// Normalised equality.
    pub exact: bool,
    /// Normalised reference contained in the normalised reply.
    pub contains: bool,
}

/// What `eval` reports.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EvalReport {
    /// Rows evaluated.
    pub rows: usize,
    /// Fraction of exact matches.
    pub exact_match: f64,
    /// Fraction of replies containing the reference.
    pub contains: f64,
    /// Every row.
    pub results: Vec<EvalRow>,
}

/// Lower case, ASCII punctuation dropped, whitespace collapsed.
pub fn normalize(text: &str) -> String {
    let cleaned: String = text
        .to_lowercase()
        .chars()
        .map(|c| if c.is_ascii_punctuation() { ' ' } else { c })
        .collect();
    cleaned.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Evaluates `model` on (at most `limit`) rows of `dataset`, greedy, up to
/// `max_new_tokens` per reply.
pub fn evaluate(
    model_dir: &Path,
    dataset: &Path,
    max_new_tokens: usize,
    limit: Option<usize>,
) -> Result<EvalReport> {
    let model = MultimodalModel::load(model_dir, &LoadOptions::default())?;
    let rows = crate::data::read_jsonl_for(dataset, &model)?;
    let mut params = GenerationParams {
        max_new_tokens,
        ..GenerationParams::default()
    };
    params.eos_token_ids = model.lm.generation.eos_token_ids.clone();
    let mut results = Vec::new();
    for row in rows.iter().take(limit.unwrap_or(usize::MAX)) {
        let Some(last) = row.messages.iter().rposition(|m| m.role == "assistant") else {
            continue;
        };
        let reference = row.messages[last].content.clone();
        let prepared = model
            .prepare_chat(&row.messages[..last], &row.items)
            .map_err(|e| Error::Row {
                file: dataset.to_path_buf(),
                line: row.line,
                id: row.id_suffix(),
                message: e.to_string(),
            })?;
        let output = model.generate(&prepared, &row.items, &params, &mut |_| true)?;
        let (p, r) = (normalize(&output.text), normalize(&reference));
        results.push(EvalRow {
            id: row.id.clone(),
            exact: p == r,
            contains: !r.is_empty() && p.contains(&r),
            reference,
            prediction: output.text,
        });
    }
    if results.is_empty() {
        return Err(Error::Config(format!(
            "{}: no row has an assistant answer to compare",
            dataset.display()
        )));
    }
    let n = results.len() as f64;
    Ok(EvalReport {
        rows: results.len(),
        exact_match: results.iter().filter(|r| r.exact).count() as f64 / n,
        contains: results.iter().filter(|r| r.contains).count() as f64 / n,
        results,
    })
}

#[cfg(test)]
mod tests {
    use super::normalize;

    #[test]
    fn normalisation_ignores_case_punctuation_and_spacing() {
        assert_eq!(normalize("  A red   Circle. "), "a red circle");
        assert_eq!(normalize("Yes!"), normalize("yes"));
        assert_ne!(normalize("red"), normalize("blue"));
    }
}
