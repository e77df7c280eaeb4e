//! The `moe` subcommand of the `multitoken` binary.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};

use crate::build::{build, BuildConfig};
use crate::config::Routing;
use crate::gate::{set_gate, train_gate, TrainGateConfig};

/// `multitoken moe build|train-gate|set-gate`.
#[derive(Debug, Args)]
pub struct MoeArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: MoeCommand,
}

/// The `moe` subcommands.
#[derive(Debug, Subcommand)]
pub enum MoeCommand {
    /// Build a mixture of experts: the base's model with every MLP replaced by
    /// the experts' MLPs behind a gate.
    Build {
        /// The base model directory (HF LM or multimodal multitoken.json directory).
        #[arg(long)]
        base: PathBuf,
        /// Expert model directories (full fine-tunes or PEFT LoRA adapters of the base).
        #[arg(long, num_args = 1.., required = true)]
        experts: Vec<PathBuf>,
        /// Experts computed per token.
        #[arg(long, default_value_t = 1)]
        k: usize,
        /// Routing: cephalo (softmax, top-k, softmax) or renormalize (softmax, top-k, / sum).
        #[arg(long, default_value = "cephalo")]
        routing: Routing,
        /// Output directory (new or empty).
        #[arg(long)]
        out: PathBuf,
        /// Seed of the initial (untrained) gates.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Load the built MoE with its decoder linears (every expert's) quantized
        /// to q8_0, q4_1 or q4_k (recorded in moe.json; gates and head stay dense).
        #[arg(long, value_name = "FORMAT")]
        quantize: Option<String>,
    },
    /// Train the gates on labelled prompts (Cephalo's method) and store them.
    TrainGate {
        /// The MoE model directory.
        dir: PathBuf,
        /// JSONL rows {"text": ..., "items": {"images": ["a.png"]}, "expert": 0}.
        #[arg(long)]
        prompts: PathBuf,
        /// Adam steps per layer.
        #[arg(long, default_value_t = 1000)]
        epochs: usize,
        /// Learning rate.
        #[arg(long, default_value_t = 5e-5)]
        lr: f64,
        /// Print the loss every N epochs.
        #[arg(long, default_value_t = 100)]
        loss_steps: usize,
        /// Gate i learns from hidden state i + offset (0 = the layer's input).
        #[arg(long, default_value_t = 0)]
        layer_offset: usize,
        /// Also write the trained gates to this file (set-gate format).
        #[arg(long)]
        save_gates: Option<PathBuf>,
    },
    /// Load gate weights (layers.{i}.gate.weight / .bias) into an MoE directory.
    SetGate {
        /// The MoE model directory.
        dir: PathBuf,
        /// The gate file.
        #[arg(long)]
        gates: PathBuf,
    },
}

/// Run `multitoken moe`.
pub fn run(args: MoeArgs) -> Result<()> {
    match args.command {
        MoeCommand::Build {
            base,
            experts,
            k,
            routing,
            out,
            seed,
            quantize,
        } => {
            let quantize = quantize
                .map(|q| q.parse::<multitoken_lm::quantize::Quantization>())
                .transpose()
                .map_err(|e| anyhow::anyhow!("--quantize: {e}"))?;
            let report = build(&BuildConfig {
                base,
                experts,
                k,
                routing,
                out: out.clone(),
                seed,
                quantize,
            })
            .with_context(|| format!("building the mixture of experts in {}", out.display()))?;
            println!(
                "wrote {}: {} layers x {} experts, k = {k} ({routing:?} routing); gates are untrained: run `multitoken moe train-gate` or `set-gate`",
                report.lm_dir.display(),
                report.layers,
                report.experts
            );
        }
        MoeCommand::TrainGate {
            dir,
            prompts,
            epochs,
            lr,
            loss_steps,
            layer_offset,
            save_gates,
        } => {
            let cfg = TrainGateConfig {
                epochs,
                lr,
                loss_steps,
                layer_offset,
            };
            train_gate(&dir, &prompts, &cfg, save_gates.as_deref())
                .with_context(|| format!("training the gates of {}", dir.display()))?;
            println!("gates of {} updated", dir.display());
        }
        MoeCommand::SetGate { dir, gates } => {
            set_gate(&dir, &gates)
                .with_context(|| format!("setting the gates of {}", dir.display()))?;
            println!("gates of {} set from {}", dir.display(), gates.display());
        }
    }
    Ok(())
}
