//! The demo model's tokenizers, trained with the `tokenizers` crate on the
//! dataset text: a byte-level BPE for the LM (ChatML and modality tokens
//! special) and a lowercase WordPiece for the document encoder (BERT layout).

use std::path::Path;

use anyhow::{anyhow, Result};
use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::wordpiece::{WordPiece, WordPieceTrainerBuilder};
use tokenizers::models::TrainerWrapper;
use tokenizers::normalizers::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::processors::bert::BertProcessing;
use tokenizers::{AddedToken, Tokenizer};

/// The LM's special tokens, in id order (pad = 0).
pub const LM_SPECIAL: [&str; 7] = [
    "<pad>",
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<image>",
    "<speech>",
    "<document>",
];
/// The document encoder's special tokens, in id order (pad = 0).
pub const BERT_SPECIAL: [&str; 5] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];

/// Trains the LM tokenizer (byte-level BPE, `vocab_size` entries) on `texts`.
pub fn train_lm(texts: &[String], vocab_size: usize, path: &Path) -> Result<usize> {
    let specials: Vec<AddedToken> = LM_SPECIAL
        .iter()
        .map(|t| AddedToken::from(*t, true))
        .collect();
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(specials)
        .initial_alphabet(
            tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet()
                .into_iter()
                .collect(),
        )
        .build()
        .into();
    let mut tokenizer = Tokenizer::new(BPE::default());
    let byte_level = ByteLevel::new(false, true, true);
    tokenizer.with_pre_tokenizer(Some(byte_level));
    tokenizer.with_decoder(Some(byte_level));
    tokenizer.with_post_processor(Some(byte_level));
    tokenizer
        .train(&mut trainer, texts.iter())
        .map_err(|e| anyhow!("training the LM tokenizer: {e}"))?;
    tokenizer
        .save(path, true)
        .map_err(|e| anyhow!("{}: {e}", path.display()))?;
    Ok(tokenizer.get_vocab_size(true))
}

/// Trains the document encoder's tokenizer (lowercase WordPiece, `[CLS] x [SEP]`).
pub fn train_bert(texts: &[String], vocab_size: usize, path: &Path) -> Result<usize> {
    let specials: Vec<AddedToken> = BERT_SPECIAL
        .iter()
        .map(|t| AddedToken::from(*t, true))
        .collect();
    let mut trainer: TrainerWrapper = WordPieceTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(1)
        .show_progress(false)
        .special_tokens(specials)
        .build()
        .into();
    let mut tokenizer = Tokenizer::new(WordPiece::default());
    tokenizer
        .with_normalizer(Some(BertNormalizer::new(true, true, None, true)))
        .map_err(|e| anyhow!("document tokenizer normalizer: {e}"))?;
    tokenizer.with_pre_tokenizer(Some(BertPreTokenizer));
    tokenizer.with_decoder(Some(tokenizers::decoders::wordpiece::WordPiece::default()));
    tokenizer
        .train(&mut trainer, texts.iter())
        .map_err(|e| anyhow!("training the document tokenizer: {e}"))?;
    let id = |t: &str| {
        tokenizer
            .token_to_id(t)
            .ok_or_else(|| anyhow!("the document tokenizer lacks {t}"))
    };
    let processor = BertProcessing::new(
        ("[SEP]".to_string(), id("[SEP]")?),
        ("[CLS]".to_string(), id("[CLS]")?),
    );
    tokenizer.with_post_processor(Some(processor));
    tokenizer
        .save(path, true)
        .map_err(|e| anyhow!("{}: {e}", path.display()))?;
    Ok(tokenizer.get_vocab_size(true))
}
