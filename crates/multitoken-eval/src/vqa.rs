//! VQAv2-style accuracy as lmms-eval's `tasks/vqav2/utils.py` computes it:
//! the answer and each of the (usually ten) reference answers have newlines
//! and tabs turned into spaces and are stripped, then go through EvalAI's
//! `process_punctuation` and `process_digit_article`; the score is the mean,
//! over each reference answer left out in turn, of `min(#other references
//! equal to the answer / 3, 1)`.
//!
//! Rows: `question`, the key (`index`, `question_id` or `id`), the references
//! as `answers` (a list of strings or of `{"answer": ...}` objects, or that
//! list's JSON / Python text in a TSV cell) or `answer` (the same, or one
//! answer), `image`, and optionally `answer_type` / `question_type`.

use std::sync::OnceLock;

use serde_json::Value;

use crate::bench::{keyed_rows, KeyedRows};
use crate::images::RowImages;
use crate::pope::SHORT_ANSWER;
use crate::pytext::{py_split, py_strip};
use crate::score::{require_predictions, Predictions, Scored, Scores};
use crate::table::{Record, RowKey, Table};
use crate::{Prompt, Result};

const CONTRACTIONS: &[(&str, &str)] = &[
    ("aint", "ain't"),
    ("arent", "aren't"),
    ("cant", "can't"),
    ("couldve", "could've"),
    ("couldnt", "couldn't"),
    ("couldn'tve", "couldn't've"),
    ("couldnt've", "couldn't've"),
    ("didnt", "didn't"),
    ("doesnt", "doesn't"),
    ("dont", "don't"),
    ("hadnt", "hadn't"),
    ("hadnt've", "hadn't've"),
    ("hadn'tve", "hadn't've"),
    ("hasnt", "hasn't"),
    ("havent", "haven't"),
    ("hed", "he'd"),
    ("hed've", "he'd've"),
    ("he'dve", "he'd've"),
    ("hes", "he's"),
    ("howd", "how'd"),
    ("howll", "how'll"),
    ("hows", "how's"),
    ("Id've", "I'd've"),
    ("I'dve", "I'd've"),
    ("Im", "I'm"),
    ("Ive", "I've"),
    ("isnt", "isn't"),
    ("itd", "it'd"),
    ("itd've", "it'd've"),
    ("it'dve", "it'd've"),
    ("itll", "it'll"),
    ("let's", "let's"),
    ("maam", "ma'am"),
    ("mightnt", "mightn't"),
    ("mightnt've", "mightn't've"),
    ("mightn'tve", "mightn't've"),
    ("mightve", "might've"),
    ("mustnt", "mustn't"),
    ("mustve", "must've"),
    ("neednt", "needn't"),
    ("notve", "not've"),
    ("oclock", "o'clock"),
    ("oughtnt", "oughtn't"),
    ("ow's'at", "'ow's'at"),
    ("'ows'at", "'ow's'at"),
    ("'ow'sat", "'ow's'at"),
    ("shant", "shan't"),
    ("shed've", "she'd've"),
    ("she'dve", "she'd've"),
    ("she's", "she's"),
    ("shouldve", "should've"),
    ("shouldnt", "shouldn't"),
    ("shouldnt've", "shouldn't've"),
    ("shouldn'tve", "shouldn't've"),
    ("somebody'd", "somebodyd"),
    ("somebodyd've", "somebody'd've"),
    ("somebody'dve", "somebody'd've"),
    ("somebodyll", "somebody'll"),
    ("somebodys", "somebody's"),
    ("someoned", "someone'd"),
    ("someoned've", "someone'd've"),
    ("someone'dve", "someone'd've"),
    ("someonell", "someone'll"),
    ("someones", "someone's"),
    ("somethingd", "something'd"),
    ("somethingd've", "something'd've"),
    ("something'dve", "something'd've"),
    ("somethingll", "something'll"),
    ("thats", "that's"),
    ("thered", "there'd"),
    ("thered've", "there'd've"),
    ("there'dve", "there'd've"),
    ("therere", "there're"),
    ("theres", "there's"),
    ("theyd", "they'd"),
    ("theyd've", "they'd've"),
    ("they'dve", "they'd've"),
    ("theyll", "they'll"),
    ("theyre", "they're"),
    ("theyve", "they've"),
    ("twas", "'twas"),
    ("wasnt", "wasn't"),
    ("wed've", "we'd've"),
    ("we'dve", "we'd've"),
    ("weve", "we've"),
    ("werent", "weren't"),
    ("whatll", "what'll"),
    ("whatre", "what're"),
    ("whats", "what's"),
    ("whatve", "what've"),
    ("whens", "when's"),
    ("whered", "where'd"),
    ("wheres", "where's"),
    ("whereve", "where've"),
    ("whod", "who'd"),
    ("whod've", "who'd've"),
    ("who'dve", "who'd've"),
    ("wholl", "who'll"),
    ("whos", "who's"),
    ("whove", "who've"),
    ("whyll", "why'll"),
    ("whyre", "why're"),
    ("whys", "why's"),
    ("wont", "won't"),
    ("wouldve", "would've"),
    ("wouldnt", "wouldn't"),
    ("wouldnt've", "wouldn't've"),
    ("wouldn'tve", "wouldn't've"),
    ("yall", "y'all"),
    ("yall'll", "y'all'll"),
    ("y'allll", "y'all'll"),
    ("yall'd've", "y'all'd've"),
    ("y'alld've", "y'all'd've"),
    ("y'all'dve", "y'all'd've"),
    ("youd", "you'd"),
    ("youd've", "you'd've"),
    ("you'dve", "you'd've"),
    ("youll", "you'll"),
    ("youre", "you're"),
    ("youve", "you've"),
];

const NUMBERS: &[(&str, &str)] = &[
    ("none", "0"),
    ("zero", "0"),
    ("one", "1"),
    ("two", "2"),
    ("three", "3"),
    ("four", "4"),
    ("five", "5"),
    ("six", "6"),
    ("seven", "7"),
    ("eight", "8"),
    ("nine", "9"),
    ("ten", "10"),
];

const ARTICLES: &[&str] = &["a", "an", "the"];

const PUNCTUATIONS: &[&str] = &[
    ";", "/", "[", "]", "\"", "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
    ",", "?", "!",
];

/// EvalAI's period rule removes at most this many periods: the reference
/// passes `re.UNICODE` (32) where `re.sub` takes its `count`.
const PERIOD_LIMIT: usize = 32;

fn comma_between_digits() -> Option<&'static fancy_regex::Regex> {
    static RE: OnceLock<Option<fancy_regex::Regex>> = OnceLock::new();
    RE.get_or_init(|| fancy_regex::Regex::new(r"(?<=\d)(\,)+(?=\d)").ok())
        .as_ref()
}

/// EvalAI's `process_punctuation`: each punctuation mark is deleted when it
/// touches a space somewhere in the text (or the text has a comma between
/// digits), else replaced by a space; then periods not followed by a digit go.
pub fn process_punctuation(text: &str) -> String {
    let comma_number = comma_between_digits().is_some_and(|re| re.is_match(text).unwrap_or(false));
    let mut out = text.to_string();
    for p in PUNCTUATIONS {
        let touches_space = text.contains(&format!("{p} ")) || text.contains(&format!(" {p}"));
        out = out.replace(
            p,
            if touches_space || comma_number {
                ""
            } else {
                " "
            },
        );
    }
    // `(?!<=\d)(\.)(?!\d)`: the first group is a look-ahead (not the look-behind
    // it was meant to be) that always holds, so every period not followed by a
    // digit goes, up to the limit.
    let Some(period) = period_not_before_digit() else {
        return out;
    };
    let mut kept = String::with_capacity(out.len());
    let mut last = 0;
    for found in period.find_iter(&out).take(PERIOD_LIMIT) {
        let Ok(found) = found else { break };
        kept.push_str(&out[last..found.start()]);
        last = found.end();
    }
    kept.push_str(&out[last..]);
    kept
}

fn period_not_before_digit() -> Option<&'static fancy_regex::Regex> {
    static RE: OnceLock<Option<fancy_regex::Regex>> = OnceLock::new();
    RE.get_or_init(|| fancy_regex::Regex::new(r"\.(?!\d)").ok())
        .as_ref()
}

/// EvalAI's `process_digit_article`: lower case, number words to digits,
/// articles dropped, contractions given their apostrophes.
pub fn process_digit_article(text: &str) -> String {
    let lower = text.to_lowercase();
    let words: Vec<String> = py_split(&lower)
        .into_iter()
        .map(|w| {
            NUMBERS
                .iter()
                .find(|(k, _)| *k == w)
                .map(|(_, v)| *v)
                .unwrap_or(w)
        })
        .filter(|w| !ARTICLES.contains(w))
        .map(|w| {
            CONTRACTIONS
                .iter()
                .find(|(k, _)| *k == w)
                .map(|(_, v)| v.to_string())
                .unwrap_or_else(|| w.to_string())
        })
        .collect();
    words.join(" ")
}

/// An answer as lmms-eval compares it.
pub fn normalize_answer(text: &str) -> String {
    let flat = text.replace(['\n', '\t'], " ");
    process_digit_article(&process_punctuation(py_strip(&flat)))
}

/// lmms-eval's VQAv2 accuracy of `prediction` against `references`.
pub fn vqa_accuracy(prediction: &str, references: &[String]) -> f64 {
    let prediction = normalize_answer(prediction);
    let refs: Vec<String> = references.iter().map(|r| normalize_answer(r)).collect();
    if refs.is_empty() {
        return 0.0;
    }
    let total: f64 = (0..refs.len())
        .map(|left_out| {
            let matches = refs
                .iter()
                .enumerate()
                .filter(|(j, r)| *j != left_out && **r == prediction)
                .count();
            (matches as f64 / 3.0).min(1.0)
        })
        .sum();
    total / refs.len() as f64
}

/// A Python or JSON list literal of strings (`['a', "b"]`), `None` when the text is no list.
pub fn parse_string_list(text: &str) -> Option<Vec<String>> {
    let t = text.trim();
    if let Ok(Value::Array(items)) = serde_json::from_str::<Value>(t) {
        return items.iter().map(answer_of).collect();
    }
    let inner = t.strip_prefix('[')?.strip_suffix(']')?;
    let mut out = Vec::new();
    let mut chars = inner.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace() || *c == ',') {
            chars.next();
        }
        let Some(quote) = chars.next() else { break };
        if quote != '\'' && quote != '"' {
            return None;
        }
        let mut item = String::new();
        loop {
            match chars.next()? {
                '\\' => {
                    let escaped = chars.next()?;
                    item.push(match escaped {
                        'n' => '\n',
                        't' => '\t',
                        other => other,
                    });
                }
                c if c == quote => break,
                c => item.push(c),
            }
        }
        out.push(item);
    }
    Some(out)
}

fn answer_of(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Object(map) => map
            .get("answer")
            .and_then(|a| a.as_str())
            .map(str::to_string),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn references(record: &Record) -> Option<Vec<String>> {
    for column in ["answers", "answer"] {
        match record.value(column) {
            Some(Value::Array(items)) => return items.iter().map(answer_of).collect(),
            Some(Value::String(s)) => {
                return Some(parse_string_list(s).unwrap_or_else(|| vec![s.clone()]));
            }
            Some(Value::Number(n)) => return Some(vec![n.to_string()]),
            _ => {}
        }
    }
    None
}

/// A loaded VQAv2-style file.
#[derive(Debug, Clone)]
pub struct Vqa {
    rows: KeyedRows,
    references: Vec<Vec<String>>,
    images: RowImages,
}

impl Vqa {
    /// Reads the rows; a row with no readable reference answers is an error naming it.
    pub fn load(table: Table) -> Result<Self> {
        table.require("VQAv2", &["question"])?;
        if !table.has("answers") && !table.has("answer") {
            return Err(crate::Error::File {
                file: table.file.clone(),
                message: format!(
                    "not a VQAv2 file: no `answers` or `answer` column (its columns: {})",
                    table.columns.join(", ")
                ),
            });
        }
        let rows = keyed_rows(table, "VQAv2")?;
        let mut all = Vec::new();
        for record in &rows.table.rows {
            match references(record) {
                Some(refs) if !refs.is_empty() => all.push(refs),
                _ => {
                    return Err(rows.table.row_error(
                        record,
                        "no reference answers (`answers` / `answer` is empty or unreadable)",
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
            references: all,
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

    /// lmms-eval's prompt: the image, the question, then the short-answer instruction.
    pub fn prompt(&self, i: usize) -> Result<Prompt> {
        let question = self.rows.table.rows[i].text("question").unwrap_or_default();
        Ok(Prompt::images_first(
            self.rows.decode_images(&self.images, i)?,
            format!("{question}{SHORT_ANSWER}"),
        ))
    }

    /// Scores the first `limit` rows.
    pub fn score(&self, predictions: &Predictions, limit: Option<usize>) -> Result<Scores> {
        let keys = self.keys(limit);
        require_predictions(predictions, &keys)?;
        let mut scores = Scores::default();
        for (i, key) in keys.iter().enumerate() {
            let record = &self.rows.table.rows[i];
            let prediction = predictions.get(key).unwrap_or_default();
            let normalized = normalize_answer(prediction);
            scores.rows.push(Scored {
                index: key.clone(),
                score: vqa_accuracy(prediction, &self.references[i]),
                category: record.text("answer_type"),
                sub_category: record.text("question_type"),
                split: None,
                answer: self.references[i].join(" | "),
                prediction: prediction.to_string(),
                unparsed: normalized.is_empty(),
                parsed: Some(normalized),
            });
        }
        Ok(scores)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn punctuation_rules() {
        // No mark touches a space: marks become spaces.
        assert_eq!(process_punctuation("red/blue"), "red blue");
        // A mark touching a space anywhere: every such mark is deleted.
        assert_eq!(
            process_punctuation("yes - it's red-ish"),
            "yes  it's redish"
        );
        // A comma between digits: all marks are deleted.
        assert_eq!(process_punctuation("1,000 (approx)"), "1000 approx");
        // Periods go unless a digit follows.
        assert_eq!(process_punctuation("3.5 m. ok."), "3.5 m ok");
    }

    #[test]
    fn period_rule_stops_after_32() {
        let text = ".".repeat(40);
        assert_eq!(process_punctuation(&text), ".".repeat(8));
    }

    #[test]
    fn digits_articles_contractions() {
        assert_eq!(process_digit_article("The Two dogs"), "2 dogs");
        assert_eq!(process_digit_article("an apple isnt none"), "apple isn't 0");
        // The table's capitalised keys never match after lower-casing, as in EvalAI.
        assert_eq!(process_digit_article("Im here"), "im here");
    }

    #[test]
    fn accuracy_is_min_matches_over_three_averaged_over_left_out_answers() {
        let refs = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let ten_yes = refs(&["yes"; 10]);
        assert_eq!(vqa_accuracy("Yes", &ten_yes), 1.0);
        // Two "2" among ten: each left-out subset has 1 or 2 matches -> (8 * 2/3 + 2 * 1/3) / 10.
        let two = refs(&["2", "2", "3", "3", "3", "3", "3", "3", "3", "3"]);
        assert!((vqa_accuracy("two", &two) - (8.0 * 2.0 / 3.0 + 2.0 / 3.0) / 10.0).abs() < 1e-12);
        // Three matches: 7 subsets with 3 (1.0), 3 with 2 (2/3).
        let three = refs(&[
            "cat", "cat", "cat", "dog", "dog", "dog", "dog", "dog", "dog", "dog",
        ]);
        assert!((vqa_accuracy("a cat.", &three) - (7.0 + 3.0 * 2.0 / 3.0) / 10.0).abs() < 1e-12);
        assert_eq!(vqa_accuracy("mouse", &three), 0.0);
    }

    #[test]
    fn reference_lists_in_cells() {
        assert_eq!(
            parse_string_list("['a', \"b's\", 'c\\'d']"),
            Some(vec!["a".into(), "b's".into(), "c'd".into()])
        );
        assert_eq!(
            parse_string_list("[\"x\", {\"answer\": \"y\"}]"),
            Some(vec!["x".into(), "y".into()])
        );
        assert_eq!(parse_string_list("just text"), None);
    }
}
