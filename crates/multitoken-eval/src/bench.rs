//! The benchmarks by name, and one loaded benchmark file whatever its kind.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use crate::images::RowImages;
use crate::mmbench::MmBench;
use crate::mmmu::Mmmu;
use crate::pope::Pope;
use crate::score::{Predictions, Scores};
use crate::table::{RowKey, Table};
use crate::vqa::Vqa;
use crate::{Error, Prompt, Result};

/// A benchmark `multitoken eval --benchmark` knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Benchmark {
    /// MMBench (VLMEvalKit TSV, CircularEval).
    MmBench,
    /// MMMU (lmms-eval's rules).
    Mmmu,
    /// POPE (lmms-eval's rules).
    Pope,
    /// VQAv2-style accuracy (EvalAI normalisation, 10 answers).
    Vqav2,
}

impl Benchmark {
    /// Every benchmark.
    pub const ALL: [Benchmark; 4] = [Self::MmBench, Self::Mmmu, Self::Pope, Self::Vqav2];

    /// The name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::MmBench => "mmbench",
            Self::Mmmu => "mmmu",
            Self::Pope => "pope",
            Self::Vqav2 => "vqav2",
        }
    }

    /// New-token budget when prompting: lmms-eval's `generation_kwargs`
    /// (MMMU and POPE 128, VQAv2 16); MMBench answers are a letter or an option.
    pub fn default_max_new_tokens(self) -> usize {
        match self {
            Self::MmBench => 64,
            Self::Mmmu | Self::Pope => 128,
            Self::Vqav2 => 16,
        }
    }
}

impl fmt::Display for Benchmark {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Benchmark {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let lower = s.to_ascii_lowercase();
        Self::ALL
            .into_iter()
            .find(|b| b.name() == lower || (lower == "vqa" && *b == Self::Vqav2))
            .ok_or_else(|| {
                Error::Config(format!(
                    "unknown benchmark `{s}`; known: {}",
                    Self::ALL.map(|b| b.name()).join(", ")
                ))
            })
    }
}

/// A benchmark file read and checked.
#[derive(Debug, Clone)]
pub enum Loaded {
    /// MMBench.
    MmBench(MmBench),
    /// MMMU.
    Mmmu(Mmmu),
    /// POPE.
    Pope(Pope),
    /// VQAv2.
    Vqav2(Vqa),
}

impl Loaded {
    /// Reads `path` as `benchmark`.
    pub fn read(benchmark: Benchmark, path: &Path) -> Result<Self> {
        let table = Table::read(path)?;
        if table.rows.is_empty() {
            return Err(Error::File {
                file: path.to_path_buf(),
                message: "no rows".into(),
            });
        }
        Ok(match benchmark {
            Benchmark::MmBench => Self::MmBench(MmBench::load(table)?),
            Benchmark::Mmmu => Self::Mmmu(Mmmu::load(table)?),
            Benchmark::Pope => Self::Pope(Pope::load(table)?),
            Benchmark::Vqav2 => Self::Vqav2(Vqa::load(table)?),
        })
    }

    /// Which benchmark.
    pub fn benchmark(&self) -> Benchmark {
        match self {
            Self::MmBench(_) => Benchmark::MmBench,
            Self::Mmmu(_) => Benchmark::Mmmu,
            Self::Pope(_) => Benchmark::Pope,
            Self::Vqav2(_) => Benchmark::Vqav2,
        }
    }

    /// The rows to answer (the first `limit` questions; MMBench: with their copies).
    pub fn keys(&self, limit: Option<usize>) -> Vec<RowKey> {
        match self {
            Self::MmBench(b) => b.keys(limit),
            Self::Mmmu(b) => b.keys(limit),
            Self::Pope(b) => b.keys(limit),
            Self::Vqav2(b) => b.keys(limit),
        }
    }

    /// Every key of the file (to tell a prediction for no row).
    pub fn all_keys(&self) -> Vec<RowKey> {
        self.keys(None)
    }

    /// The prompt for the row with `key`.
    pub fn prompt(&self, key: &RowKey) -> Result<Prompt> {
        let i = self
            .position(key)
            .ok_or_else(|| Error::Config(format!("no row has index {key}")))?;
        match self {
            Self::MmBench(b) => b.prompt(i),
            Self::Mmmu(b) => b.prompt(i),
            Self::Pope(b) => b.prompt(i),
            Self::Vqav2(b) => b.prompt(i),
        }
    }

    fn position(&self, key: &RowKey) -> Option<usize> {
        match self {
            Self::MmBench(b) => b.position(key),
            Self::Mmmu(b) => b.position(key),
            Self::Pope(b) => b.position(key),
            Self::Vqav2(b) => b.position(key),
        }
    }

    /// Scores the first `limit` questions from `predictions`.
    pub fn score(&self, predictions: &Predictions, limit: Option<usize>) -> Result<Scores> {
        match self {
            Self::MmBench(b) => b.score(predictions, limit),
            Self::Mmmu(b) => b.score(predictions, limit),
            Self::Pope(b) => b.score(predictions, limit),
            Self::Vqav2(b) => b.score(predictions, limit),
        }
    }
}

/// A table with one key per row: `index`, else `question_id`, else `id`;
/// a missing or repeated key is an error naming the row.
#[derive(Debug, Clone)]
pub struct KeyedRows {
    /// The table.
    pub table: Table,
    /// Row `i`'s key.
    pub keys: Vec<RowKey>,
    /// Key to row.
    pub position: HashMap<RowKey, usize>,
}

impl KeyedRows {
    /// The row with `key`.
    pub fn row_of(&self, key: &RowKey) -> Option<usize> {
        self.position.get(key).copied()
    }

    /// The first `limit` keys (all without one), in file order.
    pub fn first_keys(&self, limit: Option<usize>) -> Vec<RowKey> {
        self.keys.iter().take(limit.unwrap_or(usize::MAX)).cloned().collect()
    }
}

/// Keys the rows of `table` (see [`KeyedRows`]).
pub fn keyed_rows(table: Table, benchmark: &str) -> Result<KeyedRows> {
    let Some(column) = ["index", "question_id", "id"]
        .into_iter()
        .find(|c| table.has(c))
    else {
        return Err(Error::File {
            file: table.file.clone(),
            message: format!(
                "not a {benchmark} file: no `index`, `question_id` or `id` column to name rows by (its columns: {})",
                table.columns.join(", ")
            ),
        });
    };
    let mut keys = Vec::with_capacity(table.rows.len());
    let mut position = HashMap::new();
    for (i, record) in table.rows.iter().enumerate() {
        let key = record
            .value(column)
            .and_then(RowKey::from_json)
            .ok_or_else(|| {
                table.row_error(record, format!("no `{column}` (or not a number or text)"))
            })?;
        if let Some(first) = position.insert(key.clone(), i) {
            return Err(table.row_error(
                record,
                format!(
                    "{column} {key} again (first on line {})",
                    table.rows[first].line
                ),
            ));
        }
        keys.push(key);
    }
    Ok(KeyedRows {
        table,
        keys,
        position,
    })
}

impl KeyedRows {
    /// The rows' images from `column` (references resolved), if it exists.
    pub fn images(&self, column: &str) -> Result<RowImages> {
        if !self.table.has(column) {
            return Ok(RowImages::default());
        }
        let keys: Vec<String> = self.keys.iter().map(RowKey::to_string).collect();
        RowImages::resolve(&self.table, column, &keys)
    }

    /// Row `i`'s images decoded (bad base64 names the row).
    pub fn decode_images(&self, images: &RowImages, i: usize) -> Result<Vec<Vec<u8>>> {
        let record = &self.table.rows[i];
        images
            .row(i)
            .iter()
            .enumerate()
            .filter(|(_, d)| !d.is_empty())
            .map(|(k, d)| {
                crate::images::decode(
                    &self.table,
                    record,
                    &format!("row {}'s image {}", self.keys[i], k + 1),
                    d,
                )
            })
            .collect()
    }
}
