//! MMMU scored by the official MMMU rules as lmms-eval 0.7 implements them
//! (`tasks/mmmu/utils.py`, `tasks/_task_utils/mmmu_mcq_utils.py`).
//!
//! Multiple choice (`parse_mmmu_multi_choice_response`): the answer with
//! `,.!?;:'` stripped from both ends and padded with spaces; candidates are
//! the letters written `(A)`, else followed by a space (`A `), else by a
//! period (`A.`), else — for answers of more than five words — the options
//! whose text occurs in it; several candidates: the one written last; none:
//! a random letter (Python's `random.choice` after `random.seed(0)`, the rows
//! taken in file order; such rows are counted as unparsed).
//!
//! Open answers (`parse_open_response`, `eval_open`): the text after the last
//! key phrase (`could be`, `so`, `is`, `thus`, `therefore`, `final`, `answer`,
//! `result`, and `=` on the last line) in each line, with every number in
//! them; numbers are compared as values rounded to two places, text by
//! containment of the normalised reference.
//!
//! Accuracy per subject, and instance-weighted per domain and overall (which
//! is the plain mean over the questions of the domain, or of all).
//!
//! Files: VLMEvalKit's `MMMU_DEV_VAL.tsv` (`index, question, A.., answer, id,
//! category, split, image`; no options = an open question) or the Hugging Face
//! layout (`id, question, options, answer, question_type, image_1..image_7`),
//! its parquet files or JSON Lines. `<image k>` markers in the question and options become
//! the model's image token with image `k` in its place (the interleaved format).

use std::sync::OnceLock;

use crate::bench::{keyed_rows, KeyedRows};
use crate::images::{decode, RowImages};
use crate::pytext::{py_float, py_len, py_round2, py_split, py_strip, py_strip_char, PyRandom};
use crate::score::{require_predictions, Predictions, Scored, Scores};
use crate::table::{RowKey, Table};
use crate::vqa::parse_string_list;
use crate::{Prompt, Result, IMAGE_TOKEN};

/// lmms-eval's instruction after a multiple-choice question.
pub const MC_PROMPT: &str = "Answer with the option's letter from the given choices directly.";
/// lmms-eval's instruction after an open question.
pub const OPEN_PROMPT: &str = "Answer the question using a single word or phrase.";

/// MMMU's six disciplines and their subjects (the official `DOMAIN_CAT2SUB_CAT`).
pub const DOMAINS: &[(&str, &[&str])] = &[
    ("Art and Design", &["Art", "Art_Theory", "Design", "Music"]),
    (
        "Business",
        &["Accounting", "Economics", "Finance", "Manage", "Marketing"],
    ),
    (
        "Science",
        &["Biology", "Chemistry", "Geography", "Math", "Physics"],
    ),
    (
        "Health and Medicine",
        &[
            "Basic_Medical_Science",
            "Clinical_Medicine",
            "Diagnostics_and_Laboratory_Medicine",
            "Pharmacy",
            "Public_Health",
        ],
    ),
    (
        "Humanities and Social Science",
        &["History", "Literature", "Sociology", "Psychology"],
    ),
    (
        "Tech and Engineering",
        &[
            "Agriculture",
            "Architecture_and_Engineering",
            "Computer_Science",
            "Electronics",
            "Energy_and_Power",
            "Materials",
            "Mechanical_Engineering",
        ],
    ),
];

/// The domain of a subject (`Art_Theory` or `Art Theory`), if it is one of MMMU's 30.
pub fn domain_of(subject: &str) -> Option<&'static str> {
    let key = subject.replace(' ', "_");
    DOMAINS
        .iter()
        .find(|(_, subjects)| subjects.contains(&key.as_str()))
        .map(|(d, _)| *d)
}

/// `extract_subset_name`: the subject in an id `{split}_{Subject_Name}_{n}`.
pub fn subject_of_id(id: &str) -> Option<String> {
    // `^{split}_(.+?)_\d+$` with `split` the text before the first `_`: the lazy
    // group ends at the first later `_` after which only digits follow.
    let (_, rest) = id.split_once('_')?;
    let end = rest.match_indices('_').map(|(i, _)| i).find(|&i| {
        let tail = &rest[i + 1..];
        i > 0 && !tail.is_empty() && tail.chars().all(|c| c.is_ascii_digit())
    })?;
    Some(rest[..end].to_string())
}

/// What `parse_open_response` returns: text or a number (rounded to two places).
#[derive(Debug, Clone, PartialEq)]
pub enum OpenPred {
    /// A lower-cased piece of the answer.
    Text(String),
    /// A number.
    Num(f64),
}

/// `normalize_str`: a number (commas dropped) rounded to two places, else the
/// lower-cased text; a one-character text becomes `" x"` and `"x "` so it only
/// matches as a word.
pub fn normalize_str(text: &str) -> Vec<OpenPred> {
    let t = py_strip(text);
    if let Some(x) = py_float(&t.replace(',', "")) {
        return vec![OpenPred::Num(py_round2(x))];
    }
    let lower = t.to_lowercase();
    if py_len(&lower) == 1 {
        return vec![
            OpenPred::Text(format!(" {lower}")),
            OpenPred::Text(format!("{lower} ")),
        ];
    }
    vec![OpenPred::Text(lower)]
}

fn number_patterns() -> &'static [fancy_regex::Regex] {
    static RES: OnceLock<Vec<fancy_regex::Regex>> = OnceLock::new();
    RES.get_or_init(|| {
        [
            r"-?\b\d{1,3}(?:,\d{3})+\b",
            r"-?\d+(?:\.\d+)?[eE][+-]?\d+",
            r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])",
        ]
        .iter()
        .filter_map(|p| fancy_regex::Regex::new(p).ok())
        .collect()
    })
}

/// `extract_numbers`: numbers with thousands commas, then in scientific
/// notation, then plain ones, each pattern's matches in order.
pub fn extract_numbers(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for re in number_patterns() {
        for found in re.find_iter(text).flatten() {
            out.push(found.as_str().to_string());
        }
    }
    out
}

const KEY_PHRASES: &[&str] = &[
    "could be ",
    "so ",
    "is ",
    "thus ",
    "therefore ",
    "final ",
    "answer ",
    "result ",
];
const TRIVIAL: &[&str] = &[":", ",", ".", "!", "?", ";", "'"];

/// `parse_open_response`: the candidate answers of a free-form reply.
pub fn parse_open_response(response: &str) -> Vec<OpenPred> {
    let response = py_strip_char(py_strip(response), '.').to_lowercase();
    // `re.split(r"\.\s(?=[A-Z])|\n", ...)` runs on the lower-cased text, so only
    // newlines ever split it.
    let lines: Vec<&str> = response.split('\n').collect();
    let mut keys: Vec<String> = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let last = i + 1 == lines.len();
        let mut shortest: Option<String> = None;
        for phrase in KEY_PHRASES.iter().copied().chain(last.then_some("=")) {
            if let Some(pos) = line.rfind(phrase) {
                let tail = py_strip(&line[pos + phrase.len()..]).to_string();
                // An empty candidate is falsy in Python: the next one replaces it.
                let replace = match &shortest {
                    None => true,
                    Some(s) if s.is_empty() => true,
                    Some(s) => py_len(&tail) < py_len(s),
                };
                if replace {
                    shortest = Some(tail);
                }
            }
        }
        if let Some(s) = shortest {
            if !s.is_empty() && !TRIVIAL.contains(&py_strip(&s)) {
                keys.push(s);
            }
        }
    }
    if keys.is_empty() {
        keys.push(response.clone());
    }
    let mut candidates: Vec<String> = keys.clone();
    for k in &keys {
        candidates.extend(extract_numbers(k));
    }
    let mut out: Vec<OpenPred> = Vec::new();
    for c in &candidates {
        for p in normalize_str(c) {
            if !out.contains(&p) {
                out.push(p);
            }
        }
    }
    out
}

/// `eval_open`: a number candidate equal to a number reference, or a text
/// candidate containing a text reference.
pub fn eval_open(answer: &str, preds: &[OpenPred]) -> bool {
    let refs = normalize_str(answer);
    preds.iter().any(|p| match p {
        OpenPred::Text(t) => refs
            .iter()
            .any(|r| matches!(r, OpenPred::Text(r) if t.contains(r.as_str()))),
        OpenPred::Num(x) => refs.iter().any(|r| matches!(r, OpenPred::Num(y) if x == y)),
    })
}

/// How a multiple-choice reply was read.
#[derive(Debug, Clone, PartialEq)]
pub struct McParse {
    /// The letter chosen.
    pub letter: char,
    /// `false` when no letter or option text was found and the letter is the random fallback's.
    pub found: bool,
}

/// `parse_mmmu_multi_choice_response` with `options` lettered from `A`;
/// `rng` supplies the fallback.
pub fn parse_multi_choice(response: &str, options: &[String], rng: &mut PyRandom) -> McParse {
    let letters: Vec<char> = ('A'..='Z').take(options.len()).collect();
    let mut r = response;
    for c in [',', '.', '!', '?', ';', ':', '\''] {
        r = py_strip_char(r, c);
    }
    let padded = format!(" {r} ");
    let mut candidates: Vec<char> = Vec::new();
    let mut by_text = false;
    let mut bracketed = false;
    for &l in &letters {
        if padded.contains(&format!("({l})")) {
            candidates.push(l);
            bracketed = true;
        }
    }
    if candidates.is_empty() {
        candidates.extend(letters.iter().filter(|l| padded.contains(&format!("{l} "))));
    }
    if candidates.is_empty() {
        candidates.extend(letters.iter().filter(|l| padded.contains(&format!("{l}."))));
    }
    let lower = padded.to_lowercase();
    if candidates.is_empty() && py_split(&padded).len() > 5 {
        for (l, text) in letters.iter().zip(options) {
            if lower.contains(&text.to_lowercase()) {
                candidates.push(*l);
                by_text = true;
            }
        }
    }
    match candidates.as_slice() {
        [] => McParse {
            letter: rng.choice(&letters).copied().unwrap_or('A'),
            found: false,
        },
        [one] => McParse {
            letter: *one,
            found: true,
        },
        many => {
            // The candidate written last wins; ties go to the first (numpy's argmax).
            let position = |l: char| -> i64 {
                let found = if by_text {
                    let i = (l as u8 - b'A') as usize;
                    lower.rfind(&options[i].to_lowercase())
                } else if bracketed {
                    padded.rfind(&format!("({l})"))
                } else {
                    padded.rfind(&format!(" {l} "))
                };
                found.map(|p| p as i64).unwrap_or(-1)
            };
            let mut best = many[0];
            let mut best_pos = position(best);
            for &l in &many[1..] {
                let p = position(l);
                if p > best_pos {
                    best = l;
                    best_pos = p;
                }
            }
            McParse {
                letter: best,
                found: true,
            }
        }
    }
}

/// One MMMU question.
#[derive(Debug, Clone, PartialEq)]
struct MmmuRow {
    question: String,
    /// Empty for an open question.
    options: Vec<String>,
    answer: String,
    subject: Option<String>,
    split: Option<String>,
}

/// A loaded MMMU file.
#[derive(Debug, Clone)]
pub struct Mmmu {
    rows: KeyedRows,
    questions: Vec<MmmuRow>,
    images: RowImages,
}

impl Mmmu {
    /// Reads either layout; a multiple-choice answer that is no option letter,
    /// or unreadable options, is an error naming the row.
    pub fn load(table: Table) -> Result<Self> {
        table.require("MMMU", &["question", "answer"])?;
        let hf = table.has("options");
        let rows = keyed_rows(table, "MMMU")?;
        let table = &rows.table;
        let mut questions = Vec::new();
        for record in &table.rows {
            let question = record
                .text("question")
                .ok_or_else(|| table.row_error(record, "no `question`"))?;
            let answer = record
                .text("answer")
                .ok_or_else(|| table.row_error(record, "no `answer`"))?;
            let options = if hf {
                let open = record
                    .text("question_type")
                    .is_some_and(|t| t != "multiple-choice");
                match record.value("options") {
                    _ if open => Vec::new(),
                    Some(serde_json::Value::Array(items)) => items
                        .iter()
                        .map(|v| {
                            v.as_str()
                                .map(str::to_string)
                                .unwrap_or_else(|| v.to_string())
                        })
                        .collect(),
                    Some(serde_json::Value::String(s)) => {
                        parse_string_list(s).ok_or_else(|| {
                            table.row_error(record, format!("`options` is not a list: {s}"))
                        })?
                    }
                    _ => {
                        return Err(
                            table.row_error(record, "no `options` for a multiple-choice question")
                        )
                    }
                }
            } else {
                ('A'..='Z')
                    .map_while(|l| record.text(&l.to_string()))
                    .collect()
            };
            if !options.is_empty() {
                let letters: Vec<String> =
                    ('A'..='Z').take(options.len()).map(String::from).collect();
                if !letters.contains(&answer) {
                    return Err(table.row_error(
                        record,
                        format!(
                            "the answer `{answer}` is none of the option letters {}",
                            letters.join(", ")
                        ),
                    ));
                }
            }
            let subject = record
                .text("id")
                .and_then(|id| subject_of_id(&id))
                .or_else(|| record.text("category"))
                .or_else(|| record.text("subject"));
            questions.push(MmmuRow {
                question,
                options,
                answer,
                subject,
                split: record.text("split"),
            });
        }
        let image_columns: Vec<String> = (1..=7)
            .map(|k| format!("image_{k}"))
            .filter(|c| rows.table.has(c))
            .collect();
        let images = if image_columns.is_empty() {
            rows.images("image")?
        } else {
            RowImages::from_columns(&rows.table, &image_columns)
        };
        Ok(Self {
            rows,
            questions,
            images,
        })
    }

    /// The keys to answer (the first `limit`).
    pub fn keys(&self, limit: Option<usize>) -> Vec<RowKey> {
        self.rows.first_keys(limit)
    }

    /// Row of `key`.
    pub fn position(&self, key: &RowKey) -> Option<usize> {
        self.rows.row_of(key)
    }

    /// lmms-eval's prompt for row `i`, interleaved: each `<image k>` becomes
    /// an image marker with image `k` there. A question with images but no
    /// marker gets them first; a marker naming a missing image is an error.
    pub fn prompt(&self, i: usize) -> Result<Prompt> {
        let q = &self.questions[i];
        let text = if q.options.is_empty() {
            format!("{}\n\n{OPEN_PROMPT}", q.question)
        } else {
            let listed: Vec<String> = ('A'..='Z')
                .zip(&q.options)
                .map(|(l, o)| format!("{l}. {o}"))
                .collect();
            format!("{}\n{}\n\n{MC_PROMPT}", q.question, listed.join("\n"))
        };
        let record = &self.rows.table.rows[i];
        let available = self.images.row(i);
        let mut out = String::new();
        let mut images = Vec::new();
        let mut rest = text.as_str();
        while let Some(start) = rest.find("<image ") {
            let after = &rest[start + 7..];
            let digits: String = after.chars().take_while(|c| c.is_ascii_digit()).collect();
            let k: usize = digits.parse().unwrap_or(0);
            if !(1..=7).contains(&k) || !after[digits.len()..].starts_with('>') {
                out.push_str(&rest[..start + 7]);
                rest = after;
                continue;
            }
            let data = available
                .get(k - 1)
                .filter(|d| !d.is_empty())
                .ok_or_else(|| {
                    self.rows.table.row_error(
                        record,
                        format!(
                            "row {} names <image {k}>, but has no image {k}",
                            self.rows.keys[i]
                        ),
                    )
                })?;
            images.push(decode(
                &self.rows.table,
                record,
                &format!("row {}'s image {k}", self.rows.keys[i]),
                data,
            )?);
            out.push_str(&rest[..start]);
            out.push_str(IMAGE_TOKEN);
            rest = &after[digits.len() + 1..];
        }
        out.push_str(rest);
        if images.is_empty() {
            let all = self.rows.decode_images(&self.images, i)?;
            return Ok(Prompt::images_first(all, out));
        }
        Ok(Prompt { text: out, images })
    }

    /// Scores the first `limit` rows.
    pub fn score(&self, predictions: &Predictions, limit: Option<usize>) -> Result<Scores> {
        let keys = self.keys(limit);
        require_predictions(predictions, &keys)?;
        let mut rng = PyRandom::seed(0);
        let mut scores = Scores::default();
        let mut unknown = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            let q = &self.questions[i];
            let prediction = predictions.get(key).unwrap_or_default();
            let (right, parsed, unparsed) = if q.options.is_empty() {
                let preds = parse_open_response(prediction);
                let shown: Vec<String> = preds
                    .iter()
                    .map(|p| match p {
                        OpenPred::Text(t) => format!("{t:?}"),
                        OpenPred::Num(x) => crate::pytext::py_float_repr(*x),
                    })
                    .collect();
                (
                    eval_open(&q.answer, &preds),
                    shown.join(", "),
                    py_strip(prediction).is_empty(),
                )
            } else {
                let p = parse_multi_choice(prediction, &q.options, &mut rng);
                (
                    p.letter.to_string() == q.answer,
                    p.letter.to_string(),
                    !p.found,
                )
            };
            let domain = q.subject.as_deref().and_then(domain_of);
            if domain.is_none() {
                unknown.push(q.subject.clone().unwrap_or_else(|| "(none)".into()));
            }
            scores.rows.push(Scored {
                index: key.clone(),
                score: if right { 1.0 } else { 0.0 },
                category: domain.map(str::to_string),
                sub_category: q.subject.clone(),
                split: q.split.clone(),
                answer: q.answer.clone(),
                prediction: prediction.to_string(),
                parsed: Some(parsed),
                unparsed,
            });
        }
        unknown.sort();
        unknown.dedup();
        if !unknown.is_empty() {
            scores.notes.push(format!(
                "subjects outside MMMU's six domains (counted in the overall score only): {}",
                unknown.join(", ")
            ));
        }
        Ok(scores)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn mc(response: &str) -> McParse {
        let mut rng = PyRandom::seed(0);
        parse_multi_choice(
            response,
            &opts(&["red circle", "blue square", "green triangle", "yellow star"]),
            &mut rng,
        )
    }

    #[test]
    fn multi_choice_rules() {
        assert_eq!(mc("(B)").letter, 'B');
        // Brackets win over bare letters, and the last bracketed letter wins.
        assert_eq!(mc("(A) or maybe (C), final: D").letter, 'C');
        assert_eq!(mc("B").letter, 'B');
        assert_eq!(
            mc("C.").letter,
            'C',
            "the trailing period is stripped, then `C ` matches"
        );
        assert_eq!(mc("Answer: D.").letter, 'D');
        // "A " inside a sentence counts: the article.
        assert_eq!(mc("A blue square").letter, 'A');
        // Several bare letters: the last written.
        assert_eq!(mc("A or B").letter, 'B');
        // `X.` when no `X ` exists.
        assert_eq!(
            mc("x:A.B").letter,
            'B',
            "`B ` (the padding) is found before any `X.`"
        );
        assert_eq!(mc("x:A.B!").letter, 'B');
        assert_eq!(
            mc("(x)A.").letter,
            'A',
            "`A.` stripped to `A` then padded: `A `"
        );
        // Option text only for more than five words; the last mentioned wins.
        assert_eq!(mc("i think it shows the blue square here").letter, 'B');
        assert_eq!(
            mc("the red circle, no wait, the green triangle").letter,
            'C'
        );
        // Five words or fewer and no letter: the random fallback.
        let p = mc("blue square");
        assert!(!p.found);
        assert_eq!(
            p.letter, 'D',
            "random.seed(0); random.choice('ABCD') is 'D'"
        );
    }

    #[test]
    fn open_rules() {
        let num = |x: f64| OpenPred::Num(x);
        let text = |s: &str| OpenPred::Text(s.into());
        // The key text itself reads as a number.
        assert_eq!(
            parse_open_response("The answer is 5.14159."),
            vec![num(5.14)]
        );
        // "2,000" as a whole, and "000" after the comma (Python's `re` finds it too).
        assert_eq!(
            parse_open_response("x = 2,000"),
            vec![num(2000.0), num(0.0)]
        );
        assert_eq!(parse_open_response("Paris"), vec![text("paris")]);
        // Shortest tail among key phrases; the last line may end in an equation.
        assert_eq!(
            parse_open_response("so it is blue\nthus y = 5"),
            vec![text("blue"), num(5.0)]
        );
        // One character: padded both ways.
        assert_eq!(normalize_str("B"), vec![text(" b"), text("b ")]);
        assert_eq!(normalize_str("1,234.567"), vec![num(1234.57)]);
        assert!(eval_open(
            "5.14",
            &parse_open_response("The answer is 5.14159.")
        ));
        assert!(eval_open(
            "Paris",
            &parse_open_response("It is Paris, France")
        ));
        assert!(!eval_open("b", &parse_open_response("blue")));
        assert!(eval_open("b", &parse_open_response("the answer is b ok")));
    }

    #[test]
    fn number_extraction_backtracks_as_python_re_does() {
        assert_eq!(
            extract_numbers("12.345e5 and 1,000 and -7"),
            vec!["1,000", "12.345e5", "12", "5", "000", "-7"]
        );
    }

    #[test]
    fn prompts_interleave_images_where_their_markers_stand() {
        let png = "iVBORw0KGgo=";
        let row = format!(
            "{{\"id\": \"validation_Art_1\", \"question\": \"Compare <image 2> and <image 1>.\", \"options\": \"['<image 1>', 'neither']\", \"answer\": \"A\", \"question_type\": \"multiple-choice\", \"image_1\": {{\"bytes\": \"{png}\"}}, \"image_2\": \"iVBORw0KGgoAAAA\"}}\n{{\"id\": \"validation_Math_2\", \"question\": \"How many?\", \"options\": \"[]\", \"answer\": \"3\", \"question_type\": \"open\", \"image_1\": \"{png}\"}}\n"
        );
        let table = Table::from_jsonl(std::path::Path::new("m.jsonl"), &row).unwrap();
        let mmmu = Mmmu::load(table).unwrap();
        let p = mmmu.prompt(0).unwrap();
        assert_eq!(
            p.text,
            "Compare <image> and <image>.\nA. <image>\nB. neither\n\nAnswer with the option's letter from the given choices directly."
        );
        // Image 2, image 1, then image 1 again (the option), in the order the markers stand.
        assert_eq!(p.images.len(), 3);
        assert_eq!(p.images[0].len(), 11);
        assert_eq!(p.images[1], p.images[2]);
        // No marker: the images first, then lmms-eval's open-question prompt.
        let p = mmmu.prompt(1).unwrap();
        assert_eq!(
            p.text,
            "<image>\nHow many?\n\nAnswer the question using a single word or phrase."
        );
        assert_eq!(
            mmmu.keys(None),
            vec![
                RowKey::Text("validation_Art_1".into()),
                RowKey::Text("validation_Math_2".into())
            ]
        );
    }

    #[test]
    fn subjects_and_domains() {
        assert_eq!(
            subject_of_id("validation_Art_Theory_12").as_deref(),
            Some("Art_Theory")
        );
        assert_eq!(subject_of_id("dev_Math_1").as_deref(), Some("Math"));
        assert_eq!(subject_of_id("nounderscore"), None);
        assert_eq!(domain_of("Art Theory"), Some("Art and Design"));
        assert_eq!(
            domain_of("Basic_Medical_Science"),
            Some("Health and Medicine")
        );
        assert_eq!(domain_of("Cooking"), None);
    }
}
