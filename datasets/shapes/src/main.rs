//! `multitoken-datasets`: writes the synthetic shapes / beeps / topics dataset.
//!
//! ```text
//! multitoken-datasets --out DIR [--seed N] [--train N] [--heldout N] [--tasks a,b,...] [--style S]
//! multitoken-datasets --benchmark mmbench|pope --out FILE [--seed N] [--questions N]
//! ```
//! `--train`/`--heldout` are rows per task; task names are those of
//! `multitoken_datasets::Task::name` (image_shape, audio_count, ...).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use multitoken_datasets::{generate, GenerateConfig, Style, Task};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--benchmark") {
        return benchmark(&args);
    }
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

/// `--benchmark mmbench|pope --out FILE [--seed N] [--questions N]`: a
/// benchmark-format TSV of the shapes images (`--questions`: per task for
/// MMBench, in all for POPE).
fn benchmark(args: &[String]) -> Result<()> {
    let (mut kind, mut out, mut seed, mut questions) = (None, None, 7u64, None);
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--benchmark" => kind = Some(value()?.clone()),
            "--out" => out = Some(PathBuf::from(value()?)),
            "--seed" => seed = value()?.parse().with_context(|| format!("{flag}: not an integer"))?,
            "--questions" => questions = Some(value()?.parse::<usize>().with_context(|| format!("{flag}: not an integer"))?),
            other => bail!("unknown argument `{other}` with --benchmark (--benchmark, --out, --seed, --questions)"),
        }
    }
    let out = out.context("--out FILE is required")?;
    let text = match kind.as_deref() {
        Some("mmbench") => {
            multitoken_datasets::benchmarks::mmbench_tsv(seed, questions.unwrap_or(20))?
        }
        Some("pope") => multitoken_datasets::benchmarks::pope_tsv(seed, questions.unwrap_or(40))?,
        other => bail!(
            "--benchmark: `{}` is not mmbench or pope",
            other.unwrap_or("")
        ),
    };
    std::fs::write(&out, &text).with_context(|| format!("writing {}", out.display()))?;
    println!(
        "wrote {} ({} rows)",
        out.display(),
        text.lines().count().saturating_sub(1)
    );
    Ok(())
}

/// `--help`: the flags with their defaults, and every task by name.
fn usage() -> String {
    let defaults = GenerateConfig::default();
    let mut text = format!(
        "Writes the synthetic shapes / beeps / topics dataset: DIR/train.jsonl, DIR/heldout.jsonl and their items.

usage: multitoken-datasets --out DIR [--seed N] [--train N] [--heldout N] [--tasks a,b,...] [--style S]
       multitoken-datasets --benchmark mmbench|pope --out FILE [--seed N] [--questions N]

  --out DIR        where to write (created when missing)
  --seed N         random seed [default: {}]
  --train N        training rows per task [default: {}]
  --heldout N      held-out rows per task [default: {}]
  --tasks a,b,...  the tasks to write [default: all]
  --style S        classic (the original phrasings and plain square images),
                   varied (dozens of phrasings, any aspect, tinted/noisy
                   backgrounds, plus unanswerable and multi_turn tasks) or
                   unlike (a test style sharing no phrasing or background
                   with the others) [default: classic]

tasks:",
        defaults.seed, defaults.train_per_task, defaults.heldout_per_task
    );
    for task in Task::ALL {
        text.push_str(&format!("\n  {}", task.name()));
    }
    for task in Task::EXTRA {
        text.push_str(&format!(
            "\n  {} (added by --style varied|unlike)",
            task.name()
        ));
    }
    text
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
            "--style" => {
                let name = value()?;
                config.style = Style::from_name(name).with_context(|| {
                    format!("--style: unknown style `{name}` (classic, varied or unlike)")
                })?
            }
            "-h" | "--help" => {
                println!("{}", usage());
                std::process::exit(0);
            }
            other => bail!("unknown argument `{other}` (try --help)"),
        }
    }
    let out = out.context("--out DIR is required")?;
    Ok((out, config))
}
