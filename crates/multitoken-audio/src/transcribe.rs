//! Greedy Whisper transcription with our candle decoder: one 30 s window at a time,
//! `<|startoftranscript|><|en|><|transcribe|><|notimestamps|>` as the prompt, argmax
//! with the checkpoint's suppressed tokens until `<|endoftext|>`.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use multitoken_core::Item;
use tokenizers::Tokenizer;

use crate::decode::{describe_item, load_audio, DecodeConfig};
use crate::mel::LogMel;
use crate::whisper::{argmax_suppressed, Whisper};
use crate::{Error, Result};

/// Most tokens generated per 30 s window (half the decoder's 448 positions, as
/// openai/whisper does).
pub const MAX_TOKENS_PER_WINDOW: usize = 224;

/// The text of one clip.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transcript {
    /// The decoded text, windows joined with a space, trimmed.
    pub text: String,
    /// Generated token ids per window (without the prompt and `<|endoftext|>`).
    pub tokens: Vec<Vec<u32>>,
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

    /// Transcribes an audio item (path or bytes).
    pub fn transcribe_item(&self, item: &Item, decode: &DecodeConfig) -> Result<Transcript> {
        let samples = load_audio(item, decode)?;
        self.transcribe_samples(&samples).map_err(|e| match e {
            Error::Candle(e) => Error::Config(format!("{}: {e}", describe_item(item))),
            other => other,
        })
    }

    /// Transcribes mono 16 kHz samples, window by window.
    pub fn transcribe_samples(&self, samples: &[f32]) -> Result<Transcript> {
        let windows = self.mel.compute(samples);
        let mut texts = Vec::new();
        let mut tokens = Vec::new();
        for window in windows.windows {
            let mel = Tensor::from_vec(window, (1, windows.n_mels, crate::mel::N_FRAMES), &self.device)?;
            let ids = self.greedy(&mel)?;
            let text = self
                .tokenizer
                .decode(&ids, true)
                .map_err(|e| Error::Tokenizer(e.to_string()))?;
            texts.push(text.trim().to_string());
            tokens.push(ids);
        }
        Ok(Transcript {
            text: texts.join(" ").trim().to_string(),
            tokens,
        })
    }

    fn greedy(&self, mel: &Tensor) -> Result<Vec<u32>> {
        let config = &self.model.config;
        let encoded = self.model.encoder.forward(mel)?;
        let cross = self.model.decoder.cross_cache(&encoded)?;
        let mut ids = self.prompt.clone();
        let mut generated = Vec::new();
        // Timestamps and the other special tokens after <|endoftext|> are never text.
        let mut suppressed = config.suppress_tokens.clone();
        suppressed.extend((config.eos_token_id + 1)..config.vocab_size as u32);
        while generated.len() < MAX_TOKENS_PER_WINDOW {
            let input = Tensor::new(ids.as_slice(), &self.device)?.unsqueeze(0)?;
            let hidden = self.model.decoder.hidden(&input, &cross)?;
            let logits = self.model.decoder.last_logits(&hidden)?.squeeze(0)?;
            let mut blocked = suppressed.clone();
            if generated.is_empty() {
                blocked.extend(&config.begin_suppress_tokens);
            }
            let next = argmax_suppressed(&logits, &blocked)?;
            if next == config.eos_token_id {
                break;
            }
            ids.push(next);
            generated.push(next);
        }
        Ok(generated)
    }
}
