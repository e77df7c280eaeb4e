//! Benchmark files as rows of named cells: VLMEvalKit's TSVs (what pandas'
//! `to_csv(sep="\t")` writes and `read_csv(sep="\t")` reads) and JSON Lines
//! rows (the Hugging Face datasets' fields, one object a line) and the same
//! datasets' parquet files.
//!
//! A TSV cell that pandas would read as NaN (empty, `NaN`, `nan`, `None`,
//! `NA`, `N/A`, `null`, ...) is missing here too, so "is this option there?"
//! has the answer VLMEvalKit's `pd.isna` gives.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::pytext::py_float_repr;
use crate::{Error, Result};

/// The first bytes of every parquet file.
const PARQUET_MAGIC: &[u8] = b"PAR1";

/// The strings pandas' `read_csv` reads as NaN by default (`STR_NA_VALUES`).
const PANDAS_NA: &[&str] = &[
    "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
    "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null",
];

/// Whether pandas reads `cell` as NaN.
pub fn is_pandas_na(cell: &str) -> bool {
    PANDAS_NA.contains(&cell)
}

/// A row's key: VLMEvalKit's integer `index`, or a dataset's string id
/// (MMMU's `validation_Art_1`). Predictions name their row by it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RowKey {
    /// An integer index.
    Int(i64),
    /// A string id.
    Text(String),
}

impl RowKey {
    /// The key from a cell: an integer when the text is one (pandas reads a
    /// TSV's `index` column as integers), else the text.
    pub fn parse(text: &str) -> Self {
        match text.trim().parse::<i64>() {
            Ok(n) => Self::Int(n),
            Err(_) => Self::Text(text.to_string()),
        }
    }

    /// The key of a JSON value (a number or a string).
    pub fn from_json(value: &Value) -> Option<Self> {
        match value {
            Value::Number(n) => n.as_i64().map(Self::Int),
            Value::String(s) => Some(Self::parse(s)),
            _ => None,
        }
    }
}

impl fmt::Display for RowKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Int(n) => write!(f, "{n}"),
            Self::Text(s) => write!(f, "{s}"),
        }
    }
}

/// One row: its cells by column name and where it starts in its file.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// 1-based line the row starts on.
    pub line: usize,
    /// Cells by column; a missing (NaN) cell is `Value::Null`.
    pub cells: BTreeMap<String, Value>,
}

impl Record {
    /// The cell as text; `None` when the column is absent or the cell missing.
    /// Numbers give their JSON text, lists and objects their JSON.
    pub fn text(&self, column: &str) -> Option<String> {
        match self.cells.get(column)? {
            Value::Null => None,
            Value::String(s) => Some(s.clone()),
            Value::Bool(b) => Some(if *b { "True".into() } else { "False".into() }),
            other => Some(other.to_string()),
        }
    }

    /// The raw cell (`None` when the column is absent).
    pub fn value(&self, column: &str) -> Option<&Value> {
        self.cells.get(column)
    }
}

/// A benchmark file read whole.
#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    /// Where it came from (for errors).
    pub file: PathBuf,
    /// Column names in file order (a JSONL file: every key seen, in first-seen order).
    pub columns: Vec<String>,
    /// The rows.
    pub rows: Vec<Record>,
}

impl Table {
    /// Reads a `.tsv` (VLMEvalKit), `.jsonl` / `.json` (one object a line) or
    /// `.parquet` (a Hugging Face dataset's split, e.g. MMMU's
    /// `validation-00000-of-00001.parquet`; recognised by its `PAR1` magic) file.
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        if bytes.starts_with(PARQUET_MAGIC) {
            return Self::from_parquet(path, bytes);
        }
        let text = String::from_utf8(bytes).map_err(|e| Error::File {
            file: path.to_path_buf(),
            message: format!("not UTF-8 text (byte {})", e.utf8_error().valid_up_to()),
        })?;
        let jsonl = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e.eq_ignore_ascii_case("jsonl") || e.eq_ignore_ascii_case("json"));
        if jsonl {
            Self::from_jsonl(path, &text)
        } else {
            Self::from_tsv(path, &text)
        }
    }

    /// Parses TSV text as pandas' C parser does with `sep="\t"`: a field that
    /// starts with `"` is quoted (`""` inside is one quote, tabs and newlines
    /// are kept), blank lines are skipped, the first record is the header.
    pub fn from_tsv(path: &Path, text: &str) -> Result<Self> {
        let records = split_tsv(text).map_err(|(line, message)| Error::Row {
            file: path.to_path_buf(),
            line,
            message,
        })?;
        let mut records = records.into_iter();
        let Some((_, header)) = records.next() else {
            return Err(Error::File {
                file: path.to_path_buf(),
                message: "empty file: no header row".into(),
            });
        };
        // pandas names an unnamed first column `Unnamed: 0` (a written index).
        let columns: Vec<String> = header
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if c.is_empty() {
                    format!("Unnamed: {i}")
                } else {
                    c.clone()
                }
            })
            .collect();
        for (i, c) in columns.iter().enumerate() {
            if columns[..i].contains(c) {
                return Err(Error::File {
                    file: path.to_path_buf(),
                    message: format!("column `{c}` appears twice"),
                });
            }
        }
        let mut rows = Vec::new();
        for (line, fields) in records {
            if fields.len() > columns.len() {
                return Err(Error::Row {
                    file: path.to_path_buf(),
                    line,
                    message: format!(
                        "{} fields, but the header names {} columns",
                        fields.len(),
                        columns.len()
                    ),
                });
            }
            let mut cells = BTreeMap::new();
            for (i, column) in columns.iter().enumerate() {
                // pandas fills a short row's last columns with NaN.
                let cell = match fields.get(i) {
                    Some(f) if !is_pandas_na(f) => Value::String(f.clone()),
                    _ => Value::Null,
                };
                cells.insert(column.clone(), cell);
            }
            rows.push(Record { line, cells });
        }
        Ok(Self {
            file: path.to_path_buf(),
            columns,
            rows,
        })
    }

    /// Parses JSON Lines: one object a line, blank lines skipped.
    pub fn from_jsonl(path: &Path, text: &str) -> Result<Self> {
        let mut columns: Vec<String> = Vec::new();
        let mut rows = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let row_error = |message: String| Error::Row {
                file: path.to_path_buf(),
                line: i + 1,
                message,
            };
            let value: Value =
                serde_json::from_str(line).map_err(|e| row_error(format!("not JSON: {e}")))?;
            let Value::Object(map) = value else {
                return Err(row_error("a row must be a JSON object".into()));
            };
            let mut cells = BTreeMap::new();
            for (k, v) in map {
                if !columns.contains(&k) {
                    columns.push(k.clone());
                }
                cells.insert(k, v);
            }
            rows.push(Record { line: i + 1, cells });
        }
        Ok(Self {
            file: path.to_path_buf(),
            columns,
            rows,
        })
    }

    /// Reads a parquet file's rows as `datasets` wrote them: each column a
    /// cell, nested structs as objects (an image column's `{"bytes": ...,
    /// "path": ...}`), lists as arrays, binary as base64 text (so image bytes
    /// read as the JSONL export's base64 do). A record's `line` is its 1-based
    /// row. Snappy-compressed or uncompressed files are read; another codec is
    /// an error naming it.
    pub fn from_parquet(path: &Path, bytes: Vec<u8>) -> Result<Self> {
        let file_error = |message: String| Error::File {
            file: path.to_path_buf(),
            message,
        };
        // The parquet reader is a library fed a user's file: a panic in it is a
        // malformed file, reported as one.
        let read = std::panic::catch_unwind(|| -> std::result::Result<Vec<serde_json::Map<String, Value>>, String> {
            use parquet::file::reader::{FileReader, SerializedFileReader};
            let reader = SerializedFileReader::new(bytes::Bytes::from(bytes)).map_err(|e| e.to_string())?;
            let rows = reader.get_row_iter(None).map_err(|e| e.to_string())?;
            let mut out = Vec::new();
            for row in rows {
                match row.map_err(|e| e.to_string())?.to_json_value() {
                    Value::Object(map) => out.push(map),
                    other => return Err(format!("a row is not a record: {other}")),
                }
            }
            Ok(out)
        });
        let rows = match read {
            Ok(Ok(rows)) => rows,
            Ok(Err(message)) => return Err(file_error(format!("not a readable parquet file: {message}"))),
            Err(_) => return Err(file_error("not a readable parquet file (the reader failed on it)".into())),
        };
        let mut columns: Vec<String> = Vec::new();
        let records = rows
            .into_iter()
            .enumerate()
            .map(|(i, map)| {
                for k in map.keys() {
                    if !columns.contains(k) {
                        columns.push(k.clone());
                    }
                }
                Record {
                    line: i + 1,
                    cells: map.into_iter().collect(),
                }
            })
            .collect();
        Ok(Self {
            file: path.to_path_buf(),
            columns,
            rows: records,
        })
    }

    /// Whether a column exists (TSV header, or any JSONL row's key).
    pub fn has(&self, column: &str) -> bool {
        self.columns.iter().any(|c| c == column)
    }

    /// Fails naming the file and the missing columns unless all of `needed` exist.
    pub fn require(&self, benchmark: &str, needed: &[&str]) -> Result<()> {
        let missing: Vec<&str> = needed.iter().copied().filter(|c| !self.has(c)).collect();
        if missing.is_empty() {
            return Ok(());
        }
        Err(Error::File {
            file: self.file.clone(),
            message: format!(
                "not a {benchmark} file: no column {} (its columns: {})",
                missing
                    .iter()
                    .map(|c| format!("`{c}`"))
                    .collect::<Vec<_>>()
                    .join(", "),
                self.columns.join(", ")
            ),
        })
    }

    /// An error about `record`.
    pub fn row_error(&self, record: &Record, message: impl Into<String>) -> Error {
        Error::Row {
            file: self.file.clone(),
            line: record.line,
            message: message.into(),
        }
    }
}

/// Records of TSV text with the line each starts on; `Err((line, message))`
/// for a quoted field that never ends.
#[allow(clippy::type_complexity)]
fn split_tsv(text: &str) -> std::result::Result<Vec<(usize, Vec<String>)>, (usize, String)> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut records = Vec::new();
    let mut chars = text.chars().peekable();
    let mut line = 1usize;
    while chars.peek().is_some() {
        let start = line;
        let mut fields = Vec::new();
        let mut field = String::new();
        let mut quoted = false;
        let mut at_field_start = true;
        loop {
            let Some(c) = chars.next() else {
                if quoted {
                    return Err((
                        start,
                        "a quoted field never ends (a `\"` is missing)".into(),
                    ));
                }
                fields.push(std::mem::take(&mut field));
                break;
            };
            if quoted {
                match c {
                    '"' if chars.peek() == Some(&'"') => {
                        chars.next();
                        field.push('"');
                    }
                    '"' => quoted = false,
                    '\n' => {
                        line += 1;
                        field.push(c);
                    }
                    _ => field.push(c),
                }
                continue;
            }
            match c {
                '"' if at_field_start => {
                    quoted = true;
                    at_field_start = false;
                }
                '\t' => {
                    fields.push(std::mem::take(&mut field));
                    at_field_start = true;
                }
                '\r' if chars.peek() == Some(&'\n') => {}
                '\n' => {
                    line += 1;
                    fields.push(std::mem::take(&mut field));
                    break;
                }
                _ => {
                    field.push(c);
                    at_field_start = false;
                }
            }
        }
        // pandas skips blank lines.
        if !(fields.len() == 1 && fields[0].is_empty()) {
            records.push((start, fields));
        }
    }
    Ok(records)
}

/// How pandas types a column of a TSV (VLMEvalKit prints cells as `str(value)`).
pub enum ColumnKind {
    /// Strings, printed as written.
    Text,
    /// int64: every present cell an integer and none missing (`007` prints `7`).
    Int,
    /// float64: numbers, or integers with a missing cell (`3` prints `3.0`).
    Float,
}

fn pandas_int(s: &str) -> Option<i64> {
    let t = s.trim_matches(' ');
    let digits = t.strip_prefix(['+', '-']).unwrap_or(t);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    t.parse().ok()
}

fn pandas_float(s: &str) -> Option<f64> {
    let t = s.trim_matches(' ');
    if t.bytes().any(|b| b == b'_') {
        return None;
    }
    t.parse().ok()
}

/// How pandas types `column` of `table`.
pub fn column_kind(table: &Table, column: &str) -> ColumnKind {
    let cells: Vec<Option<String>> = table.rows.iter().map(|r| r.text(column)).collect();
    let present: Vec<&String> = cells.iter().flatten().collect();
    if present.is_empty() {
        return ColumnKind::Text;
    }
    let any_missing = present.len() < cells.len();
    if present.iter().all(|s| pandas_int(s).is_some()) {
        return if any_missing {
            ColumnKind::Float
        } else {
            ColumnKind::Int
        };
    }
    if present.iter().all(|s| pandas_float(s).is_some()) {
        return ColumnKind::Float;
    }
    ColumnKind::Text
}

/// `str()` of a cell as pandas typed its column.
pub fn as_pandas(kind: &ColumnKind, text: String) -> String {
    match kind {
        ColumnKind::Text => text,
        ColumnKind::Int => pandas_int(&text).map(|n| n.to_string()).unwrap_or(text),
        ColumnKind::Float => pandas_float(&text).map(py_float_repr).unwrap_or(text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tsv(text: &str) -> Table {
        match Table::from_tsv(Path::new("t.tsv"), text) {
            Ok(t) => t,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn quoted_fields_keep_tabs_newlines_and_doubled_quotes() {
        let t = tsv("index\tquestion\tA\n1\t\"a\tb\nc \"\"d\"\"\"\tx\n\n2\tplain \"q\"\t\n");
        assert_eq!(t.rows.len(), 2);
        assert_eq!(t.rows[0].text("question").as_deref(), Some("a\tb\nc \"d\""));
        assert_eq!(t.rows[1].line, 5);
        assert_eq!(t.rows[1].text("question").as_deref(), Some("plain \"q\""));
        assert_eq!(t.rows[1].text("A"), None, "an empty cell is NaN");
    }

    #[test]
    fn pandas_na_strings_are_missing_and_short_rows_are_padded() {
        let t = tsv("index\tA\tB\tC\r\n1\tNaN\tNone\r\n2\tnan value\tN/A\tnull\r\n");
        assert_eq!(t.rows[0].text("A"), None);
        assert_eq!(t.rows[0].text("B"), None);
        assert_eq!(t.rows[0].text("C"), None);
        assert_eq!(t.rows[1].text("A").as_deref(), Some("nan value"));
        assert_eq!(t.rows[1].text("B"), None);
    }

    #[test]
    fn broken_tsv_is_an_error_naming_the_line() {
        let e = Table::from_tsv(Path::new("t.tsv"), "index\tq\n1\t\"open\n")
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            e.as_deref(),
            Some("t.tsv:2: a quoted field never ends (a `\"` is missing)")
        );
        let e = Table::from_tsv(Path::new("t.tsv"), "index\tq\n1\ta\tb\n")
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            e.as_deref(),
            Some("t.tsv:2: 3 fields, but the header names 2 columns")
        );
        let e = Table::from_tsv(Path::new("t.tsv"), "")
            .err()
            .map(|e| e.to_string());
        assert_eq!(e.as_deref(), Some("t.tsv: empty file: no header row"));
    }

    #[test]
    fn jsonl_rows_keep_their_values_and_lines() {
        let t = match Table::from_jsonl(
            Path::new("t.jsonl"),
            "{\"id\": \"a_1\", \"n\": 3}\n\n{\"id\": null}\n",
        ) {
            Ok(t) => t,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(t.columns, vec!["id", "n"]);
        assert_eq!(t.rows[0].text("n").as_deref(), Some("3"));
        assert_eq!(t.rows[1].line, 3);
        assert_eq!(t.rows[1].text("id"), None);
        let e = Table::from_jsonl(Path::new("t.jsonl"), "[1]\n")
            .err()
            .map(|e| e.to_string());
        assert_eq!(e.as_deref(), Some("t.jsonl:1: a row must be a JSON object"));
    }

    #[test]
    fn row_keys_are_integers_when_they_can_be() {
        assert_eq!(RowKey::parse("1000003"), RowKey::Int(1_000_003));
        assert_eq!(
            RowKey::parse("validation_Art_1"),
            RowKey::Text("validation_Art_1".into())
        );
        assert_eq!(
            RowKey::from_json(&serde_json::json!(7)),
            Some(RowKey::Int(7))
        );
        assert_eq!(RowKey::from_json(&serde_json::json!(1.5)), None);
    }
}
