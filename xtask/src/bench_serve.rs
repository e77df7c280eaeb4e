//! `cargo xtask bench serve`: see the issue that asks for it; being built.

use anyhow::{bail, Result};

/// Run this benchmark.
pub fn run(_args: &[String]) -> Result<()> {
    bail!("cargo xtask bench serve is not built yet")
}
