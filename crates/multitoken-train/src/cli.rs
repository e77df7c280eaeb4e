//! The `train`, `dataset`, `merge-lora` and `eval` subcommands of the `multitoken` binary.
//!
//! Flag names mirror multi_token's (`--num-train-epochs` or
//! `--num_train_epochs`); every `train` flag can also come from a TOML file
//! (`--config run.toml`, snake_case keys), flags winning over the file.
//! Boolean flags are bare switches (`--no-progress`); the older
//! `--flag true|false` form is still accepted. Output locations are
//! `--output-dir` in every subcommand (older names stay as aliases). Since a
//! flag's absence must let the TOML file decide, defaults are applied in
//! [`TrainArgs::resolve`] and written in each flag's help as `[default: X]`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use serde::Deserialize;

use crate::data;
use crate::model::EncoderChoice;
use crate::optim::Schedule;
use crate::trainer::{self, Stage, TrainConfig};

/// `multitoken train`: train projectors, LoRA adapters or the whole LM.
#[derive(Debug, Default, Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainArgs {
    /// TOML file with any of these settings (snake_case keys); flags override it.
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Quantize an HF base's linears to q8_0, q4_1 or q4_k as they are read; with
    /// `--stage lora` the adapters train over the quantized base (QLoRA). A GGUF
    /// base is already quantized and trains as it is.
    #[arg(long, value_name = "q8_0|q4_1|q4_k")]
    pub quantize: Option<String>,
    /// Keep the frozen modality towers' linears as q8_0 or q4_1 blocks, quantized
    /// as they are read (refused with an encoder that trains).
    #[arg(long, value_name = "q8_0|q4_1")]
    pub quantize_towers: Option<String>,
    /// `--stage lora`: recompute each decoder layer in the backward pass instead
    /// of keeping its activations: the same gradients, far less memory, about one
    /// more forward per step (multi_token's and transformers' flag).
    #[arg(long, alias = "gradient_checkpointing", num_args = 0..=1, default_missing_value = "true", value_name = "true|false")]
    pub gradient_checkpointing: Option<bool>,
    /// Model directory to start from (multitoken.json + projectors, or an HF LM directory).
    #[arg(long, alias = "model_name_or_path", alias = "model-name-or-path")]
    pub model: Option<PathBuf>,
    /// Training data: JSONL rows in multi_token's schema.
    #[arg(long, alias = "dataset_path", alias = "dataset-path")]
    pub dataset: Option<PathBuf>,
    /// Where the trained model, checkpoints and metrics go; a directory already
    /// holding a run is refused unless --resume or --overwrite-output-dir.
    #[arg(long, alias = "output_dir", alias = "output")]
    pub output_dir: Option<PathBuf>,
    /// Replace the run already in --output-dir: its checkpoints, metrics and
    /// model files are removed (after the model and data load, before the first
    /// step); other files there are kept.
    #[arg(long, alias = "overwrite_output_dir", num_args = 0..=1, default_missing_value = "true", value_name = "true|false")]
    pub overwrite_output_dir: Option<bool>,
    /// `projectors` (stage 1), `lora` (stage 2: adapters + projectors) or `full` (LM + projectors)
    /// [default: projectors].
    #[arg(long, value_enum)]
    pub stage: Option<Stage>,
    /// Stage 1 (multi_token's flag): same as `--stage projectors` (`false`: `--stage full`).
    #[arg(long, alias = "pretrain_projectors", num_args = 0..=1, default_missing_value = "true", value_name = "true|false")]
    pub pretrain_projectors: Option<bool>,
    /// Stage 2 (multi_token's flag): same as `--stage lora`.
    #[arg(long, alias = "lora_enable", num_args = 0..=1, default_missing_value = "true", value_name = "true|false")]
    pub lora_enable: Option<bool>,
    /// LoRA rank [default: 64].
    #[arg(long, alias = "lora_r")]
    pub lora_r: Option<usize>,
    /// LoRA alpha (scale = alpha / r) [default: 16].
    #[arg(long, alias = "lora_alpha")]
    pub lora_alpha: Option<f64>,
    /// LoRA dropout [default: 0.05].
    #[arg(long, alias = "lora_dropout")]
    pub lora_dropout: Option<f32>,
    /// LoRA target modules, comma-separated (default: every decoder linear).
    #[arg(long, alias = "lora_target_modules", value_delimiter = ',')]
    pub lora_target_modules: Option<Vec<String>>,
    /// `--stage full`: LM parameters kept as loaded, comma-separated transformers
    /// names or name prefixes (`model.embed_tokens`) [default: none].
    #[arg(long, alias = "freeze_lm", value_delimiter = ',')]
    pub freeze_lm: Option<Vec<String>>,
    /// Also train the modality encoders: `true` (all), or builder names
    /// (`vision_clip,audio_whisper`); an encoder directory without weights starts random
    /// [default: none].
    #[arg(long, alias = "train_encoders", num_args = 0..=1, default_missing_value = "true", value_name = "true|NAMES")]
    pub train_encoders: Option<EncoderChoice>,
    /// Projector weights (safetensors) to start from, e.g. stage 1's [default: the model's
    /// projectors.safetensors].
    #[arg(
        long,
        alias = "pretrained_projectors_path",
        alias = "pretrained-projectors-path"
    )]
    pub pretrained_projectors: Option<PathBuf>,
    /// Epochs (ignored with --max-steps) [default: 1].
    #[arg(long, alias = "num_train_epochs")]
    pub num_train_epochs: Option<f64>,
    /// Optimizer steps (overrides epochs).
    #[arg(long, alias = "max_steps")]
    pub max_steps: Option<usize>,
    /// Rows per micro-batch [default: 4].
    #[arg(long, alias = "per_device_train_batch_size", alias = "batch-size")]
    pub per_device_train_batch_size: Option<usize>,
    /// Micro-batches per optimizer step [default: 1].
    #[arg(long, alias = "gradient_accumulation_steps")]
    pub gradient_accumulation_steps: Option<usize>,
    /// Peak learning rate [default: 1e-3].
    #[arg(long, alias = "learning_rate", alias = "lr")]
    pub learning_rate: Option<f64>,
    /// AdamW weight decay (matrices only) [default: 0].
    #[arg(long, alias = "weight_decay")]
    pub weight_decay: Option<f64>,
    /// AdamW β₁ [default: 0.9].
    #[arg(long, alias = "adam_beta1")]
    pub adam_beta1: Option<f64>,
    /// AdamW β₂ [default: 0.999].
    #[arg(long, alias = "adam_beta2")]
    pub adam_beta2: Option<f64>,
    /// AdamW ε [default: 1e-8].
    #[arg(long, alias = "adam_epsilon")]
    pub adam_epsilon: Option<f64>,
    /// Warmup fraction of the steps [default: 0.03].
    #[arg(long, alias = "warmup_ratio")]
    pub warmup_ratio: Option<f64>,
    /// Warmup steps (overrides the ratio).
    #[arg(long, alias = "warmup_steps")]
    pub warmup_steps: Option<usize>,
    /// `cosine`, `linear` or `constant` after warmup [default: cosine].
    #[arg(long, value_enum, alias = "lr_scheduler_type")]
    pub lr_scheduler_type: Option<Schedule>,
    /// Clip gradients to this global norm (0 = off) [default: 1].
    #[arg(long, alias = "max_grad_norm")]
    pub max_grad_norm: Option<f64>,
    /// Truncate rows to this many tokens [default: no truncation].
    #[arg(long, alias = "model_max_length")]
    pub model_max_length: Option<usize>,
    /// Group rows of similar length into batches (on by default; --no-group-by-length
    /// or `--group-by-length false` turns it off) [default: true].
    #[arg(
        long,
        alias = "group_by_length",
        alias = "group_by_modality_length",
        num_args = 0..=1,
        default_missing_value = "true",
        value_name = "true|false"
    )]
    pub group_by_length: Option<bool>,
    /// Batches in dataset-shuffle order, without length grouping.
    #[arg(long, alias = "no_group_by_length", conflicts_with = "group_by_length")]
    #[serde(default)]
    pub no_group_by_length: bool,
    /// Checkpoint every N steps (0 = at the end only) [default: 0].
    #[arg(long, alias = "save_steps")]
    pub save_steps: Option<usize>,
    /// Keep at most N checkpoints [default: all].
    #[arg(long, alias = "save_total_limit")]
    pub save_total_limit: Option<usize>,
    /// Log every N steps to metrics.jsonl [default: 1].
    #[arg(long, alias = "logging_steps")]
    pub logging_steps: Option<usize>,
    /// Seed of data order and fresh weights [default: 42].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Continue from the latest checkpoint in the output directory, or from DIR; a
    /// checkpoint of another run (model, dataset or setup differ) is refused.
    #[arg(long, num_args = 0..=1, default_missing_value = "latest", value_name = "DIR")]
    pub resume: Option<PathBuf>,
    /// Keep frozen-encoder features on disk here (safetensors keyed by item content
    /// hash, one file per encoder identity) and reuse them across runs.
    #[arg(long, alias = "feature_cache")]
    pub feature_cache: Option<PathBuf>,
    /// No progress bar.
    #[arg(long, alias = "no_progress", num_args = 0..=1, default_missing_value = "true", value_name = "true|false")]
    pub no_progress: Option<bool>,
}

impl TrainArgs {
    /// Flags over the TOML file over the defaults.
    pub fn resolve(self) -> Result<TrainConfig> {
        self.resolve_with(&|model: &Path| Ok(model.to_path_buf()))
    }

    /// [`TrainArgs::resolve`], with the model (flag or TOML `model`) passed through
    /// `resolve_model` (the binary's hub-id lookup: this crate does no network IO).
    pub fn resolve_with(self, resolve_model: &dyn Fn(&Path) -> Result<PathBuf>) -> Result<TrainConfig> {
        let file: TrainArgs = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                toml::from_str(&text)
                    .with_context(|| format!("{}: bad training config", path.display()))?
            }
            None => TrainArgs::default(),
        };
        macro_rules! pick {
            ($f:ident) => {
                self.$f.or(file.$f)
            };
        }
        let (Some(model), Some(dataset), Some(output_dir)) =
            (pick!(model), pick!(dataset), pick!(output_dir))
        else {
            bail!("--model, --dataset and --output-dir are required (as flags or in --config)");
        };
        let model = resolve_model(&model)?;
        let mut cfg = TrainConfig::new(model, dataset, output_dir);
        let stage = pick!(stage);
        cfg.stage = match (stage, pick!(pretrain_projectors)) {
            (Some(s), _) => s,
            (None, _) if pick!(lora_enable) == Some(true) => Stage::Lora,
            (None, Some(true)) | (None, None) => Stage::Projectors,
            (None, Some(false)) => Stage::Full,
        };
        macro_rules! set {
            ($f:ident) => {
                if let Some(v) = pick!($f) {
                    cfg.$f = v;
                }
            };
        }
        set!(train_encoders);
        set!(lora_r);
        set!(lora_alpha);
        set!(lora_dropout);
        set!(lora_target_modules);
        set!(freeze_lm);
        set!(num_train_epochs);
        set!(per_device_train_batch_size);
        set!(gradient_accumulation_steps);
        set!(learning_rate);
        set!(weight_decay);
        set!(adam_beta1);
        set!(adam_beta2);
        set!(adam_epsilon);
        set!(warmup_ratio);
        set!(lr_scheduler_type);
        set!(max_grad_norm);
        set!(group_by_length);
        // The flag wins over the file: `--no-group-by-length`, or the file's
        // `no_group_by_length` unless a flag said `--group-by-length`.
        if self.no_group_by_length || (file.no_group_by_length && self.group_by_length.is_none()) {
            cfg.group_by_length = false;
        }
        set!(save_steps);
        set!(logging_steps);
        set!(seed);
        cfg.pretrained_projectors = pick!(pretrained_projectors);
        cfg.max_steps = pick!(max_steps);
        cfg.warmup_steps = pick!(warmup_steps);
        cfg.model_max_length = pick!(model_max_length);
        cfg.save_total_limit = pick!(save_total_limit);
        cfg.resume = pick!(resume);
        cfg.overwrite_output_dir = pick!(overwrite_output_dir).unwrap_or(false);
        cfg.feature_cache = pick!(feature_cache);
        cfg.quantize = pick!(quantize);
        cfg.quantize_towers = pick!(quantize_towers);
        cfg.gradient_checkpointing = pick!(gradient_checkpointing).unwrap_or(false);
        cfg.progress = !pick!(no_progress).unwrap_or(false);
        Ok(cfg)
    }
}

/// `multitoken dataset`: convert and check datasets.
#[derive(Debug, Args)]
pub struct DatasetArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: DatasetCommand,
}

/// `multitoken dataset` subcommands.
#[derive(Debug, Subcommand)]
pub enum DatasetCommand {
    /// Convert LLaVA JSON (`image`, `conversations`) to multitoken JSONL.
    ConvertLlava {
        /// LLaVA JSON file (a list of rows).
        input: PathBuf,
        /// JSONL file to write.
        output: PathBuf,
        /// Where the images are (default: next to the input file).
        #[arg(long, alias = "image_folder")]
        image_folder: Option<PathBuf>,
    },
    /// Check every row: schema, roles, item files, token counts.
    Check {
        /// JSONL dataset.
        dataset: PathBuf,
        /// Also prepare every row with this model (tokens, template, lengths).
        #[arg(long)]
        model: Option<PathBuf>,
    },
}

/// `multitoken merge-lora`: fold a PEFT adapter into the base weights.
#[derive(Debug, Args)]
pub struct MergeLoraArgs {
    /// Model directory (a `--stage lora` output, or the base LM's HF directory).
    #[arg(long)]
    pub model: PathBuf,
    /// Adapter directory (adapter_config.json + adapter_model.safetensors); default: `--model`.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Where the merged model goes.
    #[arg(long = "output-dir", alias = "output_dir", alias = "output")]
    pub output: PathBuf,
}

/// `multitoken eval`: accuracy on a held-out dataset.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Model directory.
    #[arg(long)]
    pub model: PathBuf,
    /// JSONL rows; the last assistant message of each is the reference.
    #[arg(long)]
    pub dataset: PathBuf,
    /// Longest reply.
    #[arg(long, default_value_t = 32)]
    pub max_new_tokens: usize,
    /// Evaluate only the first N rows.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Write every row's prediction as JSON to this file (a file, not a directory).
    #[arg(long)]
    pub output: Option<PathBuf>,
}

/// Run `multitoken train`.
pub fn train(args: TrainArgs) -> Result<()> {
    train_with(args, &|model: &Path| Ok(model.to_path_buf()))
}

/// [`train`] with the model looked up by `resolve_model` (see [`TrainArgs::resolve_with`]).
pub fn train_with(args: TrainArgs, resolve_model: &dyn Fn(&Path) -> Result<PathBuf>) -> Result<()> {
    let cfg = args.resolve_with(resolve_model)?;
    let summary = trainer::train(&cfg)?;
    let last = summary
        .log
        .last()
        .map(|l| format!(", final loss {:.4}", l.loss))
        .unwrap_or_default();
    println!(
        "trained {} steps{last}; model written to {}",
        summary.steps,
        summary.output_dir.display()
    );
    Ok(())
}

/// Run `multitoken dataset`.
pub fn dataset(args: DatasetArgs) -> Result<()> {
    match args.command {
        DatasetCommand::ConvertLlava {
            input,
            output,
            image_folder,
        } => {
            let n = data::convert_llava(&input, &output, image_folder.as_deref())?;
            println!("wrote {n} rows to {}", output.display());
            Ok(())
        }
        DatasetCommand::Check { dataset, model } => {
            let mut tokens: BTreeMap<String, String> = data::default_tokens();
            let mut problems = Vec::new();
            let mut loaded_model = None;
            if let Some(model) = &model {
                let loaded = crate::model::TrainableModel::load(
                    model,
                    crate::model::TrainParts::default(),
                    &candle_core::Device::Cpu,
                )?;
                tokens = loaded
                    .mm
                    .modalities
                    .iter()
                    .map(|m| {
                        (
                            m.modality.data_key().to_string(),
                            m.modality.token().to_string(),
                        )
                    })
                    .collect();
                if let Ok(rows) = data::read_jsonl_for(&dataset, &loaded.mm) {
                    for row in rows {
                        if let Err(e) = loaded
                            .mm
                            .prepare_training(&row.messages, &row.items)
                        {
                            problems.push(format!(
                                "{}:{} (id {}): {e}",
                                dataset.display(),
                                row.line,
                                row.id
                            ));
                        }
                    }
                }
                loaded_model = Some(loaded);
            }
            let mut report = match &loaded_model {
                Some(loaded) => data::check_with(&dataset, &tokens, &data::model_items(&loaded.mm))?,
                None => data::check(&dataset, &tokens)?,
            };
            report.problems.extend(problems);
            let items: Vec<String> = report
                .items
                .iter()
                .map(|(k, n)| format!("{n} {k}"))
                .collect();
            println!(
                "{}: {} rows{}{}",
                dataset.display(),
                report.rows,
                if items.is_empty() {
                    String::new()
                } else {
                    format!(", items: {}", items.join(", "))
                },
                if report.problems.is_empty() {
                    ", no problems".to_string()
                } else {
                    String::new()
                }
            );
            for p in &report.problems {
                eprintln!("{p}");
            }
            if !report.problems.is_empty() {
                bail!("{} problem(s) found", report.problems.len());
            }
            Ok(())
        }
    }
}

/// Run `multitoken merge-lora`.
pub fn merge_lora(args: MergeLoraArgs) -> Result<()> {
    let lm = crate::merge::merge_lora(&args.model, args.adapter.as_deref(), &args.output)?;
    println!("merged weights written to {}", lm.display());
    Ok(())
}

/// Run `multitoken eval`.
pub fn eval(args: EvalArgs) -> Result<()> {
    let report =
        crate::eval::evaluate(&args.model, &args.dataset, args.max_new_tokens, args.limit)?;
    println!(
        "{} rows: exact match {:.1}%, contains {:.1}%",
        report.rows,
        100.0 * report.exact_match,
        100.0 * report.contains
    );
    if let Some(path) = &args.output {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    #[derive(Debug, Parser)]
    struct Train {
        #[command(flatten)]
        args: TrainArgs,
    }

    #[derive(Debug, Parser)]
    struct Merge {
        #[command(flatten)]
        args: MergeLoraArgs,
    }

    const PATHS: [&str; 7] = ["t", "--model", "m", "--dataset", "d.jsonl", "--output-dir", "o"];

    fn resolve(extra: &[&str]) -> Result<TrainConfig> {
        let argv: Vec<&str> = PATHS.iter().chain(extra).copied().collect();
        Train::try_parse_from(argv)?.args.resolve()
    }

    #[test]
    fn boolean_flags_are_bare_switches_and_take_the_old_values() -> Result<()> {
        let defaults = resolve(&[])?;
        assert!(defaults.progress && defaults.group_by_length && !defaults.overwrite_output_dir);
        let bare = resolve(&["--no-progress", "--overwrite-output-dir", "--no-group-by-length"])?;
        assert!(!bare.progress && bare.overwrite_output_dir && !bare.group_by_length);
        let old = resolve(&["--no-progress", "true", "--group-by-length", "false", "--overwrite-output-dir", "false"])?;
        assert!(!old.progress && !old.group_by_length && !old.overwrite_output_dir);
        assert!(resolve(&["--no_progress", "false", "--group_by_length"])?.progress);
        assert_eq!(resolve(&["--pretrain-projectors", "--seed", "3"])?.stage, Stage::Projectors);
        assert_eq!(resolve(&["--lora-enable"])?.stage, Stage::Lora);
        assert!(resolve(&["--group-by-length", "--no-group-by-length"]).is_err());
        Ok(())
    }

    #[test]
    fn output_dir_is_one_name_with_the_old_ones_as_aliases() -> Result<()> {
        for flag in ["--output-dir", "--output", "--output_dir"] {
            let merge = Merge::try_parse_from(["m", "--model", "a", flag, "b"])?;
            assert_eq!(merge.args.output, PathBuf::from("b"), "{flag}");
            let train = Train::try_parse_from(["t", "--model", "m", "--dataset", "d", flag, "o"])?;
            assert_eq!(train.args.output_dir, Some(PathBuf::from("o")), "{flag}");
        }
        Ok(())
    }

    /// The defaults written in `--help` are the ones applied.
    #[test]
    fn help_shows_the_defaults_applied() -> Result<()> {
        // Whitespace normalised: clap may wrap a long help line anywhere.
        let help = Train::command().render_long_help().to_string();
        let help = help.split_whitespace().collect::<Vec<_>>().join(" ");
        let cfg = resolve(&[])?;
        for shown in [
            format!("[default: {}]", cfg.per_device_train_batch_size),
            format!("[default: {}]", cfg.seed),
            format!("[default: {}]", cfg.lora_r),
            format!("[default: {}]", cfg.adam_beta2),
            format!("[default: {}]", cfg.warmup_ratio),
            format!("[default: {:e}]", cfg.learning_rate),
            "[default: cosine]".to_string(),
            "[default: projectors]".to_string(),
        ] {
            assert!(help.contains(&shown), "--help lacks {shown}:\n{help}");
        }
        assert!(help.contains("--overwrite-output-dir") && help.contains("--no-group-by-length"));
        Ok(())
    }
}
