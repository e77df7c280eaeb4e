//! `cargo xtask fixtures [NAME...]`: regenerate the parity fixtures under `tests/fixtures/`.
//!
//! Each `xtask/fixtures/NAME.py` is a Python script (torch + transformers, dev
//! only, never in CI) that builds tiny seeded random models and records their
//! outputs; with no names every script runs. The interpreter is `$PYTHON`, else
//! the workspace's `.venv/bin/python`, else `python3` from `PATH`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// Run the fixture scripts named in `args` (all of them when empty).
pub fn run(args: &[String]) -> Result<()> {
    let root = workspace_root();
    let scripts_dir = root.join("xtask").join("fixtures");
    let scripts = if args.is_empty() {
        all_scripts(&scripts_dir)?
    } else {
        args.iter()
            .map(|name| {
                let path = scripts_dir.join(format!("{}.py", name.trim_end_matches(".py")));
                if path.is_file() {
                    Ok(path)
                } else {
                    bail!("no fixture script {} (available: {})", path.display(), available(&scripts_dir))
                }
            })
            .collect::<Result<Vec<_>>>()?
    };
    let python = python(&root);
    for script in scripts {
        println!("fixtures: {} {}", python.display(), script.display());
        let status = Command::new(&python)
            .arg(&script)
            .current_dir(&root)
            .status()
            .with_context(|| format!("cannot run {} (set $PYTHON to a Python with torch + transformers)", python.display()))?;
        if !status.success() {
            bail!("{} failed with {status}", script.display());
        }
    }
    Ok(())
}

fn workspace_root() -> PathBuf {
    let xtask = Path::new(env!("CARGO_MANIFEST_DIR"));
    xtask.parent().map_or_else(|| xtask.to_path_buf(), Path::to_path_buf)
}

/// `$PYTHON`, else `.venv/bin/python` in the workspace, else `python3`.
fn python(root: &Path) -> PathBuf {
    if let Some(p) = std::env::var_os("PYTHON").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let venv = root.join(".venv").join("bin").join("python");
    if venv.is_file() {
        return venv;
    }
    PathBuf::from("python3")
}

fn all_scripts(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut scripts: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "py"))
        .collect();
    scripts.sort();
    if scripts.is_empty() {
        bail!("no fixture scripts in {}", dir.display());
    }
    Ok(scripts)
}

fn available(dir: &Path) -> String {
    all_scripts(dir)
        .map(|s| {
            s.iter()
                .filter_map(|p| p.file_stem().map(|n| n.to_string_lossy().into_owned()))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default()
}
