//! Options shared by every subcommand that loads a model and samples from it.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::Args;
use multitoken_core::{Item, ItemsByKey};
use multitoken_lm::generate::GenerationParams;
use multitoken_lm::gguf::{load_gguf_with, GgufWeights};
use multitoken_lm::loader::LoadOptions;
use multitoken_lm::multimodal::{template_from_spec, MultimodalModel};
use multitoken_lm::sampling::SamplingParams;

/// Which model to load and how.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// An HF model directory, a `.gguf` file or a hub id `org/name[@revision][:QUANT]` (from the
    /// HF cache, else downloaded unless HF_HUB_OFFLINE is set) [default: the demo model in examples/demo-model,
    /// else SmolLM2 from `cargo xtask weights`].
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Activation / weight dtype: f32, f16 or bf16. A GGUF keeps its quantized
    /// matrices unless `--dequantize` is given. On the CPU, bf16 keeps the LM's
    /// linear weights in bf16 (AMX / AVX-512 BF16 products where the CPU has
    /// them) while its activations, norms, attention and the towers stay f32; a quantized
    /// model's prefill then multiplies in bf16 on AMX (faster, not exact).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Dequantize a GGUF's matrices to `--dtype` instead of keeping them quantized.
    #[arg(long)]
    pub dequantize: bool,
    /// Quantize an HF directory's linears (and head) to q8_0, q4_1 or q4_k as they
    /// are read; embeddings, norms and modality towers keep `--dtype`.
    #[arg(long, value_name = "q8_0|q4_1|q4_k")]
    pub quantize: Option<String>,
    /// Keep the modality towers' linears (vision, audio, document encoders) as
    /// q8_0 or q4_1 blocks, quantized as they are read; without it they keep
    /// `--dtype`. Rows that are not whole 32-weight blocks stay unquantized.
    #[arg(long, value_name = "q8_0|q4_1")]
    pub quantize_towers: Option<String>,
    /// Round activations to 8 bits for the Q4_1 / Q8_0 products (integer dot
    /// products, as llama.cpp does): faster decoding, logits no longer those of
    /// the dequantized f32 model (the default, exact mode).
    #[arg(long)]
    pub int8_activations: bool,
    /// Chat template to use instead of the model's own: a built-in name
    /// (chatml, mistral, llama2, idefics2, phi2) or a jinja file.
    #[arg(long)]
    pub chat_template: Option<String>,
}

/// How to sample.
#[derive(Debug, Clone, Args)]
pub struct SamplingArgs {
    /// Most new tokens to generate.
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 (the default) is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches P.
    #[arg(long)]
    pub top_p: Option<f64>,
    /// Keep only the K most likely tokens.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Penalise tokens already present (transformers' repetition_penalty).
    #[arg(long)]
    pub repetition_penalty: Option<f32>,
    /// Seed of the sampler's random numbers.
    #[arg(long, default_value_t = 299_792_458)]
    pub seed: u64,
    /// Stop when this text is generated (repeatable).
    #[arg(long = "stop")]
    pub stop_strings: Vec<String>,
    /// Generate exactly --max-new-tokens: the end-of-sequence ids are never chosen
    /// (transformers' min_new_tokens).
    #[arg(long)]
    pub ignore_eos: bool,
}

impl ModelArgs {
    /// The model path given (a hub id resolved to its cached snapshot), or the
    /// default one if it is installed.
    pub fn resolve_path(&self) -> Result<PathBuf> {
        if let Some(path) = &self.model {
            return crate::hub::resolve_model_arg(path);
        }
        let default = default_model_path();
        if default.join("multitoken.json").is_file() {
            return Ok(default);
        }
        // Until the demo model is committed (or in a checkout without examples/): SmolLM2.
        let smollm2 = smollm2_path();
        if smollm2.exists() {
            return Ok(smollm2);
        }
        bail!(
            "no --model given, and neither the demo model {} nor SmolLM2 {} is there; run `cargo xtask weights` or pass --model DIR|FILE.gguf",
            default.display(),
            smollm2.display()
        )
    }

    /// Load the model (multimodal when its directory has `multitoken.json`) on the CPU.
    pub fn load(&self) -> Result<MultimodalModel> {
        let path = self.resolve_path()?;
        let dtype = parse_dtype(&self.dtype)?;
        let quantize = parse_quantize(self.quantize.as_deref())?;
        if quantize.is_some() && self.dequantize {
            bail!("--quantize and --dequantize exclude each other");
        }
        let quantize_towers = parse_quantize_towers(self.quantize_towers.as_deref())?;
        let options = LoadOptions { dtype, device: Device::Cpu, quantize, quantize_towers };
        multitoken_lm::set_int8_activations(self.int8_activations);
        let is_gguf = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
        let loaded = if is_gguf && self.dequantize {
            load_gguf_with(&path, &options, GgufWeights::Dequantized)
                .and_then(|lm| MultimodalModel::from_parts(lm, Vec::new(), None))
        } else {
            MultimodalModel::load(&path, &options)
        };
        let mut model = loaded.with_context(|| format!("loading model {}", path.display()))?;
        if let Some(spec) = &self.chat_template {
            let template = template_from_spec(spec, &model.lm).with_context(|| format!("--chat-template {spec}"))?;
            model.set_chat_template(template)?;
        }
        Ok(model)
    }
}

/// `--quantize`'s value, checked.
pub fn parse_quantize(value: Option<&str>) -> Result<Option<multitoken_lm::quantize::Quantization>> {
    value.map(|v| v.parse().map_err(|e| anyhow::anyhow!("--quantize: {e}"))).transpose()
}

/// `--quantize-towers`' value, checked.
pub fn parse_quantize_towers(value: Option<&str>) -> Result<Option<multitoken_lm::loader::TowerQuantization>> {
    value
        .map(|v| multitoken_lm::loader::parse_tower_quantization(v).map_err(|e| anyhow::anyhow!("--quantize-towers: {e}")))
        .transpose()
}

/// Items given on the command line, by modality.
#[derive(Debug, Clone, Default, Args)]
pub struct ItemArgs {
    /// An image for the next `<image>` token (repeatable; the k-th flag fills the k-th token).
    #[arg(long = "image", value_name = "PATH")]
    pub images: Vec<PathBuf>,
    /// An audio clip for the next `<speech>` token (repeatable).
    #[arg(long = "audio", value_name = "PATH")]
    pub audios: Vec<PathBuf>,
    /// A document (pdf, txt, md) for the next `<document>` token (repeatable).
    #[arg(long = "document", value_name = "PATH")]
    pub documents: Vec<PathBuf>,
    /// An item for any modality by its data key, `KEY=PATH` (repeatable).
    #[arg(long = "item", value_name = "KEY=PATH")]
    pub items: Vec<String>,
}

impl ItemArgs {
    /// The items keyed as dataset rows key them.
    pub fn collect(&self) -> Result<ItemsByKey> {
        let mut items = ItemsByKey::new();
        let mut add = |key: &str, path: &std::path::Path| -> Result<()> {
            let shown = path.to_string_lossy();
            if shown.starts_with("http://") || shown.starts_with("https://") {
                bail!("{shown}: URLs are not fetched by the CLI yet; download the file and pass its path");
            }
            if let Err(e) = multitoken_core::check_regular_file(path) {
                bail!("{}: {e} (given for `{key}`)", path.display());
            }
            items.entry(key.to_string()).or_default().push(Item::Path(path.to_path_buf()));
            Ok(())
        };
        for path in &self.images {
            add("images", path)?;
        }
        for path in &self.audios {
            add("speech_audios", path)?;
        }
        for path in &self.documents {
            add("documents", path)?;
        }
        for spec in &self.items {
            let Some((key, path)) = spec.split_once('=') else {
                bail!("--item {spec:?}: expected KEY=PATH, e.g. images=cat.png");
            };
            add(key, std::path::Path::new(path))?;
        }
        Ok(items)
    }
}

impl SamplingArgs {
    /// Generation parameters, with EOS ids from the checkpoint.
    pub fn params(&self, model: &MultimodalModel) -> GenerationParams {
        GenerationParams {
            sampling: SamplingParams {
                temperature: Some(self.temperature),
                top_k: self.top_k,
                top_p: self.top_p,
                repetition_penalty: self.repetition_penalty,
                seed: Some(self.seed),
            },
            max_new_tokens: self.max_new_tokens,
            stop_strings: self.stop_strings.clone(),
            eos_token_ids: model.lm.generation.eos_token_ids.clone(),
            ignore_eos: self.ignore_eos,
        }
    }
}

/// The model used when no `--model` is given: the demo model shipped in the
/// repository (`examples/demo-model`, built by `cargo xtask demo-model`).
pub fn default_model_path() -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/demo-model")
}

/// Where `cargo xtask weights` puts SmolLM2.
pub fn smollm2_path() -> PathBuf {
    weights_dir().join("smollm2").join("SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// `$MULTITOKEN_WEIGHTS`, default `~/.cache/multitoken`.
pub fn weights_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("MULTITOKEN_WEIGHTS") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("multitoken")
}

fn parse_dtype(name: &str) -> Result<DType> {
    Ok(match name {
        "f32" => DType::F32,
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        other => bail!("unknown --dtype {other:?}; expected f32, f16 or bf16"),
    })
}
