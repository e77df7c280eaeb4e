//! The `serve` subcommand of the `multitoken` binary:
//! `multitoken serve [--model DIR] [--host H] [--port P] [--allow-files DIR] [--allow-urls]
//! [--dtype D] [--dequantize | --quantize Q] [--int8-activations] [--chat-template NAME|FILE] [limits]`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::Args;
use multitoken_lm::loader::LoadOptions;
use multitoken_lm::gguf::{load_gguf_with, GgufWeights};
use multitoken_lm::multimodal::{template_from_spec, MultimodalModel};

use crate::config::{ConnectionLimits, Limits, ServeConfig};
use crate::state::AppState;

/// `multitoken serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// A model directory (multimodal with `multitoken.json`, or a plain HF LM) or a
    /// `.gguf` file [default: the embedded demo model examples/demo-model, else SmolLM2].
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0 picks a free one).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Items may name files under this directory (no local file is read without
    /// it); a file is opened once, checked to lie under DIR as opened, and read
    /// up to --max-body-bytes.
    #[arg(long, value_name = "DIR")]
    pub allow_files: Option<PathBuf>,
    /// Items may be http(s) URLs, fetched by the server.
    #[arg(long)]
    pub allow_urls: bool,
    /// Name listed by /v1/models [default: the model directory's name].
    #[arg(long)]
    pub name: Option<String>,
    /// Activation / weight dtype: f32, f16 or bf16. A GGUF keeps its quantized
    /// matrices unless `--dequantize` is given. On the CPU, bf16 keeps the LM's
    /// linear weights in bf16 (AMX / AVX-512 BF16 products where the CPU has
    /// them) while its activations, norms, attention and the towers stay f32; a quantized
    /// model's prefill then multiplies in bf16 on AMX (faster, not exact).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Dequantize a GGUF's matrices to `--dtype` instead of keeping them quantized
    /// (as `generate --dequantize`).
    #[arg(long)]
    pub dequantize: bool,
    /// Round activations to 8 bits for the Q4_1 / Q8_0 products (integer dot
    /// products, as llama.cpp does): faster decoding, logits no longer those of
    /// the dequantized f32 model (the default, exact mode).
    #[arg(long)]
    pub int8_activations: bool,
    /// Quantize an HF directory's linears (and head) to q8_0, q4_1 or q4_k as they
    /// are read (as `generate --quantize`).
    #[arg(long, value_name = "q8_0|q4_1|q4_k")]
    pub quantize: Option<String>,
    /// Keep the modality towers' linears (vision, audio, document encoders) as
    /// q8_0 or q4_1 blocks too (as `generate --quantize-towers`).
    #[arg(long, value_name = "q8_0|q4_1")]
    pub quantize_towers: Option<String>,
    /// Chat template to use instead of the model's own: a built-in name (chatml,
    /// mistral, llama2, idefics2, phi2) or a jinja file (as `generate --chat-template`).
    #[arg(long)]
    pub chat_template: Option<String>,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = Limits::default().max_body_bytes)]
    pub max_body_bytes: usize,
    /// Most items per request.
    #[arg(long, default_value_t = Limits::default().max_items)]
    pub max_items: usize,
    /// Most pixels per image.
    #[arg(long, default_value_t = Limits::default().max_image_pixels)]
    pub max_image_pixels: u64,
    /// Longest audio clip in seconds.
    #[arg(long, default_value_t = Limits::default().max_audio_seconds)]
    pub max_audio_seconds: f64,
    /// Most pages per PDF document.
    #[arg(long, default_value_t = Limits::default().max_document_pages)]
    pub max_document_pages: usize,
    /// Most new tokens per request (also the default).
    #[arg(long, default_value_t = Limits::default().max_new_tokens)]
    pub max_new_tokens: usize,
    /// Per-request time limit in seconds, preparation included (items read and
    /// checked, prompt tokenised, items embedded: 408 when not done in time).
    #[arg(long, default_value_t = Limits::default().request_timeout.as_secs())]
    pub request_timeout: u64,
    /// Most bytes of message text per request, refused before tokenising
    /// [default: the model's context length x its longest vocabulary entry, at
    /// most 1 MiB or 8 bytes per context position, whichever is larger].
    #[arg(long, value_name = "BYTES")]
    pub max_prompt_bytes: Option<usize>,
    /// Let special tokens typed in messages (`<|im_end|>`, `</s>`) act as the
    /// tokens they spell by default (a request's `parse_special_tokens` still
    /// decides); without it message text is tokenised as plain text. Only for
    /// clients that are trusted to write raw prompts.
    #[arg(long)]
    pub parse_special_tokens: bool,
    /// Most stop strings per request.
    #[arg(long, default_value_t = Limits::default().max_stop_strings)]
    pub max_stop_strings: usize,
    /// Longest stop string in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = Limits::default().max_stop_bytes)]
    pub max_stop_bytes: usize,
    /// Most requests prepared at once, each on a blocking thread [default: the
    /// number of CPUs]; others wait their turn within --request-timeout.
    #[arg(long, value_name = "N")]
    pub max_preparing: Option<usize>,
    /// Most sequences decoded together.
    #[arg(long, default_value_t = ServeConfig::default().max_batch)]
    pub max_batch: usize,
    /// Most requests waiting for a slot (more get 429).
    #[arg(long, default_value_t = ServeConfig::default().max_queue)]
    pub max_queue: usize,
    /// Seconds a client has to send a request's headers; also how long a
    /// kept-alive connection may sit idle before it is closed.
    #[arg(long, value_name = "SECONDS", default_value_t = ConnectionLimits::default().header_read_timeout.as_secs())]
    pub header_read_timeout: u64,
    /// Seconds a client has to send a whole request body (408 after).
    #[arg(long, value_name = "SECONDS", default_value_t = ConnectionLimits::default().body_read_timeout.as_secs())]
    pub body_read_timeout: u64,
    /// Most connections open at once (lowered to fit the file-descriptor limit,
    /// whose soft value is raised to the hard one at start); more wait to be accepted.
    #[arg(long, default_value_t = ConnectionLimits::default().max_connections)]
    pub max_connections: usize,
}

impl ServeArgs {
    /// The server settings these flags describe.
    pub fn config(&self, model_name: String) -> Result<ServeConfig> {
        if let Some(dir) = &self.allow_files {
            if !dir.is_dir() {
                bail!("--allow-files {}: not a directory", dir.display());
            }
        }
        Ok(ServeConfig {
            model_name,
            allow_files: self.allow_files.clone(),
            allow_urls: self.allow_urls,
            limits: Limits {
                max_body_bytes: self.max_body_bytes,
                max_items: self.max_items,
                max_image_pixels: self.max_image_pixels,
                max_audio_seconds: self.max_audio_seconds,
                max_document_pages: self.max_document_pages,
                max_new_tokens: self.max_new_tokens,
                request_timeout: Duration::from_secs(self.request_timeout),
                max_prompt_bytes: self.max_prompt_bytes,
                max_stop_strings: self.max_stop_strings,
                max_stop_bytes: self.max_stop_bytes,
            },
            max_batch: self.max_batch,
            max_queue: self.max_queue,
            parse_special_tokens: self.parse_special_tokens,
            max_preparing: self.max_preparing.unwrap_or(ServeConfig::default().max_preparing).max(1),
            connections: ConnectionLimits {
                header_read_timeout: Duration::from_secs(self.header_read_timeout.max(1)),
                body_read_timeout: Duration::from_secs(self.body_read_timeout.max(1)),
                max_connections: self.max_connections.max(1),
            },
        })
    }

    /// The model path given, or the default one that exists.
    pub fn model_path(&self) -> Result<PathBuf> {
        if let Some(path) = &self.model {
            return Ok(path.clone());
        }
        let candidates = default_models();
        for path in &candidates {
            if path.exists() {
                return Ok(path.clone());
            }
        }
        let shown: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
        bail!(
            "no --model given and no default model is installed (looked for {})",
            shown.join(", ")
        )
    }
}

/// The demo model (`$MULTITOKEN_DEMO_MODEL`, else the workspace's
/// examples/demo-model), then SmolLM2 from `cargo xtask weights`.
pub fn default_models() -> Vec<PathBuf> {
    let mut list = Vec::new();
    if let Some(dir) = std::env::var_os("MULTITOKEN_DEMO_MODEL") {
        list.push(PathBuf::from(dir));
    }
    list.push(PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/demo-model"
    )));
    let weights = match std::env::var_os("MULTITOKEN_WEIGHTS") {
        Some(dir) => PathBuf::from(dir),
        None => std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_default()
            .join(".cache")
            .join("multitoken"),
    };
    list.push(weights.join("smollm2").join("SmolLM2-135M-Instruct.Q4_1.gguf"));
    list
}

/// Run `multitoken serve`.
pub fn run(args: ServeArgs) -> Result<()> {
    let path = args.model_path()?;
    let dtype = match args.dtype.as_str() {
        "f32" => DType::F32,
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        other => bail!("unknown --dtype {other:?}; expected f32, f16 or bf16"),
    };
    let quantize = args
        .quantize
        .as_deref()
        .map(|v| v.parse::<multitoken_lm::quantize::Quantization>().map_err(|e| anyhow::anyhow!("--quantize: {e}")))
        .transpose()?;
    if quantize.is_some() && args.dequantize {
        bail!("--quantize and --dequantize exclude each other");
    }
    multitoken_lm::set_int8_activations(args.int8_activations);
    let quantize_towers = args
        .quantize_towers
        .as_deref()
        .map(|v| multitoken_lm::loader::parse_tower_quantization(v).map_err(|e| anyhow::anyhow!("--quantize-towers: {e}")))
        .transpose()?;
    let options = LoadOptions {
        dtype,
        device: Device::Cpu,
        quantize,
        quantize_towers,
    };
    let is_gguf = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    let loaded = if is_gguf && args.dequantize {
        load_gguf_with(&path, &options, GgufWeights::Dequantized)
            .and_then(|lm| MultimodalModel::from_parts(lm, Vec::new(), None))
    } else {
        MultimodalModel::load(&path, &options)
    };
    let mut model = loaded.with_context(|| format!("loading model {}", path.display()))?;
    if let Some(spec) = &args.chat_template {
        let template = template_from_spec(spec, &model.lm).with_context(|| format!("--chat-template {spec}"))?;
        model.set_chat_template(template)?;
    }
    crate::log::init_stderr();
    let name = args.name.clone().unwrap_or_else(|| {
        let canonical = path.canonicalize().unwrap_or_else(|_| path.clone());
        canonical
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "multitoken".into())
    });
    let config = args.config(name)?;
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async move {
        let state = AppState::new(model, config)?;
        let address = format!("{}:{}", args.host, args.port);
        let listener = tokio::net::TcpListener::bind(&address)
            .await
            .with_context(|| format!("listening on {address}"))?;
        let local = listener.local_addr().context("reading the bound address")?;
        let modalities: Vec<&str> = state.model.modality_tokens();
        eprintln!(
            "serving {} ({}) on http://{local}/ (POST /generate, /v1/chat/completions; Ctrl-C stops)",
            state.config.model_name,
            if modalities.is_empty() {
                "text only".to_string()
            } else {
                modalities.join(" ")
            }
        );
        crate::serve(listener, state, shutdown_signal()).await?;
        eprintln!("stopped");
        Ok(())
    })
}

/// Ctrl-C, or SIGTERM on Unix.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
