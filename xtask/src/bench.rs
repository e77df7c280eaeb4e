//! (being written)

use anyhow::Result;

/// Run this task.
pub fn run(_args: &[String]) -> Result<()> {
    anyhow::bail!("not written yet")
}
