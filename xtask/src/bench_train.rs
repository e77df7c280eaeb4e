//! `cargo xtask bench train`: see the issue that asks for it; being built.

use anyhow::{bail, Result};

/// Run this benchmark.
pub fn run(_args: &[String]) -> Result<()> {
    bail!("cargo xtask bench train is not built yet")
}
