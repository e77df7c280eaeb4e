//! CTranslate2 Whisper `model.bin` -> HF safetensors (`WhisperForConditionalGeneration`
//! key names), `config.json` and `tokenizer.json`, for `cargo xtask weights`.
//!
//! The CTranslate2 layout (`python/ctranslate2/specs/model_spec.py`, `_serialize`):
//!
//! ```text
//! u32 binary version (6) · string spec name · u32 revision · u32 variable count
//! per variable: string name · u8 rank · u32 dims[rank] · u8 dtype · u32 byte count · bytes
//! u32 alias count · per alias: string alias · string variable name
//! string = u16 length (with the NUL) · bytes · NUL; all little-endian
//! dtype: 0 f32, 1 i8, 2 i16, 3 i32, 4 f16, 5 bf16
//! ```
//!
//! Whisper's spec fuses the self-attention q/k/v (`linear_0`, k's bias is zero) and the
//! cross-attention k/v (`attention/linear_1`); they are split back here. Tensors keep
//! their dtype (f16 for this checkpoint); candle and transformers upcast on load.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};

/// One variable of the CTranslate2 file.
struct Variable {
    dims: Vec<usize>,
    dtype: u8,
    bytes: Vec<u8>,
}

/// A tensor to write: safetensors dtype name, shape, bytes.
struct Out {
    dtype: &'static str,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

/// Converts `dir/model.bin` + `dir/config.json` (CTranslate2) + `dir/tokenizer.json` into
/// `dir/hf/` unless `dir/hf/model.safetensors` exists.
pub fn convert_if_needed(dir: &Path) -> Result<()> {
    let out = dir.join("hf");
    if out.join("model.safetensors").is_file() || !dir.join("model.bin").is_file() {
        return Ok(());
    }
    println!("whisper-base: converting CTranslate2 model.bin to {}", out.display());
    convert(dir, &out)
}

/// Converts a CTranslate2 Whisper directory into a HF directory `out`.
pub fn convert(dir: &Path, out: &Path) -> Result<()> {
    let bin = std::fs::read(dir.join("model.bin")).with_context(|| format!("reading {}/model.bin", dir.display()))?;
    let (spec, variables) = parse(&bin)?;
    ensure!(spec == "WhisperSpec", "{}: spec `{spec}` is not WhisperSpec", dir.display());
    let ct2_config: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json"))?)?;
    let (tensors, config) = to_hf(&variables, &ct2_config)?;
    std::fs::create_dir_all(out)?;
    write_safetensors(&out.join("model.safetensors"), &tensors)?;
    std::fs::write(out.join("config.json"), serde_json::to_string_pretty(&config)?)?;
    std::fs::copy(dir.join("tokenizer.json"), out.join("tokenizer.json"))
        .with_context(|| format!("copying {}/tokenizer.json", dir.display()))?;
    Ok(())
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        let end = self.pos.checked_add(n).filter(|e| *e <= self.data.len());
        let Some(end) = end else { bail!("model.bin ends early at byte {} (wanted {n} more)", self.pos) };
        let slice = &self.data[self.pos..end];
        self.pos = end;
        Ok(slice)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn string(&mut self) -> Result<String> {
        let n = self.u16()? as usize;
        let bytes = self.take(n)?;
        let text = bytes.strip_suffix(&[0]).unwrap_or(bytes);
        Ok(String::from_utf8_lossy(text).into_owned())
    }
}

fn parse(data: &[u8]) -> Result<(String, BTreeMap<String, Variable>)> {
    let mut r = Reader { data, pos: 0 };
    let version = r.u32()?;
    ensure!((5..=6).contains(&version), "CTranslate2 binary version {version} (5 or 6 supported)");
    let spec = r.string()?;
    let _revision = r.u32()?;
    let count = r.u32()?;
    let mut variables = BTreeMap::new();
    for _ in 0..count {
        let name = r.string()?;
        let rank = r.u8()? as usize;
        let dims = (0..rank).map(|_| r.u32().map(|d| d as usize)).collect::<Result<Vec<_>>>()?;
        let dtype = r.u8()?;
        let n = r.u32()? as usize;
        let bytes = r.take(n)?.to_vec();
        variables.insert(name, Variable { dims, dtype, bytes });
    }
    let aliases = r.u32()?;
    for _ in 0..aliases {
        let alias = r.string()?;
        let target = r.string()?;
        let Some(v) = variables.get(&target) else { bail!("alias {alias} -> missing {target}") };
        let copy = Variable { dims: v.dims.clone(), dtype: v.dtype, bytes: v.bytes.clone() };
        variables.insert(alias, copy);
    }
    Ok((spec, variables))
}

fn dtype_info(dtype: u8) -> Result<(&'static str, usize)> {
    Ok(match dtype {
        0 => ("F32", 4),
        1 => ("I8", 1),
        2 => ("I16", 2),
        3 => ("I32", 4),
        4 => ("F16", 2),
        5 => ("BF16", 2),
        other => bail!("unknown CTranslate2 dtype id {other}"),
    })
}

fn scalar_i64(vars: &BTreeMap<String, Variable>, name: &str) -> Result<i64> {
    let v = vars.get(name).with_context(|| format!("model.bin has no `{name}`"))?;
    Ok(match v.dtype {
        1 => i64::from(v.bytes[0] as i8),
        2 => i64::from(i16::from_le_bytes([v.bytes[0], v.bytes[1]])),
        3 => i64::from(i32::from_le_bytes([v.bytes[0], v.bytes[1], v.bytes[2], v.bytes[3]])),
        other => bail!("`{name}` has dtype {other}, expected an integer scalar"),
    })
}

/// Whole tensor, or rows `part` of `parts` equal slices along dim 0.
fn tensor(vars: &BTreeMap<String, Variable>, name: &str, part: Option<(usize, usize)>) -> Result<Out> {
    let v = vars.get(name).with_context(|| format!("model.bin has no `{name}`"))?;
    let (dtype, size) = dtype_info(v.dtype)?;
    let numel: usize = v.dims.iter().product();
    ensure!(v.bytes.len() == numel * size, "`{name}`: {} bytes for shape {:?}", v.bytes.len(), v.dims);
    let Some((index, parts)) = part else {
        return Ok(Out { dtype, shape: v.dims.clone(), bytes: v.bytes.clone() });
    };
    ensure!(!v.dims.is_empty() && v.dims[0] % parts == 0, "`{name}` {:?} does not split in {parts}", v.dims);
    let mut shape = v.dims.clone();
    shape[0] /= parts;
    let chunk = numel / parts * size;
    Ok(Out { dtype, shape, bytes: v.bytes[index * chunk..(index + 1) * chunk].to_vec() })
}

fn to_hf(vars: &BTreeMap<String, Variable>, ct2: &Value) -> Result<(BTreeMap<String, Out>, Value)> {
    let count_layers = |side: &str| (0..).take_while(|i| vars.contains_key(&format!("{side}/layer_{i}/ffn/linear_0/weight"))).count();
    let (enc_layers, dec_layers) = (count_layers("encoder"), count_layers("decoder"));
    ensure!(enc_layers > 0 && dec_layers > 0, "no encoder/decoder layers in model.bin");
    let mut t = BTreeMap::new();
    let mut put = |key: String, out: Out| {
        t.insert(key, out);
    };
    let norm = |src: &str| -> Result<[Out; 2]> {
        Ok([tensor(vars, &format!("{src}/gamma"), None)?, tensor(vars, &format!("{src}/beta"), None)?])
    };
    let put_norm = |put: &mut dyn FnMut(String, Out), dst: &str, src: &str| -> Result<()> {
        let [g, b] = norm(src)?;
        put(format!("{dst}.weight"), g);
        put(format!("{dst}.bias"), b);
        Ok(())
    };
    let linear = |put: &mut dyn FnMut(String, Out), dst: &str, src: &str, part: Option<(usize, usize)>, bias: bool| -> Result<()> {
        put(format!("{dst}.weight"), tensor(vars, &format!("{src}/weight"), part)?);
        if bias {
            put(format!("{dst}.bias"), tensor(vars, &format!("{src}/bias"), part)?);
        }
        Ok(())
    };
    for (side, layers) in [("encoder", enc_layers), ("decoder", dec_layers)] {
        let hf = format!("model.{side}");
        for i in 0..layers {
            let (src, dst) = (format!("{side}/layer_{i}"), format!("{hf}.layers.{i}"));
            let sa = format!("{src}/self_attention");
            put_norm(&mut put, &format!("{dst}.self_attn_layer_norm"), &format!("{sa}/layer_norm"))?;
            for (k, name) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
                linear(&mut put, &format!("{dst}.self_attn.{name}"), &format!("{sa}/linear_0"), Some((k, 3)), *name != "k_proj")?;
            }
            linear(&mut put, &format!("{dst}.self_attn.out_proj"), &format!("{sa}/linear_1"), None, true)?;
            if side == "decoder" {
                let ca = format!("{src}/attention");
                put_norm(&mut put, &format!("{dst}.encoder_attn_layer_norm"), &format!("{ca}/layer_norm"))?;
                linear(&mut put, &format!("{dst}.encoder_attn.q_proj"), &format!("{ca}/linear_0"), None, true)?;
                linear(&mut put, &format!("{dst}.encoder_attn.k_proj"), &format!("{ca}/linear_1"), Some((0, 2)), false)?;
                linear(&mut put, &format!("{dst}.encoder_attn.v_proj"), &format!("{ca}/linear_1"), Some((1, 2)), true)?;
                linear(&mut put, &format!("{dst}.encoder_attn.out_proj"), &format!("{ca}/linear_2"), None, true)?;
            }
            put_norm(&mut put, &format!("{dst}.final_layer_norm"), &format!("{src}/ffn/layer_norm"))?;
            linear(&mut put, &format!("{dst}.fc1"), &format!("{src}/ffn/linear_0"), None, true)?;
            linear(&mut put, &format!("{dst}.fc2"), &format!("{src}/ffn/linear_1"), None, true)?;
        }
        put_norm(&mut put, &format!("{hf}.layer_norm"), &format!("{side}/layer_norm"))?;
        put(format!("{hf}.embed_positions.weight"), tensor(vars, &format!("{side}/position_encodings/encodings"), None)?);
    }
    for conv in ["conv1", "conv2"] {
        linear(&mut put, &format!("model.encoder.{conv}"), &format!("encoder/{conv}"), None, true)?;
    }
    put("model.decoder.embed_tokens.weight".to_string(), tensor(vars, "decoder/embeddings/weight", None)?);

    let dims = |name: &str| vars.get(name).map(|v| v.dims.clone()).unwrap_or_default();
    let embed = dims("decoder/embeddings/weight");
    let (vocab, d_model) = (embed.first().copied().unwrap_or(0), embed.get(1).copied().unwrap_or(0));
    let mel_bins = dims("encoder/conv1/weight").get(1).copied().unwrap_or(80);
    let ffn = |side: &str| dims(&format!("{side}/layer_0/ffn/linear_0/weight")).first().copied().unwrap_or(0);
    let positions = |side: &str| dims(&format!("{side}/position_encodings/encodings")).first().copied().unwrap_or(0);
    let list = |key: &str| ct2.get(key).cloned().unwrap_or_else(|| json!([]));
    let config = json!({
        "architectures": ["WhisperForConditionalGeneration"],
        "model_type": "whisper",
        "vocab_size": vocab,
        "num_mel_bins": mel_bins,
        "d_model": d_model,
        "encoder_layers": enc_layers,
        "decoder_layers": dec_layers,
        "encoder_attention_heads": scalar_i64(vars, "encoder/num_heads")?,
        "decoder_attention_heads": scalar_i64(vars, "decoder/num_heads")?,
        "encoder_ffn_dim": ffn("encoder"),
        "decoder_ffn_dim": ffn("decoder"),
        "max_source_positions": positions("encoder"),
        "max_target_positions": positions("decoder"),
        "activation_function": "gelu",
        "scale_embedding": false,
        "tie_word_embeddings": true,
        "pad_token_id": 50257,
        "bos_token_id": 50257,
        "eos_token_id": 50257,
        "decoder_start_token_id": 50258,
        "suppress_tokens": list("suppress_ids"),
        "begin_suppress_tokens": list("suppress_ids_begin"),
        "lang_ids": list("lang_ids"),
        "torch_dtype": "float16",
    });
    Ok((t, config))
}

fn write_safetensors(path: &Path, tensors: &BTreeMap<String, Out>) -> Result<()> {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, t) in tensors {
        let end = offset + t.bytes.len();
        header.insert(name.clone(), json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [offset, end]}));
        offset = end;
    }
    header.insert("__metadata__".to_string(), json!({"format": "pt", "source": "CTranslate2 model.bin"}));
    let mut text = serde_json::to_string(&Value::Object(header))?;
    while text.len() % 8 != 0 {
        text.push(' ');
    }
    let partial = path.with_extension("safetensors.partial");
    {
        let mut file = std::io::BufWriter::new(std::fs::File::create(&partial)?);
        file.write_all(&(text.len() as u64).to_le_bytes())?;
        file.write_all(text.as_bytes())?;
        for t in tensors.values() {
            file.write_all(&t.bytes)?;
        }
        file.flush()?;
    }
    std::fs::rename(&partial, path)?;
    Ok(())
}
