//! The narrow interface between the multimodal machinery and a decoder LM.
//!
//! Core never names a concrete model: `multitoken-lm` implements
//! [`LanguageModel`] for each family it loads.

use candle_core::{DType, Device, Tensor};

use crate::Result;

/// Which positions the LM should return logits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsSelection {
    /// Logits for every position, `[batch, seq, vocab]` (training, parity tests).
    All,
    /// Logits for the last position only, `[batch, vocab]` (generation).
    Last,
    /// Logits for the last `n` positions (all when `n` exceeds them),
    /// `[batch, n, vocab]`: training asks only for the positions that carry
    /// labels, which spares the vocabulary-wide head (SmolLM2's is a fifth of
    /// the model's FLOPs) its work on the prompt.
    Tail(usize),
}

/// Per-layer key/value cache, passed explicitly to every forward call.
///
/// Keys and values are stored as `[batch, kv_heads, capacity, head_dim]`
/// buffers of which the first [`KvCache::seen`] positions are filled (models
/// write new positions in place). The cache also remembers the attention mask
/// seen so far so that left-padded batches keep masking their padding during
/// decode. Cloning copies the buffers, so a clone can be extended on its own.
#[derive(Debug, Default)]
pub struct KvCache {
    /// One `(keys, values)` pair per decoder layer, `None` until first used.
    pub layers: Vec<Option<(Tensor, Tensor)>>,
    /// `[batch, seen]` mask (1 = real token, 0 = padding) of every position cached.
    pub attention_mask: Option<Tensor>,
    /// Number of positions already cached.
    pub seen: usize,
    /// Per row, what to add to the plain position of every new token, set by
    /// a forward with explicit positions ([`LanguageModel::forward_embeds_at`]):
    /// Qwen2-VL's `rope_deltas`, `max position + 1 - real length`. `None`
    /// means 0 for every row.
    pub position_shift: Option<Vec<i64>>,
}

impl Clone for KvCache {
    fn clone(&self) -> Self {
        // Deep copies: models write into the buffers in place, so a shallow
        // clone would let two conversations overwrite each other's positions.
        let layers = self
            .layers
            .iter()
            .map(|layer| {
                // A copy that fails (out of memory) falls back to sharing the
                // buffers: the cached values stay right, which dropping the
                // layer would not.
                layer.as_ref().map(|(k, v)| (k.copy().unwrap_or_else(|_| k.clone()), v.copy().unwrap_or_else(|_| v.clone())))
            })
            .collect();
        Self { layers, attention_mask: self.attention_mask.clone(), seen: self.seen, position_shift: self.position_shift.clone() }
    }
}

impl KvCache {
    /// An empty cache for a model with `num_layers` decoder layers.
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
            attention_mask: None,
            seen: 0,
            position_shift: None,
        }
    }

    /// Forget everything cached.
    pub fn clear(&mut self) {
        for layer in &mut self.layers {
            *layer = None;
        }
        self.attention_mask = None;
        self.seen = 0;
        self.position_shift = None;
    }
}

/// A decoder language model seen from the multimodal side.
pub trait LanguageModel: Send + Sync {
    /// Width of the embeddings / hidden states.
    fn hidden_size(&self) -> usize;
    /// Number of rows of the output projection.
    fn vocab_size(&self) -> usize;
    /// Number of decoder layers (the length of a [`KvCache`]).
    fn num_layers(&self) -> usize;
    /// Longest sequence the model accepts (`max_position_embeddings`).
    fn max_context(&self) -> usize;
    /// The device the weights live on.
    fn device(&self) -> &Device;
    /// The activation dtype.
    fn dtype(&self) -> DType;
    /// Token ids `[batch, seq]` (u32) to embeddings `[batch, seq, hidden]`.
    fn embed_tokens(&self, ids: &Tensor) -> Result<Tensor>;
    /// Forward from input embeddings `[batch, seq, hidden]`.
    ///
    /// `attention_mask` is `[batch, seq]` for the new positions (1 = real, 0 =
    /// left padding); `None` means all real. Position ids follow transformers:
    /// the cumulative count of real tokens minus one. The cache is extended.
    fn forward_embeds(
        &self,
        embeds: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: &mut KvCache,
        logits: LogitsSelection,
    ) -> Result<Tensor>;

    /// Whether the model takes explicit multimodal rotary positions
    /// (Qwen2-VL's M-RoPE) through [`LanguageModel::forward_embeds_at`].
    fn takes_positions(&self) -> bool {
        false
    }

    /// [`LanguageModel::forward_embeds`] at explicit positions: `positions` is
    /// `[3, batch, seq]` (integer; temporal, height and width streams, e.g.
    /// [`crate::RopePositions::batch_tensor`]) for the new tokens, padding
    /// included. The model then keeps each row's shift (`max position + 1 -
    /// real length`) in the cache so that later calls without positions
    /// continue where the prompt ended. `None` is `forward_embeds`. The
    /// default rejects positions: only a model with M-RoPE reads them.
    fn forward_embeds_at(
        &self,
        embeds: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: &mut KvCache,
        logits: LogitsSelection,
        positions: Option<&Tensor>,
    ) -> Result<Tensor> {
        match positions {
            None => self.forward_embeds(embeds, attention_mask, cache, logits),
            Some(_) => Err(crate::Error::msg(
                "explicit position ids were given to a language model without multimodal rotary positions (M-RoPE, mrope_section)",
            )),
        }
    }

    /// Whether [`LanguageModel::forward_ragged`] runs for this model. The
    /// default is `false`: a server then prefills each prompt whole and alone
    /// and decodes through [`LanguageModel::decode_step`].
    fn runs_ragged(&self) -> bool {
        false
    }

    /// One forward over the next positions of several sequences, each with a
    /// cache of its own (continuous batching with chunked prefill):
    /// `embeds` `[n, 1, hidden]` holds `counts[s]` consecutive rows for
    /// `caches[s]` (one new token of a decoding sequence, or a prompt or a
    /// chunk of one; plain positions, no padding), and each cache is extended
    /// by its count. Returns the logits `[m, vocab]` of the last row of each
    /// sequence whose `logits[s]` is set, in order.
    ///
    /// An implementation computes every row as it would alone, so that a
    /// sequence gets the same bits whatever shares the step and however its
    /// prompt is split into chunks. The default refuses (see
    /// [`LanguageModel::runs_ragged`]).
    fn forward_ragged(&self, embeds: &Tensor, counts: &[usize], caches: &mut [&mut KvCache], logits: &[bool]) -> Result<Tensor> {
        let _ = (embeds, counts, caches, logits);
        Err(crate::Error::msg("this language model has no ragged forward (runs_ragged is false)"))
    }

    /// One decode step of several independent sequences, each with a cache
    /// of its own (batch of one, any length): `embeds` `[n, 1, hidden]` holds
    /// each sequence's new position, `caches[i]` is sequence `i`'s cache and
    /// is extended by one. Returns the last-position logits `[n, vocab]`.
    ///
    /// Each row must be exactly what `forward_embeds(row, None, caches[i],
    /// Last)` gives alone, so that a server batching requests answers as it
    /// would one at a time. The default runs the sequences one after another
    /// (exact by construction); a model overrides it with one forward for all
    /// of them that keeps that guarantee.
    fn decode_step(&self, embeds: &Tensor, caches: &mut [&mut KvCache]) -> Result<Tensor> {
        let n = embeds.dim(0)?;
        if n != caches.len() || n == 0 {
            return Err(crate::Error::msg(format!(
                "a decode step got {n} embedding rows for {} caches",
                caches.len()
            )));
        }
        let mut rows = Vec::with_capacity(n);
        for (i, cache) in caches.iter_mut().enumerate() {
            let row = embeds.narrow(0, i, 1)?;
            rows.push(self.forward_embeds(&row, None, cache, LogitsSelection::Last)?);
        }
        Ok(Tensor::cat(&rows, 0)?)
    }
}
