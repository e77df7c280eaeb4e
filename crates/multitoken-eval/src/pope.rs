//! POPE (object hallucination, yes/no questions) scored as lmms-eval's
//! `tasks/pope/utils.py` does: the answer lower-cased and stripped must equal
//! `yes` or `no` exactly; accuracy over every row; precision and recall of
//! `yes`; F1; and lmms-eval's `yes_ratio`, the share of `yes` among the
//! *reference* answers. The POPE paper's yes-ratio (share of `yes` among the
//! model's answers) is `pred_yes_ratio`. An answer that is neither word counts
//! as unparsed (and wrong, as in lmms-eval).
//!
//! Prompt: lmms-eval's default, the image then `question` stripped and
//! `\nAnswer the question using a single word or phrase.`

use crate::bench::{keyed_rows, KeyedRows};
use crate::images::RowImages;
use crate::pytext::py_strip;
use crate::score::{mean, require_predictions, Predictions, Scored, Scores};
use crate::table::{RowKey, Table};
use crate::{Prompt, Result};

/// lmms-eval's `post_prompt` for POPE and VQAv2.
pub const SHORT_ANSWER: &str = "\nAnswer the question using a single word or phrase.";

/// A loaded POPE file.
#[derive(Debug, Clone)]
pub struct Pope {
    rows: KeyedRows,
    answers: Vec<String>,
    images: RowImages,
}

impl Pope {
    /// Reads `question`, `answer` (yes/no in any case), the key (`index`,
    /// `question_id` or `id`), `category` and `image`.
    pub fn load(table: Table) -> Result<Self> {
        table.require("POPE", &["question", "answer"])?;
        let rows = keyed_rows(table, "POPE")?;
        let mut answers = Vec::new();
        for record in &rows.table.rows {
            let answer = record
                .text("answer")
                .map(|a| py_strip(&a.to_lowercase()).to_string());
            match answer.as_deref() {
                Some("yes") | Some("no") => answers.push(answer.unwrap_or_default()),
                other => {
                    return Err(rows.table.row_error(
                        record,
                        format!(
                            "the answer must be yes or no, not {}",
                            other.map(|a| format!("`{a}`")).unwrap_or("empty".into())
                        ),
                    ))
                }
            }
            if record.text("question").is_none() {
                return Err(rows.table.row_error(record, "no `question`"));
            }
        }
        let images = rows.images("image")?;
        Ok(Self {
            rows,
            answers,
            images,
        })
    }

    /// The row with `key`.
    pub fn position(&self, key: &RowKey) -> Option<usize> {
        self.rows.row_of(key)
    }

    /// The keys to answer (the first `limit`).
    pub fn keys(&self, limit: Option<usize>) -> Vec<RowKey> {
        self.rows.first_keys(limit)
    }

    /// lmms-eval's prompt for row `i`.
    pub fn prompt(&self, i: usize) -> Result<Prompt> {
        let record = &self.rows.table.rows[i];
        let question = record.text("question").unwrap_or_default();
        let text = format!("{}{SHORT_ANSWER}", py_strip(&question));
        Ok(Prompt::images_first(
            self.rows.decode_images(&self.images, i)?,
            text,
        ))
    }

    /// Scores the first `limit` rows.
    pub fn score(&self, predictions: &Predictions, limit: Option<usize>) -> Result<Scores> {
        let keys = self.keys(limit);
        require_predictions(predictions, &keys)?;
        let mut scores = Scores::default();
        let (mut tp, mut fp, mut fneg, mut pred_yes, mut gt_yes) =
            (0usize, 0usize, 0usize, 0usize, 0usize);
        for (i, key) in keys.iter().enumerate() {
            let record = &self.rows.table.rows[i];
            let prediction = predictions.get(key).unwrap_or_default();
            let pred = py_strip(&prediction.to_lowercase()).to_string();
            let gt = &self.answers[i];
            match (gt.as_str(), pred.as_str()) {
                ("yes", "yes") => tp += 1,
                ("no", "yes") => fp += 1,
                ("yes", "no") => fneg += 1,
                _ => {}
            }
            pred_yes += usize::from(pred == "yes");
            gt_yes += usize::from(gt == "yes");
            let parsed = matches!(pred.as_str(), "yes" | "no");
            scores.rows.push(Scored {
                index: key.clone(),
                score: if &pred == gt { 1.0 } else { 0.0 },
                category: record.text("category"),
                sub_category: None,
                split: None,
                answer: gt.clone(),
                prediction: prediction.to_string(),
                parsed: parsed.then(|| pred.clone()),
                unparsed: !parsed,
            });
        }
        let n = keys.len();
        let ratio = |a: usize, b: usize| if b > 0 { a as f64 / b as f64 } else { 0.0 };
        let precision = ratio(tp, tp + fp);
        let recall = ratio(tp, tp + fneg);
        let f1 = if precision + recall > 0.0 {
            2.0 * precision * recall / (precision + recall)
        } else {
            0.0
        };
        scores
            .metrics
            .insert("accuracy".into(), mean(scores.rows.iter().map(|r| r.score)));
        scores.metrics.insert("precision".into(), precision);
        scores.metrics.insert("recall".into(), recall);
        scores.metrics.insert("f1".into(), f1);
        scores.metrics.insert("yes_ratio".into(), ratio(gt_yes, n));
        scores
            .metrics
            .insert("pred_yes_ratio".into(), ratio(pred_yes, n));
        Ok(scores)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn metrics_follow_lmms_eval() {
        let table = Table::from_tsv(
            Path::new("p.tsv"),
            "index\tquestion\tanswer\tcategory\n1\tIs there a dog?\tYes\tadversarial\n2\tIs there a cat?\tno\tadversarial\n3\tq\tyes\trandom\n4\tq\tno\trandom\n5\tq\tyes\trandom\n",
        )
        .unwrap();
        let pope = Pope::load(table).unwrap();
        let p = Predictions {
            by_key: [(1, " Yes "), (2, "yes"), (3, "Yes."), (4, "NO"), (5, "no")]
                .iter()
                .map(|(k, v)| (RowKey::Int(*k), v.to_string()))
                .collect(),
        };
        let s = pope.score(&p, None).unwrap();
        // right: 1 (yes/yes), 4 (no/no) -> 2/5; "Yes." is neither word.
        assert_eq!(s.metrics["accuracy"], 0.4);
        // tp 1, fp 1 (row 2), fn 1 (row 5; row 3's "yes." is no "no").
        assert_eq!(s.metrics["precision"], 0.5);
        assert_eq!(s.metrics["recall"], 0.5);
        assert_eq!(s.metrics["f1"], 0.5);
        assert_eq!(s.metrics["yes_ratio"], 0.6);
        assert_eq!(s.metrics["pred_yes_ratio"], 0.4);
        assert_eq!(s.rows.iter().filter(|r| r.unparsed).count(), 1);
        assert_eq!(
            pope.prompt(0).unwrap().text,
            "Is there a dog?\nAnswer the question using a single word or phrase."
        );
    }

    #[test]
    fn a_reference_that_is_not_yes_or_no_is_an_error() {
        let table =
            Table::from_tsv(Path::new("p.tsv"), "index\tquestion\tanswer\n1\tq\tmaybe\n").unwrap();
        let e = Pope::load(table).err().map(|e| e.to_string());
        assert_eq!(
            e.as_deref(),
            Some("p.tsv:2: the answer must be yes or no, not `maybe`")
        );
    }
}
