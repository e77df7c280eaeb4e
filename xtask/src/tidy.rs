//! `cargo xtask tidy`: the map's guard.
//!
//! Fails on a Rust file without a `//!` header, a file over the size limit, and a
//! crate dependency that DESIGN.md forbids. It also runs as a test of the xtask
//! crate, so `cargo test --workspace` enforces it.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Longest a source file may grow before it must be split.
const MAX_LINES: usize = 1_500;

/// Crates that implement a modality; they may depend on `multitoken-core` and `multitoken-kernels` alone.
const MODALITY_PREFIXES: &[&str] = &["multitoken-vision", "multitoken-audio", "multitoken-document"];

/// Crates that must do no network IO, and so may not depend on these.
const NETWORK_CRATES: &[&str] = &["reqwest", "hyper", "ureq", "tokio", "axum", "hf-hub", "curl"];

/// Run every check and report all problems at once.
pub fn run(_args: &[String]) -> Result<()> {
    let root = workspace_root()?;
    let problems = check_tree(&root)?;
    if problems.is_empty() {
        println!("tidy: ok");
        return Ok(());
    }
    for problem in &problems {
        eprintln!("tidy: {problem}");
    }
    bail!("tidy found {} problem(s)", problems.len())
}

fn workspace_root() -> Result<PathBuf> {
    let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .map(Path::to_path_buf)
        .context("xtask has no parent directory")
}

/// All problems found under `root`.
fn check_tree(root: &Path) -> Result<Vec<String>> {
    let mut problems = Vec::new();
    let mut files = Vec::new();
    for dir in ["crates", "xtask", "tests", "examples", "datasets"] {
        collect_rust_files(&root.join(dir), &mut files)?;
    }
    for file in &files {
        let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        let shown = file.strip_prefix(root).unwrap_or(file).display().to_string();
        problems.extend(check_file(&shown, &text));
    }
    let crates_dir = root.join("crates");
    for entry in std::fs::read_dir(&crates_dir).with_context(|| format!("reading {}", crates_dir.display()))? {
        let dir = entry?.path();
        let manifest = dir.join("Cargo.toml");
        if !manifest.is_file() {
            continue;
        }
        let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let text = std::fs::read_to_string(&manifest).with_context(|| format!("reading {}", manifest.display()))?;
        problems.extend(check_dependencies(&name, &normal_dependencies(&text)));
    }
    Ok(problems)
}

fn collect_rust_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    if !dir.is_dir() {
        return Ok(());
    }
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if path.is_dir() {
            // Generated or foreign trees are not ours to police.
            if name == "target" || name.starts_with('.') || name == "fixtures" {
                continue;
            }
            collect_rust_files(&path, out)?;
        } else if name.ends_with(".rs") {
            out.push(path);
        }
    }
    Ok(())
}

/// Header and size problems of one file.
fn check_file(shown: &str, text: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    if !first.starts_with("//!") {
        problems.push(format!("{shown}: no `//!` header saying what the file is for"));
    }
    let lines = text.lines().count();
    if lines > MAX_LINES {
        problems.push(format!("{shown}: {lines} lines, over the {MAX_LINES}-line limit; split it"));
    }
    problems
}

/// Names in the `[dependencies]` table (normal, not dev or build) of a manifest.
fn normal_dependencies(manifest: &str) -> Vec<String> {
    let mut deps = Vec::new();
    let mut in_deps = false;
    for line in manifest.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            let header = line.trim_matches(|c| c == '[' || c == ']');
            in_deps = header == "dependencies";
            if let Some(name) = header.strip_prefix("dependencies.") {
                deps.push(name.to_string());
            }
            continue;
        }
        if in_deps && !line.is_empty() && !line.starts_with('#') {
            let key = line.split(['=', '.']).next().unwrap_or("").trim();
            if !key.is_empty() {
                deps.push(key.to_string());
            }
        }
    }
    deps
}

/// Which of our crates `krate` may depend on, per DESIGN.md.
fn check_dependencies(krate: &str, deps: &[String]) -> Vec<String> {
    let ours: Vec<&String> = deps.iter().filter(|d| d.starts_with("multitoken")).collect();
    let is_modality = MODALITY_PREFIXES.iter().any(|p| krate.starts_with(p));
    let allowed: Option<&[&str]> = match krate {
        "multitoken-kernels" => Some(&[]),
        // Core builds every modality inside the kernels' quantization scope
        // (`--quantize-towers`); the kernels depend on nothing of ours.
        "multitoken-core" => Some(&["multitoken-kernels"]),
        "multitoken-lm" => Some(&["multitoken-core", "multitoken-kernels"]),
        "multitoken-train" | "multitoken-moe" | "multitoken-serve" => {
            Some(&["multitoken-core", "multitoken-lm", "multitoken-train", "multitoken-moe"])
        }
        // The importers build towers through the registry and Cephalo's
        // mixtures with multitoken-moe's layers; never a modality crate by name.
        "multitoken-vlm" => Some(&["multitoken-core", "multitoken-lm", "multitoken-moe"]),
        // Benchmarks prompt through the server's scheduler, never a modality crate.
        "multitoken-eval" => Some(&["multitoken-core", "multitoken-lm", "multitoken-serve"]),
        _ if is_modality => Some(&["multitoken-core", "multitoken-kernels"]),
        _ => None,
    };
    let mut problems = Vec::new();
    if let Some(allowed) = allowed {
        for dep in ours {
            if !allowed.contains(&dep.as_str()) {
                problems.push(format!(
                    "crates/{krate} depends on {dep}; DESIGN.md allows it only {allowed:?}"
                ));
            }
        }
    }
    let offline = matches!(krate, "multitoken-core" | "multitoken-kernels" | "multitoken-lm") || is_modality;
    if offline {
        for dep in deps {
            if NETWORK_CRATES.contains(&dep.as_str()) {
                problems.push(format!(
                    "crates/{krate} depends on {dep}; core, lm and the modality crates do no network IO"
                ));
            }
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tree_is_tidy() -> Result<()> {
        let problems = check_tree(&workspace_root()?)?;
        assert!(problems.is_empty(), "tidy problems:\n{}", problems.join("\n"));
        Ok(())
    }

    fn check_deps(krate: &str, manifest: &str, expect: &[&str]) {
        let problems = check_dependencies(krate, &normal_dependencies(manifest));
        assert_eq!(problems.len(), expect.len(), "{problems:?}");
        for (problem, needle) in problems.iter().zip(expect) {
            assert!(problem.contains(needle), "{problem} should mention {needle}");
        }
    }

    #[test]
    fn dependency_rules() {
        check_deps("multitoken-core", "[dependencies]\ncandle-core.workspace = true\n", &[]);
        check_deps("multitoken-core", "[dependencies]\nmultitoken-lm.workspace = true\n", &["multitoken-lm"]);
        check_deps("multitoken-vision", "[dependencies]\nmultitoken-core = { path = \"x\" }\n", &[]);
        check_deps("multitoken-vision", "[dependencies]\nmultitoken-kernels.workspace = true\n", &[]);
        check_deps("multitoken-kernels", "[dependencies]\nmultitoken-core.workspace = true\n", &["multitoken-core"]);
        check_deps("multitoken-core", "[dependencies]\nmultitoken-kernels.workspace = true\n", &[]);
        check_deps("multitoken-vision", "[dependencies]\nmultitoken-lm = \"1\"\n", &["multitoken-lm"]);
        check_deps("multitoken-serve", "[dependencies]\nmultitoken-vision.workspace = true\n", &["multitoken-vision"]);
        check_deps("multitoken-lm", "[dependencies]\nreqwest = \"1\"\n", &["network"]);
        check_deps("multitoken-lm", "[dev-dependencies]\nmultitoken-vision = \"1\"\n", &[]);
        check_deps("multitoken-audio", "[dependencies.multitoken-train]\nworkspace = true\n", &["multitoken-train"]);
        check_deps("multitoken", "[dependencies]\nmultitoken-vision.workspace = true\nmultitoken-serve = \"1\"\n", &[]);
    }

    #[test]
    fn file_rules() {
        assert!(check_file("a.rs", "//! ok\nfn f() {}\n").is_empty());
        assert!(check_file("a.rs", "\n//! ok after blank\n").is_empty());
        assert_eq!(check_file("a.rs", "fn f() {}\n").len(), 1);
        assert_eq!(check_file("a.rs", &"//! x\n".repeat(MAX_LINES + 1)).len(), 1);
    }
}
