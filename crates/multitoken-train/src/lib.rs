//! multitoken-train: see ARCHITECTURE.md ("multitoken-train") and USAGE.md.
//!
//! Datasets in multi_token's JSONL schema ([`data`]), the trainable model
//! (projectors, LoRA adapters, the whole LM, encoders: [`model`]), AdamW with
//! warmup + cosine/linear schedules and global-norm clipping ([`optim`]), the
//! training loop with atomic checkpoints and exact resume ([`trainer`]), output
//! directory safety and run identities ([`run`]), and the
//! `train` / `dataset` / `merge-lora` / `eval` subcommands ([`cli`]).

pub mod cli;
pub mod data;
pub mod error;
pub mod eval;
pub mod merge;
pub mod model;
pub mod optim;
pub mod plot;
pub mod run;
pub mod trainer;

pub use error::{Error, Result};
