//! The `moe` subcommand of the `multitoken` binary.

use anyhow::{bail, Result};
use clap::Args;

/// `multitoken moe build|train-gate|set-gate`.
#[derive(Debug, Args)]
pub struct MoeArgs {
    /// Arguments, parsed by this crate.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub rest: Vec<String>,
}

/// Run `multitoken moe`.
pub fn run(_args: MoeArgs) -> Result<()> {
    bail!("multitoken moe is not built yet")
}
