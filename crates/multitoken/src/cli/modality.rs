//! `multitoken modality list` (the builders linked into this binary) and
//! `multitoken modality add` (a copy of a model with one more modality and
//! freshly initialised projector weights, ready for `train --stage projectors`).
//!
//! ```text
//! multitoken modality list
//! multitoken modality add --model examples/demo-model --builder sensor_series \
//!     --config '{"length": 32}' --out my-model
//! multitoken train --model my-model --stage projectors --dataset rows.jsonl --output-dir trained
//! ```

use std::path::{Component, Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use clap::{Args, Subcommand};
use multitoken_core::{
    build_modality, builder_names, modality_infos, Modality, ModalityContext, Projector, ProjectorSpec,
    TextModalityBuilder,
};
use multitoken_lm::loader::LoadOptions;
use multitoken_lm::multimodal::{
    export_imported, find_importer, imports_dir, read_config, ModalityEntry, MultimodalConfig, MultimodalModel,
    MULTIMODAL_CONFIG_FILE, PROJECTORS_FILE,
};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

/// `multitoken modality`.
#[derive(Debug, Args)]
pub struct ModalityArgs {
    #[command(subcommand)]
    command: ModalityCommand,
}

#[derive(Debug, Subcommand)]
enum ModalityCommand {
    /// The modality builders linked into this binary: token, data key, width.
    List(ListArgs),
    /// Write a copy of a model with one more modality and fresh projector weights.
    Add(AddArgs),
}

/// `multitoken modality list`.
#[derive(Debug, Args)]
struct ListArgs {
    /// One JSON object per builder instead of a table.
    #[arg(long)]
    json: bool,
}

/// `multitoken modality add`.
#[derive(Debug, Args)]
struct AddArgs {
    /// The model to start from: a `multitoken.json` directory, a checkpoint an
    /// importer reads (Idefics2, ...), a plain LM directory / `.gguf`, or a hub id
    /// `org/name[@revision]`.
    #[arg(long)]
    model: PathBuf,
    /// Registry name of the modality's builder (`multitoken modality list`).
    #[arg(long)]
    builder: String,
    /// The builder's config (JSON); relative paths in it resolve against the
    /// model directory, as in `multitoken.json` [default: {}].
    #[arg(long)]
    config: Option<String>,
    /// The projector: a kind (`linear`, `mlp2x_gelu`, ...) or a JSON spec
    /// (`{"kind": "vector_mlp", "num_layers": 2, "num_tokens": 4}`); it must be
    /// the modality's own `Modality::projector()` (the default), which its
    /// config decides where it offers a choice.
    #[arg(long)]
    projector: Option<String>,
    /// The new model directory (must differ from --model).
    #[arg(long)]
    out: PathBuf,
    /// Replace --out when it exists.
    #[arg(long)]
    overwrite: bool,
    /// Seed of the fresh projector weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// Run `multitoken modality …`.
pub fn run(args: ModalityArgs) -> Result<()> {
    match args.command {
        ModalityCommand::List(args) => list(&args),
        ModalityCommand::Add(mut args) => {
            // As every other subcommand's --model: a hub id names a cached (or
            // downloaded) snapshot.
            args.model = crate::hub::resolve_model_arg(&args.model)?;
            add(&args)
        }
    }
}

/// Builds `name` with `config`, a panicking builder turned into an error naming it.
fn build_guarded(name: &str, config: &Value, context: &ModalityContext) -> Result<Box<dyn Modality>> {
    // build_modality catches a panicking builder itself (core's `guard`).
    build_modality(name, config, context).map_err(|error| {
        let message = error.to_string();
        if message.starts_with(&format!("modality `{name}`")) {
            anyhow!(message)
        } else {
            anyhow!("modality `{name}`: {message}")
        }
    })
}

fn list(args: &ListArgs) -> Result<()> {
    let context = ModalityContext::cpu_f32(".");
    let empty = json!({});
    // A failing builder must not print its panic message in the middle of the table.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut rows = Vec::new();
    for name in builder_names() {
        let row = match build_guarded(name, &empty, &context) {
            Ok(modality) => json!({
                "builder": name,
                "kind": "embedding",
                "token": modality.token(),
                "data_key": modality.data_key(),
                "token_width": modality.token_width(),
                "feature_dim": modality.feature_dim(),
                "projector": modality.projector().kind_name(),
            }),
            Err(error) => {
                let mut row = json!({
                    "builder": name,
                    "kind": "embedding",
                    "needs_config": first_line(&error.to_string()),
                });
                // Declared without building (`ModalityInfo`), where the crate does.
                if let Some(info) = modality_infos().find(|info| info.builder == name) {
                    row["token"] = json!(info.token);
                    row["data_key"] = json!(info.data_key);
                }
                row
            }
        };
        rows.push(row);
    }
    std::panic::set_hook(hook);
    let mut text_names: Vec<&str> = multitoken_core::inventory::iter::<TextModalityBuilder>
        .into_iter()
        .map(|builder| builder.name)
        .collect();
    text_names.sort_unstable();
    text_names.dedup();
    for name in text_names {
        rows.push(json!({"builder": name, "kind": "text"}));
    }
    for row in &rows {
        if args.json {
            println!("{row}");
            continue;
        }
        let field = |key: &str| row.get(key).map(|v| v.as_str().map(str::to_string).unwrap_or(v.to_string()));
        let name = field("builder").unwrap_or_default();
        if row["kind"] == "text" {
            println!("{name:<28} text modality (its token becomes text; no projector)");
        } else if let Some(reason) = field("needs_config") {
            let token = field("token").map(|t| format!("{t:<14} key {:<16} ", field("data_key").unwrap_or_default()));
            println!("{name:<28} {}needs a config: {reason}", token.unwrap_or_default());
        } else {
            println!(
                "{name:<28} {:<14} key {:<16} {} positions of {} features, projector {}",
                field("token").unwrap_or_default(),
                field("data_key").unwrap_or_default(),
                field("token_width").unwrap_or_default(),
                field("feature_dim").unwrap_or_default(),
                field("projector").unwrap_or_default(),
            );
        }
    }
    Ok(())
}

fn first_line(text: &str) -> String {
    text.lines().next().unwrap_or_default().to_string()
}

/// Where `modality add` starts: the directory whose files are copied (if any)
/// and the config to extend.
struct Source {
    /// A directory with `multitoken.json` to copy, or `None` for a plain LM.
    dir: Option<PathBuf>,
    config: MultimodalConfig,
}

fn source(model: &Path) -> Result<Source> {
    let config_path = model.join(MULTIMODAL_CONFIG_FILE);
    if config_path.is_file() {
        let config = read_config(&config_path)?;
        return Ok(Source { dir: Some(model.to_path_buf()), config });
    }
    if find_importer(model).is_some() {
        let exported = export_imported(model, &imports_dir())?
            .with_context(|| format!("{}: the importer wrote nothing", model.display()))?;
        let config = read_config(&exported.join(MULTIMODAL_CONFIG_FILE))?;
        return Ok(Source { dir: Some(exported), config });
    }
    let absolute = std::path::absolute(model).with_context(|| format!("{}: cannot resolve", model.display()))?;
    let config: MultimodalConfig = serde_json::from_value(json!({
        "base_model": absolute.display().to_string(),
        "modalities": [],
    }))?;
    Ok(Source { dir: None, config })
}

fn add(args: &AddArgs) -> Result<()> {
    if !args.model.exists() {
        bail!("--model {}: no such file or directory", args.model.display());
    }
    if args.out.exists() {
        let same = match (args.out.canonicalize(), args.model.canonicalize()) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        };
        if same {
            bail!("--out {} is the --model directory; write the new model elsewhere", args.out.display());
        }
        if !args.overwrite {
            bail!("--out {} exists; pass --overwrite to replace it", args.out.display());
        }
    }
    let config: Value = match &args.config {
        Some(text) => serde_json::from_str(text).with_context(|| format!("--config {text:?}: not JSON"))?,
        None => json!({}),
    };

    let source = source(&args.model)?;
    // The model as it is: its LM width and the tokens and keys already taken.
    let load_path = source.dir.clone().unwrap_or_else(|| args.model.clone());
    let model = MultimodalModel::load(&load_path, &LoadOptions::default())
        .with_context(|| format!("loading model {}", load_path.display()))?;
    if source.dir.is_none() && !model.modalities.is_empty() {
        bail!(
            "{}: a multimodal checkpoint without multitoken.json (llava-hf or multi_token); `modality add` extends multitoken.json models, plain LMs and imported families",
            args.model.display()
        );
    }
    // Before building: a builder the model already has would otherwise fail
    // first on its own config (a CLIP tower without its config.json, say).
    if source.config.modalities.iter().any(|entry| entry.builder == args.builder) {
        bail!("the model already has a `{}` modality", args.builder);
    }
    let context_dir = source.dir.clone().unwrap_or_else(|| PathBuf::from("."));
    let modality = build_guarded(&args.builder, &config, &ModalityContext::cpu_f32(&context_dir))?;
    check_collisions(&args.builder, modality.as_ref(), &model)?;
    // One source of truth: the loader takes the modality's own projector(), so
    // a --projector may only restate it (a modality whose config picks its
    // projector is given that choice through --config).
    let spec = modality.projector();
    if let Some(text) = &args.projector {
        let asked = parse_projector(text)?;
        if asked != spec {
            bail!(
                "--projector {asked} is not `{}`'s projector {spec}; the modality decides its projector (through its config, if it offers a choice), and loading checks that they agree",
                args.builder
            );
        }
    }
    spec.validate().map_err(|e| anyhow!("projector of `{}`: {e}", args.builder))?;
    let hidden = model.lm.model.hidden_size();
    drop(model);

    let mut new_config = source.config.clone();
    // The entry names no projector: the loader takes the modality's own.
    let entry: ModalityEntry = serde_json::from_value(json!({
        "builder": args.builder,
        "config": config,
    }))
    .context("writing the new modality entry")?;
    let prefix = entry.prefix();
    new_config.modalities.push(entry);

    // Fresh projector weights next to the existing ones.
    let map = VarMap::new();
    if let Some(dir) = &source.dir {
        let existing = dir.join(PROJECTORS_FILE);
        if existing.is_file() {
            multitoken_train::model::preload(&map, &existing, &Device::Cpu)?;
        }
    }
    let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu).pp(&prefix);
    Projector::load(spec, modality.feature_dim(), hidden, vb)
        .map_err(|e| anyhow!("projector {} of `{}`: {e}", spec.kind_name(), args.builder))?;
    fresh_init(&map, &format!("{prefix}."), args.seed)?;

    write_model(args, &source, &mut new_config, &map)?;
    if let Err(error) = MultimodalModel::load(&args.out, &LoadOptions::default()) {
        let _ = std::fs::remove_dir_all(&args.out);
        return Err(anyhow!("the new model does not load, so it was not kept: {error}"));
    }
    eprintln!(
        "added `{}` ({}, key `{}`, {} positions, projector {}: {} -> {hidden}) to {}",
        args.builder,
        modality.token(),
        modality.data_key(),
        modality.token_width(),
        spec.kind_name(),
        modality.feature_dim(),
        args.out.display()
    );
    eprintln!(
        "train its projector: {} train --model {} --stage projectors --dataset ROWS.jsonl --output-dir DIR",
        this_binary(),
        args.out.display()
    );
    Ok(())
}

/// The name this program was started as (`multitoken`, or a custom binary
/// built on `multitoken::cli::main()`, which alone knows its own modalities).
fn this_binary() -> String {
    std::env::args_os()
        .next()
        .and_then(|arg0| std::path::Path::new(&arg0).file_name().map(|name| name.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "multitoken".to_string())
}

/// The new modality's token and data key must be new to the model (its
/// builder is checked before it is built, in `add`).
fn check_collisions(builder: &str, modality: &dyn Modality, model: &MultimodalModel) -> Result<()> {
    let mut taken: Vec<(String, String, String)> = model
        .modalities
        .iter()
        .map(|m| (m.modality.name().to_string(), m.modality.token().to_string(), m.modality.data_key().to_string()))
        .collect();
    taken.extend(
        model
            .text_modalities()
            .map(|m| (m.name().to_string(), m.token().to_string(), m.data_key().to_string())),
    );
    for (name, token, key) in &taken {
        if token == modality.token() {
            bail!("`{builder}`'s token {token} is already the token of the model's `{name}` modality");
        }
        if key == modality.data_key() {
            bail!("`{builder}`'s data key `{key}` is already read by the model's `{name}` modality");
        }
    }
    Ok(())
}

/// `--projector`: a JSON spec, else a bare kind name.
fn parse_projector(text: &str) -> Result<ProjectorSpec> {
    let value: Value = serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_string()));
    serde_json::from_value(value).map_err(|e| anyhow!("--projector {text:?}: {e}"))
}

/// Redraws the variables under `prefix` as the trainer initialises a fresh
/// projector: matrices U(±1/√fan_in) (torch's `nn.Linear` bound), biases zero,
/// other vectors (norm scales, as the layer built them) kept. Seeded per name.
fn fresh_init(map: &VarMap, prefix: &str, seed: u64) -> Result<()> {
    let data = map.data().lock().map_err(|_| anyhow!("variable map poisoned"))?;
    for (name, var) in data.iter().filter(|(name, _)| name.starts_with(prefix)) {
        let t = var.as_tensor();
        let dims = t.dims().to_vec();
        let fresh = if dims.len() >= 2 {
            let fan_in: usize = dims[1..].iter().product();
            let bound = 1.0 / (fan_in.max(1) as f32).sqrt();
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ name_hash(name));
            let values: Vec<f32> = (0..t.elem_count()).map(|_| rng.random_range(-bound..bound)).collect();
            Tensor::from_vec(values, dims, t.device())?
        } else if name.ends_with("bias") {
            t.zeros_like()?
        } else {
            continue;
        };
        var.set(&fresh.to_dtype(t.dtype())?)?;
    }
    Ok(())
}

/// FNV-1a of a variable name: a stable per-name seed.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// Writes `--out`: the source directory's files (hard links where possible;
/// not the records of its training run),
/// paths that pointed outside it made absolute, the new `multitoken.json` and
/// `projectors.safetensors`.
fn write_model(args: &AddArgs, source: &Source, config: &mut MultimodalConfig, map: &VarMap) -> Result<()> {
    if args.out.exists() {
        std::fs::remove_dir_all(&args.out).with_context(|| format!("removing {}", args.out.display()))?;
    }
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    if let Some(dir) = &source.dir {
        copy_tree(dir, &args.out)?;
        if let Some(base) = &config.base_model {
            config.base_model = Some(outside_made_absolute(dir, base));
        }
        for entry in &mut config.modalities {
            if let Value::Object(fields) = &mut entry.config {
                for value in fields.values_mut() {
                    if let Some(text) = value.as_str() {
                        *value = Value::String(outside_made_absolute(dir, text));
                    }
                }
            }
        }
    }
    let projectors = args.out.join(PROJECTORS_FILE);
    // A hard link would write through to the source model's file.
    let _ = std::fs::remove_file(&projectors);
    multitoken_train::model::save_varmap(map, &projectors)?;
    let config_path = args.out.join(MULTIMODAL_CONFIG_FILE);
    let _ = std::fs::remove_file(&config_path);
    let text = serde_json::to_string_pretty(config)?;
    std::fs::write(&config_path, text).with_context(|| format!("writing {}", config_path.display()))
}

/// A relative path that leaves `dir` (`../x`) and names something there is
/// made absolute, so that it still names it from the copy; others are kept.
fn outside_made_absolute(dir: &Path, text: &str) -> String {
    let path = Path::new(text);
    let leaves = path.components().any(|c| matches!(c, Component::ParentDir));
    if path.is_relative() && leaves && dir.join(path).exists() {
        if let Ok(absolute) = dir.join(path).canonicalize() {
            return absolute.display().to_string();
        }
    }
    text.to_string()
}

/// Copies the files under `from` into `to`; files of 1 MiB and more are hard
/// links when the file system allows (checkpoints are large, and multitoken
/// replaces weight files by renaming, never writes them in place).
fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    for entry in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry.with_context(|| format!("reading {}", from.display()))?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        // The source's training run (its checkpoints, metrics and plot) does not describe the new model.
        let run_record = name.starts_with("checkpoint-") || ["metrics.jsonl", "loss.png", "trainer_state.json"].contains(&name.as_str());
        if run_record {
            continue;
        }
        let target = to.join(entry.file_name());
        if path.is_dir() {
            std::fs::create_dir_all(&target).with_context(|| format!("creating {}", target.display()))?;
            copy_tree(&path, &target)?;
        } else if !(is_large(&path) && std::fs::hard_link(&path, &target).is_ok()) {
            std::fs::copy(&path, &target)
                .with_context(|| format!("copying {} to {}", path.display(), target.display()))?;
        }
    }
    Ok(())
}

/// Whether a file is worth a hard link rather than a copy.
fn is_large(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.len() >= 1 << 20)
}
