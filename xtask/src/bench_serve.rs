//! `cargo xtask bench serve`: total tokens/s of the HTTP server for 1, 4, 16
//! and 64 concurrent clients, with p50/p99 time to first token and p50/p99
//! inter-token latency as a streaming client sees them.
//!
//! The server runs in this process on a loopback port (the real axum stack and
//! the continuous-batching scheduler); clients are threads posting streamed
//! `/v1/chat/completions`, timing each SSE piece of text and counting
//! `usage.completion_tokens`. The one-client round sends `--lone-requests`
//! requests one after another (the lone-request baseline); the others send
//! one request per client, all at once.
//!
//! `cargo xtask bench serve [--model PATH] [--clients 1,4,16,64] [--tokens 48] [--lone-requests 4] [--quantized] [--bf16] [--threads N]`
//! (`--bf16`: `--dtype bf16`, the linears' weights in bf16 with f32 activations)
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
    clients: Vec<usize>,
    tokens: usize,
    quantized: bool,
    bf16: bool,
    lone_requests: usize,
}

fn parse(args: &[String]) -> Result<Options> {
    let mut options = Options {
        model: None,
        clients: vec![1, 4, 16, 64],
        tokens: 48,
        quantized: false,
        bf16: false,
        lone_requests: 4,
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = || it.next().cloned().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--model" => options.model = Some(PathBuf::from(value()?)),
            "--clients" => {
                options.clients = value()?
                    .split(',')
                    .map(|c| c.trim().parse::<usize>().context("--clients takes counts like 1,4,16,64"))
                    .collect::<Result<_>>()?;
                if options.clients.contains(&0) {
                    bail!("--clients: a round needs at least one client");
                }
            }
            "--tokens" => options.tokens = value()?.parse().context("--tokens")?,
            "--lone-requests" => options.lone_requests = value()?.parse::<usize>().context("--lone-requests")?.max(1),
            "--quantized" => options.quantized = true,
            "--bf16" => options.bf16 = true,
            "--threads" => std::env::set_var("RAYON_NUM_THREADS", value()?),
            other => bail!("unknown option {other}; usage: cargo xtask bench serve [--model PATH] [--clients 1,4,16,64] [--tokens N] [--lone-requests N] [--quantized] [--bf16] [--threads N]"),
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
        dtype: if options.bf16 { candle_core::DType::BF16 } else { candle_core::DType::F32 },
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

/// What one streamed request saw.
struct Answer {
    /// Completion tokens (`usage`).
    tokens: usize,
    /// Prompt positions (the chat template's included).
    prompt_tokens: usize,
    /// Time from sending the request to the first piece of text.
    first: Duration,
    /// Gaps between successive pieces of text.
    gaps: Vec<Duration>,
}

/// One streamed chat completion, timing each piece of text as it arrives.
fn ask(url: &str, prompt: &str, tokens: usize) -> Result<Answer> {
    use std::io::BufRead;
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let body = serde_json::json!({
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": tokens,
        "temperature": 0.7,
        "seed": 7,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let start = Instant::now();
    let mut response = agent.post(url).send(body.to_string())?;
    let status = response.status().as_u16();
    if status != 200 {
        let text = response.body_mut().read_to_string()?;
        bail!("status {status}: {text}");
    }
    let reader = std::io::BufReader::new(response.body_mut().as_reader());
    let (mut first, mut last, mut gaps, mut count, mut prompt_tokens) = (None, None::<Instant>, Vec::new(), None, 0);
    for line in reader.lines() {
        let line = line?;
        let Some(data) = line.strip_prefix("data: ") else { continue };
        if data == "[DONE]" {
            break;
        }
        let json: serde_json::Value = serde_json::from_str(data)?;
        if let Some(n) = json["usage"]["completion_tokens"].as_u64() {
            count = Some(n as usize);
            prompt_tokens = json["usage"]["prompt_tokens"].as_u64().unwrap_or(0) as usize;
        }
        let text = json["choices"][0]["delta"]["content"].as_str().unwrap_or("");
        if !text.is_empty() {
            let now = Instant::now();
            match last {
                None => first = Some(now - start),
                Some(previous) => gaps.push(now - previous),
            }
            last = Some(now);
        }
    }
    Ok(Answer {
        tokens: count.context("no usage in the stream")?,
        prompt_tokens,
        first: first.context("no text in the stream")?,
        gaps,
    })
}

/// One round: `clients` clients, each sending its requests one after another.
struct Round {
    clients: usize,
    tokens: usize,
    prompt_tokens: usize,
    wall: Duration,
    firsts: Vec<Duration>,
    gaps: Vec<Duration>,
}

impl Round {
    fn tok_s(&self) -> f64 {
        self.tokens as f64 / self.wall.as_secs_f64()
    }
}

/// The `p` quantile (nearest rank) of `values` in milliseconds.
fn percentile_ms(values: &[Duration], p: f64) -> f64 {
    let mut l: Vec<f64> = values.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    l.sort_by(f64::total_cmp);
    let i = ((l.len() as f64 - 1.0) * p).round() as usize;
    l.get(i).copied().unwrap_or(0.0)
}

fn round(url: &str, prompts: &[String], clients: usize, per_client: usize, tokens: usize) -> Result<Round> {
    let start = Instant::now();
    let handles: Vec<_> = (0..clients)
        .map(|c| {
            let url = url.to_string();
            let mine: Vec<String> = (0..per_client).map(|r| prompts[(c * per_client + r) % prompts.len()].clone()).collect();
            std::thread::spawn(move || mine.iter().map(|p| ask(&url, p, tokens)).collect::<Result<Vec<_>>>())
        })
        .collect();
    let mut round = Round { clients, tokens: 0, prompt_tokens: 0, wall: Duration::ZERO, firsts: Vec::new(), gaps: Vec::new() };
    for handle in handles {
        for answer in handle.join().map_err(|_| anyhow::anyhow!("a client thread panicked"))?? {
            round.tokens += answer.tokens;
            round.prompt_tokens += answer.prompt_tokens;
            round.firsts.push(answer.first);
            round.gaps.extend(answer.gaps);
        }
    }
    round.wall = start.elapsed();
    Ok(round)
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
    let most = options.clients.iter().copied().max().unwrap_or(1);
    let config = ServeConfig {
        model_name: "bench".into(),
        max_batch: most,
        max_queue: ServeConfig::default().max_queue.max(most),
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
    let prompts = prompts(most.max(options.lone_requests));
    ask(&url, "warm up", 4)?;

    let mut rounds = Vec::new();
    for &clients in &options.clients {
        // A lone client sends several requests one after another (a steadier
        // baseline); otherwise each client sends one, all at once.
        let per_client = if clients == 1 { options.lone_requests } else { 1 };
        rounds.push(round(&url, &prompts, clients, per_client, options.tokens)?);
    }
    let _ = stop_tx.send(());
    server
        .join()
        .map_err(|_| anyhow::anyhow!("the server thread panicked"))??;

    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "all".into());
    println!(
        "serve bench: {name} ({}), streamed chat completions of up to {} tokens, CPU threads: {threads}",
        match (options.quantized, options.bf16) {
            (true, true) => "quantized, bf16 prefill",
            (true, false) => "quantized",
            (false, true) => "bf16 linears",
            (false, false) => "f32",
        },
        options.tokens
    );
    println!("| clients | requests | prompt tokens | tokens | wall s | tokens/s | x one client | TTFT p50 ms | TTFT p99 ms | inter-token p50 ms | inter-token p99 ms |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let lone = rounds.iter().find(|r| r.clients == 1).map(Round::tok_s);
    for r in &rounds {
        let ratio = lone.map_or_else(|| "-".to_string(), |l| format!("{:.2}", r.tok_s() / l));
        println!(
            "| {} | {} | {} | {} | {:.2} | {:.1} | {ratio} | {:.0} | {:.0} | {:.1} | {:.1} |",
            r.clients,
            r.firsts.len(),
            r.prompt_tokens,
            r.tokens,
            r.wall.as_secs_f64(),
            r.tok_s(),
            percentile_ms(&r.firsts, 0.5),
            percentile_ms(&r.firsts, 0.99),
            percentile_ms(&r.gaps, 0.5),
            percentile_ms(&r.gaps, 0.99),
        );
    }
    Ok(())
}
