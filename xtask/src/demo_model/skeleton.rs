//! The demo model's directory with seeded random weights: a tiny llama LM
//! (`lm/`), a tiny CLIP vision tower (`vision/`), a tiny Whisper (`audio/`), a
//! tiny sentence-transformers BERT (`document/`), their projectors and
//! `multitoken.json` — a directory `MultimodalModel::load` accepts.

use std::path::Path;

use anyhow::{Context, Result};
use candle_core::Tensor;
use multitoken_core::{Projector, ProjectorSpec};
use serde_json::json;

use super::random::{init_tensor, RandomInit};
use super::tokenizer;

/// LM width.
pub const LM_HIDDEN: usize = 128;
const LM_LAYERS: usize = 3;
const LM_HEADS: usize = 8;
const LM_INTERMEDIATE: usize = 256;
const LM_VOCAB: usize = 640;
const LM_MAX_POSITIONS: usize = 512;

const CLIP_HIDDEN: usize = 64;

/// The vision tower's shape and preprocessing.
#[derive(Debug, Clone, Copy)]
pub struct Tower {
    /// Input side in pixels.
    pub image: usize,
    /// Patch side in pixels.
    pub patch: usize,
    /// Encoder layers.
    pub layers: usize,
    /// `spatial_pool_stride`: the patch grid is averaged in `pool`×`pool` blocks.
    pub pool: usize,
    /// Pad to a square (LLaVA's `pad`) instead of cropping the centre.
    pub pad: bool,
}

impl Tower {
    /// The classic style's tower (the embedded model's): 48 px in 8 px
    /// patches, the 6×6 grid averaged to 3×3 positions per image (with 36 the
    /// two-image questions stayed at chance: a text stand-in with 9-token
    /// items learned them, one with 36-token items did not), 2 layers.
    pub const CLASSIC: Tower = Tower { image: 48, patch: 8, layers: 2, pool: 2, pad: false };

    /// The styled images' tower: images up to 4:1 are padded to a square
    /// (CLIP's centre crop cut a shape near a wide image's end away), and at
    /// 96 px a small shape in a wide image keeps ~10 px across (at 48 px,
    /// 2-3). The 12×12 grid is averaged to 4×4 positions. Measured: with 12 px
    /// patches the tower learned colours but not shapes (45% on the varied
    /// held-out split); with 8 px patches, phase 1 on the classic rows reached
    /// 62% on shapes where the classic tower reaches ~97%.
    pub const STYLED: Tower = Tower { image: 96, patch: 8, layers: 3, pool: 3, pad: true };
}

const WHISPER_D: usize = 64;
/// Pooled audio positions per clip (1 s each over Whisper's 30 s window).
pub const AUDIO_TOKENS: usize = 30;

const BERT_HIDDEN: usize = 64;
const DOC_TOKENS: usize = 4;

/// The tower for data of `style`.
pub fn tower_for(style: multitoken_datasets::Style) -> Tower {
    match style {
        multitoken_datasets::Style::Classic => Tower::CLASSIC,
        _ => Tower::STYLED,
    }
}

/// ChatML without a default system prompt.
pub const CHAT_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))
}

/// Writes the whole skeleton into `dir` (created), training the tokenizers on
/// `texts` (questions, answers and documents of the training split).
pub fn write(dir: &Path, texts: &[String], seed: u64, tower: Tower) -> Result<()> {
    for sub in ["lm", "vision", "audio", "document/1_Pooling"] {
        std::fs::create_dir_all(dir.join(sub))
            .with_context(|| format!("creating {}", dir.join(sub).display()))?;
    }
    let lm_vocab = write_lm(&dir.join("lm"), texts, seed)?;
    write_vision(&dir.join("vision"), seed, tower)?;
    write_audio(&dir.join("audio"), seed)?;
    write_document(&dir.join("document"), texts, seed)?;
    let modalities = json!([
        {"builder": "vision_clip", "config": {"tower": "vision", "vision_feature_layer": -1, "spatial_pool_stride": tower.pool}, "projector": "mlp2x_gelu"},
        {"builder": "audio_whisper", "config": {"model_path": "audio", "features": "encoder_pooled", "token_width": AUDIO_TOKENS, "projector_depth": 2, "max_seconds": 30.0}, "projector": "mlp2x_gelu"},
        {"builder": "document_minilm", "config": {"encoder": "document", "num_tokens": DOC_TOKENS, "num_layers": 2},
         "projector": {"kind": "vector_mlp", "num_layers": 2, "num_tokens": DOC_TOKENS}},
    ]);
    write_json(
        &dir.join("multitoken.json"),
        &json!({"base_model": "lm", "modalities": modalities}),
    )?;
    let parameters = write_projectors(dir, seed)?;
    println!(
        "demo model skeleton in {} (LM vocab {lm_vocab}, {} projector parameters)",
        dir.display(),
        parameters
    );
    Ok(())
}

/// Seeded random projectors from each encoder's feature width to the LM's
/// width, written to `dir/projectors.safetensors`; returns their parameter count.
pub fn write_projectors(dir: &Path, seed: u64) -> Result<usize> {
    let (vb, backend) = RandomInit::var_builder(seed ^ 0x5052_4f4a);
    let specs = [
        ("vision_clip_lmm_projector", ProjectorSpec::MlpGelu { depth: 2 }, CLIP_HIDDEN),
        ("audio_whisper_lmm_projector", ProjectorSpec::MlpGelu { depth: 2 }, WHISPER_D),
        (
            "document_minilm_lmm_projector",
            ProjectorSpec::VectorMlp {
                num_layers: 2,
                num_tokens: DOC_TOKENS,
            },
            BERT_HIDDEN,
        ),
    ];
    for (prefix, spec, feature_dim) in specs {
        Projector::load(spec, feature_dim, LM_HIDDEN, vb.pp(prefix))
            .with_context(|| format!("projector {prefix}"))?;
    }
    backend.save(&dir.join("projectors.safetensors"))?;
    Ok(backend.parameters())
}

fn write_lm(dir: &Path, texts: &[String], seed: u64) -> Result<usize> {
    let vocab = tokenizer::train_lm(texts, LM_VOCAB, &dir.join("tokenizer.json"))?;
    write_lm_weights(dir, vocab, seed, None)?;
    Ok(vocab)
}

/// The LM's config files and seeded random weights, for a tokenizer of
/// `vocab` entries already in `dir` (ours specials at ids 0..7); `embeddings`
/// `[rows, LM_HIDDEN]` replace the random embedding table when given.
pub fn write_lm_weights(dir: &Path, vocab: usize, seed: u64, embeddings: Option<Tensor>) -> Result<()> {
    // The embedding table is a multiple of 64 rows (ids past the tokenizer's are never produced).
    let rows = vocab.div_ceil(64) * 64;
    let id = |t: &str| {
        tokenizer::LM_SPECIAL
            .iter()
            .position(|s| *s == t)
            .unwrap_or(0)
    };
    let (pad, eos) = (id("<pad>"), id("<|im_end|>"));
    write_json(
        &dir.join("config.json"),
        &json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": rows, "hidden_size": LM_HIDDEN, "intermediate_size": LM_INTERMEDIATE,
            "num_hidden_layers": LM_LAYERS, "num_attention_heads": LM_HEADS, "num_key_value_heads": LM_HEADS,
            "max_position_embeddings": LM_MAX_POSITIONS, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "hidden_act": "silu", "tie_word_embeddings": true, "torch_dtype": "float32",
            "bos_token_id": null, "eos_token_id": eos, "pad_token_id": pad
        }),
    )?;
    write_json(
        &dir.join("tokenizer_config.json"),
        &json!({
            "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": LM_MAX_POSITIONS,
            "eos_token": "<|im_end|>", "pad_token": "<pad>", "bos_token": null,
            "additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<image>", "<speech>", "<document>"],
            "chat_template": CHAT_TEMPLATE
        }),
    )?;
    write_json(
        &dir.join("generation_config.json"),
        &json!({"eos_token_id": eos, "pad_token_id": pad, "do_sample": false}),
    )?;
    let mut tensors = std::collections::HashMap::new();
    let mut put = |name: String, shape: &[usize]| -> Result<()> {
        let t: Tensor = init_tensor(seed, &name, shape)?;
        tensors.insert(name, t);
        Ok(())
    };
    if embeddings.is_none() {
        put("model.embed_tokens.weight".into(), &[rows, LM_HIDDEN])?;
    }
    put("model.norm.weight".into(), &[LM_HIDDEN])?;
    for i in 0..LM_LAYERS {
        let p = format!("model.layers.{i}");
        for proj in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            put(
                format!("{p}.self_attn.{proj}.weight"),
                &[LM_HIDDEN, LM_HIDDEN],
            )?;
        }
        put(
            format!("{p}.mlp.gate_proj.weight"),
            &[LM_INTERMEDIATE, LM_HIDDEN],
        )?;
        put(
            format!("{p}.mlp.up_proj.weight"),
            &[LM_INTERMEDIATE, LM_HIDDEN],
        )?;
        put(
            format!("{p}.mlp.down_proj.weight"),
            &[LM_HIDDEN, LM_INTERMEDIATE],
        )?;
        put(format!("{p}.input_layernorm.weight"), &[LM_HIDDEN])?;
        put(format!("{p}.post_attention_layernorm.weight"), &[LM_HIDDEN])?;
    }
    if let Some(table) = embeddings {
        if table.dims() != [rows, LM_HIDDEN] {
            anyhow::bail!("embeddings of shape {:?}, the LM needs [{rows}, {LM_HIDDEN}]", table.dims());
        }
        tensors.insert("model.embed_tokens.weight".into(), table);
    }
    let path = dir.join("model.safetensors");
    candle_core::safetensors::save(&tensors, &path)
        .with_context(|| format!("writing {}", path.display()))
}

pub(crate) fn write_vision(dir: &Path, seed: u64, tower: Tower) -> Result<usize> {
    let config = json!({
        "model_type": "clip_vision_model", "architectures": ["CLIPVisionModel"],
        "hidden_size": CLIP_HIDDEN, "intermediate_size": 4 * CLIP_HIDDEN, "num_hidden_layers": tower.layers,
        "num_attention_heads": 4, "image_size": tower.image, "patch_size": tower.patch, "num_channels": 3,
        "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": CLIP_HIDDEN
    });
    write_json(&dir.join("config.json"), &config)?;
    write_json(
        &dir.join("preprocessor_config.json"),
        &json!({
            "image_processor_type": "CLIPImageProcessor", "do_resize": true, "size": {"shortest_edge": tower.image},
            "resample": 3, "pad_to_square": tower.pad, "do_center_crop": true, "crop_size": {"height": tower.image, "width": tower.image},
            "do_rescale": true, "rescale_factor": 1.0 / 255.0, "do_normalize": true, "do_convert_rgb": true,
            "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]
        }),
    )?;
    let parsed: multitoken_vision::ClipVisionConfig = serde_json::from_value(config)?;
    let (vb, backend) = RandomInit::var_builder(seed ^ 0x434c_4950);
    multitoken_vision::ClipVisionTower::load(&parsed, vb).context("building the CLIP tower")?;
    backend.save(&dir.join("model.safetensors"))?;
    Ok(CLIP_HIDDEN)
}

fn write_audio(dir: &Path, seed: u64) -> Result<usize> {
    let config = json!({
        "model_type": "whisper", "architectures": ["WhisperForConditionalGeneration"],
        "num_mel_bins": 80, "d_model": WHISPER_D, "encoder_layers": 1, "encoder_attention_heads": 4,
        "encoder_ffn_dim": 2 * WHISPER_D, "decoder_layers": 1, "decoder_attention_heads": 4,
        "decoder_ffn_dim": 2 * WHISPER_D, "max_source_positions": 1500, "max_target_positions": 8,
        "vocab_size": 8, "decoder_start_token_id": 1, "eos_token_id": 2, "activation_function": "gelu"
    });
    write_json(&dir.join("config.json"), &config)?;
    let parsed: multitoken_audio::WhisperConfig = serde_json::from_value(config)?;
    let (vb, backend) = RandomInit::var_builder(seed ^ 0x5748_5350);
    multitoken_audio::Whisper::from_var_builder(vb, parsed).context("building Whisper")?;
    backend.save(&dir.join("model.safetensors"))?;
    Ok(WHISPER_D)
}

fn write_document(dir: &Path, texts: &[String], seed: u64) -> Result<usize> {
    let vocab = tokenizer::train_bert(texts, 600, &dir.join("tokenizer.json"))?;
    let config = json!({
        "architectures": ["BertModel"], "model_type": "bert", "vocab_size": vocab, "hidden_size": BERT_HIDDEN,
        "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 2 * BERT_HIDDEN,
        "hidden_act": "gelu", "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
        "max_position_embeddings": 256, "type_vocab_size": 2, "initializer_range": 0.02,
        "layer_norm_eps": 1e-12, "pad_token_id": 0, "position_embedding_type": "absolute"
    });
    write_json(&dir.join("config.json"), &config)?;
    write_json(
        &dir.join("modules.json"),
        &json!([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}
        ]),
    )?;
    write_json(
        &dir.join("1_Pooling/config.json"),
        &json!({"word_embedding_dimension": BERT_HIDDEN, "pooling_mode_cls_token": false, "pooling_mode_mean_tokens": true,
                "pooling_mode_max_tokens": false, "pooling_mode_mean_sqrt_len_tokens": false}),
    )?;
    write_json(
        &dir.join("sentence_bert_config.json"),
        &json!({"max_seq_length": 256, "do_lower_case": false}),
    )?;
    let parsed: candle_transformers::models::bert::Config = serde_json::from_value(config)?;
    let (vb, backend) = RandomInit::var_builder(seed ^ 0x4245_5254);
    candle_transformers::models::bert::BertModel::load(vb, &parsed).context("building BERT")?;
    backend.save(&dir.join("model.safetensors"))?;
    Ok(BERT_HIDDEN)
}
