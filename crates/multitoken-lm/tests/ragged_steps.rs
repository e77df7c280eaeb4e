//! The ragged step ([`LanguageModel::forward_ragged`]): decoding sequences'
//! next tokens and chunks of prompts in one forward, as the server's
//! continuous batching with chunked prefill runs them. A sequence must get
//! the same bits whatever shares its steps and however its prompt is cut into
//! chunks; a decode row must equal the batched decode step's; and a prompt
//! must agree with the plain prefill (a GEMM and the causal kernel) to float
//! rounding, sliding windows included (mistral's fixture has a window of 8).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use candle_core::{DType, Device, Tensor};
use common::{argmax, fixture, prompt};
use multitoken_core::{KvCache, LanguageModel, LogitsSelection};
use multitoken_lm::loader::{load_model, LoadOptions};
use multitoken_lm::quantize::Quantization;

fn options(dtype: DType, quantize: Option<Quantization>) -> LoadOptions {
    LoadOptions { dtype, device: Device::Cpu, quantize, quantize_towers: None }
}

/// One sequence being run: its prompt, how far it got, its greedy tokens and
/// every logits row it was given.
struct Sequence {
    prompt: Vec<u32>,
    done: usize,
    tokens: usize,
    cache: KvCache,
    last: Option<u32>,
    logits: Vec<Vec<f32>>,
}

impl Sequence {
    fn new(model: &dyn LanguageModel, prompt: Vec<u32>, tokens: usize) -> Self {
        Self { prompt, done: 0, tokens, cache: KvCache::new(model.num_layers()), last: None, logits: Vec::new() }
    }

    fn finished(&self) -> bool {
        self.logits.len() >= self.tokens
    }
}

/// Runs `sequences` through ragged steps until each has its tokens. `chunk(step, i)`
/// is how many prompt positions sequence `i` may run at `step` (0: none
/// this step; sequences that are not finished still decode).
fn run(model: &dyn LanguageModel, sequences: &mut [Sequence], chunk: impl Fn(usize, usize) -> usize) {
    let mut step = 0;
    while sequences.iter().any(|s| !s.finished()) {
        let mut pieces = Vec::new();
        let mut counts = Vec::new();
        let mut wants = Vec::new();
        let mut members = Vec::new();
        for (i, s) in sequences.iter().enumerate() {
            if s.finished() {
                continue;
            }
            let ids: Vec<u32> = if s.done < s.prompt.len() {
                let c = chunk(step, i).min(s.prompt.len() - s.done);
                s.prompt[s.done..s.done + c].to_vec()
            } else {
                vec![s.last.unwrap()]
            };
            if ids.is_empty() {
                continue;
            }
            let n = ids.len();
            let embeds = model.embed_tokens(&Tensor::from_vec(ids, (n, 1), model.device()).unwrap()).unwrap();
            pieces.push(embeds);
            counts.push(n);
            wants.push(s.done + n >= s.prompt.len());
            members.push(i);
        }
        step += 1;
        if pieces.is_empty() {
            continue;
        }
        let embeds = Tensor::cat(&pieces, 0).unwrap();
        let logits = {
            let mut caches: Vec<&mut KvCache> = Vec::new();
            for (i, s) in sequences.iter_mut().enumerate() {
                if members.contains(&i) {
                    caches.push(&mut s.cache);
                }
            }
            model.forward_ragged(&embeds, &counts, &mut caches, &wants).unwrap()
        };
        let mut rows = logits.to_vec2::<f32>().unwrap().into_iter();
        for ((&i, &c), &want) in members.iter().zip(&counts).zip(&wants) {
            let s = &mut sequences[i];
            s.done = (s.done + c).min(s.prompt.len());
            if want {
                let row = rows.next().expect("a logits row per sequence that asked");
                s.last = Some(argmax(&row));
                s.logits.push(row);
            }
        }
        assert!(rows.next().is_none(), "more logits rows than asked for");
    }
}

fn same_bits(a: &[Vec<f32>], b: &[Vec<f32>]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.len() == y.len() && x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits()))
}

/// Prompts of 1 to ~40 positions (past mistral's window of 8), 2 to 6 tokens each.
fn workload(model: &dyn LanguageModel, n: usize) -> Vec<Sequence> {
    let vocab = model.vocab_size();
    (0..n).map(|i| Sequence::new(model, prompt(1 + (i * 13) % 41, 7 + i as u64, vocab), 2 + i % 5)).collect()
}

#[test]
fn a_sequence_gets_the_same_bits_alone_whole_or_chunked_among_others() {
    let formats: [(DType, Option<Quantization>, &str); 4] = [
        (DType::F32, None, "f32"),
        (DType::F32, Some(Quantization::Q4_1), "q4_1"),
        (DType::F32, Some(Quantization::Q8_0), "q8_0"),
        (DType::BF16, None, "bf16 linears"),
    ];
    for family in ["llama", "mistral", "phi2", "qwen2"] {
        for (dtype, quantize, name) in formats {
            let model = load_model(&fixture(family), &options(dtype, quantize)).unwrap();
            let lm = model.model.as_ref();
            // Servers take ragged steps for f32 and quantized weights, not
            // bf16 linears (see `CausalLm::runs_ragged`); the step itself is
            // exact for all.
            assert_eq!(lm.runs_ragged(), name != "bf16 linears", "{family} {name}: runs_ragged");
            let case = format!("{family} {name}");
            // Each alone, its prompt whole in one step.
            let mut alone: Vec<Sequence> = workload(lm, 9);
            for s in alone.iter_mut() {
                run(lm, std::slice::from_mut(s), |_, _| usize::MAX);
            }
            // All together, prompts in chunks of 1 to 7 that change from step
            // to step, some sequences held back for a few steps.
            let mut together = workload(lm, 9);
            run(lm, &mut together, |step, i| if i % 4 == 3 && step < 3 { 0 } else { 1 + (step * 3 + i * 5) % 7 });
            for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
                assert!(
                    same_bits(&a.logits, &t.logits),
                    "{case}: sequence {i} (prompt of {}) got other logits among others in chunks",
                    a.prompt.len()
                );
            }
        }
    }
}

#[test]
fn a_ragged_decode_row_is_the_batched_decode_step_and_a_prompt_is_the_prefill() {
    for family in ["llama", "mistral", "phi2", "qwen2"] {
        let model = load_model(&fixture(family), &options(DType::F32, None)).unwrap();
        let lm = model.model.as_ref();
        let vocab = lm.vocab_size();
        for (len, seed) in [(1usize, 1u64), (5, 2), (23, 3)] {
            let ids = prompt(len, seed, vocab);
            // The plain prefill and the ragged one agree to rounding.
            let mut plain = KvCache::new(lm.num_layers());
            let embeds = lm.embed_tokens(&Tensor::new(ids.as_slice(), lm.device()).unwrap().unsqueeze(0).unwrap()).unwrap();
            let want: Vec<f32> = lm.forward_embeds(&embeds, None, &mut plain, LogitsSelection::Last).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let mut ragged = KvCache::new(lm.num_layers());
            let rows = embeds.squeeze(0).unwrap().unsqueeze(1).unwrap();
            let got: Vec<f32> = lm.forward_ragged(&rows, &[len], &mut [&mut ragged], &[true]).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let worst = want.iter().zip(&got).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(worst < 1e-4, "{family}, prompt of {len}: ragged prefill logits differ by {worst}");
            assert_eq!(ragged.seen, len);
            // A decode row after it: the ragged step and decode_step give the
            // same bits; where mistral's window of 8 bites, decode_step runs
            // the masked general path, equal to rounding.
            let token = argmax(&got);
            let next = lm.embed_tokens(&Tensor::new(&[[token]], lm.device()).unwrap()).unwrap();
            let mut copy = ragged.clone();
            let a: Vec<f32> = lm.forward_ragged(&next, &[1], &mut [&mut ragged], &[true]).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let b: Vec<f32> = lm.decode_step(&next, &mut [&mut copy]).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            if family == "mistral" && len + 1 > 8 {
                let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
                assert!(worst < 1e-4, "{family}, prompt of {len}: decode rows differ by {worst}");
            } else {
                assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "{family}, prompt of {len}: decode rows differ");
            }
        }
    }
}

#[test]
fn a_ragged_step_refuses_what_it_cannot_run() {
    let model = load_model(&fixture("llama"), &options(DType::F32, None)).unwrap();
    let lm = model.model.as_ref();
    let three = lm.embed_tokens(&Tensor::new(&[[1u32], [2], [3]], lm.device()).unwrap()).unwrap();
    let mut a = KvCache::new(lm.num_layers());
    let mut b = KvCache::new(lm.num_layers());
    let cases: [(&[usize], &[bool], &str); 3] = [(&[2, 2], &[true, true], "3 rows"), (&[3, 0], &[true, true], "at least 1"), (&[3], &[true], "per cache")];
    for (counts, wants, needle) in cases {
        let err = lm.forward_ragged(&three, counts, &mut [&mut a, &mut b], wants).unwrap_err().to_string();
        assert!(err.contains(needle), "counts {counts:?}: {err}");
        assert_eq!((a.seen, b.seen), (0, 0), "a refused step changed a cache");
    }
    // A cache with a padding mask (a padded batch prefill) is not one it takes.
    let mut padded = KvCache::new(lm.num_layers());
    let ids = Tensor::new(&[[5u32, 6]], lm.device()).unwrap();
    let mask = Tensor::new(&[[0f32, 1.0]], lm.device()).unwrap();
    lm.forward_embeds(&lm.embed_tokens(&ids).unwrap(), Some(&mask), &mut padded, LogitsSelection::Last).unwrap();
    let one = three.narrow(0, 0, 1).unwrap();
    let err = lm.forward_ragged(&one, &[1], &mut [&mut padded], &[true]).unwrap_err().to_string();
    assert!(err.contains("padding"), "{err}");
    // Nothing wanted: no logits rows, the cache still extended.
    let mut fresh = KvCache::new(lm.num_layers());
    let none = lm.forward_ragged(&three, &[3], &mut [&mut fresh], &[false]).unwrap();
    assert_eq!(none.dims(), [0, lm.vocab_size()]);
    assert_eq!(fresh.seen, 3);
}
