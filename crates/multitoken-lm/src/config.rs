//! The runtime model configuration every family is built from.
//!
//! HF `config.json` files (one serde struct per family, see `hf_config`) and GGUF
//! metadata both turn into a [`ModelConfig`]; the model code reads nothing else.

/// The decoder families we implement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Llama 1/2/3, SmolLM, Vicuna: RMSNorm, SwiGLU, GQA, rotary.
    Llama,
    /// Mistral: llama + sliding-window attention.
    Mistral,
    /// Qwen2: llama + qkv bias, often tied embeddings.
    Qwen2,
    /// Phi-2: LayerNorm, partial rotary, parallel attention + MLP, biases.
    Phi2,
}

/// How rotary embeddings pair the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// transformers' `rotate_half`: dimension i pairs with i + d/2.
    Half,
    /// llama.cpp / GGUF: dimension 2i pairs with 2i + 1 (q/k rows are permuted
    /// by llama.cpp's converter, so the model must rotate interleaved pairs).
    Interleaved,
}

/// Llama-3 style frequency scaling of the rotary embedding.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3RopeScaling {
    /// `factor`.
    pub factor: f64,
    /// `low_freq_factor`.
    pub low_freq_factor: f64,
    /// `high_freq_factor`.
    pub high_freq_factor: f64,
    /// `original_max_position_embeddings`.
    pub original_max_position_embeddings: usize,
}

/// The MLP / feed-forward activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// SiLU (llama family, gated).
    Silu,
    /// tanh-approximated GELU (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
    /// exact erf GELU (`gelu`).
    Gelu,
}

/// Everything the model code needs to know about an architecture instance.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// Which family's layer layout to build.
    pub family: Family,
    /// Rows of the embedding table and of `lm_head`.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (GQA when smaller than `num_heads`).
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Longest context.
    pub max_position_embeddings: usize,
    /// Rotary base.
    pub rope_theta: f64,
    /// Optional Llama-3 rotary scaling.
    pub rope_scaling: Option<Llama3RopeScaling>,
    /// Pairing of rotary dimensions.
    pub rope_style: RopeStyle,
    /// Fraction of each head that is rotated (Phi-2: 0.4; others 1.0).
    pub partial_rotary_factor: f64,
    /// RMSNorm / LayerNorm epsilon.
    pub norm_eps: f64,
    /// MLP activation.
    pub hidden_act: Activation,
    /// Bias on q/k/v projections (Qwen2, Phi-2, some llamas).
    pub qkv_bias: bool,
    /// Bias on the attention output projection.
    pub o_bias: bool,
    /// Bias on MLP linears.
    pub mlp_bias: bool,
    /// Mistral's sliding attention window, if any.
    pub sliding_window: Option<usize>,
    /// `lm_head` shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Multimodal rotary positions (Qwen2-VL's M-RoPE): how many of the
    /// `rot_dim / 2` frequencies follow the temporal, height and width
    /// position streams, in that order. `None`: one position stream.
    pub mrope_section: Option<[usize; 3]>,
}
