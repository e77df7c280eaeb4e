//! `cargo xtask bench document`: sentence embeddings with all-MiniLM-L6-v2 on CPU,
//! ours against sentence-transformers in one run, and PDF text extraction.
//!
//! ```text
//! cargo xtask bench document [--threads N] [--sentences 1000] [--repeat 3] [--batch 32] [--no-python]
//! ```
//!
//! Both sides get the same 1,000 deterministic sentences and the same thread count
//! (`RAYON_NUM_THREADS` for candle, `torch.set_num_threads` for torch); each reports
//! the best of `--repeat` timed passes after a warm-up. Ours runs in this process
//! (`cargo run --release -p xtask -- bench document` for a release build; candle
//! itself is optimised in every profile). The PDF part writes a 50-page text PDF
//! with a tiny writer of its own and times `multitoken_document::extract_item`.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use multitoken_document::{default_minilm_dir, extract_item, ChunkConfig, ExtractConfig, SentenceEncoder};
use serde_json::{json, Value};

use crate::bench::last_json_line;
use crate::weights::{python, workspace_root};

/// Run `bench document`.
pub fn run(args: &[String]) -> Result<()> {
    let mut threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let mut count = 1000usize;
    let mut repeat = 3usize;
    let mut with_python = true;
    let mut batch = 32usize;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut number = |name: &str| -> Result<usize> {
            let v = it.next().with_context(|| format!("{name} needs a number"))?;
            v.parse().with_context(|| format!("{name} {v}: not a number"))
        };
        match arg.as_str() {
            "--threads" => threads = number("--threads")?.max(1),
            "--sentences" => count = number("--sentences")?.max(1),
            "--repeat" => repeat = number("--repeat")?.max(1),
            "--batch" => batch = number("--batch")?.max(1),
            "--no-python" => with_python = false,
            other => bail!("unknown argument `{other}`"),
        }
    }
    // Before candle's thread pool exists.
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    let model = default_minilm_dir();
    if !model.join("model.safetensors").is_file() {
        bail!("{} not found: run `cargo xtask weights` first", model.display());
    }
    let target = workspace_root().join("target").join("bench");
    std::fs::create_dir_all(&target)?;
    let sentences = sentences(count);
    let sentences_file = target.join("document_sentences.json");
    std::fs::write(&sentences_file, serde_json::to_string(&sentences)?)?;

    eprintln!("ours, {threads} threads ...");
    let ours = ours(&model, &sentences, repeat, batch)?;
    let reference = if with_python {
        eprintln!("sentence-transformers, {threads} threads ...");
        let mut cmd = Command::new(python());
        cmd.arg(workspace_root().join("xtask").join("bench").join("document.py"))
            .arg("--model")
            .arg(&model)
            .arg("--sentences")
            .arg(&sentences_file)
            .args(["--threads", &threads.to_string(), "--repeat", &repeat.to_string()])
            .env("OMP_NUM_THREADS", threads.to_string())
            .env("MKL_NUM_THREADS", threads.to_string());
        Some(last_json_line(&mut cmd)?)
    } else {
        None
    };
    let pdf = pdf_bench(&target, repeat)?;

    println!();
    println!("all-MiniLM-L6-v2, CPU, {threads} threads, {count} sentences (best of {repeat})");
    let f = |v: &Value, k: &str| v.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN);
    println!("ours                  {:>9.1} sentences/s  (load {:.2} s)", f(&ours, "sentences_per_s"), f(&ours, "load_s"));
    if let Some(r) = &reference {
        println!("sentence-transformers {:>9.1} sentences/s  (load {:.2} s)", f(r, "sentences_per_s"), f(r, "load_s"));
        println!("ours / sentence-transformers: {:.2}x (goal >= 1.5)", f(&ours, "sentences_per_s") / f(r, "sentences_per_s"));
    }
    println!(
        "pdf text extraction: {} pages, {} bytes -> {} characters in {:.1} ms ({:.1} pages/s)",
        f(&pdf, "pages"), f(&pdf, "bytes"), f(&pdf, "characters"), f(&pdf, "seconds") * 1e3, f(&pdf, "pages") / f(&pdf, "seconds")
    );
    println!();
    println!("{}", json!({"threads": threads, "ours": ours, "sentence_transformers": reference, "pdf": pdf, "profile": if cfg!(debug_assertions) { "dev" } else { "release" }}));
    Ok(())
}

fn ours(model: &Path, sentences: &[String], repeat: usize, batch: usize) -> Result<Value> {
    let start = Instant::now();
    let mut encoder = SentenceEncoder::load(model, &Device::Cpu, DType::F32)?;
    encoder.set_batch_size(batch);
    let load_s = start.elapsed().as_secs_f64();
    let refs: Vec<&str> = sentences.iter().map(String::as_str).collect();
    let config = ChunkConfig::default();
    encoder.embed_texts(&refs[..refs.len().min(64)], &config)?;
    let mut best = f64::INFINITY;
    for _ in 0..repeat {
        let start = Instant::now();
        let rows = encoder.embed_texts(&refs, &config)?;
        best = best.min(start.elapsed().as_secs_f64());
        std::hint::black_box(rows);
    }
    Ok(json!({
        "impl": "ours",
        "batch": batch,
        "threads": candle_core::utils::get_num_threads(),
        "sentences": sentences.len(),
        "seconds": best,
        "sentences_per_s": sentences.len() as f64 / best,
        "load_s": load_s,
    }))
}

/// Deterministic English-like sentences of 6 to 29 words.
fn sentences(n: usize) -> Vec<String> {
    const WORDS: &[&str] = &[
        "the", "model", "reads", "a", "document", "about", "cats", "and", "their", "owners", "while", "images",
        "show", "quiet", "rivers", "under", "bright", "winter", "skies", "researchers", "measure", "how", "fast",
        "language", "models", "answer", "questions", "from", "long", "reports", "with", "tables", "numbers", "like",
        "forty", "two", "percent", "of", "revenue", "grew", "in", "spring", "because", "customers", "bought", "more",
    ];
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (state >> 33) as usize
    };
    (0..n)
        .map(|_| {
            let len = 6 + next() % 24;
            let mut words: Vec<&str> = (0..len).map(|_| WORDS[next() % WORDS.len()]).collect();
            let first = words[0].to_string();
            words[0] = "";
            let mut sentence = first[..1].to_uppercase() + &first[1..];
            for word in words.iter().skip(1) {
                sentence.push(' ');
                sentence.push_str(word);
            }
            sentence.push('.');
            sentence
        })
        .collect()
}

fn pdf_bench(target: &Path, repeat: usize) -> Result<Value> {
    let pages = 50;
    let lines: Vec<String> = sentences(pages * 45);
    let page_lines: Vec<Vec<String>> = lines.chunks(45).map(<[String]>::to_vec).collect();
    let bytes = write_pdf(&page_lines);
    let path = target.join("document_50_pages.pdf");
    std::fs::write(&path, &bytes)?;
    let item = multitoken_core::Item::Path(path);
    let config = ExtractConfig::default();
    let mut best = f64::INFINITY;
    let mut characters = 0;
    for _ in 0..repeat {
        let start = Instant::now();
        let text = extract_item(&item, &config)?;
        best = best.min(start.elapsed().as_secs_f64());
        characters = text.chars().count();
    }
    Ok(json!({"pages": pages, "bytes": bytes.len(), "characters": characters, "seconds": best}))
}

/// A PDF with one Helvetica page per entry of `pages`, one text line per string.
fn write_pdf(pages: &[Vec<String>]) -> Vec<u8> {
    let mut objects: Vec<Vec<u8>> = Vec::new();
    let kids: Vec<String> = (0..pages.len()).map(|i| format!("{} 0 R", 4 + 2 * i)).collect();
    objects.push(b"<< /Type /Catalog /Pages 2 0 R >>".to_vec());
    objects.push(format!("<< /Type /Pages /Kids [{}] /Count {} >>", kids.join(" "), pages.len()).into_bytes());
    objects.push(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>".to_vec());
    for (i, lines) in pages.iter().enumerate() {
        objects.push(
            format!(
                "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> >> /Contents {} 0 R >>",
                5 + 2 * i
            )
            .into_bytes(),
        );
        let mut ops = String::from("BT\n/F1 10 Tf\n14 TL\n50 750 Td\n");
        for line in lines {
            let escaped = line.replace('\\', "\\\\").replace('(', "\\(").replace(')', "\\)");
            ops.push_str(&format!("({escaped}) Tj T*\n"));
        }
        ops.push_str("ET");
        let mut stream = format!("<< /Length {} >>\nstream\n", ops.len()).into_bytes();
        stream.extend_from_slice(ops.as_bytes());
        stream.extend_from_slice(b"\nendstream");
        objects.push(stream);
    }
    let mut out = b"%PDF-1.4\n".to_vec();
    let mut offsets = Vec::with_capacity(objects.len());
    for (number, body) in objects.iter().enumerate() {
        offsets.push(out.len());
        out.extend_from_slice(format!("{} 0 obj\n", number + 1).as_bytes());
        out.extend_from_slice(body);
        out.extend_from_slice(b"\nendobj\n");
    }
    let xref = out.len();
    out.extend_from_slice(format!("xref\n0 {}\n0000000000 65535 f \n", objects.len() + 1).as_bytes());
    for offset in offsets {
        out.extend_from_slice(format!("{offset:010} 00000 n \n").as_bytes());
    }
    out.extend_from_slice(
        format!("trailer\n<< /Size {} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n", objects.len() + 1).as_bytes(),
    );
    out
}
