//! The images of a benchmark row, as VLMEvalKit's TSVs and the Hugging Face
//! datasets store them: base64 text, a Python list of base64 texts, or (in a
//! TSV) a short value naming another row's `index` whose image it shares (the
//! circular copies of an MMBench question carry only their original's index).

use std::collections::HashMap;

use base64::Engine;
use serde_json::Value;

use crate::table::{Record, Table};
use crate::Result;

/// VLMEvalKit's rule: an `image` cell of at most this many characters is the
/// index of the row whose image this row shares, never image data.
pub const MAX_REFERENCE_LEN: usize = 64;

/// Where a row's images are, before decoding.
#[derive(Debug, Clone, PartialEq)]
pub enum ImageCell {
    /// The row has no image.
    None,
    /// Base64 texts (one, or several for a multi-image row).
    Data(Vec<String>),
    /// Another row's index, whose images this row shares.
    Ref(String),
}

impl ImageCell {
    /// Reads a cell: JSON `{"bytes": ...}` objects (a datasets export), lists,
    /// a Python list literal `['...', '...']`, a short reference, or base64.
    pub fn parse(value: Option<&Value>) -> Self {
        match value {
            None | Some(Value::Null) => Self::None,
            Some(Value::Array(items)) => Self::Data(items.iter().filter_map(Self::one).collect()),
            Some(Value::String(s)) => Self::from_text(s),
            Some(other) => match Self::one(other) {
                Some(s) => Self::Data(vec![s]),
                None => Self::None,
            },
        }
    }

    fn one(value: &Value) -> Option<String> {
        match value {
            Value::String(s) => Some(s.clone()),
            Value::Object(map) => map
                .get("bytes")
                .and_then(|b| b.as_str())
                .map(str::to_string),
            _ => None,
        }
    }

    fn from_text(s: &str) -> Self {
        let t = s.trim();
        if t.starts_with('[') && t.ends_with(']') {
            let inner = &t[1..t.len() - 1];
            let items: Vec<String> = inner
                .split(',')
                .map(|p| p.trim().trim_matches(|c| c == '\'' || c == '"').to_string())
                .filter(|p| !p.is_empty())
                .collect();
            return Self::Data(items);
        }
        if t.chars().count() <= MAX_REFERENCE_LEN {
            return Self::Ref(t.to_string());
        }
        Self::Data(vec![t.to_string()])
    }
}

/// Every row's images, references resolved, still base64.
#[derive(Debug, Clone, Default)]
pub struct RowImages {
    by_row: Vec<Vec<String>>,
}

impl RowImages {
    /// Resolves the `column` cells of `table`; `keys[i]` is row `i`'s index as
    /// text. A reference to no row, or to a row that itself holds a reference,
    /// is an error naming the row.
    pub fn resolve(table: &Table, column: &str, keys: &[String]) -> Result<Self> {
        let cells: Vec<ImageCell> = table
            .rows
            .iter()
            .map(|r| ImageCell::parse(r.value(column)))
            .collect();
        let position: HashMap<&str, usize> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| (k.as_str(), i))
            .collect();
        let mut by_row = Vec::with_capacity(cells.len());
        for (row, cell) in table.rows.iter().zip(&cells) {
            by_row.push(match cell {
                ImageCell::None => Vec::new(),
                ImageCell::Data(items) => items.clone(),
                ImageCell::Ref(target) => match position.get(target.as_str()).map(|&i| &cells[i]) {
                    Some(ImageCell::Data(items)) => items.clone(),
                    Some(_) => {
                        return Err(table.row_error(
                            row,
                            format!("its `{column}` names row {target}, which holds no image data of its own"),
                        ))
                    }
                    None => {
                        return Err(table.row_error(
                            row,
                            format!(
                                "its `{column}` is `{target}`: too short to be an image, and no row has that index"
                            ),
                        ))
                    }
                },
            });
        }
        Ok(Self { by_row })
    }

    /// Images from separate columns (MMMU's `image_1` .. `image_7`).
    pub fn from_columns(table: &Table, columns: &[String]) -> Self {
        let by_row = table
            .rows
            .iter()
            .map(|r| {
                columns
                    .iter()
                    // These columns hold data only: a short string is a short
                    // (probably broken) image, never a reference.
                    .map(|c| match r.value(c) {
                        Some(Value::String(s)) => s.clone(),
                        other => match ImageCell::parse(other) {
                            ImageCell::Data(mut items) if !items.is_empty() => items.swap_remove(0),
                            _ => String::new(),
                        },
                    })
                    .collect()
            })
            .collect();
        Self { by_row }
    }

    /// Row `i`'s base64 images (empty strings where a column had none).
    pub fn row(&self, i: usize) -> &[String] {
        self.by_row.get(i).map(Vec::as_slice).unwrap_or(&[])
    }
}

/// Decodes one base64 image (standard alphabet, padding optional, whitespace
/// ignored) of `record`; bad base64 is an error naming the row.
pub fn decode(table: &Table, record: &Record, what: &str, data: &str) -> Result<Vec<u8>> {
    let cleaned: String = data.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    let cleaned = cleaned
        .strip_prefix("data:")
        .and_then(|rest| rest.split_once(";base64,").map(|(_, b)| b.to_string()))
        .unwrap_or(cleaned);
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    let bytes = engine
        .decode(cleaned.as_bytes())
        .map_err(|e| table.row_error(record, format!("{what} is not valid base64: {e}")))?;
    if bytes.is_empty() {
        return Err(table.row_error(record, format!("{what} is empty")));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn cells_are_data_lists_or_references() {
        let long = "A".repeat(100);
        assert_eq!(
            ImageCell::parse(Some(&Value::String(long.clone()))),
            ImageCell::Data(vec![long.clone()])
        );
        assert_eq!(
            ImageCell::parse(Some(&Value::String("12".into()))),
            ImageCell::Ref("12".into())
        );
        assert_eq!(
            ImageCell::parse(Some(&Value::String(format!("['{long}', '{long}']")))),
            ImageCell::Data(vec![long.clone(), long.clone()])
        );
        assert_eq!(
            ImageCell::parse(Some(&serde_json::json!({"bytes": "abc"}))),
            ImageCell::Data(vec!["abc".into()])
        );
        assert_eq!(ImageCell::parse(None), ImageCell::None);
    }

    #[test]
    fn references_resolve_or_name_the_row() {
        let long = "iVBORw0KGgo".repeat(8);
        let text = format!("index\timage\n1\t{long}\n1000001\t1\n2\t7\n");
        let table = Table::from_tsv(Path::new("m.tsv"), &text).unwrap();
        let keys: Vec<String> = vec!["1".into(), "1000001".into(), "2".into()];
        let err = RowImages::resolve(&table, "image", &keys)
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some(
                "m.tsv:4: its `image` is `7`: too short to be an image, and no row has that index"
            )
        );
        let text = format!("index\timage\n1\t{long}\n1000001\t1\n");
        let table = Table::from_tsv(Path::new("m.tsv"), &text).unwrap();
        let images = RowImages::resolve(&table, "image", &keys[..2]).unwrap();
        assert_eq!(images.row(1), std::slice::from_ref(&long));
    }

    #[test]
    fn bad_base64_names_the_row() {
        let table = Table::from_tsv(Path::new("m.tsv"), "index\timage\n1\tx\n").unwrap();
        let e = decode(&table, &table.rows[0], "row 1's image", "not*base64!")
            .err()
            .map(|e| e.to_string());
        assert!(e.is_some_and(|e| e.starts_with("m.tsv:2: row 1's image is not valid base64")));
        assert_eq!(
            decode(&table, &table.rows[0], "i", "aGk=").ok(),
            Some(b"hi".to_vec())
        );
        assert_eq!(
            decode(&table, &table.rows[0], "i", "aGk").ok(),
            Some(b"hi".to_vec())
        );
    }
}
