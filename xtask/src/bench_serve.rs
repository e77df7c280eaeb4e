//! `cargo xtask bench serve`: total tokens/s of the HTTP server with N concurrent
//! clients against the same requests sent one at a time, with p50/p99 latency.
//!
//! The server runs in this process on a loopback port (the real axum stack and
//! the continuous-batching scheduler); clients are threads posting
//! `/v1/chat/completions` and counting `usage.completion_tokens`.
//!
//! `cargo xtask bench serve [--model PATH] [--clients 16] [--tokens 48] [--quantized] [--threads N]`
//! (default model: SmolLM2-135M-Instruct from `cargo xtask weights`, dequantized
//! to f32 so batched decode runs as matrix-matrix products).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use candle_core::Device;
use multitoken_lm::gguf::{load_gguf_with, GgufWeights};
use multitoken_lm::loader::LoadOptions;
use multitoken_lm::multimodal::MultimodalModel;
use multitoken_serve::{AppState, Limits, ServeConfig};

struct Options {
    model: Option<PathBuf>,
    clients: usize,
    tokens: usize,
    quantized: bool,
}

fn parse(args: &[String]) -> Result<Options> {
    let mut options = Options {
        model: None,
        clients: 16,
        tokens: 48,
        quantized: false,
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = || it.next().cloned().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--model" => options.model = Some(PathBuf::from(value()?)),
            "--clients" => options.clients = value()?.parse().context("--clients")?,
            "--tokens" => options.tokens = value()?.parse().context("--tokens")?,
            "--quantized" => options.quantized = true,
            "--threads" => std::env::set_var("RAYON_NUM_THREADS", value()?),
            other => bail!("unknown option {other}; usage: cargo xtask bench serve [--model PATH] [--clients N] [--tokens N] [--quantized] [--threads N]"),
        }
    }
    Ok(options)
}

fn default_model() -> PathBuf {
    let weights = std::env::var_os("MULTITOKEN_WEIGHTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_default()
                .join(".cache/multitoken")
        });
    weights.join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
}

fn load(options: &Options) -> Result<MultimodalModel> {
    let path = options.model.clone().unwrap_or_else(default_model);
    if !path.exists() {
        bail!(
            "{} is missing; run `cargo xtask weights` or pass --model",
            path.display()
        );
    }
    let opts = LoadOptions {
        device: Device::Cpu,
        ..Default::default()
    };
    let is_gguf = path.extension().is_some_and(|e| e == "gguf");
    Ok(if is_gguf && !options.quantized {
        MultimodalModel::from_parts(
            load_gguf_with(&path, &opts, GgufWeights::Dequantized)?,
            Vec::new(),
            None,
        )?
    } else {
        MultimodalModel::load(&path, &opts)?
    })
}

/// One request: (completion tokens, latency).
fn ask(url: &str, prompt: &str, tokens: usize) -> Result<(usize, Duration)> {
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let body = serde_json::json!({
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": tokens,
        "temperature": 0.7,
        "seed": 7,
    });
    let start = Instant::now();
    let mut response = agent.post(url).send(body.to_string())?;
    let status = response.status().as_u16();
    let text = response.body_mut().read_to_string()?;
    let latency = start.elapsed();
    if status != 200 {
        bail!("status {status}: {text}");
    }
    let json: serde_json::Value = serde_json::from_str(&text)?;
    let n = json["usage"]["completion_tokens"]
        .as_u64()
        .context("no usage in the answer")? as usize;
    Ok((n, latency))
}

struct Round {
    tokens: usize,
    wall: Duration,
    latencies: Vec<Duration>,
}

impl Round {
    fn tok_s(&self) -> f64 {
        self.tokens as f64 / self.wall.as_secs_f64()
    }

    fn percentile(&self, p: f64) -> f64 {
        let mut l: Vec<f64> = self.latencies.iter().map(Duration::as_secs_f64).collect();
        l.sort_by(f64::total_cmp);
        let i = ((l.len() as f64 - 1.0) * p).round() as usize;
        l.get(i).copied().unwrap_or(0.0)
    }
}

fn prompts(n: usize) -> Vec<String> {
    let topics = [
        "the sea",
        "a lighthouse",
        "mountains",
        "a robot",
        "bread",
        "winter",
        "a city at night",
        "cats",
    ];
    (0..n)
        .map(|i| format!("Write a long story about {} (story {i}).", topics[i % topics.len()]))
        .collect()
}

/// Run this benchmark.
pub fn run(args: &[String]) -> Result<()> {
    let options = parse(args)?;
    let model = load(&options)?;
    let name = model.lm.name.clone();
    let config = ServeConfig {
        model_name: "bench".into(),
        max_batch: options.clients,
        limits: Limits {
            max_new_tokens: options.tokens,
            ..Default::default()
        },
        ..Default::default()
    };
    let state = AppState::new(model, config)?;
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = std::thread::spawn(move || -> Result<()> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            addr_tx.send(listener.local_addr()?)?;
            multitoken_serve::serve(listener, state, async {
                let _ = stop_rx.await;
            })
            .await?;
            Ok(())
        })
    });
    let addr = addr_rx.recv().context("the server did not start")?;
    let url = format!("http://{addr}/v1/chat/completions");
    let prompts = prompts(options.clients);
    ask(&url, "warm up", 4)?;

    let start = Instant::now();
    let mut sequential = Round {
        tokens: 0,
        wall: Duration::ZERO,
        latencies: Vec::new(),
    };
    for prompt in &prompts {
        let (n, latency) = ask(&url, prompt, options.tokens)?;
        sequential.tokens += n;
        sequential.latencies.push(latency);
    }
    sequential.wall = start.elapsed();

    let start = Instant::now();
    let handles: Vec<_> = prompts
        .iter()
        .map(|p| {
            let (url, p, tokens) = (url.clone(), p.clone(), options.tokens);
            std::thread::spawn(move || ask(&url, &p, tokens))
        })
        .collect();
    let mut concurrent = Round {
        tokens: 0,
        wall: Duration::ZERO,
        latencies: Vec::new(),
    };
    for handle in handles {
        let (n, latency) = handle
            .join()
            .map_err(|_| anyhow::anyhow!("a client thread panicked"))??;
        concurrent.tokens += n;
        concurrent.latencies.push(latency);
    }
    concurrent.wall = start.elapsed();
    let _ = stop_tx.send(());
    server
        .join()
        .map_err(|_| anyhow::anyhow!("the server thread panicked"))??;

    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "all".into());
    println!(
        "serve bench: {name} ({}), {} requests x up to {} tokens, CPU threads: {threads}",
        if options.quantized { "quantized" } else { "f32" },
        options.clients,
        options.tokens
    );
    println!("| mode | tokens | wall s | tokens/s | p50 latency s | p99 latency s |");
    println!("|---|---|---|---|---|---|");
    for (label, round) in [
        ("one at a time", &sequential),
        (&*format!("{} concurrent", options.clients), &concurrent),
    ] {
        println!(
            "| {label} | {} | {:.2} | {:.1} | {:.2} | {:.2} |",
            round.tokens,
            round.wall.as_secs_f64(),
            round.tok_s(),
            round.percentile(0.5),
            round.percentile(0.99)
        );
    }
    println!(
        "speedup (tokens/s, concurrent / one at a time): {:.2}x",
        concurrent.tok_s() / sequential.tok_s()
    );
    Ok(())
}
