//! Loading GGUF files (llama.cpp's format): config and tokenizer from the metadata,
//! weights kept quantized. (The loader lands with the model code; the tokenizer
//! rebuilt from GGUF metadata is here already.)

mod tokenizer;

pub use tokenizer::{bytes_to_unicode, tokenizer_from_gguf, GgufTokenizer};
