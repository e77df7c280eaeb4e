//! The generation loop against a scripted model: the token at each position is fixed in
//! advance, so EOS, length, context, stop strings and streaming can be checked exactly.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{DType, Device, Tensor};
use multitoken_core::{KvCache, LanguageModel, LogitsSelection};
use multitoken_lm::generate::{generate, generate_from_ids, FinishReason, GenerationParams};
use multitoken_lm::sampling::SamplingParams;

/// Vocabulary = bytes; the prediction after position `p` is `script[p + 1]`.
struct Scripted {
    script: Vec<u32>,
    max_context: usize,
    forwards: AtomicUsize,
    device: Device,
}

impl Scripted {
    fn new(text: &str, max_context: usize) -> Self {
        Self { script: text.bytes().map(u32::from).collect(), max_context, forwards: AtomicUsize::new(0), device: Device::Cpu }
    }
}

impl LanguageModel for Scripted {
    fn hidden_size(&self) -> usize {
        4
    }
    fn vocab_size(&self) -> usize {
        256
    }
    fn num_layers(&self) -> usize {
        1
    }
    fn max_context(&self) -> usize {
        self.max_context
    }
    fn device(&self) -> &Device {
        &self.device
    }
    fn dtype(&self) -> DType {
        DType::F32
    }
    fn embed_tokens(&self, ids: &Tensor) -> multitoken_core::Result<Tensor> {
        let (b, t) = ids.dims2()?;
        Ok(Tensor::zeros((b, t, 4), DType::F32, &self.device)?)
    }
    fn forward_embeds(
        &self,
        embeds: &Tensor,
        _mask: Option<&Tensor>,
        cache: &mut KvCache,
        logits: LogitsSelection,
    ) -> multitoken_core::Result<Tensor> {
        assert_eq!(logits, LogitsSelection::Last);
        self.forwards.fetch_add(1, Ordering::SeqCst);
        let (_, t, _) = embeds.dims3()?;
        cache.seen += t;
        let next = self.script.get(cache.seen).copied().unwrap_or(b'.' as u32);
        let mut row = vec![0f32; 256];
        row[next as usize] = 10.0;
        // A runner-up that a repetition penalty can promote.
        row[b'#' as usize] = 9.0;
        Ok(Tensor::from_vec(row, (1, 256), &self.device)?.to_dtype(DType::BF16)?)
    }
}

fn byte_tokenizer() -> tokenizers::Tokenizer {
    let table = multitoken_lm::gguf::bytes_to_unicode();
    let vocab: serde_json::Map<String, serde_json::Value> =
        (0..256usize).map(|b| (table[b].to_string(), serde_json::json!(b))).collect();
    let json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "vocab": vocab, "merges": []}
    });
    json.to_string().parse().unwrap()
}

struct Case {
    /// Prompt + continuation the model will produce.
    script: &'static str,
    prompt_len: usize,
    max_context: usize,
    params: GenerationParams,
    /// Expected: text, number of new ids, finish reason.
    text: &'static str,
    new_ids: usize,
    finish: FinishReason,
}

fn params(max_new_tokens: usize, stops: &[&str], eos: &[u8], ignore_eos: bool) -> GenerationParams {
    GenerationParams {
        sampling: SamplingParams::greedy(),
        max_new_tokens,
        stop_strings: stops.iter().map(|s| s.to_string()).collect(),
        eos_token_ids: eos.iter().map(|&b| b as u32).collect(),
        ignore_eos,
    }
}

#[test]
fn stops_for_the_right_reason_with_the_right_text() {
    let cases = [
        // max_new_tokens
        Case { script: "Q:hello world", prompt_len: 2, max_context: 100, params: params(5, &[], &[], false), text: "hello", new_ids: 5, finish: FinishReason::Length },
        // EOS id (here '!'): included in the ids, not in the text.
        Case { script: "Q:hi!more", prompt_len: 2, max_context: 100, params: params(20, &[], b"!", false), text: "hi", new_ids: 3, finish: FinishReason::Eos },
        // ignore_eos runs past it and never picks it (the runner-up '#' instead), as
        // transformers' generate(min_new_tokens=N) masks the EOS ids.
        Case { script: "Q:hi!more", prompt_len: 2, max_context: 100, params: params(6, &[], b"!", true), text: "hi#mor", new_ids: 6, finish: FinishReason::Length },
        // stop string: text cut before it, ids kept up to the one completing it.
        Case { script: "Q:one\nUser: two", prompt_len: 2, max_context: 100, params: params(30, &["\nUser:"], &[], false), text: "one", new_ids: 9, finish: FinishReason::Stop },
        // the context fills: 10 positions, 4 in the prompt, 6 new at most.
        Case { script: "Q:ab0123456789", prompt_len: 4, max_context: 10, params: params(50, &[], &[], false), text: "012345", new_ids: 6, finish: FinishReason::Length },
        // zero new tokens.
        Case { script: "Q:ab", prompt_len: 2, max_context: 10, params: params(0, &[], &[], false), text: "", new_ids: 0, finish: FinishReason::Length },
    ];
    let tokenizer = byte_tokenizer();
    for (i, c) in cases.iter().enumerate() {
        let model = Scripted::new(c.script, c.max_context);
        let prompt: Vec<u32> = c.script.bytes().take(c.prompt_len).map(u32::from).collect();
        let mut streamed = String::new();
        let out = generate_from_ids(&model, &tokenizer, &prompt, &c.params, &mut |piece| {
            streamed.push_str(piece);
            true
        })
        .unwrap();
        assert_eq!(out.text, c.text, "case {i}: text");
        assert_eq!(streamed, c.text, "case {i}: streamed text");
        assert_eq!(out.token_ids.len(), c.new_ids, "case {i}: new ids {:?}", out.token_ids);
        assert_eq!(out.finish_reason, c.finish, "case {i}: finish reason");
        assert_eq!(out.prompt_tokens, c.prompt_len, "case {i}: prompt tokens");
        // One prefill plus one forward per new token after the first.
        assert_eq!(model.forwards.load(Ordering::SeqCst), c.new_ids, "case {i}: forwards");
    }
}

#[test]
fn the_callback_stops_generation() {
    let model = Scripted::new("Q:abcdefgh", 100);
    let mut pieces = 0;
    let out = generate_from_ids(&model, &byte_tokenizer(), &[b'Q' as u32, b':' as u32], &params(50, &[], &[], false), &mut |_| {
        pieces += 1;
        pieces < 3
    })
    .unwrap();
    assert_eq!(out.finish_reason, FinishReason::Stop);
    assert_eq!(out.token_ids.len(), 3);
}

#[test]
fn repetition_penalty_sees_the_prompt() {
    // The scripted token ('a', logit 10) is in the prompt; a penalty of 2 drops it to 5,
    // below the runner-up '#' at 9.
    let model = Scripted::new("aaaa", 100);
    let mut p = params(1, &[], &[], false);
    p.sampling.repetition_penalty = Some(2.0);
    let out = generate_from_ids(&model, &byte_tokenizer(), &[b'a' as u32], &p, &mut |_| true).unwrap();
    assert_eq!(out.token_ids, vec![b'#' as u32]);
}

#[test]
fn bad_prompts_are_errors() {
    let tokenizer = byte_tokenizer();
    let model = Scripted::new("abcdef", 4);
    let p = params(4, &[], &[], false);
    // (prompt embeddings shape, expected words)
    let cases: &[(&[usize], &str)] = &[
        (&[1, 4, 4], "leaves no room in the model's context of 4"),
        (&[1, 0, 4], "the prompt is empty"),
        (&[2, 2, 4], "one prompt at a time"),
        (&[1, 2, 3], "width 3"),
    ];
    for (shape, expected) in cases {
        let embeds = Tensor::zeros(*shape, DType::F32, &Device::Cpu).unwrap();
        let err = generate(&model, &tokenizer, &embeds, &[], &p, &mut |_| true).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains(expected), "{shape:?}: `{err}` should mention `{expected}`");
    }
    let err = generate_from_ids(&model, &tokenizer, &[], &p, &mut |_| true).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("the prompt is empty"), "{err}");
}
