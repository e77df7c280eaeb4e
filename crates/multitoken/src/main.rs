//! The `multitoken` command line: `generate`, `chat`, and (in later issues)
//! `train`, `serve`, `moe`, `dataset`, `inspect`.
//!
//! Argument parsing and printing live here; the work is done by the libraries.

mod cli;

use anyhow::Result;
use clap::Parser;

fn main() -> Result<()> {
    let args = cli::Cli::parse();
    cli::run(args)
}
