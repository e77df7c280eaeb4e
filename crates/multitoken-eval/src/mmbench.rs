//! MMBench in VLMEvalKit's TSV (`index, question, hint, A.., answer, category,
//! l2-category, split, image`): its prompt (`ImageMCQDataset.build_prompt`),
//! choice extraction ([`crate::mcq::can_infer`]) and CircularEval
//! (`mcq_circular_eval`): rows whose `index % 1_000_000` agree are one
//! question asked with its options rotated; the row whose index equals that
//! number is the original, and the question scores 1 only when every rotation's
//! answer reads as that rotation's right letter. Exact-matching mode: an
//! answer naming no option is wrong (and counted as unparsed).
//!
//! Option cells are read as VLMEvalKit's pandas reads them: a column whose
//! every present cell is an integer holds integers (`007` is `7`), or floats
//! when a cell is missing (`3` is `3.0`), and a column of numbers holds floats
//! (`2.50` is `2.5`); the prompt and the text rule see those spellings.

use std::collections::{BTreeMap, HashMap};

use crate::images::RowImages;
use crate::mcq::{can_infer, Choice};
use crate::score::{mean, require_predictions, Predictions, Scored, Scores};
use crate::table::{as_pandas, column_kind, ColumnKind, Record, RowKey, Table};
use crate::{Prompt, Result};

/// Copies of a question have indices `original + k * CIRCULAR_OFFSET`.
pub const CIRCULAR_OFFSET: i64 = 1_000_000;

/// One MMBench row.
#[derive(Debug, Clone, PartialEq)]
pub struct McqRow {
    /// `index`.
    pub index: i64,
    /// Position in the table.
    pub row: usize,
    /// `question`.
    pub question: String,
    /// `hint`, when present and not NaN.
    pub hint: Option<String>,
    /// The options present, in letter order.
    pub choices: Vec<Choice>,
    /// `answer`: the right letter.
    pub answer: String,
    /// `category` (MMBench's fine ability).
    pub category: Option<String>,
    /// `l2-category` (MMBench's coarse ability).
    pub l2_category: Option<String>,
    /// `split`.
    pub split: Option<String>,
}

impl McqRow {
    /// The question this row is a rotation of.
    pub fn group(&self) -> i64 {
        self.index.rem_euclid(CIRCULAR_OFFSET)
    }
}

/// A loaded MMBench file.
#[derive(Debug, Clone)]
pub struct MmBench {
    table: Table,
    rows: Vec<McqRow>,
    images: RowImages,
    /// Row of each index.
    position: HashMap<i64, usize>,
}

/// A column by name as VLMEvalKit finds it: names other than the option
/// letters are compared in lower case.
fn find_column<'a>(table: &'a Table, name: &str) -> Option<&'a str> {
    table
        .columns
        .iter()
        .find(|c| c.to_lowercase() == name)
        .map(String::as_str)
}

fn cell(record: &Record, column: Option<&str>) -> Option<String> {
    column.and_then(|c| record.text(c))
}

impl MmBench {
    /// Reads the rows of an MMBench-format table; fails naming the row on a
    /// missing or non-integer index, a duplicate index, a missing answer, or an
    /// image reference that names no row.
    pub fn load(table: Table) -> Result<Self> {
        // VLMEvalKit lower-cases every column name but the option letters.
        let needed = ["index", "question", "answer"];
        let missing: Vec<&str> = needed
            .into_iter()
            .filter(|c| find_column(&table, c).is_none())
            .collect();
        if !missing.is_empty() {
            table.require("MMBench", &missing)?;
        }
        table.require("MMBench", &["A", "B"])?;
        let index_col = find_column(&table, "index");
        let question_col = find_column(&table, "question");
        let hint_col = find_column(&table, "hint");
        let answer_col = find_column(&table, "answer");
        let category_col = find_column(&table, "category");
        let l2_col = find_column(&table, "l2-category");
        let split_col = find_column(&table, "split");
        let letters: Vec<(char, ColumnKind)> = ('A'..='Z')
            .filter(|l| table.has(&l.to_string()))
            .map(|l| (l, column_kind(&table, &l.to_string())))
            .collect();
        let mut rows = Vec::with_capacity(table.rows.len());
        let mut seen: HashMap<i64, usize> = HashMap::new();
        for (i, record) in table.rows.iter().enumerate() {
            let index_text =
                cell(record, index_col).ok_or_else(|| table.row_error(record, "no `index`"))?;
            let index = match RowKey::parse(&index_text) {
                RowKey::Int(n) => n,
                RowKey::Text(t) => {
                    return Err(table.row_error(record, format!("`index` is `{t}`, not an integer")))
                }
            };
            if let Some(first) = seen.insert(index, record.line) {
                return Err(table.row_error(
                    record,
                    format!("index {index} again (first on line {first})"),
                ));
            }
            let question = cell(record, question_col)
                .ok_or_else(|| table.row_error(record, format!("row {index} has no `question`")))?;
            let answer = cell(record, answer_col)
                .ok_or_else(|| table.row_error(record, format!("row {index} has no `answer`")))?;
            let choices: Vec<Choice> = letters
                .iter()
                .filter_map(|(letter, kind)| {
                    record.text(&letter.to_string()).map(|t| Choice {
                        letter: *letter,
                        text: as_pandas(kind, t),
                    })
                })
                .collect();
            if choices.is_empty() {
                return Err(table.row_error(
                    record,
                    format!("row {index} has no options (A, B, ... are all empty)"),
                ));
            }
            rows.push(McqRow {
                index,
                row: i,
                question,
                hint: cell(record, hint_col),
                choices,
                // Compared as written: VLMEvalKit does not strip it either.
                answer,
                category: cell(record, category_col),
                l2_category: cell(record, l2_col),
                split: cell(record, split_col),
            });
        }
        let keys: Vec<String> = rows.iter().map(|r| r.index.to_string()).collect();
        let images = match find_column(&table, "image") {
            Some(col) => RowImages::resolve(&table, col, &keys)?,
            None => RowImages::default(),
        };
        let position = rows.iter().enumerate().map(|(i, r)| (r.index, i)).collect();
        Ok(Self {
            table,
            rows,
            images,
            position,
        })
    }

    /// The row with `key`.
    pub fn position(&self, key: &RowKey) -> Option<usize> {
        match key {
            RowKey::Int(n) => self.position.get(n).copied(),
            RowKey::Text(_) => None,
        }
    }

    /// The rows.
    pub fn rows(&self) -> &[McqRow] {
        &self.rows
    }

    /// The table read.
    pub fn table(&self) -> &Table {
        &self.table
    }

    /// The rows to answer: the first `limit` originals (all when `None`) with
    /// their circular copies, in file order.
    pub fn selected(&self, limit: Option<usize>) -> Vec<usize> {
        let originals: std::collections::HashSet<i64> = self
            .rows
            .iter()
            .filter(|r| r.index == r.group())
            .take(limit.unwrap_or(usize::MAX))
            .map(|r| r.index)
            .collect();
        if limit.is_none() {
            return (0..self.rows.len()).collect();
        }
        self.rows
            .iter()
            .enumerate()
            .filter(|(_, r)| originals.contains(&r.group()))
            .map(|(i, _)| i)
            .collect()
    }

    /// The keys of [`Self::selected`].
    pub fn keys(&self, limit: Option<usize>) -> Vec<RowKey> {
        self.selected(limit)
            .into_iter()
            .map(|i| RowKey::Int(self.rows[i].index))
            .collect()
    }

    /// VLMEvalKit's prompt for row `i`: images first, then `Hint: ...`,
    /// `Question: ...`, `Options:` one per line, and the instruction.
    pub fn prompt(&self, i: usize) -> Result<Prompt> {
        let row = &self.rows[i];
        let mut text = String::new();
        if let Some(hint) = &row.hint {
            text.push_str(&format!("Hint: {hint}\n"));
        }
        text.push_str(&format!("Question: {}\n", row.question));
        if !row.choices.is_empty() {
            text.push_str("Options:\n");
            for c in &row.choices {
                text.push_str(&format!("{}. {}\n", c.letter, c.text));
            }
            text.push_str("Please select the correct answer from the options above. \n");
        }
        let record = &self.table.rows[row.row];
        let mut images = Vec::new();
        for (k, data) in self.images.row(row.row).iter().enumerate() {
            images.push(crate::images::decode(
                &self.table,
                record,
                &format!("row {}'s image {}", row.index, k + 1),
                data,
            )?);
        }
        Ok(Prompt::images_first(images, text))
    }

    /// Scores the selected rows: CircularEval per original (copies whose
    /// original is absent are skipped, as VLMEvalKit skips them, and noted),
    /// plus the plain accuracy over every row as `vanilla_all`.
    pub fn score(&self, predictions: &Predictions, limit: Option<usize>) -> Result<Scores> {
        let selected = self.selected(limit);
        let keys: Vec<RowKey> = selected
            .iter()
            .map(|&i| RowKey::Int(self.rows[i].index))
            .collect();
        require_predictions(predictions, &keys)?;
        let mut groups: BTreeMap<i64, Vec<&McqRow>> = BTreeMap::new();
        for &i in &selected {
            groups
                .entry(self.rows[i].group())
                .or_default()
                .push(&self.rows[i]);
        }
        let mut scores = Scores::default();
        let mut vanilla = Vec::new();
        let mut unparsed_rows = 0usize;
        // Originals in file order, as the report lists them.
        for &i in &selected {
            let main = &self.rows[i];
            if main.index != main.group() {
                continue;
            }
            let mut group = groups.remove(&main.index).unwrap_or_default();
            group.sort_by_key(|r| r.index);
            let mut all_right = true;
            let mut any_unparsed = false;
            let mut parsed = Vec::new();
            let mut texts = Vec::new();
            for r in &group {
                let prediction = predictions.get(&RowKey::Int(r.index)).unwrap_or_default();
                let letter = can_infer(prediction, &r.choices);
                let right = letter.is_some_and(|l| l.to_string() == r.answer);
                if letter.is_none() {
                    any_unparsed = true;
                    unparsed_rows += 1;
                }
                all_right &= right;
                parsed.push(letter.map(String::from).unwrap_or_else(|| "?".into()));
                texts.push(prediction.to_string());
            }
            let answers: Vec<&str> = group.iter().map(|r| r.answer.as_str()).collect();
            scores.rows.push(Scored {
                index: RowKey::Int(main.index),
                score: if all_right { 1.0 } else { 0.0 },
                category: main.l2_category.clone().or_else(|| main.category.clone()),
                sub_category: if main.l2_category.is_some() {
                    main.category.clone()
                } else {
                    None
                },
                split: main.split.clone(),
                answer: answers.join(","),
                prediction: texts.join(" || "),
                parsed: Some(parsed.join(",")),
                unparsed: any_unparsed,
            });
        }
        // VLMEvalKit's plain accuracy over every row (`PRINT_VANILLA`'s "vanilla_all").
        for &i in &selected {
            let r = &self.rows[i];
            let prediction = predictions.get(&RowKey::Int(r.index)).unwrap_or_default();
            let right =
                can_infer(prediction, &r.choices).is_some_and(|l| l.to_string() == r.answer);
            vanilla.push(if right { 1.0 } else { 0.0 });
        }
        let orphans: Vec<i64> = groups.values().flatten().map(|r| r.index).collect();
        if !orphans.is_empty() {
            scores.notes.push(format!(
                "{} circular cop{} without their original row (index % {CIRCULAR_OFFSET} names no row), not scored, as VLMEvalKit skips them: {}",
                orphans.len(),
                if orphans.len() == 1 { "y" } else { "ies" },
                orphans.iter().take(5).map(i64::to_string).collect::<Vec<_>>().join(", ")
            ));
        }
        if unparsed_rows > 0 {
            scores.notes.push(format!(
                "{unparsed_rows} of {} answers named no option (scored wrong, as VLMEvalKit's exact matching does)",
                selected.len()
            ));
        }
        scores.metrics.insert("vanilla_all".into(), mean(vanilla));
        Ok(scores)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn bench(text: &str) -> MmBench {
        MmBench::load(Table::from_tsv(Path::new("m.tsv"), text).unwrap()).unwrap()
    }

    fn preds(pairs: &[(i64, &str)]) -> Predictions {
        Predictions {
            by_key: pairs
                .iter()
                .map(|(k, v)| (RowKey::Int(*k), v.to_string()))
                .collect(),
        }
    }

    const CIRCULAR: &str = "index\tquestion\thint\tA\tB\tC\tanswer\tcategory\tl2-category\n\
        1\tWhat shape?\tnan\tcircle\tsquare\ttriangle\tA\tshape\tperception\n\
        1000001\tWhat shape?\tnan\tsquare\ttriangle\tcircle\tC\tshape\tperception\n\
        2000001\tWhat shape?\tnan\ttriangle\tcircle\tsquare\tB\tshape\tperception\n\
        2\tWhat colour?\tLook closely.\tred\tblue\tnan\tB\tcolour\tperception\n\
        1000002\tWhat colour?\tLook closely.\tblue\tred\tnan\tA\tcolour\tperception\n\
        3000009\tOrphan?\tnan\tx\ty\tnan\tA\tcolour\tperception\n";

    #[test]
    fn circular_groups_by_index_mod_a_million() {
        let b = bench(CIRCULAR);
        // Question 1 right in every rotation (by letter and by text), question 2 wrong in one.
        let p = preds(&[
            (1, "A"),
            (1_000_001, "circle"),
            (2_000_001, "(B)"),
            (2, "B"),
            (1_000_002, "B"),
            (3_000_009, "A"),
        ]);
        let s = b.score(&p, None).unwrap();
        assert_eq!(s.rows.len(), 2);
        assert_eq!(
            (s.rows[0].index.clone(), s.rows[0].score),
            (RowKey::Int(1), 1.0)
        );
        assert_eq!(
            (s.rows[1].index.clone(), s.rows[1].score),
            (RowKey::Int(2), 0.0)
        );
        assert_eq!(s.rows[1].parsed.as_deref(), Some("B,B"));
        assert_eq!(s.rows[0].category.as_deref(), Some("perception"));
        assert_eq!(s.rows[0].sub_category.as_deref(), Some("shape"));
        // vanilla: 5 of 6 rows right (the orphan counts in vanilla_all, not in circular).
        assert!((s.metrics["vanilla_all"] - 5.0 / 6.0).abs() < 1e-12);
        assert_eq!(s.notes.len(), 1, "{:?}", s.notes);
        assert!(s.notes[0].contains("3000009"));
    }

    #[test]
    fn an_unparsed_rotation_fails_the_question_and_is_counted() {
        let b = bench(CIRCULAR);
        let p = preds(&[
            (1, "A"),
            (1_000_001, "no idea"),
            (2_000_001, "B"),
            (2, "B"),
            (1_000_002, "A"),
            (3_000_009, "A"),
        ]);
        let s = b.score(&p, None).unwrap();
        assert_eq!(s.rows[0].score, 0.0);
        assert!(s.rows[0].unparsed);
        assert_eq!(s.rows[0].parsed.as_deref(), Some("A,?,B"));
        assert_eq!(s.rows[1].score, 1.0);
    }

    #[test]
    fn limit_takes_originals_with_their_copies() {
        let b = bench(CIRCULAR);
        let keys = b.keys(Some(1));
        assert_eq!(
            keys,
            vec![
                RowKey::Int(1),
                RowKey::Int(1_000_001),
                RowKey::Int(2_000_001)
            ]
        );
        let p = preds(&[(1, "A")]);
        let e = b.score(&p, Some(1)).err().map(|e| e.to_string());
        assert_eq!(
            e.as_deref(),
            Some("2 of 3 rows have no prediction (index 1000001, 2000001); score the rows that have one with --limit, or fill them with --model")
        );
    }

    #[test]
    fn prompt_is_vlmevalkits() {
        let b = bench(CIRCULAR);
        let p = b.prompt(3).unwrap();
        assert_eq!(
            p.text,
            "Hint: Look closely.\nQuestion: What colour?\nOptions:\nA. red\nB. blue\nPlease select the correct answer from the options above. \n"
        );
        let p = b.prompt(0).unwrap();
        assert!(p
            .text
            .starts_with("Question: What shape?\nOptions:\nA. circle\n"));
    }

    #[test]
    fn numeric_options_read_as_pandas_reads_them() {
        let b = bench("index\tquestion\tA\tB\tC\tanswer\n1\tHow many?\t007\t2\t3\tB\n2\tHow many?\t1\t4\tnan\tA\n3\tWhy?\t1\t2.50\tx\tA\n");
        let texts: Vec<Vec<&str>> = b
            .rows()
            .iter()
            .map(|r| r.choices.iter().map(|c| c.text.as_str()).collect())
            .collect();
        // A: all integers, none missing -> int64; B: a float -> float64; C: text and NaN -> object.
        assert_eq!(
            texts,
            vec![
                vec!["7", "2.0", "3"],
                vec!["1", "4.0"],
                vec!["1", "2.5", "x"]
            ]
        );
    }

    #[test]
    fn bad_rows_are_errors_naming_them() {
        let check = |text: &str, want: &str| {
            let e = Table::from_tsv(Path::new("m.tsv"), text)
                .and_then(MmBench::load)
                .err()
                .map(|e| e.to_string());
            assert_eq!(e.as_deref(), Some(want));
        };
        check(
            "index\tquestion\tA\tB\tanswer\n1\tq\ta\tb\tA\n1\tq\ta\tb\tB\n",
            "m.tsv:3: index 1 again (first on line 2)",
        );
        check(
            "index\tquestion\tA\tB\tanswer\nx1\tq\ta\tb\tA\n",
            "m.tsv:2: `index` is `x1`, not an integer",
        );
        check(
            "index\tquestion\tA\tB\tanswer\n1\tq\ta\tb\tnan\n",
            "m.tsv:2: row 1 has no `answer`",
        );
        check(
            "index\tquestion\tA\tB\tanswer\n1\tq\tnan\tNone\tA\n",
            "m.tsv:2: row 1 has no options (A, B, ... are all empty)",
        );
        check(
            "index\tquestion\tanswer\n1\tq\tA\n",
            "m.tsv: not a MMBench file: no column `A`, `B` (its columns: index, question, answer)",
        );
    }
}
