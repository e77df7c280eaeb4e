//! BERT-family sentence encoders loaded from a sentence-transformers directory.
//!
//! The directory is what `SentenceTransformer.save()` writes (and what the hub
//! holds for all-MiniLM-L6-v2 and thenlper/gte-*): `config.json` +
//! `model.safetensors` + `tokenizer.json` for the transformer, `modules.json`
//! listing the modules, `1_Pooling/config.json` for the pooling mode, a
//! `Normalize` module when embeddings are L2-normalised, and
//! `sentence_bert_config.json` for `max_seq_length` and `do_lower_case`. The
//! encoder is candle-transformers' BERT (Devlin et al. 2018,
//! <https://arxiv.org/abs/1810.04805>); pooling and normalisation follow
//! sentence-transformers' `Pooling` and `Normalize` modules.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::Config as BertConfig;

use crate::bert::Bert;
use serde::Deserialize;
use tokenizers::Tokenizer;

use crate::chunk::{windows, ChunkConfig};
use crate::{Error, Result};

/// Sequences encoded together; sorted by length first so that little is padded.
const DEFAULT_BATCH_SIZE: usize = 32;

/// One pooling operation of sentence-transformers' `Pooling` module. When several
/// are enabled their outputs are concatenated in this order: cls, max, mean,
/// mean-sqrt-len (the order sentence-transformers uses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolingMode {
    /// The first token's hidden state.
    Cls,
    /// Element-wise max over real (unpadded) tokens.
    Max,
    /// Mean over real tokens.
    Mean,
    /// Sum over real tokens divided by the square root of their count.
    MeanSqrtLen,
}

/// `1_Pooling/config.json`.
#[derive(Debug, Default, Deserialize)]
struct PoolingFile {
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
    #[serde(default)]
    pooling_mode_weightedmean_tokens: bool,
    #[serde(default)]
    pooling_mode_lasttoken: bool,
}

/// One entry of `modules.json`.
#[derive(Debug, Deserialize)]
struct ModuleEntry {
    #[serde(default)]
    path: String,
    #[serde(rename = "type")]
    kind: String,
}

/// `sentence_bert_config.json`.
#[derive(Debug, Default, Deserialize)]
struct SentenceBertFile {
    max_seq_length: Option<usize>,
    #[serde(default)]
    do_lower_case: bool,
}

/// A sentence-transformers BERT model: tokenizer, transformer, pooling and
/// optional normalisation.
pub struct SentenceEncoder {
    dir: PathBuf,
    model: Bert,
    tokenizer: Tokenizer,
    pooling: Vec<PoolingMode>,
    normalize: bool,
    do_lower_case: bool,
    max_seq_length: usize,
    hidden_size: usize,
    prefix: Vec<u32>,
    suffix: Vec<u32>,
    pad_id: u32,
    device: Device,
    batch_size: usize,
}

impl std::fmt::Debug for SentenceEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SentenceEncoder")
            .field("dir", &self.dir)
            .field("pooling", &self.pooling)
            .field("normalize", &self.normalize)
            .field("max_seq_length", &self.max_seq_length)
            .field("dim", &self.dim())
            .finish_non_exhaustive()
    }
}

impl SentenceEncoder {
    /// Loads the sentence-transformers model in `dir` onto `device` in `dtype`
    /// (pooling is always computed in f32).
    ///
    /// Fails naming the file when one is missing or unreadable, and naming the
    /// tensor when the checkpoint lacks one.
    pub fn load(dir: impl AsRef<Path>, device: &Device, dtype: DType) -> Result<Self> {
        Self::load_trainable(dir, device, dtype, None)
    }

    /// [`SentenceEncoder::load`], with the weights as trainable variables of
    /// `trainable` when given (the checkpoint's tensors if it has
    /// `model.safetensors`, random weights otherwise).
    pub fn load_trainable(
        dir: impl AsRef<Path>,
        device: &Device,
        dtype: DType,
        trainable: Option<&candle_nn::VarMap>,
    ) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let fail = |reason: String| Error::Encoder {
            dir: dir.clone(),
            reason,
        };
        if !dir.is_dir() {
            return Err(fail(
                "not a directory (run `cargo xtask weights` for all-MiniLM-L6-v2, or give a \
                 sentence-transformers model directory)"
                    .to_string(),
            ));
        }
        let config: BertConfig = read_json(&dir, "config.json")?
            .ok_or_else(|| fail("config.json is missing".to_string()))?;
        let (pooling, normalize) = read_modules(&dir)?;
        let sbert: SentenceBertFile = read_json(&dir, "sentence_bert_config.json")?.unwrap_or_default();
        let max_seq_length = sbert
            .max_seq_length
            .unwrap_or(config.max_position_embeddings)
            .min(config.max_position_embeddings);

        let tokenizer_path = dir.join("tokenizer.json");
        let mut tokenizer = Tokenizer::from_file(&tokenizer_path)
            .map_err(|e| fail(format!("cannot load tokenizer.json: {e}")))?;
        // Chunking does its own windowing; the file's truncation and fixed padding
        // (128 for all-MiniLM-L6-v2) would cut text silently.
        tokenizer
            .with_truncation(None)
            .map_err(|e| fail(format!("tokenizer.json: {e}")))?;
        tokenizer.with_padding(None);
        let (prefix, suffix) = special_tokens(&tokenizer)?;

        let weights = dir.join("model.safetensors");
        let vb = if let Some(map) = trainable {
            let mut context = multitoken_core::ModalityContext::new(device.clone(), dtype, &dir);
            context.trainable = Some(map.clone());
            context.var_builder(&weights).map_err(|e| fail(e.to_string()))?
        } else {
            if !weights.is_file() {
                return Err(fail(
                    "model.safetensors is missing (only safetensors checkpoints are read)".to_string(),
                ));
            }
            // SAFETY: the file is memory-mapped read-only; as everywhere in candle, it
            // must not be modified while the model is alive.
            unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], dtype, device) }
                .map_err(|e| fail(format!("cannot map model.safetensors: {e}")))?
        };
        let model = Bert::load(vb, &config)
            .map_err(|e| fail(format!("model.safetensors: {e}")))?;
        Ok(Self {
            dir,
            model,
            tokenizer,
            pooling,
            normalize,
            do_lower_case: sbert.do_lower_case,
            max_seq_length,
            hidden_size: config.hidden_size,
            prefix,
            suffix,
            pad_id: config.pad_token_id as u32,
            device: device.clone(),
            batch_size: DEFAULT_BATCH_SIZE,
        })
    }

    /// The directory the model was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Width of one embedding: the hidden size times the number of pooling modes.
    pub fn dim(&self) -> usize {
        self.hidden_size * self.pooling.len()
    }

    /// The longest sequence the encoder reads, special tokens included.
    pub fn max_seq_length(&self) -> usize {
        self.max_seq_length
    }

    /// The pooling modes read from `1_Pooling/config.json`.
    pub fn pooling(&self) -> &[PoolingMode] {
        &self.pooling
    }

    /// Whether embeddings are L2-normalised (a `Normalize` module is listed).
    pub fn normalizes(&self) -> bool {
        self.normalize
    }

    /// Sets how many sequences are encoded in one forward pass (at least 1).
    pub fn set_batch_size(&mut self, batch_size: usize) {
        self.batch_size = batch_size.max(1);
    }

    /// Text tokens of `text`, without special tokens (lower-cased first when the
    /// model says `do_lower_case`).
    ///
    /// The text is tokenized in pieces of about [`TOKENIZE_PIECE_BYTES`] cut at
    /// whitespace: a whole-text `encode` keeps offsets, alignments and token strings
    /// for every byte (about 125 bytes of memory per byte of text); in pieces, memory
    /// is the ids plus one piece's working set. The ids are the same for tokenizers
    /// that split words at whitespace first (BERT's WordPiece, which the supported
    /// encoders use).
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        for piece in whitespace_pieces(text, TOKENIZE_PIECE_BYTES) {
            let lowered;
            let piece = if self.do_lower_case {
                lowered = piece.to_lowercase();
                lowered.as_str()
            } else {
                piece
            };
            let encoding = self
                .tokenizer
                .encode(piece, false)
                .map_err(|e| Error::Tokenizer(e.to_string()))?;
            ids.extend_from_slice(encoding.get_ids());
        }
        Ok(ids)
    }

    /// Token windows of `text` (special tokens included) as [`ChunkConfig`] says;
    /// a text shorter than one window gives exactly the ids the tokenizer gives
    /// with special tokens. Empty text gives no windows.
    pub fn chunk(&self, text: &str, config: &ChunkConfig) -> Result<Vec<Vec<u32>>> {
        let max_tokens = config.max_tokens.unwrap_or(self.max_seq_length);
        if max_tokens > self.max_seq_length {
            return Err(Error::Config(format!(
                "chunks of {max_tokens} tokens exceed the encoder's max_seq_length {}",
                self.max_seq_length
            )));
        }
        windows(
            &self.tokenize(text)?,
            &self.prefix,
            &self.suffix,
            max_tokens,
            config.overlap,
        )
    }

    /// Pooled (and, when the model says so, normalised) embeddings `[n, dim]` in
    /// f32 of token sequences (special tokens included), in the order given.
    pub fn embed_ids(&self, sequences: &[Vec<u32>]) -> Result<Tensor> {
        if sequences.is_empty() {
            return Ok(Tensor::zeros((0, self.dim()), DType::F32, &self.device)?);
        }
        if let Some(long) = sequences.iter().find(|s| s.len() > self.max_seq_length) {
            return Err(Error::Input(format!(
                "a sequence of {} tokens is longer than max_seq_length {}",
                long.len(),
                self.max_seq_length
            )));
        }
        // Longest first, as sentence-transformers does: batches of similar lengths
        // pad little.
        let mut order: Vec<usize> = (0..sequences.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(sequences[i].len()));
        let mut pooled = Vec::with_capacity(order.len().div_ceil(self.batch_size));
        for batch in order.chunks(self.batch_size) {
            let seqs: Vec<&[u32]> = batch.iter().map(|&i| sequences[i].as_slice()).collect();
            pooled.push(self.forward_batch(&seqs)?);
        }
        let sorted = Tensor::cat(&pooled, 0)?;
        // Back to the caller's order.
        let mut inverse = vec![0u32; order.len()];
        for (position, &original) in order.iter().enumerate() {
            inverse[original] = position as u32;
        }
        let inverse = Tensor::new(inverse.as_slice(), &self.device)?;
        Ok(sorted.index_select(&inverse, 0)?)
    }

    /// One embedding per text: each text is chunked, its chunks embedded, and the
    /// chunk embeddings averaged (then re-normalised when the model normalises).
    /// A text of one chunk gets exactly the sentence-transformers embedding.
    pub fn embed_texts(&self, texts: &[&str], config: &ChunkConfig) -> Result<Vec<Vec<f32>>> {
        let mut sequences = Vec::new();
        let mut owners = Vec::with_capacity(texts.len());
        for text in texts {
            let chunks = self.chunk(text, config)?;
            let start = sequences.len();
            if chunks.is_empty() {
                // Empty text embeds like sentence-transformers: `[CLS] [SEP]`.
                sequences.push([self.prefix.as_slice(), self.suffix.as_slice()].concat());
            } else {
                sequences.extend(chunks);
            }
            owners.push(start..sequences.len());
        }
        let embeddings = self.embed_ids(&sequences)?;
        owners
            .into_iter()
            .map(|range| {
                let rows = embeddings.narrow(0, range.start, range.len())?;
                Ok(self.combine_chunks(&rows)?.to_vec1::<f32>()?)
            })
            .collect()
    }

    /// Chunk embeddings `[chunks, dim]` of one document to one vector `[dim]`: the
    /// mean, re-normalised when the model normalises.
    pub fn combine_chunks(&self, chunks: &Tensor) -> Result<Tensor> {
        let mean = chunks.mean(0)?;
        if self.normalize {
            Ok(l2_normalize(&mean.unsqueeze(0)?)?.squeeze(0)?)
        } else {
            Ok(mean)
        }
    }

    fn forward_batch(&self, seqs: &[&[u32]]) -> Result<Tensor> {
        let width = seqs.iter().map(|s| s.len()).max().unwrap_or(0).max(1);
        let mut ids = Vec::with_capacity(seqs.len() * width);
        let mut mask = Vec::with_capacity(seqs.len() * width);
        for seq in seqs {
            ids.extend_from_slice(seq);
            ids.extend(std::iter::repeat_n(self.pad_id, width - seq.len()));
            mask.extend(std::iter::repeat_n(1u32, seq.len()));
            mask.extend(std::iter::repeat_n(0u32, width - seq.len()));
        }
        let shape = (seqs.len(), width);
        let ids = Tensor::from_vec(ids, shape, &self.device)?;
        let mask = Tensor::from_vec(mask, shape, &self.device)?;
        let types = ids.zeros_like()?;
        let hidden = self
            .model
            .forward(&ids, &types, &mask)?
            .to_dtype(DType::F32)?;
        let pooled = pool(&hidden, &mask, &self.pooling)?;
        if self.normalize {
            l2_normalize(&pooled)
        } else {
            Ok(pooled)
        }
    }
}

/// Pools hidden states `[b, s, h]` under `mask` `[b, s]` with each mode,
/// concatenated on the last dimension.
fn pool(hidden: &Tensor, mask: &Tensor, modes: &[PoolingMode]) -> Result<Tensor> {
    let mask = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
    let count = mask.sum(1)?.clamp(1e-9f32, f32::MAX)?;
    let mut parts = Vec::with_capacity(modes.len());
    for mode in modes {
        let part = match mode {
            PoolingMode::Cls => hidden.narrow(1, 0, 1)?.squeeze(1)?,
            PoolingMode::Max => {
                // Padded positions get -1e9 so they never win (sentence-transformers'
                // own trick).
                let penalty = ((&mask - 1.0)? * 1e9)?;
                hidden.broadcast_add(&penalty)?.max(1)?
            }
            PoolingMode::Mean => hidden.broadcast_mul(&mask)?.sum(1)?.broadcast_div(&count)?,
            PoolingMode::MeanSqrtLen => hidden
                .broadcast_mul(&mask)?
                .sum(1)?
                .broadcast_div(&count.sqrt()?)?,
        };
        parts.push(part);
    }
    Ok(Tensor::cat(&parts, D::Minus1)?)
}

/// Rows divided by their L2 norm (at least 1e-12, torch's `F.normalize`).
fn l2_normalize(rows: &Tensor) -> Result<Tensor> {
    let norm = rows.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.clamp(1e-12f32, f32::MAX)?;
    Ok(rows.broadcast_div(&norm)?)
}

/// Reads `name` in `dir` as JSON; `None` when the file does not exist.
fn read_json<T: serde::de::DeserializeOwned>(dir: &Path, name: &str) -> Result<Option<T>> {
    let path = dir.join(name);
    let fail = |reason: String| Error::Encoder {
        dir: dir.to_path_buf(),
        reason,
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(fail(format!("cannot read {name}: {error}"))),
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| fail(format!("{name}: {e}")))
}

/// Pooling modes and normalisation from `modules.json` and the pooling config.
/// Without `modules.json` (a bare HF model) sentence-transformers uses mean pooling
/// and no normalisation; so do we.
fn read_modules(dir: &Path) -> Result<(Vec<PoolingMode>, bool)> {
    let fail = |reason: String| Error::Encoder {
        dir: dir.to_path_buf(),
        reason,
    };
    let Some(modules) = read_json::<Vec<ModuleEntry>>(dir, "modules.json")? else {
        return Ok((vec![PoolingMode::Mean], false));
    };
    let normalize = modules.iter().any(|m| m.kind.ends_with(".Normalize"));
    let pooling_path = modules
        .iter()
        .find(|m| m.kind.ends_with(".Pooling"))
        .map(|m| m.path.clone())
        .ok_or_else(|| fail("modules.json lists no Pooling module".to_string()))?;
    let file: PoolingFile = read_json(dir, &format!("{pooling_path}/config.json"))?
        .ok_or_else(|| fail(format!("{pooling_path}/config.json is missing")))?;
    if file.pooling_mode_weightedmean_tokens || file.pooling_mode_lasttoken {
        return Err(fail(
            "weighted-mean and last-token pooling are not supported (BERT encoders use cls, \
             mean or max)"
                .to_string(),
        ));
    }
    let modes: Vec<PoolingMode> = [
        (file.pooling_mode_cls_token, PoolingMode::Cls),
        (file.pooling_mode_max_tokens, PoolingMode::Max),
        (file.pooling_mode_mean_tokens, PoolingMode::Mean),
        (file.pooling_mode_mean_sqrt_len_tokens, PoolingMode::MeanSqrtLen),
    ]
    .into_iter()
    .filter_map(|(on, mode)| on.then_some(mode))
    .collect();
    if modes.is_empty() {
        return Err(fail(format!("{pooling_path}/config.json enables no pooling mode")));
    }
    Ok((modes, normalize))
}

/// The special tokens the tokenizer's post-processor puts before and after a
/// single sequence (`[CLS]` and `[SEP]` for BERT).
fn special_tokens(tokenizer: &Tokenizer) -> Result<(Vec<u32>, Vec<u32>)> {
    let encoding = tokenizer
        .encode("a", true)
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
    let ids = encoding.get_ids();
    let special = encoding.get_special_tokens_mask();
    let leading = special.iter().take_while(|&&s| s == 1).count();
    let trailing = special.iter().rev().take_while(|&&s| s == 1).count();
    if leading + trailing > ids.len() {
        return Err(Error::Tokenizer(
            "the tokenizer marks every token of \"a\" as special".to_string(),
        ));
    }
    Ok((ids[..leading].to_vec(), ids[ids.len() - trailing..].to_vec()))
}

/// Bytes of text handed to the tokenizer at once by [`SentenceEncoder::tokenize`].
pub const TOKENIZE_PIECE_BYTES: usize = 1 << 16;

/// `text` cut into pieces of at most `size` bytes, each cut just before a
/// whitespace character; a longer run without whitespace stays whole (cutting a
/// word would change its tokens).
pub(crate) fn whitespace_pieces(text: &str, size: usize) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let cut = if rest.len() <= size {
            rest.len()
        } else {
            let space = |(_, c): &(usize, char)| c.is_whitespace();
            // The last whitespace that leaves at most `size` bytes before it, else
            // the first one after.
            let head = &rest[..rest.floor_char_boundary(size + 1)];
            head.char_indices()
                .rev()
                .find(space)
                .filter(|&(at, _)| at > 0)
                .or_else(|| rest.char_indices().skip(1).find(space))
                .map_or(rest.len(), |(at, _)| at)
        };
        let (piece, tail) = rest.split_at(cut);
        rest = tail;
        Some(piece)
    })
}

#[cfg(test)]
mod piece_tests {
    use super::whitespace_pieces;

    fn check(text: &str, size: usize, expect: &[&str]) {
        let got: Vec<&str> = whitespace_pieces(text, size).collect();
        assert_eq!(got, expect, "{text:?} in pieces of {size}");
        assert_eq!(got.concat(), text);
    }

    #[test]
    fn pieces_cut_before_whitespace_and_keep_long_words_whole() {
        check("", 4, &[]);
        check("ab cd", 8, &["ab cd"]);
        check("ab cd ef gh", 6, &["ab cd", " ef gh"]);
        check("abcdefgh ij", 4, &["abcdefgh", " ij"]);
        check(" abcdefgh", 4, &[" abcdefgh"]);
        check("é é é é", 5, &["é é", " é", " é"]);
    }
}
