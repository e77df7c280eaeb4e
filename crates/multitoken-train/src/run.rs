//! Keeping runs apart: what an output directory of a run holds, refusing to
//! train over a previous run (or into the source model) by accident, clearing
//! a previous run on `--overwrite-output-dir`, and the identity of a run that
//! its checkpoints record so that `--resume` never continues another run.
//!
//! `--overwrite-output-dir` removes the files and directories a run writes
//! ([`RUN_FILES`], `checkpoint-*`, `.checkpoint-*.tmp`, `encoder-*`, `lm/`) and
//! nothing else, after the model and the dataset have loaded (a run that fails
//! to start leaves the old one intact), before the first step: the new run's
//! checkpoints never sit next to the old run's.

use std::hash::{Hash, Hasher};
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::trainer::TrainConfig;
use crate::{Error, Result};

/// Files a run writes at the top of its output directory.
pub const RUN_FILES: [&str; 9] = [
    "multitoken.json",
    "projectors.safetensors",
    "adapter_config.json",
    "adapter_model.safetensors",
    "metrics.jsonl",
    "loss.png",
    "trainer_state.json",
    "preprocessor_config.json",
    "processor_config.json",
];

/// Files whose presence says "a run (or a trained model) is here".
const RUN_MARKERS: [&str; 5] = [
    "multitoken.json",
    "projectors.safetensors",
    "adapter_model.safetensors",
    "metrics.jsonl",
    "trainer_state.json",
];

/// `p` made absolute with symlinks and `..` resolved as far as it exists: the
/// longest existing ancestor is canonicalised and the rest appended with `.`
/// and `..` applied lexically, so two spellings of one directory compare equal
/// even before it is created.
pub fn resolved(p: &Path) -> PathBuf {
    let abs = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let mut existing = abs.clone();
    let mut rest: Vec<std::ffi::OsString> = Vec::new();
    loop {
        if let Ok(canonical) = existing.canonicalize() {
            let mut out = canonical;
            for part in rest.iter().rev() {
                match Path::new(part).components().next() {
                    Some(Component::ParentDir) => {
                        out.pop();
                    }
                    Some(Component::CurDir) | None => {}
                    _ => out.push(part),
                }
            }
            return out;
        }
        match (existing.file_name().map(|n| n.to_os_string()), existing.parent()) {
            (Some(name), Some(parent)) => {
                rest.push(name);
                existing = parent.to_path_buf();
            }
            _ => {
                // `..` or the root: step over it lexically.
                let last = existing.components().next_back();
                match (last, existing.parent()) {
                    (Some(c), Some(parent)) => {
                        rest.push(c.as_os_str().to_os_string());
                        existing = parent.to_path_buf();
                    }
                    _ => return abs,
                }
            }
        }
    }
}

/// The run artefacts in `dir` (names, sorted): top-level [`RUN_FILES`] (and
/// their `.tmp` files, left by an interrupted atomic write) and the
/// `checkpoint-*`, `.checkpoint-*.tmp`, `encoder-*` and `lm` directories.
/// Empty when `dir` does not exist.
pub fn artefacts(dir: &Path) -> Result<Vec<String>> {
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_dir = entry.path().is_dir();
        let run_dir = is_dir
            && (name.starts_with("checkpoint-")
                || (name.starts_with(".checkpoint-") && name.ends_with(".tmp"))
                || name.starts_with("encoder-")
                || name == "lm");
        let base = name.strip_suffix(".tmp").unwrap_or(&name);
        if run_dir || (!is_dir && RUN_FILES.contains(&base)) {
            found.push(name);
        }
    }
    found.sort();
    Ok(found)
}

/// Whether `dir` holds a previous run or a trained model: a checkpoint or one
/// of the files only a run writes (`multitoken.json`, projector / adapter
/// weights, `metrics.jsonl`, `trainer_state.json`).
pub fn holds_run(artefacts: &[String]) -> bool {
    artefacts
        .iter()
        .any(|a| a.starts_with("checkpoint-") || RUN_MARKERS.contains(&a.as_str()))
}

/// Checks the output directory before anything is loaded: not the source
/// model (nor its LM, `lm_path`, when known), and not a previous run unless
/// resuming it or `overwrite_output_dir` is set. Returns the artefacts found.
pub fn check_output_dir(cfg: &TrainConfig) -> Result<Vec<String>> {
    let out = resolved(&cfg.output_dir);
    if out == resolved(&cfg.model) {
        return Err(Error::Config(format!(
            "--output-dir {} is the source model directory {} (after resolving `..` and symlinks): \
             training would overwrite the model it reads; choose another --output-dir",
            cfg.output_dir.display(),
            cfg.model.display()
        )));
    }
    if cfg.resume.is_some() && cfg.overwrite_output_dir {
        return Err(Error::Config(
            "--resume and --overwrite-output-dir exclude each other: resuming continues the run in \
             --output-dir, overwriting removes it"
                .into(),
        ));
    }
    let found = artefacts(&cfg.output_dir)?;
    if cfg.resume.is_none() && !cfg.overwrite_output_dir && holds_run(&found) {
        return Err(Error::Config(format!(
            "--output-dir {} already holds a training run or trained model ({}); pass \
             --overwrite-output-dir to replace it, --resume to continue it, or choose another --output-dir",
            cfg.output_dir.display(),
            summarize(&found)
        )));
    }
    if cfg.overwrite_output_dir {
        // Never remove what this run reads.
        let mut inputs = vec![("--model", cfg.model.clone()), ("--dataset", cfg.dataset.clone())];
        if let Some(p) = &cfg.pretrained_projectors {
            inputs.push(("--pretrained-projectors", p.clone()));
        }
        if let Some(p) = &cfg.feature_cache {
            inputs.push(("--feature-cache", p.clone()));
        }
        for name in &found {
            let doomed = out.join(name);
            for (flag, input) in &inputs {
                if resolved(input).starts_with(&doomed) {
                    return Err(Error::Config(format!(
                        "--overwrite-output-dir would remove {} of the previous run, which holds {flag} {}; \
                         copy it elsewhere first or choose another --output-dir",
                        doomed.display(),
                        input.display()
                    )));
                }
            }
        }
    }
    Ok(found)
}

/// Refuses an output directory that is the model's LM directory (known only
/// once the model's `multitoken.json` is read).
pub fn check_not_lm(cfg: &TrainConfig, lm_path: &Path) -> Result<()> {
    if resolved(&cfg.output_dir) == resolved(lm_path) {
        return Err(Error::Config(format!(
            "--output-dir {} is the language model directory {} that {} is based on: training would \
             overwrite it; choose another --output-dir",
            cfg.output_dir.display(),
            lm_path.display(),
            cfg.model.display()
        )));
    }
    Ok(())
}

/// Removes the previous run's artefacts (names from [`artefacts`]) from `dir`.
pub fn clear(dir: &Path, artefacts: &[String]) -> Result<()> {
    for name in artefacts {
        let path = dir.join(name);
        let result = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        match result {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(&path, e)),
        }
    }
    Ok(())
}

fn summarize(found: &[String]) -> String {
    let shown: Vec<&str> = found.iter().take(6).map(String::as_str).collect();
    let more = found.len().saturating_sub(shown.len());
    if more > 0 {
        format!("{} and {more} more", shown.join(", "))
    } else {
        shown.join(", ")
    }
}

/// What a run is, recorded in every checkpoint's `trainer_state.json`: a
/// resumed run must match it. Each part is a hex digest, so that a mismatch
/// can say which part differs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunIdentity {
    /// The source model: its directory's files (and its LM's, and the
    /// `--pretrained-projectors` file): small files by content, weights by
    /// name and size.
    pub model: String,
    /// The dataset file's bytes.
    pub dataset: String,
    /// The settings that decide what trains and which batches it sees: stage,
    /// encoders, LoRA settings, seed, batch size, accumulation, length
    /// grouping and truncation. Optimiser settings and the step count may
    /// change on resume and are not part of it.
    pub setup: String,
}

impl RunIdentity {
    /// The identity of the run `cfg` describes, whose model's LM is at `lm_path`.
    pub fn of(cfg: &TrainConfig, lm_path: &Path) -> Result<Self> {
        let mut model = Fnv::default();
        hash_dir(&cfg.model, &mut model);
        if resolved(lm_path) != resolved(&cfg.model) {
            hash_dir(lm_path, &mut model);
        }
        if let Some(p) = &cfg.pretrained_projectors {
            hash_file(p, &mut model);
        }
        let mut dataset = Fnv::default();
        let bytes = std::fs::read(&cfg.dataset).map_err(|e| Error::io(&cfg.dataset, e))?;
        dataset.write(&bytes);
        let mut setup = Fnv::default();
        let settings = serde_json::json!({
            "stage": cfg.stage,
            "train_encoders": cfg.train_encoders,
            "lora": if cfg.stage == crate::trainer::Stage::Lora {
                serde_json::json!([cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules])
            } else {
                serde_json::Value::Null
            },
            "seed": cfg.seed,
            "batch": cfg.per_device_train_batch_size,
            "accumulation": cfg.gradient_accumulation_steps,
            "group_by_length": cfg.group_by_length,
            "model_max_length": cfg.model_max_length,
        });
        // Only when set, so that the identities of earlier runs do not change:
        // adapters trained over one quantization resume only over the same one.
        let mut settings = settings;
        if let (false, serde_json::Value::Object(map)) = (cfg.freeze_lm.is_empty(), &mut settings) {
            map.insert("freeze_lm".into(), serde_json::json!(cfg.freeze_lm));
        }
        for (key, value) in [("quantize", &cfg.quantize), ("quantize_towers", &cfg.quantize_towers)] {
            if let (Some(q), serde_json::Value::Object(map)) = (value, &mut settings) {
                map.insert(key.into(), serde_json::Value::String(q.to_ascii_lowercase()));
            }
        }
        setup.write(settings.to_string().as_bytes());
        Ok(Self {
            model: model.hex(),
            dataset: dataset.hex(),
            setup: setup.hex(),
        })
    }

    /// Why `self` (a checkpoint's) is not `this` run's, or `None` when it is.
    pub fn mismatch(&self, this: &RunIdentity) -> Option<String> {
        let mut parts = Vec::new();
        if self.model != this.model {
            parts.push("the model (--model, its LM or --pretrained-projectors)");
        }
        if self.dataset != this.dataset {
            parts.push("the dataset (--dataset)");
        }
        if self.setup != this.setup {
            parts.push(
                "the training setup (--stage, --train-encoders, LoRA settings, --quantize, --quantize-towers, --seed, batch size, \
                 accumulation, --group-by-length or --model-max-length)",
            );
        }
        (!parts.is_empty()).then(|| {
            format!(
                "it belongs to another run: {} differ(s) from this run's; resume with the settings that \
                 wrote it, or start a new run in another --output-dir",
                parts.join(", ")
            )
        })
    }
}

/// Files up to this size are hashed by content; larger ones (weights) by name and size.
const HASH_CONTENT_LIMIT: u64 = 4 << 20;

/// Feeds the regular files directly in `dir` (sorted by name) to `h`; a file
/// path is fed as one file. Unreadable entries are skipped: loading reports them.
fn hash_dir(dir: &Path, h: &mut Fnv) {
    if dir.is_file() {
        hash_file(dir, h);
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    for path in files {
        hash_file(&path, h);
    }
}

fn hash_file(path: &Path, h: &mut Fnv) {
    path.file_name().hash(h);
    let Ok(meta) = std::fs::metadata(path) else {
        return;
    };
    if meta.len() > HASH_CONTENT_LIMIT {
        meta.len().hash(h);
    } else if let Ok(bytes) = std::fs::read(path) {
        h.write(&bytes);
    }
}

/// 64-bit FNV-1a: stable across Rust versions and platforms (unlike
/// `DefaultHasher`), so identities written by one build match another's.
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    fn hex(&self) -> String {
        format!("{:016x}", self.0)
    }
}

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// `target` as a config in `dir` refers to it: relative to `dir` when it lies
/// inside `root` (the run's output directory; `dir` is `root` or a directory
/// in it, such as a checkpoint), so that the run directory can be moved as a
/// whole; absolute otherwise. Both are resolved first (symlinks, `..`).
pub fn reference(target: &Path, dir: &Path, root: &Path) -> String {
    let (t, d, r) = (resolved(target), resolved(dir), resolved(root));
    if t.starts_with(&r) && d.starts_with(&r) {
        if let Some(rel) = relative(&t, &d) {
            return rel.display().to_string();
        }
    }
    t.display().to_string()
}

/// `to` relative to `from` (both absolute, resolved), with `..` as needed.
fn relative(to: &Path, from: &Path) -> Option<PathBuf> {
    let (a, b): (Vec<Component>, Vec<Component>) = (to.components().collect(), from.components().collect());
    let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    if common == 0 {
        return None;
    }
    let mut out = PathBuf::new();
    for _ in common..b.len() {
        out.push("..");
    }
    for c in &a[common..] {
        out.push(c.as_os_str());
    }
    if out.as_os_str().is_empty() {
        out.push(".");
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths() {
        let r = |a: &str, b: &str| relative(Path::new(a), Path::new(b)).map(|p| p.display().to_string());
        assert_eq!(r("/a/b/c", "/a/b").as_deref(), Some("c"));
        assert_eq!(r("/a/b/c", "/a/b/checkpoint-3").as_deref(), Some("../c"));
        assert_eq!(r("/a/b", "/a/b").as_deref(), Some("."));
    }

    #[test]
    fn resolved_applies_dotdot_past_missing_parts() -> std::result::Result<(), Box<dyn std::error::Error>> {
        let tmp = std::env::temp_dir().canonicalize()?;
        assert_eq!(resolved(&tmp.join("no-such-x/../y")), tmp.join("y"));
        assert_eq!(resolved(&tmp.join("a/./b")), tmp.join("a/b"));
        Ok(())
    }
}
