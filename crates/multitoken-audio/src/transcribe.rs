//! Whisper transcription with our candle decoder: one 30 s window at a time,
//! `<|startoftranscript|><|en|><|transcribe|><|notimestamps|>` as the prompt, with
//! the checkpoint's suppressed tokens, until `<|endoftext|>`.
//!
//! Each window follows openai-whisper's `transcribe()` rules ([`TranscribeOptions`]):
//! greedy first, then, when the text compresses too well (zlib ratio above 2.4: a
//! repetition loop) or the tokens are unlikely (mean log-probability below -1.0),
//! decoded again at the next temperature of 0.2, 0.4, ... 1.0 (sampled, seeded);
//! a window whose `<|nospeech|>` probability is above 0.6 and whose tokens are
//! unlikely is silence and gives no text. Noise thus gives no text or a short
//! one, not 224 tokens of "Oh, oh, oh".

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use multitoken_core::Item;
use tokenizers::Tokenizer;

use crate::decode::{describe_item, load_audio, DecodeConfig};
use crate::mel::LogMel;
use crate::whisper::{CrossCache, SelfCache, Whisper};
use crate::{Error, Result};

/// Most tokens generated per 30 s window (half the decoder's 448 positions, as
/// openai/whisper does).
pub const MAX_TOKENS_PER_WINDOW: usize = 224;

/// How each window is decoded: openai-whisper's `transcribe()` defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct TranscribeOptions {
    /// Most tokens generated per window (at most the decoder's positions less the prompt).
    pub max_new_tokens: usize,
    /// Temperatures tried in turn while a decode fails the thresholds; 0 is greedy.
    pub temperatures: Vec<f64>,
    /// A decode whose text's zlib compression ratio is above this repeats itself.
    pub compression_ratio_threshold: Option<f64>,
    /// A decode whose mean token log-probability is below this is unreliable.
    pub logprob_threshold: Option<f64>,
    /// A window whose `<|nospeech|>` probability is above this, and whose decode
    /// is below `logprob_threshold`, is silence: no text.
    pub no_speech_threshold: Option<f64>,
    /// Seed of the sampling at temperatures above 0.
    pub seed: u64,
}

impl Default for TranscribeOptions {
    fn default() -> Self {
        Self {
            max_new_tokens: MAX_TOKENS_PER_WINDOW,
            temperatures: vec![0.0, 0.2, 0.4, 0.6, 0.8, 1.0],
            compression_ratio_threshold: Some(2.4),
            logprob_threshold: Some(-1.0),
            no_speech_threshold: Some(0.6),
            seed: 0,
        }
    }
}

impl TranscribeOptions {
    /// The plain greedy decode: temperature 0 only, no thresholds, no fallback
    /// (`--no-fallback`; whisper.cpp with `temperature_inc` 0).
    pub fn greedy(max_new_tokens: usize) -> Self {
        Self {
            max_new_tokens,
            temperatures: vec![0.0],
            compression_ratio_threshold: None,
            logprob_threshold: None,
            no_speech_threshold: None,
            seed: 0,
        }
    }
}

/// How one window was decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowDecode {
    /// The temperature of the decode kept.
    pub temperature: f64,
    /// Its mean token log-probability (openai-whisper's `avg_logprob`).
    pub avg_logprob: f64,
    /// Its text's zlib compression ratio.
    pub compression_ratio: f64,
    /// The probability of `<|nospeech|>` after the start token (0 when the
    /// tokenizer has no such token).
    pub no_speech_prob: f64,
    /// Whether the window was judged silence and gave no text.
    pub skipped: bool,
}

/// The text of one clip.
#[derive(Debug, Clone, PartialEq)]
pub struct Transcript {
    /// The decoded text, windows joined with a space, trimmed.
    pub text: String,
    /// Generated token ids per window (without the prompt and `<|endoftext|>`;
    /// empty for a skipped window).
    pub tokens: Vec<Vec<u32>>,
    /// How each window was decoded.
    pub windows: Vec<WindowDecode>,
}

/// The zlib compression ratio of `text` (bytes over compressed bytes), as
/// openai-whisper's `compression_ratio`: repetitive text compresses well.
pub fn compression_ratio(text: &str) -> f64 {
    if text.is_empty() {
        return 0.0;
    }
    let compressed = miniz_oxide::deflate::compress_to_vec_zlib(text.as_bytes(), 6);
    text.len() as f64 / compressed.len().max(1) as f64
}

/// One decode of a window.
struct Decoded {
    tokens: Vec<u32>,
    sum_logprob: f64,
    no_speech_prob: f64,
}

/// splitmix64: a small seeded generator for sampling (no dependency needed).
struct SplitMix(u64);

impl SplitMix {
    fn next_f64(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// `log_softmax(values)[index]`, over the finite values.
fn log_softmax_at(values: &[f32], index: usize) -> f64 {
    let max = values.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = values.iter().map(|&v| (v as f64 - max).exp()).sum();
    values.get(index).map_or(f64::NEG_INFINITY, |&v| v as f64 - max - sum.ln())
}

/// A Whisper checkpoint, its tokenizer and log-mel extractor, ready to transcribe.
#[derive(Debug)]
pub struct Transcriber {
    model: Whisper,
    tokenizer: Tokenizer,
    mel: LogMel,
    prompt: Vec<u32>,
    device: Device,
}

impl Transcriber {
    /// Loads a HF Whisper directory (`config.json`, `model.safetensors`, `tokenizer.json`)
    /// for English transcription.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let model = Whisper::load(dir, device, DType::F32)?;
        let tokenizer_path = dir.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&tokenizer_path)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", tokenizer_path.display())))?;
        Self::new(model, tokenizer, device)
    }

    /// Builds a transcriber from a loaded model and its tokenizer.
    pub fn new(model: Whisper, tokenizer: Tokenizer, device: &Device) -> Result<Self> {
        let mut prompt = vec![model.config.decoder_start_token_id];
        // Multilingual checkpoints need language and task; English-only ones lack them.
        for token in ["<|en|>", "<|transcribe|>", "<|notimestamps|>"] {
            if let Some(id) = tokenizer.token_to_id(token) {
                prompt.push(id);
            }
        }
        let mel = LogMel::new(model.config.num_mel_bins)?;
        Ok(Self {
            model,
            tokenizer,
            mel,
            prompt,
            device: device.clone(),
        })
    }

    /// Transcribes an audio item (path or bytes) with the default options.
    pub fn transcribe_item(&self, item: &Item, decode: &DecodeConfig) -> Result<Transcript> {
        self.transcribe_item_with(item, decode, &TranscribeOptions::default())
    }

    /// Transcribes an audio item (path or bytes).
    pub fn transcribe_item_with(&self, item: &Item, decode: &DecodeConfig, options: &TranscribeOptions) -> Result<Transcript> {
        let samples = load_audio(item, decode)?;
        self.transcribe_samples_with(&samples, options).map_err(|e| match e {
            Error::Candle(e) => Error::Config(format!("{}: {e}", describe_item(item))),
            other => other,
        })
    }

    /// Transcribes mono 16 kHz samples, window by window, with the default options.
    pub fn transcribe_samples(&self, samples: &[f32]) -> Result<Transcript> {
        self.transcribe_samples_with(samples, &TranscribeOptions::default())
    }

    /// Transcribes mono 16 kHz samples, window by window.
    pub fn transcribe_samples_with(&self, samples: &[f32], options: &TranscribeOptions) -> Result<Transcript> {
        let positions = self.model.config.max_target_positions;
        let room = positions.saturating_sub(self.prompt.len());
        if options.max_new_tokens == 0 || options.max_new_tokens > room {
            return Err(Error::Config(format!(
                "max_new_tokens is {}; it must be 1 to {room} (the decoder's {positions} positions less the prompt)",
                options.max_new_tokens
            )));
        }
        let windows = self.mel.compute(samples);
        let mut texts = Vec::new();
        let mut tokens = Vec::new();
        let mut infos = Vec::new();
        for (index, window) in windows.windows.into_iter().enumerate() {
            let mel = Tensor::from_vec(window, (1, windows.n_mels, crate::mel::N_FRAMES), &self.device)?;
            let (ids, text, info) = self.decode_with_fallback(&mel, options, index as u64)?;
            if !text.is_empty() {
                texts.push(text);
            }
            tokens.push(ids);
            infos.push(info);
        }
        Ok(Transcript {
            text: texts.join(" ").trim().to_string(),
            tokens,
            windows: infos,
        })
    }

    /// openai-whisper's `decode_with_fallback` plus its no-speech skip, for one window.
    fn decode_with_fallback(&self, mel: &Tensor, options: &TranscribeOptions, window: u64) -> Result<(Vec<u32>, String, WindowDecode)> {
        let encoded = self.model.encoder.forward(mel)?;
        let cross = self.model.decoder.cross_cache(&encoded)?;
        let temperatures: &[f64] = if options.temperatures.is_empty() { &[0.0] } else { &options.temperatures };
        let mut kept = None;
        for &temperature in temperatures {
            let mut rng = SplitMix(options.seed ^ window.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ temperature.to_bits());
            let decoded = self.decode(&cross, temperature, options.max_new_tokens, &mut rng)?;
            let text = self
                .tokenizer
                .decode(&decoded.tokens, true)
                .map_err(|e| Error::Tokenizer(e.to_string()))?
                .trim()
                .to_string();
            let info = WindowDecode {
                temperature,
                avg_logprob: decoded.sum_logprob / (decoded.tokens.len() + 1) as f64,
                compression_ratio: compression_ratio(&text),
                no_speech_prob: decoded.no_speech_prob,
                skipped: false,
            };
            let too_repetitive = options.compression_ratio_threshold.is_some_and(|t| info.compression_ratio > t);
            let too_unlikely = options.logprob_threshold.is_some_and(|t| info.avg_logprob < t);
            // Silence is not retried: it will be skipped below.
            let silence = options.no_speech_threshold.is_some_and(|t| info.no_speech_prob > t) && too_unlikely;
            let done = silence || !(too_repetitive || too_unlikely);
            kept = Some((decoded.tokens, text, info));
            if done {
                break;
            }
        }
        let (mut ids, mut text, mut info) = kept.ok_or_else(|| Error::Config("no temperature to decode at".into()))?;
        if let Some(threshold) = options.no_speech_threshold {
            // openai-whisper keeps the window when its tokens are likelier than the threshold.
            let unlikely = options.logprob_threshold.is_none_or(|t| info.avg_logprob <= t);
            if info.no_speech_prob > threshold && unlikely {
                info.skipped = true;
                ids.clear();
                text.clear();
            }
        }
        Ok((ids, text, info))
    }

    /// Logits `[vocab]` at `position` of hidden states `[1, t, d]`.
    fn logits_at(&self, hidden: &Tensor, position: usize) -> Result<Vec<f32>> {
        let row = hidden.narrow(1, position, 1)?;
        let logits = self.model.decoder.last_logits(&row)?.squeeze(0)?;
        Ok(logits.to_dtype(DType::F32)?.to_vec1()?)
    }

    /// One decode: greedy at temperature 0, else sampled from softmax(logits / T);
    /// log-probabilities from the suppressed logits at temperature 1, as openai-whisper.
    fn decode(&self, cross: &CrossCache, temperature: f64, max_new_tokens: usize, rng: &mut SplitMix) -> Result<Decoded> {
        let config = &self.model.config;
        let mut ids = self.prompt.clone();
        let mut generated = Vec::new();
        let mut sum_logprob = 0.0;
        let mut no_speech_prob = 0.0;
        // Timestamps and the other special tokens after <|endoftext|> are never text.
        let mut suppressed = config.suppress_tokens.clone();
        suppressed.extend((config.eos_token_id + 1)..config.vocab_size as u32);
        let no_speech = ["<|nospeech|>", "<|nocaptions|>"].iter().find_map(|t| self.tokenizer.token_to_id(t));
        // The prompt goes in first, then each new token: the self-attention keys
        // and values of what came before are kept, not recomputed every step.
        let mut cache = SelfCache::default();
        while generated.len() < max_new_tokens {
            let fed = cache.len();
            let input = Tensor::new(&ids[fed..], &self.device)?.unsqueeze(0)?;
            let hidden = self.model.decoder.hidden_cached(&input, cross, &mut cache)?;
            if generated.is_empty() {
                if let Some(token) = no_speech {
                    // The probability of <|nospeech|> right after <|startoftranscript|>.
                    let at_start = self.logits_at(&hidden, 0)?;
                    no_speech_prob = log_softmax_at(&at_start, token as usize).exp();
                }
            }
            let mut values = self.logits_at(&hidden, ids.len() - 1 - fed)?;
            let mut blocked = suppressed.clone();
            if generated.is_empty() {
                blocked.extend(&config.begin_suppress_tokens);
            }
            for &id in &blocked {
                if let Some(v) = values.get_mut(id as usize) {
                    *v = f32::NEG_INFINITY;
                }
            }
            let next = if temperature <= 0.0 {
                values
                    .iter()
                    .enumerate()
                    .max_by(|a, b| a.1.total_cmp(b.1))
                    .map(|(i, _)| i as u32)
                    .ok_or_else(|| Error::Config("empty logits".to_string()))?
            } else {
                sample(&values, temperature, rng)?
            };
            sum_logprob += log_softmax_at(&values, next as usize);
            if next == config.eos_token_id {
                break;
            }
            ids.push(next);
            generated.push(next);
        }
        Ok(Decoded { tokens: generated, sum_logprob, no_speech_prob })
    }
}

/// A token drawn from softmax(values / temperature).
fn sample(values: &[f32], temperature: f64, rng: &mut SplitMix) -> Result<u32> {
    let max = values.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let weights: Vec<f64> = values.iter().map(|&v| ((v as f64 - max) / temperature).exp()).collect();
    let total: f64 = weights.iter().sum();
    if total.is_nan() || total <= 0.0 {
        return Err(Error::Config("no token can be sampled (all logits suppressed)".into()));
    }
    let mut target = rng.next_f64() * total;
    let mut last = 0;
    for (i, w) in weights.iter().enumerate() {
        if *w > 0.0 {
            last = i;
            if target < *w {
                return Ok(i as u32);
            }
            target -= w;
        }
    }
    Ok(last as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repetitions_compress_well_and_speech_does_not() {
        let speech = compression_ratio("The quick brown fox jumps over the lazy dog.");
        let loop_ = compression_ratio(&"Oh, oh, ".repeat(60));
        assert!(speech < 2.4, "{speech}");
        assert!(loop_ > 2.4, "{loop_}");
        assert_eq!(compression_ratio(""), 0.0);
    }

    #[test]
    fn sampling_is_seeded_and_follows_the_weights() {
        let values = [0.0f32, f32::NEG_INFINITY, 2.0];
        let draw = |seed| {
            let mut rng = SplitMix(seed);
            (0..200).map(|_| sample(&values, 1.0, &mut rng).unwrap()).collect::<Vec<_>>()
        };
        let a = draw(7);
        assert_eq!(a, draw(7));
        assert!(!a.contains(&1), "a suppressed token is never drawn");
        let twos = a.iter().filter(|&&t| t == 2).count();
        assert!(twos > 150, "e^2 : 1 odds: {twos} of 200");
        assert!((log_softmax_at(&[0.0, 0.0], 1) - 0.5f64.ln()).abs() < 1e-9);
    }
}
