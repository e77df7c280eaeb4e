//! The `train`, `dataset`, `merge-lora` and `eval` subcommands of the `multitoken` binary.

use anyhow::{bail, Result};
use clap::Args;

/// `multitoken train`: train projectors, LoRA adapters or the whole LM.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Arguments, parsed by this crate.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub rest: Vec<String>,
}

/// `multitoken dataset`: convert and check datasets.
#[derive(Debug, Args)]
pub struct DatasetArgs {
    /// Arguments, parsed by this crate.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub rest: Vec<String>,
}

/// `multitoken merge-lora`: fold a PEFT adapter into the base weights.
#[derive(Debug, Args)]
pub struct MergeLoraArgs {
    /// Arguments, parsed by this crate.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub rest: Vec<String>,
}

/// `multitoken eval`: accuracy on a held-out dataset.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Arguments, parsed by this crate.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub rest: Vec<String>,
}

/// Run `multitoken train`.
pub fn train(_args: TrainArgs) -> Result<()> {
    bail!("multitoken train is not built yet")
}

/// Run `multitoken dataset`.
pub fn dataset(_args: DatasetArgs) -> Result<()> {
    bail!("multitoken dataset is not built yet")
}

/// Run `multitoken merge-lora`.
pub fn merge_lora(_args: MergeLoraArgs) -> Result<()> {
    bail!("multitoken merge-lora is not built yet")
}

/// Run `multitoken eval`.
pub fn eval(_args: EvalArgs) -> Result<()> {
    bail!("multitoken eval is not built yet")
}
