//! `cargo xtask demo-model`: train the embedded demo model with our own training binary; being built.

use anyhow::{bail, Result};

/// Run this task.
pub fn run(_args: &[String]) -> Result<()> {
    bail!("cargo xtask demo-model is not built yet")
}
