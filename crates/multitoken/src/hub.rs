//! Hub ids: `--model org/name[@revision]` (and `Model.load("org/name")` in Python).
//!
//! A model given by hub id is looked up in the local Hugging Face cache first, in the
//! layout `huggingface_hub` writes (`models--org--name/{refs,snapshots,blobs}` under
//! `HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`); only when it is
//! not there (or only part of it is) and `HF_HUB_OFFLINE` is not set are the files the
//! model needs downloaded, by the `hf-hub` crate, from `HF_ENDPOINT` with `HF_TOKEN`.
//! The result is always a snapshot directory, which every loader reads as it reads any
//! local model directory.
//!
//! Why the cache comes first even for a branch name: a model that loads offline should
//! load the same online, without a request per file to find out that nothing changed
//! (a new revision of a branch is fetched by naming it, or by emptying the cache).
//!
//! This is network IO, so it lives here in the facade and never in core, lm or a
//! modality crate.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use hf_hub::api::sync::{ApiBuilder, ApiError};
use hf_hub::{Cache, Repo, RepoType};

/// The branch used when a hub id names no revision.
const DEFAULT_REVISION: &str = "main";

/// A model repository on a hub with an optional revision: `org/name[@revision]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubId {
    /// `org/name`.
    pub repo: String,
    /// A branch, tag or commit hash; `main` when none is given.
    pub revision: String,
    /// Which quantization of a GGUF repository (`org/name:Q4_K_M`, as llama.cpp's
    /// `-hf` and Ollama spell it): the `.gguf` file whose name ends in it.
    pub quant: Option<String>,
}

impl HubId {
    /// Parses `org/name[@revision][:QUANT]`; `None` for anything that cannot be
    /// a hub id (an absolute or dotted path, more or fewer than one `/`, odd
    /// characters), so that such a string is only ever a local path.
    pub fn parse(spec: &str) -> Option<HubId> {
        let (spec, quant) = match spec.rsplit_once(':') {
            Some((rest, quant))
                if !quant.is_empty() && quant.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')) =>
            {
                (rest, Some(quant.to_string()))
            }
            Some(_) => return None,
            None => (spec, None),
        };
        let (repo, revision) = match spec.split_once('@') {
            Some((repo, revision)) if !revision.is_empty() => (repo, revision),
            Some(_) => return None,
            None => (spec, DEFAULT_REVISION),
        };
        let (org, name) = repo.split_once('/')?;
        let part_ok = |part: &str| {
            !part.is_empty()
                && !part.starts_with(['.', '-'])
                && !part.contains("..")
                && part.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        let revision_ok = revision
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
            && !revision.contains("..");
        (part_ok(org) && part_ok(name) && revision_ok)
            .then(|| HubId { repo: repo.to_string(), revision: revision.to_string(), quant })
    }

    /// The cache folder name, as `huggingface_hub` spells it: `models--org--name`.
    pub fn folder_name(&self) -> String {
        format!("models--{}", self.repo.replace('/', "--"))
    }

    fn is_commit_hash(&self) -> bool {
        self.revision.len() == 40 && self.revision.chars().all(|c| c.is_ascii_hexdigit())
    }
}

impl std::fmt::Display for HubId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.repo, self.revision)?;
        match &self.quant {
            Some(quant) => write!(f, ":{quant}"),
            None => Ok(()),
        }
    }
}

/// Where the cache is and how (whether) to reach the hub: the environment's
/// `HF_*` variables by [`HubConfig::from_env`], or set directly (tests do, so that
/// they never change the process's environment).
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// The hub cache directory (the one holding `models--org--name`).
    pub cache_dir: PathBuf,
    /// The hub's base URL, `https://huggingface.co` by default.
    pub endpoint: String,
    /// A bearer token for private or gated repositories.
    pub token: Option<String>,
    /// Never touch the network (`HF_HUB_OFFLINE=1`).
    pub offline: bool,
    /// How many times an interrupted download is resumed before giving up.
    pub retries: usize,
    /// Show a progress bar per downloaded file (on stderr).
    pub progress: bool,
}

impl HubConfig {
    /// The configuration `huggingface_hub` would use in this environment:
    /// `HF_HUB_CACHE` / `HF_HOME` / `XDG_CACHE_HOME`, `HF_ENDPOINT`, `HF_TOKEN` (else
    /// the token file `huggingface-cli login` writes), `HF_HUB_OFFLINE`.
    pub fn from_env() -> HubConfig {
        let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
        let cache_dir = if let Some(dir) = var("HF_HUB_CACHE") {
            PathBuf::from(dir)
        } else {
            let home = var("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
                let cache = var("XDG_CACHE_HOME").map(PathBuf::from).unwrap_or_else(|| {
                    var("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(".")).join(".cache")
                });
                cache.join("huggingface")
            });
            home.join("hub")
        };
        let endpoint = std::env::var("HF_ENDPOINT")
            .ok()
            .filter(|e| !e.is_empty())
            .map(|e| e.trim_end_matches('/').to_string())
            .unwrap_or_else(|| "https://huggingface.co".to_string());
        let token = std::env::var("HF_TOKEN")
            .ok()
            .filter(|t| !t.trim().is_empty())
            .or_else(|| Cache::new(cache_dir.clone()).token());
        let offline = std::env::var("HF_HUB_OFFLINE")
            .map(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
            .unwrap_or(false);
        HubConfig { cache_dir, endpoint, token, offline, retries: 3, progress: true }
    }
}

/// A hub id that is not (completely) in the cache while downloads are off: a
/// distinct type so that front ends can tell "not found" from other failures.
#[derive(Debug)]
pub struct NotInCache(pub String);

impl std::fmt::Display for NotInCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NotInCache {}

/// `--model`'s value as a directory or file to load: an existing local path as it
/// is; a hub id (`org/name[@revision]`) through [`resolve`] with the environment's
/// configuration; anything else as it is (the loader then names the missing path).
pub fn resolve_model_arg(model: &Path) -> Result<PathBuf> {
    resolve_model_arg_with(&HubConfig::from_env(), model)
}

/// [`resolve_model_arg`] with an explicit configuration.
pub fn resolve_model_arg_with(config: &HubConfig, model: &Path) -> Result<PathBuf> {
    if model.exists() {
        return Ok(model.to_path_buf());
    }
    match model.to_str().and_then(HubId::parse) {
        Some(id) => resolve(config, &id).with_context(|| {
            format!("{} is not a local path, so it was taken for a hub id", model.display())
        }),
        None => Ok(model.to_path_buf()),
    }
}

/// What to load of `id`: its snapshot directory (the cached one when it is
/// complete, else, unless offline, one downloaded into the cache), or the `.gguf`
/// file in it that `id`'s quantization names.
pub fn resolve(config: &HubConfig, id: &HubId) -> Result<PathBuf> {
    let cached = cached_snapshot(&config.cache_dir, id);
    let missing = match &cached {
        Ok(dir) => match missing_files(dir) {
            Ok(missing) if missing.is_empty() => match model_in_snapshot(dir, id) {
                Ok(path) => return Ok(path),
                Err(why) => why,
            },
            Ok(missing) => format!("its snapshot {} lacks {}", dir.display(), missing.join(", ")),
            Err(e) => format!("its snapshot {} cannot be read: {e}", dir.display()),
        },
        Err(why) => why.clone(),
    };
    if config.offline {
        return Err(NotInCache(format!(
            "model {id} is not in the Hugging Face cache {} ({missing}), and HF_HUB_OFFLINE is set, so it is not downloaded; \
             get it with `hf download {} --revision {}` where the hub is reachable (HF_HUB_CACHE / HF_HOME choose the cache), or unset HF_HUB_OFFLINE",
            config.cache_dir.display(),
            id.repo,
            id.revision
        ))
        .into());
    }
    download(config, id).with_context(|| {
        format!("model {id} is not in the Hugging Face cache {} ({missing}), and downloading it from {} failed", config.cache_dir.display(), config.endpoint)
    })
}

/// The path to load in a complete snapshot: the directory, or with a quantization
/// named the one `.gguf` file of it (or why it is not there).
fn model_in_snapshot(snapshot: &Path, id: &HubId) -> std::result::Result<PathBuf, String> {
    let has_config = ["config.json", "multitoken.json", "moe.json", "adapter_config.json"]
        .iter()
        .any(|name| snapshot.join(name).is_file());
    if id.quant.is_none() && has_config {
        return Ok(snapshot.to_path_buf());
    }
    let ggufs: Vec<String> = std::fs::read_dir(snapshot)
        .map_err(|e| format!("its snapshot {} cannot be read: {e}", snapshot.display()))?
        .flatten()
        .filter(|entry| entry.path().is_file())
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".gguf"))
        .collect();
    // A GGUF-only snapshot: the named quantization, else the one file there (or
    // the Q4_K_M among several).
    match (pick_gguf(&ggufs, id.quant.as_deref()), &id.quant) {
        (Ok(Some(name)), _) => Ok(snapshot.join(name)),
        (Ok(None) | Err(_), Some(quant)) => Err(format!("its snapshot {} has no {quant} .gguf file", snapshot.display())),
        (Ok(None), None) => Ok(snapshot.to_path_buf()),
        (Err(why), None) => Err(format!("its snapshot {}: {why}", snapshot.display())),
    }
}

/// The `.gguf` file of a GGUF repository to fetch: the one whose name ends in
/// `quant` (`…-Q4_K_M.gguf`, case ignored); without `quant`, the only one, else
/// `Q4_K_M` as llama.cpp picks. `Ok(None)` when there are no `.gguf` files; an
/// error listing the quantizations when the choice is not clear.
pub fn pick_gguf(files: &[String], quant: Option<&str>) -> std::result::Result<Option<String>, String> {
    let ggufs: Vec<&String> = files.iter().filter(|f| f.ends_with(".gguf")).collect();
    if ggufs.is_empty() {
        return Ok(None);
    }
    let tag_of = |name: &str| -> Option<String> {
        let stem = name.rsplit('/').next().unwrap_or(name).strip_suffix(".gguf")?;
        let mut quants: Vec<&str> = QUANT_TAGS.iter().copied().filter(|tag| ends_with_tag(stem, tag)).collect();
        quants.sort_by_key(|tag| std::cmp::Reverse(tag.len()));
        quants.first().map(|tag| tag.to_string())
    };
    let names = || {
        let mut listed: Vec<String> =
            ggufs.iter().map(|g| tag_of(g).unwrap_or_else(|| (*g).clone())).collect();
        listed.sort();
        listed.join(", ")
    };
    let chosen: Vec<&String> = match quant {
        Some(quant) => ggufs
            .iter()
            .copied()
            .filter(|g| g.rsplit('/').next().and_then(|b| b.strip_suffix(".gguf")).is_some_and(|stem| ends_with_tag(stem, quant)))
            .collect(),
        None if ggufs.len() == 1 => ggufs.clone(),
        None => ggufs.iter().copied().filter(|g| tag_of(g).as_deref() == Some("Q4_K_M")).collect(),
    };
    match (chosen.as_slice(), quant) {
        ([one], _) => Ok(Some((*one).clone())),
        ([], Some(quant)) => Err(format!("it has no {quant} .gguf file; it has: {}", names())),
        ([], None) => Err(format!(
            "it holds {} .gguf quantizations and no Q4_K_M; name one as org/name:QUANT (it has: {})",
            ggufs.len(),
            names()
        )),
        (many, _) => Err(format!(
            "{} .gguf files match ({}); name the file's quantization exactly",
            many.len(),
            many.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
        )),
    }
}

/// llama.cpp's quantization names, to list a repository's choices by them.
const QUANT_TAGS: [&str; 30] = [
    "F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_K", "Q5_0", "Q5_1", "Q4_K_M", "Q4_K_S", "Q4_K",
    "Q4_0", "Q4_1", "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q3_K", "Q2_K", "IQ4_XS", "IQ4_NL", "IQ3_M", "IQ3_S", "IQ3_XS",
    "IQ3_XXS", "IQ2_M", "IQ2_S", "IQ2_XS", "IQ1_S",
];

/// Whether a file stem ends in `tag` as a separate word (`model-q4_k_m`, not `q4_k_m`
/// inside `model-iq4_k_m`), ignoring case.
fn ends_with_tag(stem: &str, tag: &str) -> bool {
    let (stem, tag) = (stem.to_ascii_lowercase(), tag.to_ascii_lowercase());
    match stem.strip_suffix(&tag) {
        Some("") => true,
        Some(before) => before.ends_with(['-', '.', '_']),
        None => false,
    }
}

/// The cached snapshot directory of `id`, or why there is none.
fn cached_snapshot(cache_dir: &Path, id: &HubId) -> std::result::Result<PathBuf, String> {
    let repo_dir = cache_dir.join(id.folder_name());
    if !repo_dir.is_dir() {
        return Err(format!("no {}", id.folder_name()));
    }
    let commit = if id.is_commit_hash() {
        id.revision.to_ascii_lowercase()
    } else {
        let reference = repo_dir.join("refs").join(&id.revision);
        std::fs::read_to_string(&reference)
            .map_err(|_| format!("no revision {:?} in {}", id.revision, repo_dir.display()))?
            .trim()
            .to_string()
    };
    let snapshot = repo_dir.join("snapshots").join(&commit);
    if snapshot.is_dir() {
        Ok(snapshot)
    } else {
        Err(format!("no snapshot {commit}"))
    }
}

/// What a snapshot directory lacks for a model to load from it: files whose link
/// leads nowhere (a blob that was never finished: `huggingface_hub` and `hf-hub` link a
/// snapshot file only to a finished blob, so a dangling link is a cache someone
/// pruned or a copy that lost its blobs), shards that an index names and the
/// directory lacks, and weights or a config at all. Empty when the model is there.
pub fn missing_files(snapshot: &Path) -> Result<Vec<String>> {
    let mut missing = Vec::new();
    let mut has_config = false;
    let mut has_weights = false;
    let mut stack = vec![snapshot.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?;
        for entry in entries {
            let path = entry?.path();
            let relative = path.strip_prefix(snapshot).unwrap_or(&path).to_string_lossy().into_owned();
            // `metadata` follows the link: an error is a link to a missing blob.
            let Ok(meta) = std::fs::metadata(&path) else {
                missing.push(relative);
                continue;
            };
            if meta.is_dir() {
                stack.push(path);
                continue;
            }
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            if dir == snapshot && matches!(name.as_str(), "config.json" | "multitoken.json" | "moe.json" | "adapter_config.json") {
                has_config = true;
            }
            if name.ends_with(".safetensors") || name.ends_with(".gguf") || name.ends_with(".bin") {
                has_weights = true;
            }
            if name.ends_with(".safetensors.index.json") {
                for shard in index_shards(&path)? {
                    if !dir.join(&shard).is_file() {
                        let shown = dir.join(&shard);
                        missing.push(shown.strip_prefix(snapshot).unwrap_or(&shown).to_string_lossy().into_owned());
                    }
                }
            }
        }
    }
    let has_gguf_only = has_weights && !has_config;
    if !has_config && !has_gguf_only {
        missing.push("config.json".to_string());
    }
    if !has_weights {
        missing.push("weights (*.safetensors)".to_string());
    }
    missing.sort();
    missing.dedup();
    Ok(missing)
}

/// The shard file names of a `*.safetensors.index.json`.
fn index_shards(index: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index).with_context(|| format!("reading {}", index.display()))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", index.display()))?;
    let Some(map) = value.get("weight_map").and_then(|m| m.as_object()) else {
        bail!("{} has no weight_map", index.display());
    };
    let mut shards: Vec<String> = map.values().filter_map(|v| v.as_str().map(str::to_string)).collect();
    shards.sort();
    shards.dedup();
    Ok(shards)
}

/// Which of a repository's files a model needs: configs, tokenizers, chat
/// templates, processor configs and the weights we load (safetensors, by index
/// when there is one; PEFT adapters; multi_token's projector file), in every
/// sub-directory (a multitoken.json model keeps its LM and towers there). Not:
/// READMEs, images, and the other frameworks' weights (`pytorch_model*.bin`, onnx,
/// flax, tf) that a repository often carries beside the safetensors.
pub fn needed_files(files: &[String], quant: Option<&str>) -> std::result::Result<Vec<String>, String> {
    const OTHER_FRAMEWORKS: [&str; 5] = ["onnx/", "openvino/", "flax_", "tf_", "coreml/"];
    let keep_text = |name: &str| {
        let base = name.rsplit('/').next().unwrap_or(name);
        base.ends_with(".json")
            || base.ends_with(".jinja")
            || base == "tokenizer.model"
            || base == "merges.txt"
            || base == "vocab.txt"
            || base == "vocab.json"
            || base == "non_lora_trainables.bin"
    };
    let indexed: Vec<&String> = files.iter().filter(|f| f.ends_with(".safetensors.index.json")).collect();
    let mut wanted: Vec<String> = Vec::new();
    for name in files {
        if OTHER_FRAMEWORKS.iter().any(|p| name.contains(p)) {
            continue;
        }
        if keep_text(name) {
            wanted.push(name.clone());
        } else if name.ends_with(".safetensors") {
            // Sharded weights come by their index (below), not by listing.
            let dir = name.rsplit_once('/').map_or("", |(d, _)| d);
            let sharded = indexed.iter().any(|i| i.rsplit_once('/').map_or("", |(d, _)| d) == dir)
                && name.rsplit('/').next().is_some_and(|b| b.starts_with("model-") || b.contains("-of-"));
            if !sharded {
                wanted.push(name.clone());
            }
        }
    }
    if quant.is_some() || !files.iter().any(|f| f.ends_with(".safetensors")) {
        // A GGUF repository: its .gguf files are quantizations of one model, and
        // one of them is fetched (a named quantization is always a GGUF one).
        match pick_gguf(files, quant)? {
            Some(one) => wanted.push(one),
            None if quant.is_some() => return Err("it has no .gguf files".to_string()),
            None => {}
        }
    }
    Ok(wanted)
}

/// Downloads what `id` needs into the cache; the snapshot directory.
fn download(config: &HubConfig, id: &HubId) -> Result<PathBuf> {
    let api = ApiBuilder::from_cache(Cache::new(config.cache_dir.clone()))
        .with_endpoint(config.endpoint.clone())
        .with_token(config.token.clone())
        .with_retries(config.retries)
        .with_progress(config.progress)
        .build()
        .map_err(|e| hub_error(e, id))?;
    let repo = api.repo(Repo::with_revision(id.repo.clone(), RepoType::Model, id.revision.clone()));
    let info = repo.info().map_err(|e| hub_error(e, id))?;
    let files: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    let mut wanted = needed_files(&files, id.quant.as_deref()).map_err(|why| anyhow!("the repository {id}: {why}"))?;
    if wanted.is_empty() {
        bail!("the repository {id} has none of the files a model needs (config.json, *.safetensors); it lists: {}", files.join(", "));
    }
    let mut fetched = Vec::new();
    while let Some(name) = wanted.pop() {
        if fetched.contains(&name) {
            continue;
        }
        let path = repo.get(&name).map_err(|e| hub_error(e, id)).with_context(|| format!("downloading {name}"))?;
        if name.ends_with(".safetensors.index.json") {
            let dir = name.rsplit_once('/').map_or(String::new(), |(d, _)| format!("{d}/"));
            wanted.extend(index_shards(&path)?.into_iter().map(|s| format!("{dir}{s}")));
        }
        fetched.push(name);
    }
    // The snapshot the files were linked into is the one of the commit the hub
    // reported (`x-repo-commit`), which the downloads recorded under refs/.
    let snapshot = if id.is_commit_hash() {
        config.cache_dir.join(id.folder_name()).join("snapshots").join(&id.revision)
    } else {
        cached_snapshot(&config.cache_dir, id).map_err(|why| anyhow!("after downloading {id}: {why}"))?
    };
    let missing = missing_files(&snapshot)?;
    if !missing.is_empty() {
        bail!("after downloading {id}, its snapshot {} still lacks {}", snapshot.display(), missing.join(", "));
    }
    model_in_snapshot(&snapshot, id).map_err(|why| anyhow!("after downloading {id}: {why}"))
}

/// An `hf-hub` error in words a user can act on (401/403: a token; 404: the id).
fn hub_error(error: ApiError, id: &HubId) -> anyhow::Error {
    if let ApiError::RequestError(request) = &error {
        if let ureq2::Error::Status(status, response) = request.as_ref() {
            let url = response.get_url().to_string();
            return match status {
                401 | 403 => anyhow!(
                    "{status} from {url}: {id} is private or gated and no accepted token was sent; set HF_TOKEN (or run `hf auth login`) with a token that may read it"
                ),
                404 => anyhow!("404 from {url}: no repository {} with revision {:?} on the hub", id.repo, id.revision),
                _ => anyhow!("{status} from {url}"),
            };
        }
    }
    anyhow!(error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_parse_and_paths_do_not() {
        let check = |spec: &str, expect: Option<(&str, &str)>| {
            let got = HubId::parse(spec);
            let got = got.as_ref().map(|id| (id.repo.as_str(), id.revision.as_str()));
            assert_eq!(got, expect, "{spec}");
        };
        check("org/name", Some(("org/name", "main")));
        check("HuggingFaceTB/SmolLM2-135M@v1.0", Some(("HuggingFaceTB/SmolLM2-135M", "v1.0")));
        check("org/name@refs/pr/1", Some(("org/name", "refs/pr/1")));
        check("name", None);
        check("/abs/path", None);
        check("./rel/dir", None);
        check("a/b/c", None);
        check("org/../x", None);
        check("org/name@", None);
        check("org/model.gguf", Some(("org/model.gguf", "main")));
        check("org/name-GGUF:Q4_K_M", Some(("org/name-GGUF", "main")));
        check("org/name@v2:q8_0", Some(("org/name", "v2")));
        check("org/name:", None);
        check("C:/dir", None);
        assert_eq!(HubId::parse("org/n@v2:Q8_0").and_then(|id| id.quant), Some("Q8_0".to_string()));
        assert_eq!(HubId::parse("org/n").and_then(|id| id.quant), None);
    }

    #[test]
    fn needed_files_take_shards_by_index_and_skip_other_frameworks() -> std::result::Result<(), String> {
        let files: Vec<String> = [
            "README.md",
            ".gitattributes",
            "config.json",
            "tokenizer.json",
            "model.safetensors.index.json",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "pytorch_model.bin",
            "onnx/model.onnx",
            "onnx/config.json",
            "lm/config.json",
            "lm/model.safetensors",
            "chat_template.jinja",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let got = needed_files(&files, None)?;
        assert_eq!(
            got,
            ["config.json", "tokenizer.json", "model.safetensors.index.json", "lm/config.json", "lm/model.safetensors", "chat_template.jinja"]
        );
        Ok(())
    }

    #[test]
    fn a_gguf_repository_gives_the_named_quantization_or_q4_k_m() {
        let files: Vec<String> = ["README.md", "SmolLM2-135M.Q8_0.gguf", "smollm2-135m-q4_k_m.gguf", "SmolLM2-135M-IQ4_K_M.gguf", "SmolLM2-135M-Q4_K_S.gguf"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(needed_files(&files, Some("q8_0")), Ok(vec!["SmolLM2-135M.Q8_0.gguf".to_string()]));
        // IQ4_K_M is a word of its own, not Q4_K_M.
        assert_eq!(needed_files(&files, Some("Q4_K_M")), Ok(vec!["smollm2-135m-q4_k_m.gguf".to_string()]));
        assert_eq!(needed_files(&files, None), Ok(vec!["smollm2-135m-q4_k_m.gguf".to_string()]));
        let missing = needed_files(&files, Some("Q2_K")).err().unwrap_or_default();
        assert!(missing.contains("no Q2_K") && missing.contains("Q8_0") && missing.contains("Q4_K_S"), "{missing}");
        let no_default = needed_files(&[files[1].clone(), files[4].clone()], None).err().unwrap_or_default();
        assert!(no_default.contains("org/name:QUANT") && no_default.contains("Q8_0"), "{no_default}");
        assert_eq!(needed_files(&files[1..2], None), Ok(vec!["SmolLM2-135M.Q8_0.gguf".to_string()]));
    }
}
