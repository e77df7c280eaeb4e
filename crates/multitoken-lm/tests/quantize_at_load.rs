//! Quantization at load (`--quantize`) on real weights: SmolLM2-135M-Instruct
//! written out as an HF directory (f32 safetensors, dequantized from the Q4_1 GGUF
//! that `cargo xtask weights` installs) and quantized back to Q4_1 as it is read
//! gives the GGUF file's greedy ids.
//!
//! Dequantized Q4_1 blocks quantize back to the same blocks (each block holds its
//! minimum at `q = 0` and its maximum at `q = 15`), so the two models multiply the
//! same 4-bit matrices; only the GGUF's rows of `q_proj`/`k_proj`, stored in
//! llama.cpp's rotary order, are put back in transformers' order for the HF copy.
//! Skipped, with a message, where the GGUF file is not installed.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use multitoken_lm::generate::{generate_from_ids, GenerationParams};
use multitoken_lm::gguf::{GgufSource, GgufWeights};
use multitoken_lm::loader::{load_model, LoadOptions, LoadedModel};
use multitoken_lm::quantize::Quantization;
use multitoken_lm::WeightSource;
use serde_json::{json, Value};

const FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

fn gguf_path() -> Option<PathBuf> {
    let cache = match std::env::var_os("MULTITOKEN_WEIGHTS").filter(|d| !d.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME")?)
            .join(".cache")
            .join("multitoken"),
    };
    let path = cache.join("smollm2").join(FILE);
    if path.is_file() {
        Some(path)
    } else {
        println!(
            "skipped: {} not found; run `cargo xtask weights --only smollm2`",
            path.display()
        );
        None
    }
}

fn opts(quantize: Option<Quantization>) -> LoadOptions {
    LoadOptions {
        dtype: DType::F32,
        device: Device::Cpu,
        quantize,
        quantize_towers: None,
    }
}

/// llama.cpp's `permute` undone: within each head, GGUF row `2i + j` is
/// transformers' row `j * head_dim / 2 + i`.
fn unpermute(w: &Tensor, heads: usize) -> Tensor {
    let (out, inp) = w.dims2().unwrap();
    let hd = out / heads;
    w.reshape((heads, hd / 2, 2, inp))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape((out, inp))
        .unwrap()
}

/// The GGUF file as an f32 HF directory in `dir`; returns the block type of every
/// linear of the file.
fn write_hf_dir(gguf: &Path, dir: &Path, model: &LoadedModel) -> Vec<(String, GgmlDType)> {
    let source = GgufSource::open(gguf, &opts(None), GgufWeights::Dequantized).unwrap();
    let cfg = source.config().unwrap();
    let (h, v, i, hd) = (
        cfg.hidden_size,
        cfg.vocab_size,
        cfg.intermediate_size,
        cfg.head_dim,
    );
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let mut types = Vec::new();
    tensors.insert(
        "model.embed_tokens.weight".into(),
        source.tensor("model.embed_tokens.weight", &[v, h]).unwrap(),
    );
    tensors.insert(
        "model.norm.weight".into(),
        source.tensor("model.norm.weight", &[h]).unwrap(),
    );
    for l in 0..cfg.num_layers {
        let p = format!("model.layers.{l}");
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            let name = format!("{p}.{norm}.weight");
            tensors.insert(name.clone(), source.tensor(&name, &[h]).unwrap());
        }
        let linears = [
            (
                "self_attn.q_proj",
                h,
                cfg.num_heads * hd,
                Some(cfg.num_heads),
            ),
            (
                "self_attn.k_proj",
                h,
                cfg.num_kv_heads * hd,
                Some(cfg.num_kv_heads),
            ),
            ("self_attn.v_proj", h, cfg.num_kv_heads * hd, None),
            ("self_attn.o_proj", cfg.num_heads * hd, h, None),
            ("mlp.gate_proj", h, i, None),
            ("mlp.up_proj", h, i, None),
            ("mlp.down_proj", i, h, None),
        ];
        for (module, in_dim, out_dim, heads) in linears {
            let name = format!("{p}.{module}.weight");
            let w = source.tensor(&name, &[out_dim, in_dim]).unwrap();
            let w = heads.map_or(w.clone(), |n| unpermute(&w, n));
            types.push((name.clone(), source.stored_type(&name).unwrap()));
            tensors.insert(name, w);
        }
    }
    types.push((
        "lm_head.weight".into(),
        source.stored_type("lm_head.weight").unwrap(),
    ));
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
    let config = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": h,
        "intermediate_size": i,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": hd,
        "vocab_size": v,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "hidden_act": "silu",
        "tie_word_embeddings": true,
        "eos_token_id": model.generation.eos_token_ids,
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    model
        .tokenizer
        .save(dir.join("tokenizer.json"), false)
        .unwrap();
    types
}

/// `dir` with its layers quantized to `layers` and its head to `head`, as
/// `load_model` does with `--quantize` (which leaves the head dense).
fn load_quantized(dir: &Path, layers: Quantization, head: Option<Quantization>) -> LoadedModel {
    let cfg = multitoken_lm::hf::parse_config(&dir.join("config.json")).unwrap();
    let source =
        multitoken_lm::weights::SafetensorsSource::from_dir(dir, DType::F32, &Device::Cpu).unwrap();
    let quantizing =
        multitoken_lm::quantize::QuantizingSource::new(&source, layers).with_head(head);
    multitoken_lm::hf::load_hf_dir_with(dir, &cfg, &quantizing).unwrap()
}

fn greedy(model: &LoadedModel, prompt: &[u32], max_new_tokens: usize) -> Vec<u32> {
    let params = GenerationParams {
        max_new_tokens,
        eos_token_ids: model.generation.eos_token_ids.clone(),
        ..GenerationParams::default()
    };
    generate_from_ids(
        model.model.as_ref(),
        &model.tokenizer,
        prompt,
        &params,
        &mut |_| true,
    )
    .unwrap()
    .token_ids
}

fn fixture(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/smollm2")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn q4_1_at_load_gives_the_gguf_files_greedy_ids() {
    let Some(path) = gguf_path() else { return };
    let gguf = load_model(&path, &opts(None)).unwrap();
    let scratch = Scratch(std::env::temp_dir().join(format!(
        "multitoken-quantize-at-load-{}",
        std::process::id()
    )));
    let dir = scratch.0.clone();
    std::fs::create_dir_all(&dir).unwrap();
    let types = write_hf_dir(&path, &dir, &gguf);
    // Where the file used another block type (its head, say), the two models
    // differ by design; the comparison is meaningful only where all are Q4_1.
    let other: Vec<_> = types
        .iter()
        .filter(|(n, t)| *t != GgmlDType::Q4_1 && n != "lm_head.weight")
        .collect();
    // `--quantize q4_1` keeps the head dense; the file's head is Q8_0, so the
    // same quantization is the layers in Q4_1 and the head in Q8_0.
    let head = types
        .iter()
        .find(|(n, _)| n == "lm_head.weight")
        .map(|(_, t)| *t)
        .unwrap();
    assert_eq!(
        head,
        GgmlDType::Q8_0,
        "SmolLM2's Q4_1 file keeps its (tied) head in Q8_0"
    );
    let hf = load_quantized(&dir, Quantization::Q4_1, Some(Quantization::Q8_0));
    // The default: layers in Q4_1, the head dense (f32) - generation still runs.
    let dense_head = load_model(&dir, &opts(Some(Quantization::Q4_1))).unwrap();
    let runs = fixture("greedy.json");
    for run in runs["runs"].as_array().unwrap() {
        let prompt = ids(&run["prompt_ids"]);
        let want = greedy(&gguf, &prompt, 24);
        let got = greedy(&hf, &prompt, 24);
        assert_eq!(greedy(&dense_head, &prompt, 4).len(), 4);
        if other.is_empty() {
            assert_eq!(
                got, want,
                "{}: greedy ids of the HF dir quantized at load vs the GGUF file",
                run["name"]
            );
        } else {
            // Not every linear was Q4_1 in the file: at least the start agrees.
            println!("linears stored in other types: {other:?}");
            assert_eq!(got[..4], want[..4], "{}", run["name"]);
        }
    }
    // The same directory refuses --quantize with a GGUF.
    let err = load_model(&path, &opts(Some(Quantization::Q4_1)))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("already quantized"), "{err}");
}

/// A scratch directory removed when the test ends, failed assertions included:
/// the dequantized SmolLM2 written here is half a gigabyte.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
