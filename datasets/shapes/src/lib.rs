//! multitoken-datasets: deterministic synthetic datasets for training and
//! testing multimodal models, written as multi_token JSON Lines rows.
//!
//! One generator, three modalities:
//! - images ([`images`]): a circle, square or triangle in red, green, blue or
//!   yellow, of varied size and position, on a plain light background of varied
//!   image size; questions about the shape, the colour, and which of two images
//!   shows what;
//! - audio ([`audio`]): 16 kHz mono WAV clips of one to four beeps, all high or
//!   all low; questions about the count and the pitch;
//! - documents ([`documents`]): short plain-text documents about one of a handful
//!   of topics; a question about the topic.
//!
//! [`generate`] writes `train.jsonl` and `heldout.jsonl` with their files under
//! `train/` and `heldout/` (paths in rows are relative to the JSONL file). The
//! same [`GenerateConfig`] always gives the same bytes; the two splits draw from
//! different streams of the seed, so no held-out sample is a training sample.
//! [`judge`] decides whether a generated answer names what a reference answer
//! names (the shape, colour, count, pitch, topic or image position).
//!
//! [`benchmarks`] writes small benchmark-format files of the same images
//! (an MMBench TSV with circular copies, a POPE TSV) for `multitoken eval`.
//!
//! [`GenerateConfig::style`] picks the look of the data: [`Style::Classic`]
//! (the default, above, byte for byte as it always was), [`Style::Varied`]
//! (for training: dozens of phrasings per task, odd aspect ratios, small to
//! large shapes, tinted and noisy backgrounds, unanswerable questions and
//! multi-turn chats; module [`varied`]) or [`Style::Unlike`] (a test set
//! sharing no phrasing, item noun or background with the other two).

pub mod audio;
pub mod benchmarks;
pub mod built;
mod checks;
pub mod documents;
pub mod images;
pub mod rows;
mod templates;
pub mod varied;

use std::path::{Path, PathBuf};

pub use rows::{
    generate, generate_split, judge, GenerateConfig, Message, Row, Split, Style, Summary, Task,
    UNSURE,
};

/// Errors of the dataset generator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or directory could not be written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
    /// An image could not be encoded.
    #[error("{path}: cannot encode the image: {message}")]
    Image {
        /// The image file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// A setting is out of range.
    #[error("invalid dataset setting: {0}")]
    Config(String),
}

/// Results of this crate.
pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn io_error(path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// SplitMix64's finaliser: 64 well-mixed bits from `z` (also a hash of a
/// point for [`images`]' value noise).
pub(crate) fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The top 53 of 64 random bits as a float uniform in `[0, 1)`.
pub(crate) fn unit_f64(bits: u64) -> f64 {
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

/// A small deterministic generator (SplitMix64): the same seed gives the same
/// stream on every platform and toolchain.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix64(self.0)
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        unit_f64(self.next_u64())
    }

    /// Uniform in `[lo, hi)`.
    pub fn range_f(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit()
    }

    /// Uniform integer in `[lo, hi]`; `lo` when `hi < lo`.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        if hi <= lo {
            return lo;
        }
        lo + (self.next_u64() % (hi - lo + 1) as u64) as usize
    }

    /// A uniformly chosen element (`None` for an empty slice).
    pub fn choose<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        if items.is_empty() {
            return None;
        }
        items.get(self.range(0, items.len() - 1))
    }

    /// A generator for sub-stream `stream` of this one's seed.
    pub fn fork(&self, stream: u64) -> Self {
        let mut base = Self(self.0 ^ stream.wrapping_mul(0xD6E8_FEB8_6659_FD93));
        Self(base.next_u64())
    }
}
