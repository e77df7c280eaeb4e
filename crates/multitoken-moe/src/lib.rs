//! multitoken-moe: Cephalo-style mixtures of experts built from fine-tuned models.
//!
//! A base model supplies everything but the MLPs; every decoder layer's MLP
//! becomes a set of experts (expert j = model j's MLP of that layer, from a full
//! checkpoint or a merged PEFT LoRA adapter) behind a per-layer gate
//! `Linear(hidden, num_experts)`. See ARCHITECTURE.md ("multitoken-moe").
//!
//! - [`build`]: `multitoken moe build`, writing an MoE directory;
//! - [`layer`]: the sparse-dispatch [`layer::MoeFeedForward`];
//! - [`load`]: loading an MoE directory (also registered with multitoken-lm's
//!   loader, so every command loads it like any model);
//! - [`gate`]: `set-gate` and Cephalo's gate training (`train-gate`);
//! - [`cli`]: the `multitoken moe` subcommand.

pub mod build;
pub mod cli;
pub mod config;
pub mod error;
pub mod gate;
pub mod layer;
pub mod load;
pub mod lora;

pub use config::{MoeConfig, Routing};
pub use error::{Error, Result};
pub use layer::{Dispatch, MoeFeedForward};

/// Forces the linker to keep this crate's `inventory` registration (the MoE
/// directory loader) in a binary: call it once (e.g. from `main`); it does
/// nothing else.
pub fn link() {
    std::hint::black_box(load::load_moe_dir as fn(_, _) -> _);
}
