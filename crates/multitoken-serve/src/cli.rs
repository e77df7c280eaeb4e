//! The `serve` subcommand of the `multitoken` binary.

use anyhow::{bail, Result};
use clap::Args;

/// `multitoken serve --model DIR [--host] [--port]`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Arguments, parsed by this crate.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub rest: Vec<String>,
}

/// Run `multitoken serve`.
pub fn run(_args: ServeArgs) -> Result<()> {
    bail!("multitoken serve is not built yet")
}
