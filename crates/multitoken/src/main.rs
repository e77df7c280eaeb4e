//! The `multitoken` command line: every subcommand lives in the library's
//! [`multitoken::cli`], so that a binary linking more modality crates is the
//! same few lines.

fn main() -> anyhow::Result<()> {
    multitoken::cli::main()
}
