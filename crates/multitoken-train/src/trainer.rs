//! The training loop: batches, gradient accumulation, clipping, AdamW with a
//! schedule, metrics, atomic checkpoints and exact resume.
//!
//! Data order is a pure function of `(seed, epoch)` (a seeded shuffle, then
//! length grouping as transformers' `LengthGroupedSampler`: mega-batches of 50
//! batches sorted by length), and the micro-batch stream runs on across epochs,
//! so a resumed run sees exactly the batches the uninterrupted one would. A
//! checkpoint `checkpoint-{step}/` is a loadable model directory plus
//! `trainable.safetensors` (every trained variable), `optimizer.safetensors`
//! and `trainer_state.json`; it is written under a temporary name and renamed.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor};
use multitoken_core::{ItemsByKey, PreparedInput, IGNORE_INDEX};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::data::{write_atomic, Row};
use crate::model::{EncoderChoice, LoraSettings, TrainParts, TrainableModel};
use crate::optim::{clip_grad_norm, learning_rate, AdamW, AdamWConfig, Schedule};
use crate::run::RunIdentity;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::SyncSender;
use crate::{Error, Result};

/// Every setting of a run (the CLI flags / TOML keys).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Model directory to start from.
    pub model: PathBuf,
    /// JSONL dataset.
    pub dataset: PathBuf,
    /// Output directory.
    pub output_dir: PathBuf,
    /// `projectors` (stage 1), `lora` (stage 2) or `full`.
    pub stage: Stage,
    /// Which modality encoders train too.
    pub train_encoders: EncoderChoice,
    /// Projector weights to start from.
    pub pretrained_projectors: Option<PathBuf>,
    /// LoRA rank.
    pub lora_r: usize,
    /// LoRA alpha.
    pub lora_alpha: f64,
    /// LoRA dropout.
    pub lora_dropout: f32,
    /// LoRA target module suffixes (empty = every decoder linear).
    pub lora_target_modules: Vec<String>,
    /// `--stage full`: LM parameters that stay as loaded, by transformers name or
    /// name prefix (`model.embed_tokens`): e.g. pretrained embeddings kept fixed so
    /// that words the data never shows keep their neighbours.
    #[serde(default)]
    pub freeze_lm: Vec<String>,
    /// Epochs (ignored when `max_steps` is set).
    pub num_train_epochs: f64,
    /// Optimizer steps; overrides epochs.
    pub max_steps: Option<usize>,
    /// Rows per micro-batch.
    pub per_device_train_batch_size: usize,
    /// Micro-batches per optimizer step.
    pub gradient_accumulation_steps: usize,
    /// Peak learning rate.
    pub learning_rate: f64,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// AdamW β₁.
    pub adam_beta1: f64,
    /// AdamW β₂.
    pub adam_beta2: f64,
    /// AdamW ε.
    pub adam_epsilon: f64,
    /// Warmup as a fraction of the steps.
    pub warmup_ratio: f64,
    /// Warmup steps (overrides the ratio when set).
    pub warmup_steps: Option<usize>,
    /// Schedule after warmup.
    pub lr_scheduler_type: Schedule,
    /// Clip gradients to this global norm (0 = off).
    pub max_grad_norm: f64,
    /// Truncate rows to this many tokens.
    pub model_max_length: Option<usize>,
    /// Sort mega-batches by length (less padding).
    pub group_by_length: bool,
    /// Checkpoint every this many steps (0 = only at the end).
    pub save_steps: usize,
    /// Keep at most this many checkpoints.
    pub save_total_limit: Option<usize>,
    /// Log to metrics.jsonl every this many steps.
    pub logging_steps: usize,
    /// Seed of data order and initialisation.
    pub seed: u64,
    /// Continue from the latest checkpoint in `output_dir` (or this one).
    pub resume: Option<PathBuf>,
    /// Replace a previous run in `output_dir` (its checkpoints, metrics and
    /// model files are removed before the first step); without it, an output
    /// directory holding a run is refused unless resuming.
    #[serde(default)]
    pub overwrite_output_dir: bool,
    /// Quantize an HF base's linears to this block format (`q8_0`, `q4_1`,
    /// `q4_k`) as they are read; LoRA then trains over the quantized base (QLoRA).
    #[serde(default)]
    pub quantize: Option<String>,
    /// Keep the frozen modality towers' linears in this block format (`q8_0`,
    /// `q4_1`) as they are read (`--quantize-towers`).
    #[serde(default)]
    pub quantize_towers: Option<String>,
    /// `--stage lora`: recompute each decoder layer in the backward pass
    /// instead of keeping its activations (less memory, one more forward).
    #[serde(default)]
    pub gradient_checkpointing: bool,
    /// Directory of the on-disk cache of frozen-encoder features.
    pub feature_cache: Option<PathBuf>,
    /// Show a progress bar.
    pub progress: bool,
}

/// Which weights a run trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// Projectors only (multi_token `--pretrain_projectors`).
    Projectors,
    /// LoRA adapters on the LM's linears plus the projectors.
    Lora,
    /// Every LM weight plus the projectors.
    Full,
}

impl TrainConfig {
    /// Defaults for everything but the paths (multi_token / transformers defaults where sensible).
    pub fn new(model: PathBuf, dataset: PathBuf, output_dir: PathBuf) -> Self {
        Self {
            model,
            dataset,
            output_dir,
            stage: Stage::Projectors,
            train_encoders: EncoderChoice::None,
            pretrained_projectors: None,
            lora_r: 64,
            lora_alpha: 16.0,
            lora_dropout: 0.05,
            lora_target_modules: Vec::new(),
            freeze_lm: Vec::new(),
            num_train_epochs: 1.0,
            max_steps: None,
            per_device_train_batch_size: 4,
            gradient_accumulation_steps: 1,
            learning_rate: 1e-3,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            warmup_ratio: 0.03,
            warmup_steps: None,
            lr_scheduler_type: Schedule::Cosine,
            max_grad_norm: 1.0,
            model_max_length: None,
            group_by_length: true,
            save_steps: 0,
            save_total_limit: None,
            logging_steps: 1,
            seed: 42,
            resume: None,
            overwrite_output_dir: false,
            feature_cache: None,
            progress: true,
            quantize: None,
            quantize_towers: None,
            gradient_checkpointing: false,
        }
    }
}

/// One logged step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepLog {
    /// Optimizer step (1-based).
    pub step: usize,
    /// Epoch position (fractional).
    pub epoch: f64,
    /// Mean loss over the step's micro-batches.
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Labelled tokens in the step.
    pub tokens: usize,
}

/// `trainer_state.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps done.
    pub step: usize,
    /// Planned steps.
    pub total_steps: usize,
    /// The seed.
    pub seed: u64,
    /// Every step's log so far.
    pub log: Vec<StepLog>,
    /// The run that wrote it (`None` in checkpoints of older versions, which
    /// `--resume` refuses: it cannot tell whose they are).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<RunIdentity>,
}

/// What a finished run reports.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainSummary {
    /// Steps done in total.
    pub steps: usize,
    /// Per-step logs (including those before a resume).
    pub log: Vec<StepLog>,
    /// Where the final model is.
    pub output_dir: PathBuf,
}

/// `loss.png` is redrawn every this many steps (and at the end).
const PLOT_EVERY: usize = 10;

/// A prepared dataset row.
struct Example {
    prepared: PreparedInput,
    items: ItemsByKey,
}

/// Runs training as configured.
pub fn train(cfg: &TrainConfig) -> Result<TrainSummary> {
    train_until(cfg, &AtomicBool::new(false), None)
}

/// [`train`], stopping between optimizer steps once `stop` is set: the state
/// after the last finished step is written as a checkpoint (so `resume` continues
/// exactly from it) and [`Error::Interrupted`] names it. Python's `multitoken.train`
/// sets `stop` on Ctrl-C. Each row written to `metrics.jsonl` is also sent to
/// `logged` (Python's progress callback reads them there); a bounded channel
/// holds the trainer back when its reader falls behind, so that a reader that
/// sets `stop` on a row stops the run within the channel's bound.
pub fn train_until(cfg: &TrainConfig, stop: &AtomicBool, logged: Option<&SyncSender<String>>) -> Result<TrainSummary> {
    validate(cfg)?;
    let previous_run = crate::run::check_output_dir(cfg)?;
    let device = Device::Cpu;
    let parts = TrainParts {
        projectors: true,
        lm: cfg.stage == Stage::Full,
        encoders: cfg.train_encoders.clone(),
        pretrained_projectors: cfg.pretrained_projectors.clone(),
        lora: (cfg.stage == Stage::Lora).then(|| LoraSettings {
            r: cfg.lora_r,
            alpha: cfg.lora_alpha,
            dropout: cfg.lora_dropout,
            target_modules: cfg.lora_target_modules.clone(),
            gradient_checkpointing: cfg.gradient_checkpointing,
        }),
    };
    let quantize = cfg
        .quantize
        .as_deref()
        .map(|q| q.parse::<multitoken_lm::quantize::Quantization>())
        .transpose()
        .map_err(|e| Error::Config(format!("quantize: {e}")))?;
    let quantize_towers = cfg
        .quantize_towers
        .as_deref()
        .map(multitoken_lm::loader::parse_tower_quantization)
        .transpose()
        .map_err(|e| Error::Config(format!("quantize_towers: {e}")))?;
    let mut model = TrainableModel::load_quantized(&cfg.model, parts, &device, cfg.seed, quantize, quantize_towers)?;
    model.freeze_lm(&cfg.freeze_lm)?;
    crate::run::check_not_lm(cfg, &model.lm_path)?;
    let identity = RunIdentity::of(cfg, &model.lm_path)?;
    let rows = crate::data::read_jsonl_for(&cfg.dataset, &model.mm)?;
    let examples = prepare(&model, &rows, cfg)?;
    if let Some(dir) = &cfg.feature_cache {
        model.load_feature_cache(dir)?;
    }
    let batch = cfg.per_device_train_batch_size;
    let batches_per_epoch = examples.len().div_ceil(batch);
    let accum = cfg.gradient_accumulation_steps;
    let total_steps = match cfg.max_steps {
        Some(s) => s,
        None => ((cfg.num_train_epochs * batches_per_epoch as f64).ceil() as usize)
            .div_ceil(accum)
            .max(1),
    };
    let warmup = cfg
        .warmup_steps
        .unwrap_or((cfg.warmup_ratio * total_steps as f64).ceil() as usize);
    let params = model.params();
    if params.is_empty() {
        return Err(Error::Config(
            "nothing to train: the model has no projectors and no other part was chosen".into(),
        ));
    }
    let opt_config = AdamWConfig {
        beta1: cfg.adam_beta1,
        beta2: cfg.adam_beta2,
        eps: cfg.adam_epsilon,
        weight_decay: cfg.weight_decay,
    };
    let mut opt = AdamW::new(params, opt_config)?;
    // Only now, with the model and data loaded, is the previous run removed:
    // a run that cannot start leaves it as it was.
    if cfg.overwrite_output_dir {
        crate::run::clear(&cfg.output_dir, &previous_run)?;
    }
    std::fs::create_dir_all(&cfg.output_dir).map_err(|e| Error::io(&cfg.output_dir, e))?;

    let mut state = TrainerState {
        step: 0,
        total_steps,
        seed: cfg.seed,
        log: Vec::new(),
        run: Some(identity.clone()),
    };
    if let Some(resume) = &cfg.resume {
        let dir = if resume.as_os_str().is_empty() || resume == Path::new("latest") {
            latest_checkpoint(&cfg.output_dir)?.ok_or_else(|| {
                Error::Config(format!(
                    "--resume: no checkpoint-* directory in {}",
                    cfg.output_dir.display()
                ))
            })?
        } else {
            resume.clone()
        };
        state = load_checkpoint(&dir, &mut opt, cfg.seed, &identity)?;
        state.total_steps = total_steps;
    }
    let metrics_path = cfg.output_dir.join("metrics.jsonl");
    let mut metrics_text = String::new();
    for entry in &state.log {
        metrics_text
            .push_str(&serde_json::to_string(entry).map_err(|e| Error::Config(e.to_string()))?);
        metrics_text.push('\n');
    }
    write_atomic(&metrics_path, metrics_text.as_bytes())?;
    let mut metrics = std::fs::OpenOptions::new()
        .append(true)
        .open(&metrics_path)
        .map_err(|e| Error::io(&metrics_path, e))?;

    let lengths: Vec<usize> = examples.iter().map(|e| e.prepared.len()).collect();
    let mut order_cache: Option<(usize, Vec<Vec<usize>>)> = None;
    let bar = progress_bar(cfg.progress, total_steps, state.step);
    let started = Instant::now();
    let mut last_good: Option<PathBuf> = latest_checkpoint(&cfg.output_dir)?;
    while state.step < total_steps {
        if stop.load(Ordering::Relaxed) {
            if let Some(bar) = &bar {
                bar.abandon_with_message("interrupted");
            }
            let kept = if state.step == 0 {
                "no step had finished, so no checkpoint was written".to_string()
            } else {
                let saved_here = last_good.as_ref().is_some_and(|p| p.ends_with(format!("checkpoint-{}", state.step)));
                let dir = if saved_here {
                    last_good.clone().unwrap_or_default()
                } else {
                    save_checkpoint(&model, &opt, &state, &cfg.output_dir, cfg.save_total_limit)?
                };
                format!("checkpoint {} holds it; continue with resume", dir.display())
            };
            return Err(Error::Interrupted(format!(
                "training interrupted after step {} of {total_steps}: {kept}",
                state.step
            )));
        }
        let step = state.step;
        let lr = learning_rate(
            cfg.lr_scheduler_type,
            cfg.learning_rate,
            step,
            warmup,
            total_steps,
        );
        let mut grads: Vec<Option<Tensor>> = vec![None; opt.params().len()];
        let mut loss_sum = 0f64;
        let mut tokens = 0usize;
        for micro in 0..accum {
            let index = step * accum + micro;
            let epoch = index / batches_per_epoch;
            let within = index % batches_per_epoch;
            if order_cache.as_ref().map(|(e, _)| *e) != Some(epoch) {
                order_cache = Some((
                    epoch,
                    epoch_batches(&lengths, batch, cfg.seed, epoch, cfg.group_by_length),
                ));
            }
            let batch_rows: Vec<(&PreparedInput, &ItemsByKey)> = order_cache
                .as_ref()
                .and_then(|(_, b)| b.get(within))
                .map(|ids| {
                    ids.iter()
                        .map(|&i| (&examples[i].prepared, &examples[i].items))
                        .collect()
                })
                .unwrap_or_default();
            model
                .lora_rng
                .reseed(cfg.seed ^ (index as u64 + 1).wrapping_mul(0xD6E8_FEB8_6659_FD93));
            let (loss, count) = model.loss(&batch_rows)?;
            let value = loss.to_scalar::<f32>()? as f64;
            if !value.is_finite() {
                let kept = match &last_good {
                    Some(p) => format!("the last good checkpoint is {}", p.display()),
                    None => "no checkpoint was written before it".to_string(),
                };
                return Err(Error::NonFinite(format!(
                    "the loss is {value} at step {} (micro-batch {}); training stopped, {kept}",
                    step + 1,
                    micro + 1
                )));
            }
            loss_sum += value;
            tokens += count;
            let scaled = (loss / accum as f64)?;
            let store = scaled.backward()?;
            for (slot, param) in grads.iter_mut().zip(opt.params()) {
                // Adapters inside checkpointed layers got theirs in a side store.
                let side = multitoken_lm::model::checkpoint::take_grad(param.var.as_tensor());
                let g = match (store.get(param.var.as_tensor()).cloned(), side) {
                    (Some(a), Some(b)) => Some((a + b)?),
                    (a, b) => a.or(b),
                };
                if let Some(g) = g {
                    *slot = Some(match slot.take() {
                        Some(prev) => (prev + g)?,
                        None => g,
                    });
                }
            }
        }
        let grad_norm = clip_grad_norm(&mut grads, cfg.max_grad_norm)?;
        if !grad_norm.is_finite() {
            return Err(Error::NonFinite(format!(
                "the gradient norm is {grad_norm} at step {}; training stopped{}",
                step + 1,
                last_good
                    .as_ref()
                    .map(|p| format!(", the last good checkpoint is {}", p.display()))
                    .unwrap_or_default()
            )));
        }
        opt.step(&grads, lr)?;
        state.step += 1;
        let entry = StepLog {
            step: state.step,
            epoch: (state.step * accum) as f64 / batches_per_epoch as f64,
            loss: loss_sum / accum as f64,
            lr,
            grad_norm,
            tokens,
        };
        if cfg.logging_steps > 0
            && (state.step % cfg.logging_steps == 0 || state.step == total_steps)
        {
            let line = serde_json::to_string(&entry).map_err(|e| Error::Config(e.to_string()))?;
            writeln!(metrics, "{line}").map_err(|e| Error::io(&metrics_path, e))?;
            if let Some(logged) = logged {
                // A receiver that has gone only stops the reports, not the run.
                let _ = logged.send(line);
            }
        }
        if let Some(bar) = &bar {
            bar.set_message(format!("loss {:.4} lr {:.2e}", entry.loss, lr));
            bar.set_position(state.step as u64);
        }
        state.log.push(entry);
        if state.step % PLOT_EVERY == 0 {
            crate::plot::write_loss_png(&state.log, &cfg.output_dir.join("loss.png"))?;
        }
        if cfg.save_steps > 0 && state.step % cfg.save_steps == 0 && state.step < total_steps {
            last_good = Some(save_checkpoint(
                &model,
                &opt,
                &state,
                &cfg.output_dir,
                cfg.save_total_limit,
            )?);
        }
    }
    if let Some(bar) = &bar {
        bar.finish_with_message(format!("done in {:.1}s", started.elapsed().as_secs_f64()));
    }
    save_checkpoint(&model, &opt, &state, &cfg.output_dir, cfg.save_total_limit)?;
    model.save_in_run(&cfg.output_dir, &cfg.output_dir)?;
    if let Some(dir) = &cfg.feature_cache {
        model.save_feature_cache(dir)?;
    }
    crate::plot::write_loss_png(&state.log, &cfg.output_dir.join("loss.png"))?;
    let state_text =
        serde_json::to_string_pretty(&state).map_err(|e| Error::Config(e.to_string()))?;
    write_atomic(
        &cfg.output_dir.join("trainer_state.json"),
        state_text.as_bytes(),
    )?;
    Ok(TrainSummary {
        steps: state.step,
        log: state.log,
        output_dir: cfg.output_dir.clone(),
    })
}

fn validate(cfg: &TrainConfig) -> Result<()> {
    let bad = |m: &str| Err(Error::Config(m.to_string()));
    if cfg.per_device_train_batch_size == 0 {
        return bad("per_device_train_batch_size must be at least 1");
    }
    if cfg.gradient_accumulation_steps == 0 {
        return bad("gradient_accumulation_steps must be at least 1");
    }
    if cfg.gradient_checkpointing && cfg.stage != Stage::Lora {
        return bad("gradient_checkpointing applies to --stage lora (the decoder's layers are recomputed for its adapters)");
    }
    if !cfg.freeze_lm.is_empty() && cfg.stage != Stage::Full {
        return bad("freeze_lm applies to --stage full (only full fine-tuning trains the LM's own parameters)");
    }
    if !(cfg.learning_rate.is_finite() && cfg.learning_rate > 0.0) {
        return bad("learning_rate must be a positive number");
    }
    if !(cfg.num_train_epochs.is_finite() && cfg.num_train_epochs > 0.0) && cfg.max_steps.is_none()
    {
        return bad("num_train_epochs must be positive (or give max_steps)");
    }
    if cfg.max_steps == Some(0) {
        return bad("max_steps must be at least 1");
    }
    if !(0.0..=1.0).contains(&cfg.warmup_ratio) {
        return bad("warmup_ratio must be between 0 and 1");
    }
    if !(0.0..1.0).contains(&cfg.adam_beta1) || !(0.0..1.0).contains(&cfg.adam_beta2) {
        return bad("adam betas must be in [0, 1)");
    }
    Ok(())
}

fn prepare(model: &TrainableModel, rows: &[Row], cfg: &TrainConfig) -> Result<Vec<Example>> {
    let mut out = Vec::with_capacity(rows.len());
    let mut skipped = 0;
    for row in rows {
        let fail = |message: String| Error::Row {
            file: cfg.dataset.clone(),
            line: row.line,
            id: row.id_suffix(),
            message,
        };
        let mut prepared = model
            .mm
            .prepare_training(&row.messages, &row.items)
            .map_err(|e| fail(e.to_string()))?;
        for key in row.items.keys() {
            let text_key = model.mm.text_modalities().any(|m| m.data_key() == key);
            if model.mm.modality_for_key(key).is_none() && !text_key {
                return Err(fail(format!(
                    "`{key}` lists items but the model has no modality reading `{key}` (it has: {})",
                    model.mm.modality_tokens().join(", ")
                )));
            }
        }
        if let Some(max) = cfg.model_max_length {
            truncate(&mut prepared, max);
        }
        if prepared.labels.iter().skip(1).all(|&l| l == IGNORE_INDEX) {
            skipped += 1;
            continue;
        }
        out.push(Example {
            prepared,
            items: row.items.clone(),
        });
    }
    if skipped > 0 {
        eprintln!(
            "note: {skipped} row(s) have no labelled tokens (after truncation) and are skipped"
        );
    }
    if out.is_empty() {
        return Err(Error::Config(format!(
            "{}: no row has anything to learn",
            cfg.dataset.display()
        )));
    }
    Ok(out)
}

/// Cuts a row to `max` positions; a placeholder span that would be cut is dropped whole.
fn truncate(prepared: &mut PreparedInput, max: usize) {
    if prepared.len() <= max {
        return;
    }
    let mut cut = max;
    if let Some(span) = prepared
        .spans
        .iter()
        .find(|s| s.start < cut && s.end() > cut)
    {
        cut = span.start;
    }
    prepared.input_ids.truncate(cut);
    prepared.labels.truncate(cut);
    prepared.spans.retain(|s| s.end() <= cut);
}

/// The batches of one epoch: seeded shuffle, then (when grouping) mega-batches of
/// 50 batches each sorted by decreasing length.
pub fn epoch_batches(
    lengths: &[usize],
    batch: usize,
    seed: u64,
    epoch: usize,
    group: bool,
) -> Vec<Vec<usize>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(
        seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
    );
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.shuffle(&mut rng);
    if group {
        for mega in order.chunks_mut(batch * 50) {
            mega.sort_by(|a, b| lengths[*b].cmp(&lengths[*a]).then(a.cmp(b)));
        }
    }
    order.chunks(batch).map(<[usize]>::to_vec).collect()
}

fn progress_bar(enabled: bool, total: usize, done: usize) -> Option<indicatif::ProgressBar> {
    if !enabled {
        return None;
    }
    let bar = indicatif::ProgressBar::new(total as u64);
    let style = indicatif::ProgressStyle::with_template(
        "{bar:30} step {pos}/{len} {msg} [{elapsed_precise}<{eta_precise}, {per_sec}]",
    )
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_position(done as u64);
    Some(bar)
}

/// The `checkpoint-{N}` directory with the highest N.
pub fn latest_checkpoint(dir: &Path) -> Result<Option<PathBuf>> {
    if !dir.is_dir() {
        return Ok(None);
    }
    Ok(checkpoints(dir)?.into_iter().last().map(|(_, p)| p))
}

fn checkpoints(dir: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if let Some(n) = name
            .strip_prefix("checkpoint-")
            .and_then(|n| n.parse::<usize>().ok())
        {
            if path.is_dir() {
                found.push((n, path));
            }
        }
    }
    found.sort();
    Ok(found)
}

/// Writes `checkpoint-{step}` atomically (temporary directory + rename) and
/// removes the oldest beyond `limit`.
fn save_checkpoint(
    model: &TrainableModel,
    opt: &AdamW,
    state: &TrainerState,
    out: &Path,
    limit: Option<usize>,
) -> Result<PathBuf> {
    let final_dir = out.join(format!("checkpoint-{}", state.step));
    let tmp = out.join(format!(".checkpoint-{}.tmp", state.step));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    // Paths into the run directory are written relative: `tmp` and the final
    // checkpoint directory sit side by side, so they stay valid after the rename.
    model.save_in_run(&tmp, out)?;
    let tensors: std::collections::HashMap<String, Tensor> = opt
        .params()
        .iter()
        .map(|p| (p.name.clone(), p.var.as_tensor().clone()))
        .collect();
    crate::data::save_safetensors(&tensors, &tmp.join("trainable.safetensors"))?;
    opt.save(&tmp.join("optimizer.safetensors"))?;
    let text = serde_json::to_string_pretty(state).map_err(|e| Error::Config(e.to_string()))?;
    std::fs::write(tmp.join("trainer_state.json"), text).map_err(|e| Error::io(&tmp, e))?;
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir).map_err(|e| Error::io(&final_dir, e))?;
    }
    std::fs::rename(&tmp, &final_dir).map_err(|e| Error::io(&final_dir, e))?;
    if let Some(limit) = limit {
        let all = checkpoints(out)?;
        let excess = all.len().saturating_sub(limit.max(1));
        for (_, path) in all.into_iter().take(excess) {
            std::fs::remove_dir_all(&path).map_err(|e| Error::io(&path, e))?;
        }
    }
    Ok(final_dir)
}

/// Restores variables, optimizer state and trainer state from a checkpoint,
/// after checking that it belongs to this run (`seed`, `identity`): nothing is
/// loaded from another run's checkpoint.
fn load_checkpoint(dir: &Path, opt: &mut AdamW, seed: u64, identity: &RunIdentity) -> Result<TrainerState> {
    let fail = |message: String| Error::Checkpoint {
        path: dir.to_path_buf(),
        message,
    };
    if !dir.is_dir() {
        return Err(fail("not a directory".into()));
    }
    let state_path = dir.join("trainer_state.json");
    let text = std::fs::read_to_string(&state_path)
        .map_err(|e| fail(format!("trainer_state.json: {e}")))?;
    let state: TrainerState = serde_json::from_str(&text)
        .map_err(|e| fail(format!("trainer_state.json is corrupt: {e}")))?;
    if state.seed != seed {
        return Err(fail(format!(
            "it was trained with seed {}, this run has {seed}",
            state.seed
        )));
    }
    match &state.run {
        None => {
            return Err(fail(
                "it records no run identity (written by an older multitoken), so it cannot be told \
                 apart from another run's; start a new run instead"
                    .into(),
            ))
        }
        Some(theirs) => {
            if let Some(why) = theirs.mismatch(identity) {
                return Err(fail(why));
            }
        }
    }
    let weights = dir.join("trainable.safetensors");
    let device = opt
        .params()
        .first()
        .map(|p| p.var.device().clone())
        .unwrap_or(Device::Cpu);
    let tensors = candle_core::safetensors::load(&weights, &device)
        .map_err(|e| fail(format!("trainable.safetensors is missing or corrupt: {e}")))?;
    for p in opt.params() {
        let t = tensors.get(&p.name).ok_or_else(|| {
            fail(format!(
                "trainable.safetensors lacks `{}` (was it written by a run training other parts?)",
                p.name
            ))
        })?;
        if t.dims() != p.var.dims() {
            return Err(fail(format!(
                "`{}` has shape {:?}, the model {:?}",
                p.name,
                t.dims(),
                p.var.dims()
            )));
        }
        p.var.set(&t.to_dtype(p.var.dtype())?)?;
    }
    opt.load(&dir.join("optimizer.safetensors"))?;
    if opt.step_count() != state.step {
        return Err(fail(format!(
            "optimizer state is at step {} but trainer_state.json says {}",
            opt.step_count(),
            state.step
        )));
    }
    if state.log.len() != state.step {
        return Err(fail(format!(
            "trainer_state.json logs {} steps, expected {}",
            state.log.len(),
            state.step
        )));
    }
    Ok(state)
}
