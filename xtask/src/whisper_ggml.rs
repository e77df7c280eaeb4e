//! HF Whisper (`whisper-base/hf/`) -> whisper.cpp's `ggml` model file, for the
//! `whisper-cpp` feature (`cargo xtask weights` writes `whisper-base/ggml-base.bin`).
//!
//! The layout whisper.cpp's loader reads (`whisper_model_load`, the same one
//! `models/convert-h5-to-ggml.py` writes):
//!
//! ```text
//! i32 magic 0x67676d6c · i32 n_vocab, n_audio_ctx, n_audio_state, n_audio_head,
//! n_audio_layer, n_text_ctx, n_text_state, n_text_head, n_text_layer, n_mels, ftype
//! i32 n_mels · i32 n_fft/2+1 · f32 mel filters [n_mels][n_fft/2+1]
//! i32 token count · per token: i32 byte length · bytes (byte-level BPE decoded)
//! per tensor: i32 n_dims · i32 name length · i32 type (0 f32, 1 f16) ·
//!             i32 dims (innermost first) · name · data
//! ```
//!
//! Tensor names are OpenAI's (`encoder.blocks.0.attn.query.weight`); matrices
//! are f16, vectors, conv biases (`[n, 1]`) and positional embeddings f32.

use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context, Result};
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

/// HF key (after `model.`) -> whisper.cpp key, for names outside the layers.
fn top_level_name(name: &str) -> Option<&'static str> {
    Some(match name {
        "encoder.layer_norm.bias" => "encoder.ln_post.bias",
        "encoder.layer_norm.weight" => "encoder.ln_post.weight",
        "encoder.embed_positions.weight" => "encoder.positional_embedding",
        "decoder.layer_norm.bias" => "decoder.ln.bias",
        "decoder.layer_norm.weight" => "decoder.ln.weight",
        "decoder.embed_positions.weight" => "decoder.positional_embedding",
        "decoder.embed_tokens.weight" => "decoder.token_embedding.weight",
        "encoder.conv1.weight" => "encoder.conv1.weight",
        "encoder.conv1.bias" => "encoder.conv1.bias",
        "encoder.conv2.weight" => "encoder.conv2.weight",
        "encoder.conv2.bias" => "encoder.conv2.bias",
        _ => return None,
    })
}

/// A layer's module path (between `layers.N.` and `.weight`/`.bias`) in whisper.cpp's names.
fn layer_module(side: &str, module: &str) -> Option<&'static str> {
    Some(match module {
        "self_attn.k_proj" => "attn.key",
        "self_attn.q_proj" => "attn.query",
        "self_attn.v_proj" => "attn.value",
        "self_attn.out_proj" => "attn.out",
        "self_attn_layer_norm" => "attn_ln",
        "encoder_attn.q_proj" => "cross_attn.query",
        "encoder_attn.k_proj" if side == "decoder" => "cross_attn.key",
        "encoder_attn.v_proj" => "cross_attn.value",
        "encoder_attn.out_proj" => "cross_attn.out",
        "encoder_attn_layer_norm" => "cross_attn_ln",
        "fc1" => "mlp.0",
        "fc2" => "mlp.2",
        "final_layer_norm" => "mlp_ln",
        _ => return None,
    })
}

/// whisper.cpp's name for a HF state-dict key, `None` for keys it does not read
/// (`proj_out.weight` is the tied token embedding).
fn ggml_name(key: &str) -> Result<Option<String>> {
    let Some(rest) = key.strip_prefix("model.") else {
        return Ok(None);
    };
    if let Some(name) = top_level_name(rest) {
        return Ok(Some(name.to_string()));
    }
    let parts: Vec<&str> = rest.split('.').collect();
    if parts.len() >= 5 && parts[1] == "layers" {
        let (side, index, leaf) = (parts[0], parts[2], parts[parts.len() - 1]);
        let module = parts[3..parts.len() - 1].join(".");
        if let Some(mapped) = layer_module(side, &module) {
            return Ok(Some(format!("{side}.blocks.{index}.{mapped}.{leaf}")));
        }
    }
    bail!("{key}: no whisper.cpp name for this tensor")
}

/// GPT-2's byte-level alphabet inverted: the unicode character standing for each byte.
fn byte_decoder() -> std::collections::HashMap<char, u8> {
    let mut printable: Vec<u32> = (u32::from('!')..=u32::from('~')).collect();
    printable.extend(u32::from('¡')..=u32::from('¬'));
    printable.extend(u32::from('®')..=u32::from('ÿ'));
    let mut map = std::collections::HashMap::new();
    let mut extra = 0;
    for byte in 0..=255u32 {
        let code = if printable.contains(&byte) {
            byte
        } else {
            extra += 1;
            255 + extra
        };
        if let Some(c) = char::from_u32(code) {
            map.insert(c, byte as u8);
        }
    }
    map
}

fn i32s(out: &mut Vec<u8>, values: &[i64]) -> Result<()> {
    for &v in values {
        out.extend_from_slice(&i32::try_from(v).context("a header value does not fit in i32")?.to_le_bytes());
    }
    Ok(())
}

/// Writes `dir/ggml-base.bin` from `dir/hf/` unless it exists.
pub fn convert_if_needed(dir: &Path) -> Result<()> {
    let out = dir.join("ggml-base.bin");
    if out.is_file() || !dir.join("hf").join("model.safetensors").is_file() {
        return Ok(());
    }
    println!("whisper-base: writing whisper.cpp's {}", out.display());
    convert(&dir.join("hf"), &out)
}

/// Writes `out` (a ggml file) from the HF directory `hf`.
pub fn convert(hf: &Path, out: &Path) -> Result<()> {
    let config: Value = serde_json::from_str(&std::fs::read_to_string(hf.join("config.json"))?)?;
    let get = |key: &str| -> Result<i64> {
        config.get(key).and_then(Value::as_i64).with_context(|| format!("{}/config.json: no `{key}`", hf.display()))
    };
    let n_mels = get("num_mel_bins")?;
    let mut bytes = Vec::new();
    i32s(&mut bytes, &[0x6767_6d6c])?;
    i32s(&mut bytes, &[
        get("vocab_size")?,
        get("max_source_positions")?,
        get("d_model")?,
        get("encoder_attention_heads")?,
        get("encoder_layers")?,
        get("max_target_positions")?,
        get("d_model")?,
        get("decoder_attention_heads")?,
        get("decoder_layers")?,
        n_mels,
        1,
    ])?;
    let filters = mel_filters(n_mels as usize, 400, 16_000);
    let bins = filters.first().map_or(0, Vec::len);
    i32s(&mut bytes, &[n_mels, bins as i64])?;
    for row in &filters {
        for &v in row {
            bytes.extend_from_slice(&(v as f32).to_le_bytes());
        }
    }
    let tokenizer: Value = serde_json::from_str(&std::fs::read_to_string(hf.join("tokenizer.json"))?)?;
    let vocab = tokenizer
        .pointer("/model/vocab")
        .and_then(Value::as_object)
        .with_context(|| format!("{}/tokenizer.json: no model.vocab", hf.display()))?;
    let mut tokens: Vec<(i64, &str)> = vocab.iter().filter_map(|(t, id)| Some((id.as_i64()?, t.as_str()))).collect();
    tokens.sort_unstable();
    let decoder = byte_decoder();
    i32s(&mut bytes, &[tokens.len() as i64])?;
    for (id, text) in &tokens {
        let raw: Vec<u8> = text
            .chars()
            .map(|c| decoder.get(&c).copied().with_context(|| format!("token {id} `{text}`: not byte-level BPE")))
            .collect::<Result<_>>()?;
        i32s(&mut bytes, &[raw.len() as i64])?;
        bytes.extend_from_slice(&raw);
    }
    let path = hf.join("model.safetensors");
    let file = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let tensors = SafeTensors::deserialize(&file).with_context(|| format!("parsing {}", path.display()))?;
    let mut names: Vec<String> = tensors.names().into_iter().map(str::to_string).collect();
    names.sort();
    for key in &names {
        let Some(name) = ggml_name(key)? else { continue };
        let view = tensors.tensor(key).with_context(|| format!("{}: {key}", path.display()))?;
        let values = to_f32(view.dtype(), view.data()).with_context(|| format!("{}: {key}", path.display()))?;
        let mut dims = view.shape().to_vec();
        if name.ends_with("conv1.bias") || name.ends_with("conv2.bias") {
            dims = vec![values.len(), 1];
        }
        let f32_kept = dims.len() < 2 || name.ends_with("positional_embedding") || (name.contains(".conv") && name.ends_with("bias"));
        let (ftype, data) = if f32_kept {
            (0, values.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>())
        } else {
            (1, values.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect::<Vec<u8>>())
        };
        i32s(&mut bytes, &[dims.len() as i64, name.len() as i64, ftype])?;
        let reversed: Vec<i64> = dims.iter().rev().map(|&d| d as i64).collect();
        i32s(&mut bytes, &reversed)?;
        bytes.extend_from_slice(name.as_bytes());
        bytes.extend_from_slice(&data);
    }
    let tmp = out.with_extension("tmp");
    std::fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(&bytes))
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, out).with_context(|| format!("renaming {} to {}", tmp.display(), out.display()))
}

/// A tensor's little-endian data widened to f32 (f16 and bf16 exactly).
fn to_f32(dtype: Dtype, data: &[u8]) -> Result<Vec<f32>> {
    Ok(match dtype {
        Dtype::F32 => data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        Dtype::F16 => data.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        Dtype::BF16 => data.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        other => bail!("dtype {other:?} is not a float type this converter reads"),
    })
}

/// Whisper's log-mel filter bank (librosa's Slaney mel scale and norm), the same
/// as `multitoken_audio::mel::mel_filters` (a unit test checks it): kept here so
/// that `cargo xtask weights` links no model crate.
fn mel_filters(n_mels: usize, n_fft: usize, sample_rate: u32) -> Vec<Vec<f64>> {
    // Slaney: linear below 1 kHz, logarithmic above (the audio crate's formulas, verbatim).
    let hertz_to_mel = |freq: f64| {
        let logstep = 27.0 / 6.4f64.ln();
        if freq >= 1000.0 {
            15.0 + (freq / 1000.0).ln() * logstep
        } else {
            3.0 * freq / 200.0
        }
    };
    let mel_to_hertz = |mel: f64| {
        let logstep = 6.4f64.ln() / 27.0;
        if mel >= 15.0 {
            1000.0 * (logstep * (mel - 15.0)).exp()
        } else {
            200.0 * mel / 3.0
        }
    };
    let n_freqs = n_fft / 2 + 1;
    let nyquist = f64::from(sample_rate / 2);
    let mel_min = hertz_to_mel(0.0);
    let mel_max = hertz_to_mel(nyquist);
    let filter_freqs: Vec<f64> = (0..n_mels + 2)
        .map(|i| mel_to_hertz(mel_min + (mel_max - mel_min) * i as f64 / (n_mels + 1) as f64))
        .collect();
    let fft_freqs: Vec<f64> = (0..n_freqs).map(|i| nyquist * i as f64 / (n_freqs - 1).max(1) as f64).collect();
    (0..n_mels)
        .map(|m| {
            let (lower, center, upper) = (filter_freqs[m], filter_freqs[m + 1], filter_freqs[m + 2]);
            let enorm = 2.0 / (upper - lower);
            fft_freqs
                .iter()
                .map(|&f| {
                    let down = (f - lower) / (center - lower);
                    let up = (upper - f) / (upper - center);
                    down.min(up).max(0.0) * enorm
                })
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_names_map_to_whisper_cpp_names() {
        let cases = [
            ("model.encoder.layers.3.self_attn.q_proj.weight", Some("encoder.blocks.3.attn.query.weight")),
            ("model.decoder.layers.0.encoder_attn.k_proj.weight", Some("decoder.blocks.0.cross_attn.key.weight")),
            ("model.decoder.layers.5.fc2.bias", Some("decoder.blocks.5.mlp.2.bias")),
            ("model.encoder.layer_norm.weight", Some("encoder.ln_post.weight")),
            ("model.decoder.embed_tokens.weight", Some("decoder.token_embedding.weight")),
            ("proj_out.weight", None),
        ];
        for (key, want) in cases {
            assert_eq!(ggml_name(key).unwrap().as_deref(), want, "{key}");
        }
        assert!(ggml_name("model.encoder.layers.0.mystery.weight").is_err());
    }

    #[test]
    fn mel_filters_match_the_audio_crate() {
        for n_mels in [80, 128] {
            let ours = mel_filters(n_mels, 400, 16_000);
            let theirs = multitoken_audio::mel::mel_filters(n_mels, 400, multitoken_audio::SAMPLE_RATE);
            assert_eq!(ours, theirs, "{n_mels} mels");
        }
    }

    #[test]
    fn byte_level_alphabet_round_trips_every_byte() {
        let decoder = byte_decoder();
        assert_eq!(decoder.len(), 256);
        assert_eq!(decoder[&'Ġ'], b' ');
        assert_eq!(decoder[&'a'], b'a');
    }
}
