//! A tiny llama GGUF written from deterministic transformers-layout weights
//! (q/k rows permuted as llama.cpp's converter does, a byte-level tokenizer in
//! the metadata), optionally broken in one way: shared by the LM's GGUF tests
//! and the trainer's QLoRA-over-GGUF tests (`#[path]`-included).

#![allow(dead_code, clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

pub const HIDDEN: usize = 64;
pub const HEADS: usize = 4;
pub const KV_HEADS: usize = 2;
pub const HEAD_DIM: usize = HIDDEN / HEADS;
pub const FFN: usize = 128;
pub const LAYERS: usize = 2;

/// Byte-level tokens (GPT-2 spelling), one merge, three control tokens.
pub fn tokens() -> Vec<String> {
    let table = multitoken_lm::gguf::bytes_to_unicode();
    let mut t: Vec<String> = table.iter().map(|c| c.to_string()).collect();
    t.extend(["he", "<|endoftext|>", "<|im_start|>", "<|im_end|>"].map(String::from));
    t
}

/// transformers-layout weights (q/k rows not permuted), deterministic.
pub fn hf_weights(vocab: usize) -> HashMap<String, Tensor> {
    let dev = Device::Cpu;
    let mut seed = 1u64;
    let mut rand = |shape: &[usize], scale: f32| {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5) * 2.0 * scale
            })
            .collect();
        Tensor::from_vec(v, shape, &dev).unwrap()
    };
    let mut w = HashMap::new();
    w.insert("model.embed_tokens.weight".to_string(), rand(&[vocab, HIDDEN], 1.0));
    w.insert("model.norm.weight".to_string(), (rand(&[HIDDEN], 0.2) + 1.0).unwrap());
    for i in 0..LAYERS {
        let p = format!("model.layers.{i}");
        w.insert(format!("{p}.input_layernorm.weight"), (rand(&[HIDDEN], 0.2) + 1.0).unwrap());
        w.insert(format!("{p}.post_attention_layernorm.weight"), (rand(&[HIDDEN], 0.2) + 1.0).unwrap());
        w.insert(format!("{p}.self_attn.q_proj.weight"), rand(&[HIDDEN, HIDDEN], 0.2));
        w.insert(format!("{p}.self_attn.k_proj.weight"), rand(&[KV_HEADS * HEAD_DIM, HIDDEN], 0.2));
        w.insert(format!("{p}.self_attn.v_proj.weight"), rand(&[KV_HEADS * HEAD_DIM, HIDDEN], 0.2));
        w.insert(format!("{p}.self_attn.o_proj.weight"), rand(&[HIDDEN, HIDDEN], 0.2));
        w.insert(format!("{p}.mlp.gate_proj.weight"), rand(&[FFN, HIDDEN], 0.2));
        w.insert(format!("{p}.mlp.up_proj.weight"), rand(&[FFN, HIDDEN], 0.2));
        w.insert(format!("{p}.mlp.down_proj.weight"), rand(&[HIDDEN, FFN], 0.2));
    }
    w
}

/// llama.cpp's `permute` of q/k rows: within each head, rows (i, i + d/2) become
/// (2i, 2i + 1).
pub fn permute(w: &Tensor, heads: usize) -> Tensor {
    let (out, inp) = w.dims2().unwrap();
    w.reshape((heads, 2, out / heads / 2, inp)).unwrap().transpose(1, 2).unwrap().reshape((out, inp)).unwrap()
}

pub fn gguf_name(hf: &str) -> String {
    let fixed = [("model.embed_tokens.weight", "token_embd.weight"), ("model.norm.weight", "output_norm.weight")];
    if let Some((_, g)) = fixed.iter().find(|(h, _)| *h == hf) {
        return g.to_string();
    }
    let rest = hf.strip_prefix("model.layers.").unwrap();
    let (i, rest) = rest.split_once('.').unwrap();
    let module = [
        ("input_layernorm.weight", "attn_norm.weight"),
        ("post_attention_layernorm.weight", "ffn_norm.weight"),
        ("self_attn.q_proj.weight", "attn_q.weight"),
        ("self_attn.k_proj.weight", "attn_k.weight"),
        ("self_attn.v_proj.weight", "attn_v.weight"),
        ("self_attn.o_proj.weight", "attn_output.weight"),
        ("mlp.gate_proj.weight", "ffn_gate.weight"),
        ("mlp.up_proj.weight", "ffn_up.weight"),
        ("mlp.down_proj.weight", "ffn_down.weight"),
    ];
    let g = module.iter().find(|(h, _)| *h == rest).unwrap().1;
    format!("blk.{i}.{g}")
}

/// What to break in a written file.
#[derive(Clone, Copy, PartialEq)]
pub enum Breakage {
    None,
    Arch,
    NoBlockCount,
    DropTensor,
    BadShape,
    SentencePiece,
    ZeroAlignment,
}

/// ChatML, as a chat model's GGUF carries it.
pub const CHATML: &str = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// The tiny model with a placeholder chat template and a 64-token context,
/// `matrices` the type of its 2-D tensors, broken as `breakage` says.
pub fn write_gguf(path: &Path, matrices: GgmlDType, breakage: Breakage) {
    write_gguf_with(path, matrices, breakage, "{{ messages }}", 64)
}

/// The tiny model as a chat model: [`CHATML`] and a `context`-token context.
pub fn write_chat_gguf(path: &Path, matrices: GgmlDType, context: usize) {
    write_gguf_with(path, matrices, Breakage::None, CHATML, context)
}

fn write_gguf_with(path: &Path, matrices: GgmlDType, breakage: Breakage, chat_template: &str, context: usize) {
    let toks = tokens();
    let weights = hf_weights(toks.len());
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    for (name, t) in &weights {
        let gguf = gguf_name(name);
        if breakage == Breakage::DropTensor && gguf == "blk.1.ffn_up.weight" {
            continue;
        }
        let mut t = match gguf.rsplit('.').nth(1).unwrap() {
            "attn_q" => permute(t, HEADS),
            "attn_k" => permute(t, KV_HEADS),
            _ => t.clone(),
        };
        if breakage == Breakage::BadShape && gguf == "blk.0.attn_v.weight" {
            // A fresh storage: candle's quantize reads a view's whole storage.
            let rows: Vec<f32> = t.narrow(0, 0, 16).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            t = Tensor::from_vec(rows, (16, HIDDEN), &Device::Cpu).unwrap();
        }
        let dtype = if t.rank() == 2 { matrices } else { GgmlDType::F32 };
        tensors.push((gguf, QTensor::quantize(&t, dtype).unwrap()));
    }
    let arch = if breakage == Breakage::Arch { "phi3" } else { "llama" };
    let tok_model = if breakage == Breakage::SentencePiece { "llama" } else { "gpt2" };
    let u32v = |v: usize| Value::U32(v as u32);
    let mut meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        (format!("{arch}.embedding_length"), u32v(HIDDEN)),
        (format!("{arch}.feed_forward_length"), u32v(FFN)),
        (format!("{arch}.attention.head_count"), u32v(HEADS)),
        (format!("{arch}.attention.head_count_kv"), u32v(KV_HEADS)),
        (format!("{arch}.context_length"), u32v(context)),
        (format!("{arch}.rope.freq_base"), Value::F32(10000.0)),
        (format!("{arch}.attention.layer_norm_rms_epsilon"), Value::F32(1e-5)),
        ("tokenizer.ggml.model".into(), Value::String(tok_model.into())),
        ("tokenizer.ggml.pre".into(), Value::String("smollm".into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(toks.iter().map(|t| Value::String(t.clone())).collect())),
        ("tokenizer.ggml.merges".into(), Value::Array(vec![Value::String("h e".into())])),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(toks.iter().map(|t| Value::I32(if t.starts_with("<|") { 3 } else { 1 })).collect()),
        ),
        ("tokenizer.ggml.bos_token_id".into(), u32v(toks.len() - 2)),
        ("tokenizer.ggml.eos_token_id".into(), u32v(toks.len() - 1)),
        ("tokenizer.chat_template".into(), Value::String(chat_template.into())),
    ];
    if breakage != Breakage::NoBlockCount {
        meta.push((format!("{arch}.block_count"), u32v(LAYERS)));
    }
    if breakage == Breakage::ZeroAlignment {
        // candle's reader divided by it (a panic; issue 23).
        meta.push(("general.alignment".into(), Value::U32(0)));
    }
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut file = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut file, &meta_refs, &tensor_refs).unwrap();
}

