//! `cargo xtask bench decode-rows [--rows 1,4,16,64] [--prompt 64] [--steps 32]
//! [--mode f32|q4_1] [--threads N]`: where a batched decode step goes
//! (issue 27's breakdown), without the server around it.
//!
//! SmolLM2-135M (the GGUF of `cargo xtask weights`; `f32` dequantizes it) decodes
//! `R` sequences at once through `LanguageModel::decode_step`, exactly as
//! `serve`'s scheduler does: each sequence is prefilled alone with its own
//! `prompt`-token prompt and `KvCache`, then `steps` decode steps run over all
//! of them, each followed by a greedy pick per row (the logits copied out and
//! argmaxed, as the scheduler's sampling does). With the profiler on
//! (`multitoken_lm::profile`) each step is split into the linears, attention,
//! norms, rotary embeddings, the MLP's activation, the embedding lookup and the
//! rest ("overhead": the KV cache appends, tensor bookkeeping), plus the pick.
//! Prints per row count: ms per step, tokens/s, the speedup over one row,
//! each part's ms per step, and the first step after the prefills ("join
//! step", timed apart: it moves every sequence's prompt keys and values into a
//! growable buffer, the cost of sequences joining a running batch).
//!
//! A second table prices a prompt position both ways the server can run it:
//! the `R` prompts prefilled alone (`forward_embeds`: a GEMM from 16 rows, the
//! causal kernel) and the same prompts through `LanguageModel::forward_ragged`
//! in steps of at most 64 positions (the scheduler's chunked prefill, whose
//! rows run the one-row kernels).

use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use multitoken_core::{KvCache, LanguageModel, LogitsSelection};
use multitoken_lm::gguf::{load_gguf_with, GgufWeights};
use multitoken_lm::loader::LoadOptions;
use multitoken_lm::profile::{self, Part};

/// Runs the breakdown (see the module docs).
pub fn run(args: &[String]) -> Result<()> {
    let mut rows_list = vec![1usize, 4, 16, 64];
    let mut prompt = 64usize;
    let mut steps = 32usize;
    let mut mode = String::from("f32");
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = || it.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--rows" => rows_list = value()?.split(',').map(|r| r.trim().parse()).collect::<Result<_, _>>()?,
            "--prompt" => prompt = value()?.parse()?,
            "--steps" => steps = value()?.parse()?,
            "--mode" => mode = value()?.clone(),
            "--threads" => std::env::set_var("RAYON_NUM_THREADS", value()?),
            other => bail!("unknown argument `{other}` (--rows, --prompt, --steps, --mode, --threads)"),
        }
    }
    let weights = match mode.as_str() {
        "f32" => GgufWeights::Dequantized,
        "q4_1" => GgufWeights::Quantized,
        other => bail!("unknown mode `{other}` (f32 or q4_1)"),
    };
    let gguf = crate::weights::cache_dir()?.join("smollm2").join(crate::bench::GGUF);
    if !gguf.is_file() {
        bail!("{} not found: run `cargo xtask weights --only smollm2` first", gguf.display());
    }
    let options = LoadOptions { dtype: DType::F32, device: Device::Cpu, quantize: None, quantize_towers: None };
    let loaded = load_gguf_with(&gguf, &options, weights)?;
    let lm = loaded.model.as_ref();
    let device = lm.device().clone();
    profile::enable();
    println!(
        "SmolLM2-135M {mode}, {} threads, {prompt}-token prompts, {steps} decode steps; ms per step",
        candle_core::utils::get_num_threads()
    );
    println!(
        "{:>5} {:>9} {:>9} {:>8} {:>8} {:>7} {:>9} {:>7} {:>7} {:>7} {:>7} {:>9} {:>9} {:>10}",
        "rows", "ms/step", "tok/s", "vs 1", "matmul", "head", "attention", "norms", "rope", "act", "embed", "pick", "overhead", "join step"
    );
    let mut single = None;
    let mut prompt_costs = Vec::new();
    for &rows in &rows_list {
        // Each sequence its own prompt (shifted ids) and cache, prefilled alone.
        let mut caches: Vec<KvCache> = Vec::with_capacity(rows);
        let mut last: Vec<u32> = Vec::with_capacity(rows);
        let prompts: Vec<Vec<u32>> = (0..rows).map(|r| crate::bench::prompt_ids(prompt + r).split_off(r)).collect();
        let alone = Instant::now();
        for ids in &prompts {
            let input = Tensor::new(ids.as_slice(), &device)?.unsqueeze(0)?;
            let embeds = lm.embed_tokens(&input)?;
            let mut cache = KvCache::new(lm.num_layers());
            let logits = lm.forward_embeds_at(&embeds, None, &mut cache, LogitsSelection::Last, None)?;
            last.push(argmax(&logits.flatten_all()?.to_vec1::<f32>()?));
            caches.push(cache);
        }
        let alone_s = alone.elapsed().as_secs_f64();
        let ragged_s = ragged_prefill(lm, &prompts, 64, &device)?;
        prompt_costs.push((rows, alone_s, ragged_s));
        // The first step after the prefills moves each sequence's prompt keys and
        // values into a growable buffer (once per sequence): timed apart, as
        // the cost of a sequence joining the batch.
        let joining = Instant::now();
        last = step(lm, &mut caches, &last, &device)?;
        let join_ms = joining.elapsed().as_secs_f64() * 1e3;
        profile::reset();
        let before = profile::snapshot();
        let mut pick_s = 0.0;
        let start = Instant::now();
        for _ in 0..steps {
            let logits = forward(lm, &mut caches, &last, &device)?;
            let picking = Instant::now();
            last = pick(&logits)?;
            pick_s += picking.elapsed().as_secs_f64();
        }
        let wall = start.elapsed().as_secs_f64();
        let parts = profile::snapshot().since(&before);
        let per_step = |s: f64| s * 1e3 / steps as f64;
        let step_ms = per_step(wall);
        let tok_s = (rows * steps) as f64 / wall;
        let base = *single.get_or_insert(tok_s);
        let covered: f64 = Part::ALL.iter().map(|&p| parts.seconds(p)).sum::<f64>() + pick_s;
        println!(
            "{rows:>5} {step_ms:>9.2} {tok_s:>9.1} {:>7.2}x {:>8.2} {:>7.2} {:>9.2} {:>7.2} {:>7.2} {:>7.2} {:>7.2} {:>9.2} {:>9.2} {join_ms:>10.1}",
            tok_s / base,
            per_step(parts.seconds(Part::Matmul)),
            per_step(parts.seconds(Part::Head)),
            per_step(parts.seconds(Part::Attention)),
            per_step(parts.seconds(Part::Norm)),
            per_step(parts.seconds(Part::Rope)),
            per_step(parts.seconds(Part::Activation)),
            per_step(parts.seconds(Part::Embedding)),
            per_step(pick_s),
            per_step((wall - covered).max(0.0)),
        );
    }
    println!("\nprompt positions: ms per position, {prompt}-token prompts");
    println!("{:>5} {:>14} {:>18} {:>8}", "rows", "alone (GEMM)", "ragged (64/step)", "ratio");
    for (rows, alone_s, ragged_s) in prompt_costs {
        let per = |s: f64| s * 1e3 / (rows * prompt) as f64;
        println!("{rows:>5} {:>14.3} {:>18.3} {:>7.2}x", per(alone_s), per(ragged_s), ragged_s / alone_s);
    }
    Ok(())
}

/// Seconds to run `prompts` through ragged steps of at most `budget` prompt
/// positions (each on a fresh cache, in order, the last chunk asking for logits).
fn ragged_prefill(lm: &dyn LanguageModel, prompts: &[Vec<u32>], budget: usize, device: &Device) -> Result<f64> {
    let mut caches: Vec<KvCache> = prompts.iter().map(|_| KvCache::new(lm.num_layers())).collect();
    let mut done = vec![0usize; prompts.len()];
    let start = Instant::now();
    while done.iter().zip(prompts).any(|(d, p)| *d < p.len()) {
        let mut left = budget;
        let (mut ids, mut counts, mut wants, mut members) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (i, p) in prompts.iter().enumerate() {
            let c = (p.len() - done[i]).min(left);
            if c == 0 {
                continue;
            }
            ids.extend_from_slice(&p[done[i]..done[i] + c]);
            counts.push(c);
            wants.push(done[i] + c == p.len());
            members.push(i);
            done[i] += c;
            left -= c;
        }
        let n = ids.len();
        let embeds = lm.embed_tokens(&Tensor::from_vec(ids, (n, 1), device)?)?;
        let mut refs: Vec<&mut KvCache> =
            caches.iter_mut().enumerate().filter(|(i, _)| members.contains(i)).map(|(_, c)| c).collect();
        lm.forward_ragged(&embeds, &counts, &mut refs, &wants)?;
    }
    Ok(start.elapsed().as_secs_f64())
}

/// One decode step's logits `[rows, vocab]` for the tokens `last`.
fn forward(lm: &dyn LanguageModel, caches: &mut [KvCache], last: &[u32], device: &Device) -> Result<Tensor> {
    let ids = Tensor::from_vec(last.to_vec(), (last.len(), 1), device)?;
    let embeds = lm.embed_tokens(&ids)?;
    let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
    Ok(lm.decode_step(&embeds, &mut refs)?)
}

/// The greedy token of each row.
fn pick(logits: &Tensor) -> Result<Vec<u32>> {
    Ok(logits.to_dtype(DType::F32)?.to_vec2::<f32>()?.iter().map(|row| argmax(row)).collect())
}

/// A whole step: forward and pick.
fn step(lm: &dyn LanguageModel, caches: &mut [KvCache], last: &[u32], device: &Device) -> Result<Vec<u32>> {
    pick(&forward(lm, caches, last, device)?)
}

fn argmax(values: &[f32]) -> u32 {
    values.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i as u32)
}
