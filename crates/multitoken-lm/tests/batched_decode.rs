//! The batched decode step ([`LanguageModel::decode_step`]): several sequences
//! of different lengths, each with its own KV cache, decoded in one forward,
//! give bit for bit the logits (and so the greedy ids) each gives decoded alone
//! (`forward_embeds` on a batch of one), for every fixture family (mistral's
//! sliding window included), dense f32 and quantized at load (Q4_1, Q8_0),
//! with sequences joining and leaving the batch between steps and batches on
//! both sides of the row counts where the dense product changes kernel
//! (16 rows) and the residual add spreads over threads (32 rows). On real
//! weights (SmolLM2-135M, f32 and its Q4_1 GGUF) where `cargo xtask weights`
//! has run.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use common::{argmax, fixture, prompt};
use multitoken_core::{KvCache, LanguageModel, LogitsSelection};
use multitoken_lm::gguf::{load_gguf_with, GgufWeights};
use multitoken_lm::loader::{load_model, LoadOptions};
use multitoken_lm::quantize::Quantization;

fn options(quantize: Option<Quantization>) -> LoadOptions {
    LoadOptions { dtype: DType::F32, device: Device::Cpu, quantize, quantize_towers: None }
}

/// A sequence: its prompt, when it joins (step index) and how many tokens it makes.
struct Plan {
    prompt: Vec<u32>,
    joins_at: usize,
    tokens: usize,
}

/// Prefill `ids` alone; the last position's logits.
fn prefill(model: &dyn LanguageModel, ids: &[u32], cache: &mut KvCache) -> Vec<f32> {
    let ids = Tensor::new(ids, model.device()).unwrap().unsqueeze(0).unwrap();
    let embeds = model.embed_tokens(&ids).unwrap();
    let logits = model.forward_embeds(&embeds, None, cache, LogitsSelection::Last).unwrap();
    logits.flatten_all().unwrap().to_vec1().unwrap()
}

/// Each sequence alone: prefill, then greedy decode steps of one row. Returns
/// every logits row after the prefill's, in order.
fn alone(model: &dyn LanguageModel, plan: &Plan) -> Vec<Vec<f32>> {
    let mut cache = KvCache::new(model.num_layers());
    let mut token = argmax(&prefill(model, &plan.prompt, &mut cache));
    let mut out = Vec::new();
    for _ in 1..plan.tokens {
        let ids = Tensor::new(&[[token]], model.device()).unwrap();
        let embeds = model.embed_tokens(&ids).unwrap();
        let logits = model.forward_embeds(&embeds, None, &mut cache, LogitsSelection::Last).unwrap();
        let row: Vec<f32> = logits.flatten_all().unwrap().to_vec1().unwrap();
        token = argmax(&row);
        out.push(row);
    }
    out
}

/// All sequences through `decode_step`, joining at their step and leaving when
/// done, as the server's scheduler runs them.
fn batched(model: &dyn LanguageModel, plans: &[Plan]) -> Vec<Vec<Vec<f32>>> {
    struct Running {
        index: usize,
        cache: KvCache,
        token: u32,
        left: usize,
    }
    let mut out: Vec<Vec<Vec<f32>>> = plans.iter().map(|_| Vec::new()).collect();
    let mut running: Vec<Running> = Vec::new();
    let mut step = 0;
    while step == 0 || !running.is_empty() || plans.iter().any(|p| p.joins_at >= step) {
        for (index, plan) in plans.iter().enumerate().filter(|(_, p)| p.joins_at == step) {
            let mut cache = KvCache::new(model.num_layers());
            let token = argmax(&prefill(model, &plan.prompt, &mut cache));
            running.push(Running { index, cache, token, left: plan.tokens - 1 });
        }
        running.retain(|r| r.left > 0);
        step += 1;
        if running.is_empty() {
            continue;
        }
        let ids: Vec<u32> = running.iter().map(|r| r.token).collect();
        let ids = Tensor::from_vec(ids, (running.len(), 1), model.device()).unwrap();
        let embeds = model.embed_tokens(&ids).unwrap();
        let logits = {
            let mut caches: Vec<&mut KvCache> = running.iter_mut().map(|r| &mut r.cache).collect();
            model.decode_step(&embeds, &mut caches).unwrap()
        };
        let rows: Vec<Vec<f32>> = logits.to_vec2().unwrap();
        assert_eq!(rows.len(), running.len());
        for (r, row) in running.iter_mut().zip(rows) {
            r.token = argmax(&row);
            r.left -= 1;
            out[r.index].push(row);
        }
    }
    out
}

/// Checks `batched` against `alone` bit for bit for every sequence of `plans`.
fn check(model: &dyn LanguageModel, plans: &[Plan], case: &str) {
    let got = batched(model, plans);
    for (i, plan) in plans.iter().enumerate() {
        let want = alone(model, plan);
        assert_eq!(got[i].len(), want.len(), "{case}: sequence {i} made another number of steps");
        for (step, (g, w)) in got[i].iter().zip(&want).enumerate() {
            let same = g.len() == w.len() && g.iter().zip(w).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{case}: sequence {i} (prompt of {}) differs at decode step {step}", plan.prompt.len());
        }
    }
}

/// Sequences of different lengths joining at different steps and leaving at
/// different steps; `n` of them, prompts 1 to ~40 positions.
fn plans(n: usize, vocab: usize) -> Vec<Plan> {
    (0..n)
        .map(|i| Plan {
            prompt: prompt(1 + (i * 7) % 41, i as u64, vocab),
            joins_at: if i % 5 == 4 { 2 } else { 0 },
            tokens: 3 + (i * 5) % 9,
        })
        .collect()
}

#[test]
fn batched_steps_equal_lone_steps_for_every_family_and_weight_format() {
    for family in ["llama", "mistral", "phi2", "qwen2"] {
        for quantize in [None, Some(Quantization::Q4_1), Some(Quantization::Q8_0)] {
            let model = load_model(&fixture(family), &options(quantize)).unwrap();
            let lm = model.model.as_ref();
            let vocab = lm.vocab_size();
            // 5 rows (the lone step's kernels), 20 (past the GEMM switch) and
            // 40 (past the threaded residual add).
            for n in [5, 20, 40] {
                check(lm, &plans(n, vocab), &format!("{family} {quantize:?} {n} sequences"));
            }
        }
        // `--dtype bf16` on the CPU: bf16 linears (AMX from 16 rows where the CPU has it).
        let bf16 = LoadOptions { dtype: DType::BF16, ..options(None) };
        let model = load_model(&fixture(family), &bf16).unwrap();
        let lm = model.model.as_ref();
        for n in [5, 20] {
            check(lm, &plans(n, lm.vocab_size()), &format!("{family} bf16 linears {n} sequences"));
        }
    }
}

#[test]
fn a_decode_step_rejects_mismatched_rows_and_caches() {
    let model = load_model(&fixture("llama"), &options(None)).unwrap();
    let lm = model.model.as_ref();
    let mut cache = KvCache::new(lm.num_layers());
    prefill(lm, &[1, 2, 3], &mut cache);
    let embeds = lm.embed_tokens(&Tensor::new(&[[4u32], [5]], lm.device()).unwrap()).unwrap();
    let err = lm.decode_step(&embeds, &mut [&mut cache]).unwrap_err().to_string();
    assert!(err.contains("2") && err.contains("1"), "{err}");
    // An empty cache is no reason to fail: that row runs alone.
    let mut fresh = KvCache::new(lm.num_layers());
    let one = lm.embed_tokens(&Tensor::new(&[[4u32]], lm.device()).unwrap()).unwrap();
    let logits = lm.decode_step(&one, &mut [&mut fresh]).unwrap();
    assert_eq!(logits.dims(), [1, lm.vocab_size()]);
}

fn smollm2() -> Option<PathBuf> {
    let cache = match std::env::var_os("MULTITOKEN_WEIGHTS").filter(|d| !d.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME")?).join(".cache").join("multitoken"),
    };
    let path = cache.join("smollm2").join("SmolLM2-135M-Instruct.Q4_1.gguf");
    if path.is_file() {
        Some(path)
    } else {
        println!("skipped: {} not found; run `cargo xtask weights --only smollm2`", path.display());
        None
    }
}

#[test]
fn batched_steps_equal_lone_steps_on_smollm2_f32_and_q4_1() {
    let Some(path) = smollm2() else { return };
    for weights in [GgufWeights::Dequantized, GgufWeights::Quantized] {
        let model = load_gguf_with(&path, &options(None), weights).unwrap();
        let lm = model.model.as_ref();
        let vocab = lm.vocab_size();
        // 17 sequences: past the dense product's 16-row switch.
        let plans: Vec<Plan> = (0..17)
            .map(|i| Plan { prompt: prompt(2 + (i * 11) % 37, 50 + i as u64, vocab), joins_at: usize::from(i % 6 == 5), tokens: 2 + i % 3 })
            .collect();
        check(lm, &plans, &format!("SmolLM2 {weights:?}"));
    }
}
