//! A `tokenizers::Tokenizer` rebuilt from a GGUF file's `tokenizer.ggml.*` metadata.
//!
//! A GGUF carries no `tokenizer.json`, only the vocabulary, the merges, token types and
//! special ids under llama.cpp's key names. For byte-level BPE vocabularies
//! (`tokenizer.ggml.model = "gpt2"`) we write the `tokenizer.json` the original
//! checkpoint had and parse it, which keeps every component exactly the one HF uses:
//!
//! - model: BPE over the byte-level alphabet (tokens not spelled in that alphabet are
//!   respelled byte by byte, as transformers' GGUF loader does);
//! - pre-tokenizer chosen by `tokenizer.ggml.pre`: `smollm` is SmolLM2's own
//!   `Digits(individual) + ByteLevel(regex)`, the llama-3 and qwen2 families split with
//!   their regex first, anything else is GPT-2's `ByteLevel(regex)`;
//! - control tokens (type 3) become special added tokens, user-defined ones (type 4)
//!   plain added tokens, so `<|im_start|>` is never cut into pieces;
//! - BOS/EOS are added only when `tokenizer.ggml.add_bos_token` / `add_eos_token` say
//!   so (SmolLM2 adds none).

use std::collections::{HashMap, HashSet};
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use serde_json::{json, Map, Value as Json};

use crate::{Error, Result};

/// What the tokenizer metadata says besides the tokenizer itself.
#[derive(Debug, Clone)]
pub struct GgufTokenizer {
    /// The rebuilt tokenizer.
    pub tokenizer: tokenizers::Tokenizer,
    /// Every token string, by id, as the file spells it.
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.bos_token_id`.
    pub bos_token_id: Option<u32>,
    /// `tokenizer.ggml.eos_token_id`.
    pub eos_token_id: Option<u32>,
    /// `tokenizer.ggml.eot_token_id` / `eom_token_id` (end of turn / message).
    pub extra_eos_token_ids: Vec<u32>,
    /// `tokenizer.ggml.padding_token_id`.
    pub pad_token_id: Option<u32>,
    /// `tokenizer.chat_template`.
    pub chat_template: Option<String>,
}

/// llama-3's split regex (llama.cpp `llama-bpe`).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's split regex (single digits).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GPT-2's byte-to-character table: printable bytes map to themselves, the others to
/// code points from U+0100 on, in byte order.
pub fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        table[b as usize] = if printable {
            char::from(b)
        } else {
            let c = char::from_u32(next).unwrap_or('\u{FFFD}');
            next += 1;
            c
        };
    }
    table
}

fn meta_err(path: &Path, message: impl Into<String>) -> Error {
    Error::Config { path: path.to_path_buf(), message: message.into() }
}

fn opt_u32(content: &Content, key: &str) -> Option<u32> {
    content.metadata.get(key).and_then(|v| v.to_u32().ok().or_else(|| v.to_i32().ok().map(|i| i as u32)))
}

fn opt_bool(content: &Content, key: &str) -> Option<bool> {
    content.metadata.get(key).and_then(|v| v.to_bool().ok())
}

fn string_array(path: &Path, content: &Content, key: &str) -> Result<Option<Vec<String>>> {
    let Some(value) = content.metadata.get(key) else { return Ok(None) };
    let items = value.to_vec().map_err(|_| meta_err(path, format!("`{key}` is not an array")))?;
    items
        .iter()
        .map(|v| v.to_string().cloned().map_err(|_| meta_err(path, format!("`{key}` holds a non-string"))))
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

fn int_array(path: &Path, content: &Content, key: &str) -> Result<Option<Vec<i64>>> {
    let Some(value) = content.metadata.get(key) else { return Ok(None) };
    let items = value.to_vec().map_err(|_| meta_err(path, format!("`{key}` is not an array")))?;
    items
        .iter()
        .map(|v| match v {
            Value::I32(i) => Ok(*i as i64),
            Value::U32(u) => Ok(*u as i64),
            Value::I8(i) => Ok(*i as i64),
            Value::U8(u) => Ok(*u as i64),
            Value::I64(i) => Ok(*i),
            Value::U64(u) => Ok(*u as i64),
            _ => Err(meta_err(path, format!("`{key}` holds a non-integer"))),
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

/// Rebuilds the tokenizer described by the metadata of the GGUF at `path`.
pub fn tokenizer_from_gguf(path: &Path, content: &Content) -> Result<GgufTokenizer> {
    let model = content
        .metadata
        .get("tokenizer.ggml.model")
        .and_then(|v| v.to_string().ok())
        .ok_or_else(|| meta_err(path, "no `tokenizer.ggml.model` in the GGUF metadata"))?;
    if model != "gpt2" {
        return Err(meta_err(
            path,
            format!("GGUF tokenizer `{model}` is not supported (supported: gpt2, i.e. byte-level BPE)"),
        ));
    }
    let tokens = string_array(path, content, "tokenizer.ggml.tokens")?
        .ok_or_else(|| meta_err(path, "no `tokenizer.ggml.tokens` in the GGUF metadata"))?;
    let merges = string_array(path, content, "tokenizer.ggml.merges")?
        .ok_or_else(|| meta_err(path, "no `tokenizer.ggml.merges` in the GGUF metadata"))?;
    let token_types = int_array(path, content, "tokenizer.ggml.token_type")?.unwrap_or_default();
    let pre = content.metadata.get("tokenizer.ggml.pre").and_then(|v| v.to_string().ok()).cloned();

    let spelling = bytes_to_unicode();
    let alphabet: HashSet<char> = spelling.iter().copied().collect();
    let spell = |token: &str| -> String {
        if token.chars().all(|c| alphabet.contains(&c)) {
            token.to_string()
        } else {
            token.bytes().map(|b| spelling[b as usize]).collect()
        }
    };

    let mut vocab = Map::new();
    let mut spelled: Vec<String> = Vec::with_capacity(tokens.len());
    for (id, token) in tokens.iter().enumerate() {
        let s = spell(token);
        if !vocab.contains_key(&s) {
            vocab.insert(s.clone(), json!(id));
        }
        spelled.push(s);
    }
    let merges_json: Vec<Json> = merges
        .iter()
        .enumerate()
        .map(|(i, m)| match m.split_once(' ') {
            Some((a, b)) => Ok(json!([a, b])),
            None => Err(meta_err(path, format!("tokenizer.ggml.merges[{i}] = {m:?} is not `left right`"))),
        })
        .collect::<Result<_>>()?;

    let mut added_tokens = Vec::new();
    for (id, (token, &kind)) in tokens.iter().zip(&token_types).enumerate() {
        // 3 = CONTROL (special), 4 = USER_DEFINED (added, not special). A control token
        // not spelled in the byte alphabet is a llama.cpp mislabel: skipped, as
        // transformers does.
        let special = match kind {
            3 if token.chars().all(|c| alphabet.contains(&c)) => true,
            4 => false,
            _ => continue,
        };
        added_tokens.push(json!({
            "id": id, "content": token, "single_word": false, "lstrip": false, "rstrip": false,
            "normalized": false, "special": special
        }));
    }

    let bos_token_id = opt_u32(content, "tokenizer.ggml.bos_token_id");
    let eos_token_id = opt_u32(content, "tokenizer.ggml.eos_token_id");
    let token_text = |id: Option<u32>| id.and_then(|i| tokens.get(i as usize)).cloned();
    let add_bos = opt_bool(content, "tokenizer.ggml.add_bos_token").unwrap_or(false);
    let add_eos = opt_bool(content, "tokenizer.ggml.add_eos_token").unwrap_or(false);
    let bos = if add_bos { bos_token_id.zip(token_text(bos_token_id)) } else { None };
    let eos = if add_eos { eos_token_id.zip(token_text(eos_token_id)) } else { None };

    let json = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer(pre.as_deref()),
        "post_processor": post_processor(bos, eos),
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges_json
        }
    });
    let tokenizer: tokenizers::Tokenizer = json
        .to_string()
        .parse()
        .map_err(|e| Error::Tokenizer(format!("{}: rebuilding the tokenizer from GGUF metadata: {e}", path.display())))?;

    let mut extra_eos_token_ids = Vec::new();
    for key in ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
        if let Some(id) = opt_u32(content, key) {
            if Some(id) != eos_token_id && !extra_eos_token_ids.contains(&id) {
                extra_eos_token_ids.push(id);
            }
        }
    }
    let chat_template = content.metadata.get("tokenizer.chat_template").and_then(|v| v.to_string().ok()).cloned();
    Ok(GgufTokenizer {
        tokenizer,
        tokens,
        bos_token_id,
        eos_token_id,
        extra_eos_token_ids,
        pad_token_id: opt_u32(content, "tokenizer.ggml.padding_token_id"),
        chat_template,
    })
}

/// The pre-tokenizer the vocabulary's merges were learned with.
fn pre_tokenizer(pre: Option<&str>) -> Json {
    let byte_level = |use_regex: bool| {
        json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
    };
    let split = |regex: &str| {
        json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
            byte_level(false)
        ]})
    };
    match pre {
        // SmolLM / SmolLM2 tokenizer.json: digits one by one, then GPT-2's byte level.
        Some("smollm") => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            byte_level(true)
        ]}),
        Some("llama3" | "llama-v3" | "llama-bpe" | "smaug-bpe" | "dbrx" | "falcon3" | "pixtral") => split(LLAMA3_SPLIT),
        Some("qwen2" | "deepseek-r1-qwen") => split(QWEN2_SPLIT),
        _ => byte_level(true),
    }
}

/// ByteLevel offsets only, or a template adding BOS/EOS when the file asks for it.
fn post_processor(bos: Option<(u32, String)>, eos: Option<(u32, String)>) -> Json {
    if bos.is_none() && eos.is_none() {
        return json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true});
    }
    let mut special_tokens: HashMap<String, Json> = HashMap::new();
    let piece = |t: &(u32, String)| json!({"SpecialToken": {"id": t.1, "type_id": 0}});
    let mut single = Vec::new();
    let mut pair = Vec::new();
    if let Some(b) = &bos {
        single.push(piece(b));
        pair.push(piece(b));
        special_tokens.insert(b.1.clone(), json!({"id": b.1, "ids": [b.0], "tokens": [b.1]}));
    }
    single.push(json!({"Sequence": {"id": "A", "type_id": 0}}));
    pair.push(json!({"Sequence": {"id": "A", "type_id": 0}}));
    if let Some(e) = &eos {
        single.push(piece(e));
        pair.push(piece(e));
        special_tokens.insert(e.1.clone(), json!({"id": e.1, "ids": [e.0], "tokens": [e.1]}));
    }
    if let Some(b) = &bos {
        pair.push(json!({"SpecialToken": {"id": b.1, "type_id": 1}}));
    }
    pair.push(json!({"Sequence": {"id": "B", "type_id": 1}}));
    if let Some(e) = &eos {
        pair.push(json!({"SpecialToken": {"id": e.1, "type_id": 1}}));
    }
    json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": special_tokens})
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn byte_table_matches_gpt2() {
        // (byte, character) pairs from GPT-2's encoder.
        let t = bytes_to_unicode();
        let cases = [(b'!', '!'), (b'a', 'a'), (b' ', 'Ġ'), (b'\n', 'Ċ'), (0u8, 'Ā'), (0xAD, 'Ń'), (0xFF, 'ÿ')];
        for (b, c) in cases {
            assert_eq!(t[b as usize], c, "byte {b:#x}");
        }
        let distinct: HashSet<char> = t.iter().copied().collect();
        assert_eq!(distinct.len(), 256);
    }
}
