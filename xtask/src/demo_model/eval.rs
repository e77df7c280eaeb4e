//! Accuracy of a model on dataset rows: greedy answers judged by
//! `multitoken_datasets::judge` (the answer must name the same shape, colour,
//! count, pitch, topic or image position as the reference).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use multitoken_core::{Item, ItemsByKey, Message};
use multitoken_datasets::{judge, Row};
use multitoken_lm::generate::GenerationParams;
use multitoken_lm::loader::LoadOptions;
use multitoken_lm::multimodal::MultimodalModel;

/// Per-task and overall accuracy.
#[derive(Debug, Default)]
pub struct Report {
    /// task -> (correct, total).
    pub by_task: BTreeMap<String, (usize, usize)>,
}

impl Report {
    /// Correct answers over all rows.
    pub fn accuracy(&self) -> f64 {
        let (c, t) = self
            .by_task
            .values()
            .fold((0, 0), |(c, t), (a, b)| (c + a, t + b));
        if t == 0 {
            0.0
        } else {
            c as f64 / t as f64
        }
    }
}

/// Links every modality crate so their builders are registered.
pub fn link_modalities() {
    multitoken_vision::link();
    multitoken_audio::link();
    multitoken_document::link();
}

/// Loads `model_dir` and answers the first `limit` rows of `jsonl`.
pub fn evaluate(model_dir: &Path, jsonl: &Path, limit: usize, verbose: bool) -> Result<Report> {
    link_modalities();
    let model = MultimodalModel::load(model_dir, &LoadOptions::default())
        .with_context(|| format!("loading {}", model_dir.display()))?;
    let base = jsonl.parent().unwrap_or(Path::new("."));
    let text =
        std::fs::read_to_string(jsonl).with_context(|| format!("reading {}", jsonl.display()))?;
    let mut report = Report::default();
    for (n, line) in text.lines().enumerate().take(limit) {
        let row: Row =
            serde_json::from_str(line).with_context(|| format!("{}:{}", jsonl.display(), n + 1))?;
        let answer = answer(&model, &row, base)?;
        // Multi-turn rows are judged on their last answer, given the chat before it.
        let ok = judge(row.last_answer(), &answer);
        let task = row.id.split('-').nth(1).unwrap_or("?").to_string();
        let entry = report.by_task.entry(task).or_default();
        entry.1 += 1;
        if ok {
            entry.0 += 1;
        }
        if verbose && !ok {
            println!(
                "  wrong {}: {:?} -> {:?} (want {:?})",
                row.id,
                row.prompt().last().map_or("", |m| m.content.as_str()),
                answer,
                row.last_answer()
            );
        }
    }
    Ok(report)
}

/// The model's greedy answer to a row's last question, given the chat before
/// it (one question for single-turn rows).
pub fn answer(model: &MultimodalModel, row: &Row, base: &Path) -> Result<String> {
    let mut items = ItemsByKey::new();
    for (key, paths) in [
        ("images", &row.images),
        ("speech_audios", &row.speech_audios),
        ("documents", &row.documents),
    ] {
        if !paths.is_empty() {
            items.insert(
                key.to_string(),
                paths.iter().map(|p| Item::Path(base.join(p))).collect(),
            );
        }
    }
    let messages: Vec<Message> = row
        .prompt()
        .iter()
        .map(|m| Message {
            role: m.role.clone(),
            content: m.content.clone(),
        })
        .collect();
    let prepared = model.prepare_chat(&messages, &items)?;
    let params = GenerationParams {
        max_new_tokens: 64,
        eos_token_ids: model.lm.generation.eos_token_ids.clone(),
        ..GenerationParams::default()
    };
    let out = model.generate(&prepared, &items, &params, &mut |_| true)?;
    Ok(out.text.trim().to_string())
}

/// Prints a report.
pub fn print(report: &Report) {
    for (task, (c, t)) in &report.by_task {
        println!(
            "  {task:<16} {c:>4}/{t:<4} {:.1}%",
            100.0 * *c as f64 / (*t).max(1) as f64
        );
    }
    println!("  overall          {:.1}%", 100.0 * report.accuracy());
}
