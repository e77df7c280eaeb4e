//! GGUF loading on tiny files written here: the q/k row permutation with interleaved
//! rope against transformers' layout with `rotate_half`, quantized against dequantized
//! weights, the tokenizer rebuilt from metadata, and every kind of broken file.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use multitoken_core::{KvCache, LanguageModel, LogitsSelection};
use multitoken_lm::gguf::{load_gguf, load_gguf_with, GgufSource, GgufWeights};
use multitoken_lm::loader::LoadOptions;
use multitoken_lm::model::CausalLm;
use multitoken_lm::{Linear, RopeStyle, WeightSource};

#[path = "../../../tests/support/tiny_gguf.rs"]
mod tiny_gguf;
use tiny_gguf::*;

fn opts() -> LoadOptions {
    LoadOptions { dtype: DType::F32, device: Device::Cpu, quantize: None, quantize_towers: None }
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("multitoken-gguf-tiny-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// The transformers layout (unpermuted q/k, `rotate_half`) served from memory.
struct HfSource(HashMap<String, Tensor>);

impl WeightSource for HfSource {
    fn describe(&self) -> String {
        "in-memory".into()
    }
    fn contains(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }
    fn tensor(&self, name: &str, _shape: &[usize]) -> multitoken_lm::Result<Tensor> {
        Ok(self.0[name].clone())
    }
    fn linear(&self, prefix: &str, _in: usize, _out: usize, _bias: bool) -> multitoken_lm::Result<Linear> {
        Linear::dense(self.0[&format!("{prefix}.weight")].clone(), None)
    }
}

fn logits(model: &dyn LanguageModel, ids: &[u32]) -> Vec<Vec<f32>> {
    let input = Tensor::new(ids, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let embeds = model.embed_tokens(&input).unwrap();
    let mut cache = KvCache::new(model.num_layers());
    let out = model.forward_embeds(&embeds, None, &mut cache, LogitsSelection::All).unwrap();
    out.squeeze(0).unwrap().to_dtype(DType::F32).unwrap().to_vec2().unwrap()
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter().flatten().zip(b.iter().flatten()).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn permuted_rows_with_interleaved_rope_equal_transformers_layout() {
    let path = tmp("f32.gguf");
    write_gguf(&path, GgmlDType::F32, Breakage::None);
    let source = GgufSource::open(&path, &opts(), GgufWeights::Dequantized).unwrap();
    let cfg = source.config().unwrap();
    assert_eq!(cfg.rope_style, RopeStyle::Interleaved);
    assert_eq!((cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim), (LAYERS, HEADS, KV_HEADS, HEAD_DIM));
    assert_eq!((cfg.vocab_size, cfg.max_position_embeddings), (tokens().len(), 64));
    let ours = load_gguf_with(&path, &opts(), GgufWeights::Dequantized).unwrap();

    let mut hf_cfg = cfg.clone();
    hf_cfg.rope_style = RopeStyle::Half;
    hf_cfg.tie_word_embeddings = true;
    let reference = CausalLm::load(&hf_cfg, &HfSource(hf_weights(tokens().len()))).unwrap();
    let ids: Vec<u32> = vec![5, 17, 200, 3, 99, 256, 42, 7, 8, 250];
    let diff = max_diff(&logits(ours.model.as_ref(), &ids), &logits(&reference, &ids));
    assert!(diff < 1e-4, "GGUF layout differs from transformers' by {diff}");
}

#[test]
fn quantized_matrices_stay_close_to_dequantized() {
    // (matrix type, largest logit difference allowed, as a fraction of the largest logit)
    for (dtype, tolerance) in [(GgmlDType::Q8_0, 0.03f32), (GgmlDType::Q4_1, 0.15)] {
        let path = tmp(&format!("{dtype:?}.gguf"));
        write_gguf(&path, dtype, Breakage::None);
        let q = load_gguf(&path, &opts()).unwrap();
        let d = load_gguf_with(&path, &opts(), GgufWeights::Dequantized).unwrap();
        let ids: Vec<u32> = vec![1, 2, 3, 4, 100, 200];
        let dense = logits(d.model.as_ref(), &ids);
        let scale = dense.iter().flatten().fold(0f32, |m, x| m.max(x.abs()));
        let diff = max_diff(&logits(q.model.as_ref(), &ids), &dense);
        assert!(diff < tolerance * scale, "{dtype:?}: quantized and dequantized logits differ by {diff} (largest {scale})");
    }
}

#[test]
fn tokenizer_and_special_tokens_come_from_metadata() {
    let path = tmp("tok.gguf");
    write_gguf(&path, GgmlDType::Q8_0, Breakage::None);
    let m = load_gguf(&path, &opts()).unwrap();
    let n = tokens().len() as u32;
    assert_eq!(m.special_tokens.bos_token.as_deref(), Some("<|im_start|>"));
    assert_eq!(m.special_tokens.bos_token_id, Some(n - 2));
    assert_eq!(m.generation.eos_token_ids, vec![n - 1]);
    assert_eq!(m.chat_template.as_deref(), Some("{{ messages }}"));
    // (text, ids): bytes, the one merge, digits, control tokens kept whole, no BOS added.
    let cases: &[(&str, &[u32])] = &[
        ("he", &[256]),
        ("h e", &[b'h' as u32, b' ' as u32, b'e' as u32]),
        ("12", &[b'1' as u32, b'2' as u32]),
        ("<|im_start|>he<|im_end|>", &[n - 2, 256, n - 1]),
    ];
    for (text, ids) in cases {
        let enc = m.tokenizer.encode(*text, true).unwrap();
        assert_eq!(enc.get_ids(), *ids, "{text:?}");
        assert_eq!(m.tokenizer.decode(enc.get_ids(), false).unwrap(), *text);
    }
}

#[test]
fn broken_files_are_clear_errors() {
    // (what is wrong, expected words in the error)
    let cases: &[(Breakage, &str)] = &[
        (Breakage::Arch, "GGUF architecture `phi3` is not supported"),
        (Breakage::NoBlockCount, "no `llama.block_count`"),
        (Breakage::DropTensor, "model.layers.1.mlp.up_proj.weight"),
        (Breakage::BadShape, "blk.0.attn_v.weight` has shape [16, 64], expected [32, 64]"),
        (Breakage::SentencePiece, "GGUF tokenizer `llama` is not supported"),
        (Breakage::ZeroAlignment, "not a readable GGUF file: `general.alignment` is 0"),
    ];
    for (i, (breakage, expected)) in cases.iter().enumerate() {
        let path = tmp(&format!("broken-{i}.gguf"));
        write_gguf(&path, GgmlDType::Q8_0, *breakage);
        let err = load_gguf(&path, &opts()).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains(expected), "case {i}: `{err}` should mention `{expected}`");
        assert!(err.contains(path.to_str().unwrap()), "case {i}: `{err}` should name the file");
    }

    // Files that are not GGUF at all, or cut short.
    let good = tmp("good.gguf");
    write_gguf(&good, GgmlDType::Q8_0, Breakage::None);
    let bytes = std::fs::read(&good).unwrap();
    let files: &[(&str, Vec<u8>, &str)] = &[
        ("text.gguf", b"this is not a gguf file".to_vec(), "not a readable GGUF file"),
        ("empty.gguf", Vec::new(), "not a readable GGUF file"),
        ("header.gguf", bytes[..64].to_vec(), "not a readable GGUF file"),
        ("cut.gguf", bytes[..bytes.len() - 100].to_vec(), "cut.gguf"),
    ];
    for (name, content, expected) in files {
        let path = tmp(name);
        std::fs::write(&path, content).unwrap();
        let err = load_gguf(&path, &opts()).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains(expected), "{name}: `{err}` should mention `{expected}`");
    }
    let missing = tmp("missing.gguf");
    let err = load_gguf(&missing, &opts()).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("cannot read") && err.contains("missing.gguf"), "{err}");
}

/// LoRA A/B on every decoder linear of `model` (B non-zero, so that A gets a
/// gradient too); returns the vars.
fn attach_lora(model: &mut CausalLm) -> Vec<(String, candle_core::Var)> {
    let mut vars = Vec::new();
    for (k, (name, linear)) in model.decoder_linears_mut().into_iter().enumerate() {
        let (in_dim, out_dim) = (linear.in_dim(), linear.out_dim());
        let fill = |n: usize, seed: usize| -> Vec<f32> { (0..n).map(|i| (((i * 7 + seed * 13) % 17) as f32 - 8.0) * 0.01).collect() };
        let a = candle_core::Var::from_vec(fill(4 * in_dim, k), (4, in_dim), &Device::Cpu).unwrap();
        let b = candle_core::Var::from_vec(fill(out_dim * 4, k + 1), (out_dim, 4), &Device::Cpu).unwrap();
        let lora = multitoken_lm::lora::LoraLayer {
            a: a.as_tensor().clone(),
            b: b.as_tensor().clone(),
            scale: 2.0,
            dropout: 0.0,
            rng: multitoken_lm::lora::LoraDropout::new(0),
        };
        linear.set_lora(Some(lora)).unwrap();
        vars.push((format!("{name}.lora_A"), a));
        vars.push((format!("{name}.lora_B"), b));
    }
    vars
}

/// QLoRA on a Q4_1 file: with the rows of `q_proj`/`k_proj` put in
/// transformers' order (what LoRA training loads, so that the adapter fits the
/// HF base) the model computes what the file's own layout computes, and the
/// LoRA gradients through the quantized base (whose backward reads the blocks)
/// match those through the same base dequantized to f32.
#[test]
fn qlora_gradients_over_a_q4_1_file_match_the_dequantized_base() {
    let path = tmp("qlora-q4_1.gguf");
    write_gguf(&path, GgmlDType::Q4_1, Breakage::None);
    let file_layout = load_gguf(&path, &opts()).unwrap();
    let load = |weights: GgufWeights| {
        let source = GgufSource::open(&path, &opts(), weights).unwrap().with_transformers_rows();
        let cfg = source.config().unwrap();
        assert_eq!(cfg.rope_style, RopeStyle::Half);
        CausalLm::load(&cfg, &source).unwrap()
    };
    let mut quantized = load(GgufWeights::Quantized);
    let mut dense = load(GgufWeights::Dequantized);
    let ids: Vec<u32> = vec![5, 17, 200, 3, 99, 256, 42, 7, 8, 250, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10];
    let diff = max_diff(&logits(&quantized, &ids), &logits(file_layout.model.as_ref(), &ids));
    assert!(diff < 1e-4, "transformers' row order differs from the file's by {diff}");

    let grads = |model: &mut CausalLm| {
        let vars = attach_lora(model);
        let input = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let embeds = model.embed_tokens(&input).unwrap();
        let mut cache = KvCache::new(model.num_layers());
        let out = model.forward_embeds(&embeds, None, &mut cache, LogitsSelection::All).unwrap();
        let weights = Tensor::arange(0f32, out.elem_count() as f32, &Device::Cpu).unwrap().reshape(out.dims()).unwrap();
        let weights = ((weights * 0.37).unwrap().sin().unwrap() * 0.1).unwrap();
        let g = (out * weights).unwrap().sum_all().unwrap().backward().unwrap();
        vars.into_iter()
            .map(|(name, v)| (name, g.get(v.as_tensor()).expect("every LoRA var has a gradient").clone()))
            .collect::<Vec<_>>()
    };
    let (gq, gd) = (grads(&mut quantized), grads(&mut dense));
    for ((name, q), (_, d)) in gq.iter().zip(&gd) {
        let scale = d.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let diff = (q - d).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(scale > 0.0, "{name}: no gradient");
        assert!(diff <= 1e-3 * scale.max(1.0), "{name}: QLoRA gradient off by {diff} (largest {scale})");
    }
}
