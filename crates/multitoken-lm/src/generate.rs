//! The generation loop shared by `multitoken generate`, `multitoken chat` and the server.
//!
//! One prefill forward over the prompt embeddings (which may hold spliced modality
//! features), then one forward per new token through the KV cache, logits for the last
//! position only, computed in f32 for sampling. Text is streamed as it becomes valid
//! UTF-8 (a character split across byte-level tokens is held back until complete), and
//! text that might be the start of a stop string is held back until it is known not to
//! be one, so a stop string never reaches the caller.

use std::time::Instant;

use candle_core::{DType, Tensor};
use multitoken_core::{KvCache, LanguageModel, LogitsSelection};

use crate::sampling::{Sampler, SamplingParams};
use crate::{Error, Result};

/// Everything that controls one generation.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationParams {
    /// How each token is chosen.
    pub sampling: SamplingParams,
    /// Most new tokens to generate.
    pub max_new_tokens: usize,
    /// Generation stops when the text contains one of these; the text is cut before it.
    pub stop_strings: Vec<String>,
    /// Ids that end generation (from generation_config.json or GGUF metadata).
    pub eos_token_ids: Vec<u32>,
    /// Generate exactly `max_new_tokens` (unless a stop string or the context ends it):
    /// the EOS ids are never chosen, as transformers' `min_new_tokens` does, so greedy
    /// ids equal `generate(min_new_tokens=N, max_new_tokens=N)`.
    pub ignore_eos: bool,
}

impl Default for GenerationParams {
    /// Greedy, 256 new tokens, no stop strings, no EOS ids.
    fn default() -> Self {
        Self {
            sampling: SamplingParams::default(),
            max_new_tokens: 256,
            stop_strings: Vec::new(),
            eos_token_ids: Vec::new(),
            ignore_eos: false,
        }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An EOS id was generated.
    Eos,
    /// `max_new_tokens` were generated, or the model's context is full.
    Length,
    /// A stop string appeared, or the text callback asked to stop.
    Stop,
}

impl FinishReason {
    /// The lower-case name (`"eos"`, `"length"`, `"stop"`).
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Eos => "eos",
            FinishReason::Length => "length",
            FinishReason::Stop => "stop",
        }
    }
}

/// The result of one generation.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationOutput {
    /// The new ids only (an EOS id that ended generation included, as transformers
    /// returns it).
    pub token_ids: Vec<u32>,
    /// The new text, special tokens skipped, cut before a stop string.
    pub text: String,
    /// Length of the prompt in positions.
    pub prompt_tokens: usize,
    /// Why generation ended.
    pub finish_reason: FinishReason,
    /// Prompt positions per second of the prefill forward (first token included).
    pub prefill_tok_s: f64,
    /// New tokens per second after the first (0 when fewer than two were generated).
    pub decode_tok_s: f64,
}

/// Generates from prompt embeddings `[1, t, hidden]` (text embeddings with any modality
/// features spliced in); `prompt_ids` are the ids behind them (placeholders included),
/// used for the repetition penalty. `on_text` receives each new piece of text and
/// returns `false` to stop.
///
/// A prompt that fills the model's context is an error; otherwise generation stops
/// with [`FinishReason::Length`] when the context is full.
pub fn generate(
    model: &dyn LanguageModel,
    tokenizer: &tokenizers::Tokenizer,
    prompt_embeds: &Tensor,
    prompt_ids: &[u32],
    params: &GenerationParams,
    on_text: &mut dyn FnMut(&str) -> bool,
) -> Result<GenerationOutput> {
    generate_at(model, tokenizer, prompt_embeds, prompt_ids, None, params, on_text)
}

/// [`generate`] with the prompt at explicit M-RoPE positions `[3, 1, t]`
/// ([`multitoken_core::RopePositions::to_tensor`]); the new tokens continue
/// from the prompt's largest position ([`LanguageModel::forward_embeds_at`]).
pub fn generate_at(
    model: &dyn LanguageModel,
    tokenizer: &tokenizers::Tokenizer,
    prompt_embeds: &Tensor,
    prompt_ids: &[u32],
    positions: Option<&Tensor>,
    params: &GenerationParams,
    on_text: &mut dyn FnMut(&str) -> bool,
) -> Result<GenerationOutput> {
    let (batch, prompt_len, hidden) = prompt_embeds.dims3()?;
    if batch != 1 {
        return Err(Error::Msg(format!("generate takes one prompt at a time, got a batch of {batch}")));
    }
    if hidden != model.hidden_size() {
        return Err(Error::Msg(format!(
            "prompt embeddings have width {hidden}, the model's hidden size is {}",
            model.hidden_size()
        )));
    }
    if prompt_len == 0 {
        return Err(Error::Msg("the prompt is empty".into()));
    }
    let max_context = model.max_context();
    if prompt_len >= max_context {
        return Err(Error::Msg(format!(
            "the prompt has {prompt_len} tokens, which leaves no room in the model's context of {max_context}"
        )));
    }
    let mut sampler = Sampler::new(params.sampling.clone())?;
    let mut stream = TextStream::new(tokenizer, &params.stop_strings);
    let mut seen: Vec<u32> = prompt_ids.to_vec();
    let mut token_ids = Vec::new();
    let output = |token_ids: Vec<u32>, stream: TextStream, reason, prefill: f64, decode: f64| GenerationOutput {
        token_ids,
        text: stream.text,
        prompt_tokens: prompt_len,
        finish_reason: reason,
        prefill_tok_s: prefill,
        decode_tok_s: decode,
    };
    if params.max_new_tokens == 0 {
        return Ok(output(token_ids, stream, FinishReason::Length, 0.0, 0.0));
    }

    let mut cache = KvCache::new(model.num_layers());
    let profiling = crate::profile::enabled();
    let before_prefill = crate::profile::snapshot();
    let start = Instant::now();
    let logits = model.forward_embeds_at(prompt_embeds, None, &mut cache, LogitsSelection::Last, positions)?;
    let mut next = pick(&mut sampler, &logits, &seen, params)?;
    let prefill_secs = start.elapsed().as_secs_f64();
    let prefill_tok_s = rate(prompt_len, prefill_secs);
    let before_decode = crate::profile::snapshot();
    if profiling {
        let parts = before_decode.since(&before_prefill);
        crate::profile::record_phase("prefill", crate::profile::Phase { wall_s: prefill_secs, tokens: prompt_len, parts });
    }

    let decode_start = Instant::now();
    let finish = loop {
        token_ids.push(next);
        seen.push(next);
        let is_eos = !params.ignore_eos && params.eos_token_ids.contains(&next);
        if is_eos {
            break FinishReason::Eos;
        }
        match stream.push(&token_ids, on_text)? {
            StreamState::Continue => {}
            StreamState::Stop => break FinishReason::Stop,
        }
        if token_ids.len() >= params.max_new_tokens || prompt_len + token_ids.len() >= max_context {
            break FinishReason::Length;
        }
        let ids = Tensor::new(&[[next]], model.device())?;
        let embeds = model.embed_tokens(&ids)?;
        let logits = model.forward_embeds(&embeds, None, &mut cache, LogitsSelection::Last)?;
        next = pick(&mut sampler, &logits, &seen, params)?;
    };
    let decode_secs = decode_start.elapsed().as_secs_f64();
    if profiling {
        // Steps: every new token after the first came from one decode forward.
        let parts = crate::profile::snapshot().since(&before_decode);
        let steps = token_ids.len().saturating_sub(1);
        crate::profile::record_phase("decode", crate::profile::Phase { wall_s: decode_secs, tokens: steps, parts });
    }
    if finish != FinishReason::Stop {
        stream.flush(on_text);
    }
    let decode_tok_s = rate(token_ids.len().saturating_sub(1), decode_secs);
    Ok(output(token_ids, stream, finish, prefill_tok_s, decode_tok_s))
}

/// The next id from last-position logits; with `ignore_eos` the EOS ids are masked
/// out first (transformers' MinNewTokensLengthLogitsProcessor sets them to -inf).
fn pick(sampler: &mut Sampler, logits: &Tensor, seen: &[u32], params: &GenerationParams) -> Result<u32> {
    let _profile = crate::profile::scope(crate::profile::Part::Sampling);
    let logits = logits.flatten_all()?.to_dtype(DType::F32)?;
    if !params.ignore_eos || params.eos_token_ids.is_empty() {
        return sampler.sample_tensor(&logits, seen);
    }
    let mut row = logits.to_vec1::<f32>()?;
    for &id in &params.eos_token_ids {
        if let Some(value) = row.get_mut(id as usize) {
            *value = f32::NEG_INFINITY;
        }
    }
    sampler.sample(&mut row, seen)
}

/// [`generate`] from token ids: embeds them with the model's own embedding table.
pub fn generate_from_ids(
    model: &dyn LanguageModel,
    tokenizer: &tokenizers::Tokenizer,
    prompt_ids: &[u32],
    params: &GenerationParams,
    on_text: &mut dyn FnMut(&str) -> bool,
) -> Result<GenerationOutput> {
    if prompt_ids.is_empty() {
        return Err(Error::Msg("the prompt is empty".into()));
    }
    let ids = Tensor::new(prompt_ids, model.device())?.unsqueeze(0)?;
    let embeds = model.embed_tokens(&ids)?;
    generate(model, tokenizer, &embeds, prompt_ids, params, on_text)
}

fn rate(count: usize, secs: f64) -> f64 {
    if count == 0 || secs <= 0.0 {
        0.0
    } else {
        count as f64 / secs
    }
}

/// Whether the caller should keep generating after a piece of text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StreamState {
    Continue,
    Stop,
}

/// Incremental detokenizer with stop strings.
///
/// Decoding a window that starts a few tokens back (`prefix_offset`) and comparing with
/// the same window without the newest tokens gives the new text exactly, also for
/// decoders that strip a leading space from the first token of a sequence; the text is
/// held while it ends in U+FFFD (a multi-byte character cut between tokens).
struct TextStream<'a> {
    tokenizer: &'a tokenizers::Tokenizer,
    stop_strings: &'a [String],
    /// Start of the decode window.
    prefix_offset: usize,
    /// Tokens before this index have been turned into text.
    read_offset: usize,
    /// All decoded text (emitted plus held back).
    text: String,
    /// Bytes of `text` given to the callback.
    emitted: usize,
}

impl<'a> TextStream<'a> {
    fn new(tokenizer: &'a tokenizers::Tokenizer, stop_strings: &'a [String]) -> Self {
        Self { tokenizer, stop_strings, prefix_offset: 0, read_offset: 0, text: String::new(), emitted: 0 }
    }

    fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer.decode(ids, true).map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// Takes the new tokens at the end of `ids`, emits what is final.
    fn push(&mut self, ids: &[u32], on_text: &mut dyn FnMut(&str) -> bool) -> Result<StreamState> {
        let prefix = self.decode(&ids[self.prefix_offset..self.read_offset])?;
        let full = self.decode(&ids[self.prefix_offset..])?;
        if full.len() <= prefix.len() || full.ends_with('\u{FFFD}') || !full.starts_with(&prefix) {
            return Ok(StreamState::Continue);
        }
        let piece = &full[prefix.len()..];
        self.text.push_str(piece);
        self.prefix_offset = self.read_offset;
        self.read_offset = ids.len();

        // A stop string can only start in text not yet emitted (held back below).
        if let Some(pos) = self.find_stop() {
            self.text.truncate(pos);
            self.emit_until(pos, on_text);
            return Ok(StreamState::Stop);
        }
        let hold = self.held_back_len();
        let until = self.text.len() - hold;
        if !self.emit_until(until, on_text) {
            return Ok(StreamState::Stop);
        }
        Ok(StreamState::Continue)
    }

    /// Emits all remaining text (at EOS or length).
    fn flush(&mut self, on_text: &mut dyn FnMut(&str) -> bool) {
        let end = self.text.len();
        self.emit_until(end, on_text);
    }

    /// Gives `text[emitted..until]` to the callback; returns its answer.
    fn emit_until(&mut self, until: usize, on_text: &mut dyn FnMut(&str) -> bool) -> bool {
        if until <= self.emitted {
            return true;
        }
        let keep_going = match self.text.get(self.emitted..until) {
            Some(piece) => on_text(piece),
            None => true,
        };
        self.emitted = until;
        keep_going
    }

    /// Byte offset of the first stop string in the text.
    fn find_stop(&self) -> Option<usize> {
        let longest = self.stop_strings.iter().map(String::len).max()?;
        let mut from = self.emitted.saturating_sub(longest);
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        let window = &self.text[from..];
        self.stop_strings
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| window.find(s.as_str()))
            .min()
            .map(|p| from + p)
    }

    /// Length of the longest suffix of the text that starts some stop string.
    fn held_back_len(&self) -> usize {
        let mut hold = 0;
        for stop in self.stop_strings {
            for (i, _) in stop.char_indices().skip(1) {
                let head = &stop[..i];
                if i > hold && self.text.ends_with(head) {
                    hold = i;
                }
            }
        }
        hold.min(self.text.len() - self.emitted)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    /// A byte-level tokenizer whose ids are bytes: every id decodes to one byte, so a
    /// multi-byte character spans several ids.
    fn byte_tokenizer() -> tokenizers::Tokenizer {
        let mut vocab = serde_json::Map::new();
        let spelling = crate::gguf::bytes_to_unicode();
        for b in 0..=255u8 {
            vocab.insert(spelling[b as usize].to_string(), serde_json::json!(b as u32));
        }
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                      "vocab": vocab, "merges": []}
        });
        json.to_string().parse().unwrap()
    }

    fn stream(text: &str, stops: &[&str]) -> (Vec<String>, String, StreamState) {
        let tokenizer = byte_tokenizer();
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut s = TextStream::new(&tokenizer, &stops);
        let mut pieces = Vec::new();
        let mut ids = Vec::new();
        let mut state = StreamState::Continue;
        for b in text.bytes() {
            ids.push(b as u32);
            state = s.push(&ids, &mut |p| {
                pieces.push(p.to_string());
                true
            })
            .unwrap();
            if state == StreamState::Stop {
                break;
            }
        }
        if state == StreamState::Continue {
            s.flush(&mut |p| {
                pieces.push(p.to_string());
                true
            });
        }
        (pieces, s.text, state)
    }

    #[test]
    fn streams_whole_characters_and_cuts_at_stop_strings() {
        // (generated text, stop strings, expected streamed pieces, final text, stopped)
        type Case<'a> = (&'a str, &'a [&'a str], &'a [&'a str], &'a str, bool);
        let cases: &[Case] = &[
            ("ab", &[], &["a", "b"], "ab", false),
            // "é" is two bytes and "🤖" four: each arrives in one piece.
            ("é🤖x", &[], &["é", "🤖", "x"], "é🤖x", false),
            // the stop string never reaches the callback.
            ("hi\nUser: x", &["\nUser:"], &["h", "i"], "hi", true),
            // a false start is released when it stops matching.
            ("a\nUb", &["\nUser:"], &["a", "\nUb"], "a\nUb", false),
            // held-back text is flushed at the end.
            ("a\nUs", &["\nUser:"], &["a", "\nUs"], "a\nUs", false),
            // the earliest of several stop strings wins.
            ("xyEND", &["END", "yE"], &["x"], "x", true),
            // a stop string at the very start.
            ("ENDmore", &["END"], &[], "", true),
        ];
        for (text, stops, pieces, final_text, stopped) in cases {
            let (got_pieces, got_text, state) = stream(text, stops);
            assert_eq!(got_pieces, *pieces, "pieces of {text:?} with stops {stops:?}");
            assert_eq!(got_text, *final_text, "text of {text:?} with stops {stops:?}");
            assert_eq!(state == StreamState::Stop, *stopped, "state of {text:?}");
        }
    }

    #[test]
    fn the_callback_can_stop() {
        let tokenizer = byte_tokenizer();
        let mut s = TextStream::new(&tokenizer, &[]);
        let ids: Vec<u32> = b"abc".iter().map(|&b| b as u32).collect();
        assert_eq!(s.push(&ids[..1], &mut |_| true).unwrap(), StreamState::Continue);
        assert_eq!(s.push(&ids[..2], &mut |_| false).unwrap(), StreamState::Stop);
    }
}
