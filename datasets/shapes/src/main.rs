//! `multitoken-datasets`: writes the synthetic shapes / beeps / topics dataset.
//!
//! ```text
//! multitoken-datasets --out DIR [--seed N] [--train N] [--heldout N] [--tasks a,b,...]
//! ```
//! `--train`/`--heldout` are rows per task; task names are those of
//! `multitoken_datasets::Task::name` (image_shape, audio_count, ...).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use multitoken_datasets::{generate, GenerateConfig, Task};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (out, config) = parse(&args)?;
    let summary = generate(&out, &config)?;
    println!(
        "wrote {} ({} rows) and {} ({} rows)",
        summary.train_file.display(),
        summary.train_rows,
        summary.heldout_file.display(),
        summary.heldout_rows
    );
    Ok(())
}

/// Parses the command line into the output directory and the config.
pub fn parse(args: &[String]) -> Result<(PathBuf, GenerateConfig)> {
    let mut out = None;
    let mut config = GenerateConfig::default();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--out" => out = Some(PathBuf::from(value()?)),
            "--seed" => {
                config.seed = value()?
                    .parse()
                    .with_context(|| format!("{flag}: not an integer"))?
            }
            "--train" => {
                config.train_per_task = value()?
                    .parse()
                    .with_context(|| format!("{flag}: not an integer"))?
            }
            "--heldout" => {
                config.heldout_per_task = value()?
                    .parse()
                    .with_context(|| format!("{flag}: not an integer"))?
            }
            "--tasks" => {
                config.tasks = value()?
                    .split(',')
                    .map(|name| {
                        Task::from_name(name.trim())
                            .with_context(|| format!("--tasks: unknown task `{name}`"))
                    })
                    .collect::<Result<_>>()?
            }
            "-h" | "--help" => {
                println!("usage: multitoken-datasets --out DIR [--seed N] [--train N] [--heldout N] [--tasks a,b,...]");
                std::process::exit(0);
            }
            other => bail!("unknown argument `{other}` (try --help)"),
        }
    }
    let out = out.context("--out DIR is required")?;
    Ok((out, config))
}
