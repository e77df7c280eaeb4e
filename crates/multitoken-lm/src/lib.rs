//! Decoder language models for multitoken, written on candle-nn.
//!
//! candle-transformers' models cannot take input embeddings or return
//! full-sequence logits, both of which a multimodal model needs, so the families
//! live here: llama (also Mistral's sliding window and Qwen2's qkv bias / tied
//! embeddings) and phi-2. Weights come from HF directories (memory-mapped
//! safetensors) or GGUF files (kept quantized); both go through [`WeightSource`].

pub mod config;
pub mod error;
pub mod generate;
pub mod gguf;
pub mod hf;
pub mod linear;
pub mod loader;
pub mod lora;
pub mod model;
pub mod multimodal;
pub mod peft;
pub mod profile;
pub mod quantize;
pub mod sampling;
pub mod weights;

pub use config::{Activation, Family, ModelConfig, RopeStyle};
pub use error::{Error, Result};
pub use linear::{Linear, LinearWeight};
pub use multitoken_kernels::quantized::{int8_activations, set_int8_activations};
pub use loader::{GenerationDefaults, LoadedModel, SpecialTokens};
pub use weights::WeightSource;
