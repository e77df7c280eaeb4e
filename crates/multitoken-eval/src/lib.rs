//! multitoken-eval: the field's benchmarks in their own file formats, scored by
//! their reference rules, so a number from `multitoken eval --benchmark ...`
//! means what the same number means in a paper (see ARCHITECTURE.md,
//! "multitoken-eval").
//!
//! - MMBench (VLMEvalKit's TSV): [`mmbench`], choice extraction in [`mcq`], CircularEval.
//! - MMMU (VLMEvalKit's `MMMU_DEV_VAL.tsv`, or the Hugging Face layout as parquet or JSON Lines):
//!   [`mmmu`], lmms-eval's parsing and normalisation.
//! - POPE: [`pope`]; VQAv2: [`vqa`] (EvalAI's answer normalisation).
//!
//! With a model, [`predict`] asks every question through the server's
//! continuous-batching scheduler (greedy, the benchmark's prompt), resumable
//! from `predictions.jsonl`; [`report`] writes `report.json`, `report.md` and a
//! bar chart. [`run`] does the whole command.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod bench;
pub mod chart;
pub mod error;
pub mod images;
pub mod mcq;
pub mod mmbench;
pub mod mmmu;
pub mod pope;
pub mod predict;
pub mod pytext;
pub mod report;
pub mod run;
pub mod score;
pub mod table;
pub mod vqa;

pub use bench::{Benchmark, Loaded};
pub use error::{Error, Result};
pub use run::{run, EvalConfig, EvalOutcome};

/// A question as the model sees it: text with one `<image>` per image where
/// the benchmark puts it, and the images' file bytes in that order.
#[derive(Debug, Clone, PartialEq)]
pub struct Prompt {
    /// The user message; [`IMAGE_TOKEN`] marks each image.
    pub text: String,
    /// Image file bytes (PNG, JPEG, ...), one per marker.
    pub images: Vec<Vec<u8>>,
}

/// The marker for an image in [`Prompt::text`] (replaced by the model's own
/// image token when prompting).
pub const IMAGE_TOKEN: &str = "<image>";

impl Prompt {
    /// Images before the text (VLMEvalKit's and lmms-eval's order for a
    /// non-interleaved prompt): one marker line per image.
    pub fn images_first(images: Vec<Vec<u8>>, text: String) -> Self {
        let mut full = String::new();
        for _ in &images {
            full.push_str(IMAGE_TOKEN);
            full.push('\n');
        }
        full.push_str(&text);
        Self { text: full, images }
    }
}
