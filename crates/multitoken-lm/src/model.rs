//! The decoder: llama, mistral, qwen2 and phi-2 as one causal LM on candle-nn.
//!
//! Llama (Touvron et al. 2023, <https://arxiv.org/abs/2302.13971>), Mistral
//! (<https://arxiv.org/abs/2310.06825>, sliding-window attention), Qwen2 (qkv bias,
//! tied embeddings) and Phi-2 (partial rotary, parallel attention + MLP over one
//! LayerNorm) differ only in a few switches of [`ModelConfig`], so they share one
//! implementation. Reference code: transformers' `modeling_llama.py`,
//! `modeling_mistral.py`, `modeling_qwen2.py`, `modeling_phi.py`; tensor names are
//! transformers' own.
//!
//! Unlike candle-transformers' models, [`CausalLm`] runs from input embeddings
//! (so projected images/audio can be spliced in), returns logits for every
//! position or only the last, and takes left-padded batches with an attention
//! mask; the KV cache is passed explicitly.

mod attention;
pub mod checkpoint;
mod layers;
mod rope;

use candle_core::{DType, Device, Tensor};
use multitoken_core::{KvCache, LanguageModel, LogitsSelection};

use crate::config::{Family, ModelConfig};
use crate::linear::{Linear, LinearWeight};
use crate::weights::WeightSource;
use crate::{Error, Result};
use attention::{build_mask, Attention};
use layers::Norm;
pub use layers::{activate, FeedForward, Mlp};
use rope::{Positions, RotaryEmbedding};

/// A decoder-only causal language model of any supported [`Family`].
#[derive(Debug, Clone)]
pub struct CausalLm {
    cfg: ModelConfig,
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: Norm,
    lm_head: Linear,
    rotary: RotaryEmbedding,
    device: Device,
    dtype: DType,
    /// Layers run as [`checkpoint`] ops when the input tracks gradients.
    gradient_checkpointing: bool,
}

/// One decoder layer.
#[derive(Debug, Clone)]
struct DecoderLayer {
    input_layernorm: Norm,
    /// `None` for phi-2, whose attention and MLP share `input_layernorm`.
    post_attention_layernorm: Option<Norm>,
    self_attn: Attention,
    mlp: Mlp,
    sliding_window: Option<usize>,
}

impl CausalLm {
    /// Build the model from transformers-named tensors.
    ///
    /// Dtype and device are those of the tensors `weights` hands out. Every
    /// tensor must be present with its exact shape; there is no random-init
    /// fallback.
    pub fn load(cfg: &ModelConfig, weights: &dyn WeightSource) -> Result<Self> {
        check_config(cfg)?;
        let (h, v) = (cfg.hidden_size, cfg.vocab_size);
        let embed_tokens = weights.tensor("model.embed_tokens.weight", &[v, h])?;
        let device = embed_tokens.device().clone();
        let dtype = embed_tokens.dtype();
        let layers = (0..cfg.num_layers)
            .map(|i| DecoderLayer::load(cfg, weights, &format!("model.layers.{i}")))
            .collect::<Result<Vec<_>>>()?;
        let norm = match cfg.family {
            Family::Phi2 => load_norm(cfg, weights, "model.final_layernorm")?,
            _ => load_norm(cfg, weights, "model.norm")?,
        };
        let lm_head = if cfg.tie_word_embeddings && !weights.contains("lm_head.weight") {
            // Tied: reuse the embedding table unless the source keeps it quantized.
            let tied = weights.linear("model.embed_tokens", h, v, false)?;
            match tied.weight() {
                LinearWeight::Dense(_) => Linear::dense(embed_tokens.clone(), None)?,
                LinearWeight::Quantized(_) | LinearWeight::Bf16(_) => tied,
            }
        } else {
            weights.linear("lm_head", h, v, cfg.family == Family::Phi2)?
        };
        let rotary = RotaryEmbedding::new(cfg, &device)?;
        Ok(Self { cfg: cfg.clone(), embed_tokens, layers, norm, lm_head, rotary, device, dtype, gradient_checkpointing: false })
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The MLP of layer `layer`, if it exists.
    pub fn mlp(&self, layer: usize) -> Option<&Mlp> {
        self.layers.get(layer).map(|l| &l.mlp)
    }

    /// Replace the MLP of layer `layer` (e.g. by a mixture of experts).
    pub fn replace_mlp(&mut self, layer: usize, mlp: Mlp) -> Result<()> {
        let n = self.layers.len();
        let slot = self
            .layers
            .get_mut(layer)
            .ok_or_else(|| Error::Msg(format!("layer {layer} does not exist (the model has {n})")))?;
        slot.mlp = mlp;
        Ok(())
    }

    /// Trains through the decoder keeping one tensor per layer instead of all
    /// its activations, recomputing each layer in the backward pass (see
    /// [`checkpoint`]; f32 on the CPU, without a KV cache, i.e. a training
    /// forward). Gradients of LoRA adapters computed there are collected with
    /// [`checkpoint::take_grad`]. Inference is unaffected.
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.gradient_checkpointing = on;
    }

    /// Every decoder-layer linear with its transformers module name
    /// (`model.layers.{i}.self_attn.q_proj`, `model.layers.{i}.mlp.up_proj`, ...),
    /// `lm_head` excluded: where LoRA adapters attach. Custom MLPs are skipped.
    pub fn decoder_linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let o_name = if self.cfg.family == Family::Phi2 { "dense" } else { "o_proj" };
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let attn = &mut layer.self_attn;
            let p = format!("model.layers.{i}");
            out.push((format!("{p}.self_attn.q_proj"), &mut attn.q_proj));
            out.push((format!("{p}.self_attn.k_proj"), &mut attn.k_proj));
            out.push((format!("{p}.self_attn.v_proj"), &mut attn.v_proj));
            out.push((format!("{p}.self_attn.{o_name}"), &mut attn.o_proj));
            match &mut layer.mlp {
                Mlp::Gated { gate_proj, up_proj, down_proj, .. } => {
                    out.push((format!("{p}.mlp.gate_proj"), gate_proj));
                    out.push((format!("{p}.mlp.up_proj"), up_proj));
                    out.push((format!("{p}.mlp.down_proj"), down_proj));
                }
                Mlp::Plain { fc1, fc2, .. } => {
                    out.push((format!("{p}.mlp.fc1"), fc1));
                    out.push((format!("{p}.mlp.fc2"), fc2));
                }
                Mlp::Custom(_) => {}
            }
        }
        out
    }

    /// Set the sliding window of each layer separately (Qwen2's `layer_types`
    /// mixes full and sliding layers); `windows` has one entry per layer.
    pub fn set_layer_sliding_windows(&mut self, windows: &[Option<usize>]) -> Result<()> {
        if windows.len() != self.layers.len() {
            return Err(Error::Msg(format!(
                "{} sliding windows given for {} layers",
                windows.len(),
                self.layers.len()
            )));
        }
        for (layer, w) in self.layers.iter_mut().zip(windows) {
            layer.sliding_window = *w;
        }
        Ok(())
    }

    /// Embed `ids` and run [`LanguageModel::forward_embeds`].
    pub fn forward_ids(
        &self,
        ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: &mut KvCache,
        logits: LogitsSelection,
    ) -> Result<Tensor> {
        let embeds = self.embed(ids)?;
        self.forward(&embeds, attention_mask, cache, logits)
    }

    /// Token ids `[batch, seq]` to embeddings `[batch, seq, hidden]`.
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let flat = ids.flatten_all()?.to_dtype(DType::U32)?;
        if b * t > 0 {
            let max = flat.max(0)?.to_scalar::<u32>()? as usize;
            if max >= self.cfg.vocab_size {
                return Err(Error::Msg(format!(
                    "token id {max} is out of range for a vocabulary of {}",
                    self.cfg.vocab_size
                )));
            }
        }
        Ok(self.embed_tokens.index_select(&flat, 0)?.reshape((b, t, self.cfg.hidden_size))?)
    }

    /// The forward pass from input embeddings; see [`LanguageModel::forward_embeds`].
    /// Logits come back in the model dtype.
    pub fn forward(
        &self,
        embeds: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: &mut KvCache,
        logits: LogitsSelection,
    ) -> Result<Tensor> {
        self.forward_collecting(embeds, attention_mask, cache, logits, None, None)
    }

    /// [`CausalLm::forward`] at explicit M-RoPE positions `[3, batch, seq]`;
    /// see [`LanguageModel::forward_embeds_at`].
    pub fn forward_at(
        &self,
        embeds: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: &mut KvCache,
        logits: LogitsSelection,
        positions: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.forward_collecting(embeds, attention_mask, cache, logits, None, positions)
    }

    /// Like [`CausalLm::forward`] with a fresh cache, also returning every hidden
    /// state as transformers' `output_hidden_states` does: `num_layers + 1`
    /// tensors `[batch, seq, hidden]`, the input embeddings first, then each
    /// layer's output, the last one after the final norm.
    pub fn forward_embeds_with_hidden_states(
        &self,
        embeds: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        self.forward_embeds_with_hidden_states_at(embeds, attention_mask, None)
    }

    /// [`CausalLm::forward_embeds_with_hidden_states`] at explicit M-RoPE
    /// positions `[3, batch, seq]` (see [`LanguageModel::forward_embeds_at`]).
    pub fn forward_embeds_with_hidden_states_at(
        &self,
        embeds: &Tensor,
        attention_mask: Option<&Tensor>,
        positions: Option<&Tensor>,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let mut hidden = Vec::with_capacity(self.layers.len() + 1);
        let mut cache = KvCache::new(self.layers.len());
        let logits =
            self.forward_collecting(embeds, attention_mask, &mut cache, LogitsSelection::All, Some(&mut hidden), positions)?;
        if let Some(last) = hidden.last_mut() {
            *last = self.norm.forward(last)?;
        }
        Ok((logits, hidden))
    }

    fn forward_collecting(
        &self,
        embeds: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: &mut KvCache,
        logits: LogitsSelection,
        mut hidden: Option<&mut Vec<Tensor>>,
        explicit: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, t, h) = embeds.dims3()?;
        if h != self.cfg.hidden_size {
            return Err(Error::Msg(format!(
                "input embeddings have width {h}, the model expects {}",
                self.cfg.hidden_size
            )));
        }
        if t == 0 {
            return Err(Error::Msg("forward called with an empty sequence".into()));
        }
        if cache.layers.is_empty() {
            cache.layers = vec![None; self.layers.len()];
        } else if cache.layers.len() != self.layers.len() {
            return Err(Error::Msg(format!(
                "the KV cache has {} layers, the model {}",
                cache.layers.len(),
                self.layers.len()
            )));
        }
        let seen = cache.seen;
        if seen + t > self.cfg.max_position_embeddings {
            return Err(Error::Msg(format!(
                "the sequence ({seen} cached + {t} new = {} positions) is longer than the model's context of {} positions",
                seen + t,
                self.cfg.max_position_embeddings
            )));
        }
        if let Some(Some((k, _))) = cache.layers.first() {
            let cached_batch = k.dim(0)?;
            if cached_batch != b {
                return Err(Error::Msg(format!(
                    "batch of {b} rows but the KV cache holds {cached_batch}"
                )));
            }
        }

        let full_mask = self.full_mask(attention_mask, cache, b, t)?;
        let padding: Option<Vec<Vec<f32>>> = match &full_mask {
            Some(m) if m.min_all()?.to_scalar::<f32>()? < 0.5 => Some(m.to_vec2::<f32>()?),
            _ => None,
        };
        let positions = match &padding {
            Some(_) => {
                let m = full_mask.as_ref().ok_or_else(|| Error::Msg("mask vanished".into()))?;
                // transformers' generate: cumsum(mask) - 1, padding clamped to 0.
                let pos = (m.cumsum(1)? - 1.0)?.relu()?;
                Positions::PerRow(pos.narrow(1, seen, t)?.contiguous()?)
            }
            None => Positions::Range { start: seen, len: t },
        };
        let (positions, shift) = self.mrope_positions(positions, explicit, full_mask.as_ref(), cache, b, t)?;
        let cos_sin = self.rotary.cos_sin(&positions, self.dtype)?;

        // One mask per distinct window, shared by the layers that use it.
        let mut masks: Vec<(Option<usize>, Option<Tensor>)> = Vec::new();
        let mut x = if embeds.dtype() == self.dtype { embeds.clone() } else { embeds.to_dtype(self.dtype)? };
        if let Some(h) = hidden.as_deref_mut() {
            h.push(x.clone());
        }
        for (layer, layer_cache) in self.layers.iter().zip(cache.layers.iter_mut()) {
            let window = layer.sliding_window;
            let mask = match masks.iter().find(|(w, _)| *w == window) {
                Some((_, m)) => m.clone(),
                None => {
                    let m = build_mask(padding.as_deref(), b, seen, t, window, &self.device)?;
                    masks.push((window, m.clone()));
                    m
                }
            };
            // Exactly causal: no padding, and no window shorter than the sequence.
            let causal = padding.is_none() && window.is_none_or(|w| seen + t <= w);
            x = if self.gradient_checkpointing && seen == 0 && x.device().is_cpu() && x.dtype() == DType::F32 {
                layer.checkpointed(&x, &self.rotary, &cos_sin, mask.as_ref(), causal)?
            } else {
                layer.forward(&x, &self.rotary, &cos_sin, mask.as_ref(), causal, layer_cache, seen)?
            };
            if let Some(h) = hidden.as_deref_mut() {
                h.push(x.clone());
            }
        }
        cache.seen = seen + t;
        cache.attention_mask = full_mask;
        if shift.is_some() {
            cache.position_shift = shift;
        }

        let x = match logits {
            LogitsSelection::All => x,
            LogitsSelection::Last => x.narrow(1, t - 1, 1)?,
            LogitsSelection::Tail(n) => x.narrow(1, t - n.min(t), n.min(t))?,
        };
        // The head stays exact in the 8-bit-activation mode (see quantized::exact).
        let normed = self.norm.forward(&x)?;
        let out = {
            let _profile = crate::profile::scope(crate::profile::Part::Head);
            multitoken_kernels::quantized::exact(|| self.lm_head.forward(&normed))?
        };
        Ok(match logits {
            LogitsSelection::All | LogitsSelection::Tail(_) => out,
            LogitsSelection::Last => out.squeeze(1)?,
        })
    }

    /// One decode step for several sequences with caches of their own, in one
    /// forward: see [`LanguageModel::decode_step`]. Each row's logits are bit
    /// for bit what [`CausalLm::forward`] gives it alone (its products through
    /// [`Linear::forward_rows`], its keys and values appended to its own
    /// buffers, its attention over its own length, its rotary table at its own
    /// position), so batched serving answers as one-at-a-time generation.
    /// `Ok(None)` when a cache is not a plain one-row cache this path takes (a
    /// padding mask, an empty cache, a sliding window that bites): the caller
    /// then runs the rows one by one.
    pub fn decode_rows(&self, embeds: &Tensor, caches: &mut [&mut KvCache]) -> Result<Option<Tensor>> {
        let (b, t, h) = embeds.dims3()?;
        if t != 1 || b != caches.len() || b == 0 || h != self.cfg.hidden_size {
            return Err(Error::Msg(format!(
                "a decode step takes [sequences, 1, {}] embeddings, one row per cache; got {:?} for {} caches",
                self.cfg.hidden_size,
                embeds.dims(),
                caches.len()
            )));
        }
        // A sliding window that bites runs the masked path alone, and an empty
        // cache a prefill: this step would not give their bits.
        let fits = |c: &KvCache| {
            c.seen > 0 && self.takes_rows(c) && !self.layers.iter().any(|l| l.sliding_window.is_some_and(|w| c.seen + 1 > w))
        };
        if !caches.iter().all(|c| fits(c)) {
            return Ok(None);
        }
        Ok(Some(self.run_rows(embeds, &vec![1; b], caches, None)?))
    }

    /// Whether `cache` can be extended by the rows of one step with per-row
    /// positions ([`CausalLm::decode_rows`], [`CausalLm::forward_ragged`]): one
    /// sequence (layers of batch one, at most one position shift), no padding
    /// mask, and its layers filled exactly when positions are cached.
    fn takes_rows(&self, cache: &KvCache) -> bool {
        let seen = cache.seen;
        cache.layers.len() == self.layers.len()
            && cache.layers.iter().all(|l| match l {
                Some((k, _)) => seen > 0 && k.dim(0).is_ok_and(|d| d == 1),
                None => seen == 0,
            })
            && cache.attention_mask.is_none()
            && cache.position_shift.as_ref().is_none_or(|s| s.len() == 1)
    }

    /// The forward [`CausalLm::decode_rows`] and [`CausalLm::forward_ragged`]
    /// share once their caches are checked ([`CausalLm::takes_rows`]):
    /// `counts[s]` rows of `embeds` at the positions after `caches[s]`'s (as
    /// f32, plus the cache's shift as f32 when it keeps one: the one-sequence
    /// decode step's arithmetic), through every layer's
    /// [`DecoderLayer::forward_rows`], each cache extended by its count; then
    /// the head over the rows `heads` lists (every row when `None`), `[m, vocab]`.
    fn run_rows(&self, embeds: &Tensor, counts: &[usize], caches: &mut [&mut KvCache], heads: Option<Vec<u32>>) -> Result<Tensor> {
        let n = embeds.dim(0)?;
        let mut positions = Vec::with_capacity(n);
        for (cache, &c) in caches.iter().zip(counts) {
            let seen = cache.seen;
            if seen + c > self.cfg.max_position_embeddings {
                return Err(Error::Msg(format!(
                    "the sequence ({seen} cached + {c} new) is longer than the model's context of {} positions",
                    self.cfg.max_position_embeddings
                )));
            }
            let shift = cache.position_shift.as_deref().and_then(|s| s.first().copied());
            for j in 0..c {
                let plain = (seen + j) as f32;
                positions.push(shift.map_or(plain, |s| plain + s as f32));
            }
        }
        let positions = Positions::PerRow(Tensor::from_vec(positions, (n, 1), &self.device)?);
        let cos_sin = self.rotary.cos_sin(&positions, self.dtype)?;
        let seen: Vec<usize> = caches.iter().map(|c| c.seen).collect();
        let mut x = if embeds.dtype() == self.dtype { embeds.clone() } else { embeds.to_dtype(self.dtype)? };
        for (l, layer) in self.layers.iter().enumerate() {
            let mut layer_caches: Vec<&mut Option<(Tensor, Tensor)>> = caches.iter_mut().map(|c| &mut c.layers[l]).collect();
            x = layer.forward_rows(&x, &self.rotary, &cos_sin, &mut layer_caches, &seen, counts)?;
        }
        for (cache, &c) in caches.iter_mut().zip(counts) {
            cache.seen += c;
        }
        let x = match heads {
            None => x,
            Some(rows) if rows.is_empty() => return Ok(Tensor::zeros((0, self.cfg.vocab_size), DType::F32, &self.device)?),
            Some(rows) => {
                let m = rows.len();
                x.index_select(&Tensor::from_vec(rows, m, &self.device)?, 0)?
            }
        };
        let normed = self.norm.forward(&x)?;
        let out = {
            let _profile = crate::profile::scope(crate::profile::Part::Head);
            multitoken_kernels::quantized::exact(|| self.lm_head.forward_rows(&normed))?
        };
        Ok(out.squeeze(1)?)
    }

    /// Whether [`CausalLm::forward_ragged`] is this model's way to serve:
    /// f32 activations on the CPU, plain rotary positions (not M-RoPE) and no
    /// bf16 decoder linears. A bf16 prompt runs on AMX tiles, which sum in
    /// another order than the one-row bf16 kernel and are much faster than
    /// it, so `--dtype bf16` keeps whole-prompt prefills. Quantized weights
    /// take ragged steps: a Q4_1 prompt position through the one-row kernel
    /// costs 1.15-1.31× the dequantized GEMM's (`bench decode-rows`,
    /// 2026-12-06), which the joins it saves and the shared forwards repay
    /// (`bench serve --quantized`: the same tokens/s, inter-token p99 a
    /// quarter). ([`CausalLm::forward_ragged`] itself runs bf16 too, exactly.)
    pub fn runs_ragged(&self) -> bool {
        let no_bf16 = |a: &Attention| [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj].iter().all(|l| !l.is_bf16());
        self.can_run_ragged() && self.layers.iter().all(|l| no_bf16(&l.self_attn) && l.mlp.linears().iter().all(|m| !m.is_bf16()))
    }

    /// [`CausalLm::runs_ragged`] without the weights' condition: the ragged
    /// step computes right here.
    fn can_run_ragged(&self) -> bool {
        self.dtype == DType::F32 && self.device.is_cpu() && !self.rotary.is_multimodal()
    }

    /// One forward over the next positions of several sequences, each with a
    /// cache of its own: `embeds` `[n, 1, hidden]` holds `counts[s]`
    /// consecutive rows for `caches[s]` (a decode step's one new token, or a
    /// prompt or a chunk of one), each cache extended by its count. Returns
    /// the logits `[m, vocab]` of the last row of each sequence `s` with
    /// `logits[s]`, in order (`m` of them; `[0, vocab]` when none).
    ///
    /// Every row is computed as a lone decode step at its position computes
    /// it: products through [`Linear::forward_rows`] (one dot product per
    /// output in a fixed order), keys and values appended to the sequence's
    /// own buffers, attention of each row over the keys up to its position.
    /// So a sequence gets the same bits whether its prompt runs whole or in
    /// chunks and whatever else shares the step (continuous batching with
    /// chunked prefill, [`LanguageModel::forward_ragged`]). A decode row's
    /// bits equal [`CausalLm::decode_rows`]'; a prompt's differ from a
    /// [`CausalLm::forward`] prefill (a GEMM and the causal kernel) by float
    /// rounding only.
    pub fn forward_ragged(&self, embeds: &Tensor, counts: &[usize], caches: &mut [&mut KvCache], logits: &[bool]) -> Result<Tensor> {
        let (n, t, h) = embeds.dims3()?;
        let bad = |m: String| Err(Error::Msg(format!("a ragged step {m}")));
        if !self.can_run_ragged() {
            return bad("needs f32 activations on the CPU and plain rotary positions".into());
        }
        if t != 1 || h != self.cfg.hidden_size || counts.len() != caches.len() || logits.len() != caches.len() {
            return bad(format!(
                "takes [rows, 1, {}] embeddings and one count and logits flag per cache; got {:?}, {} counts, {} flags, {} caches",
                self.cfg.hidden_size,
                embeds.dims(),
                counts.len(),
                logits.len(),
                caches.len()
            ));
        }
        if counts.contains(&0) || counts.iter().sum::<usize>() != n {
            return bad(format!("got {n} rows for counts {counts:?} (each at least 1)"));
        }
        if !caches.iter().all(|c| self.takes_rows(c)) {
            return bad("takes caches of one sequence each, with no padding mask".into());
        }
        // Only the last row of each sequence whose logits are wanted goes
        // through the head (a prompt chunk that does not end its prompt needs none).
        let mut last = 0u32;
        let mut heads = Vec::new();
        for (&c, &want) in counts.iter().zip(logits) {
            last += c as u32;
            if want {
                heads.push(last - 1);
            }
        }
        self.run_rows(embeds, counts, caches, Some(heads))
    }

    /// The positions of the new tokens once explicit M-RoPE positions and the
    /// cache's per-row shift are taken into account, and the shift to keep
    /// when explicit positions set a new one (`max + 1 - real length`, the
    /// `rope_deltas` of transformers' Qwen2-VL).
    fn mrope_positions(
        &self,
        plain: Positions,
        explicit: Option<&Tensor>,
        full_mask: Option<&Tensor>,
        cache: &KvCache,
        b: usize,
        t: usize,
    ) -> Result<(Positions, Option<Vec<i64>>)> {
        if let Some(ids) = explicit {
            if !self.rotary.is_multimodal() {
                return Err(Error::Msg(
                    "explicit position ids were given but the model has no multimodal rotary positions (mrope_section)".into(),
                ));
            }
            if ids.dims() != [3, b, t] {
                return Err(Error::Msg(format!(
                    "position ids have shape {:?}, expected [3, {b}, {t}] (streams, batch, new positions)",
                    ids.dims()
                )));
            }
            let ids = ids.to_dtype(DType::F32)?.to_device(&self.device)?;
            let real: Vec<f32> = match full_mask {
                Some(m) => m.sum(1)?.to_vec1::<f32>()?,
                None => vec![(cache.seen + t) as f32; b],
            };
            let new_mask = match full_mask {
                Some(m) => m.narrow(1, cache.seen, t)?.contiguous()?,
                None => Tensor::ones((b, t), DType::F32, &self.device)?,
            };
            // Padding positions take no part in the row's largest position.
            let max = ids.max(0)?.mul(&new_mask)?.max(1)?.to_vec1::<f32>()?;
            let shift = max.iter().zip(&real).map(|(m, r)| (*m - *r + 1.0).round() as i64).collect();
            return Ok((Positions::Streams(ids.contiguous()?), Some(shift)));
        }
        let Some(shift) = &cache.position_shift else {
            return Ok((plain, None));
        };
        if shift.len() != b {
            return Err(Error::Msg(format!("the KV cache keeps position shifts for {} rows, the batch has {b}", shift.len())));
        }
        let rows = match plain {
            Positions::PerRow(p) => p,
            Positions::Range { start, len } => {
                let range: Vec<f32> = (start..start + len).map(|p| p as f32).collect();
                Tensor::from_vec(range, (1, len), &self.device)?.broadcast_as((b, len))?.contiguous()?
            }
            Positions::Streams(p) => return Ok((Positions::Streams(p), None)),
        };
        let shift: Vec<f32> = shift.iter().map(|&s| s as f32).collect();
        let shift = Tensor::from_vec(shift, (b, 1), &self.device)?;
        // All three streams equal: M-RoPE reduces to plain rotary positions.
        Ok((Positions::PerRow(rows.broadcast_add(&shift)?), None))
    }

    /// The `[b, seen + t]` f32 mask of every position, or `None` when no mask
    /// was ever given (everything real).
    fn full_mask(
        &self,
        attention_mask: Option<&Tensor>,
        cache: &KvCache,
        b: usize,
        t: usize,
    ) -> Result<Option<Tensor>> {
        let new = match attention_mask {
            Some(m) => {
                let dims = m.dims();
                if dims != [b, t] {
                    return Err(Error::Msg(format!(
                        "attention mask has shape {dims:?}, expected [{b}, {t}] (batch, new positions)"
                    )));
                }
                Some(m.to_dtype(DType::F32)?.to_device(&self.device)?)
            }
            None => None,
        };
        let seen = cache.seen;
        Ok(match (&cache.attention_mask, new) {
            (None, None) => None,
            (Some(old), new) => {
                let new = match new {
                    Some(n) => n,
                    None => Tensor::ones((b, t), DType::F32, &self.device)?,
                };
                Some(Tensor::cat(&[old, &new], 1)?)
            }
            (None, Some(new)) if seen == 0 => Some(new),
            (None, Some(new)) => {
                let old = Tensor::ones((b, seen), DType::F32, &self.device)?;
                Some(Tensor::cat(&[&old, &new], 1)?)
            }
        })
    }
}

impl DecoderLayer {
    fn load(cfg: &ModelConfig, w: &dyn WeightSource, prefix: &str) -> Result<Self> {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let attn = format!("{prefix}.self_attn");
        let o_name = match cfg.family {
            Family::Phi2 => "dense",
            _ => "o_proj",
        };
        let self_attn = Attention {
            q_proj: w.linear(&format!("{attn}.q_proj"), h, cfg.num_heads * hd, cfg.qkv_bias)?,
            k_proj: w.linear(&format!("{attn}.k_proj"), h, cfg.num_kv_heads * hd, cfg.qkv_bias)?,
            v_proj: w.linear(&format!("{attn}.v_proj"), h, cfg.num_kv_heads * hd, cfg.qkv_bias)?,
            o_proj: w.linear(&format!("{attn}.{o_name}"), cfg.num_heads * hd, h, cfg.o_bias)?,
            num_heads: cfg.num_heads,
            num_kv_heads: cfg.num_kv_heads,
            head_dim: hd,
        };
        let (i, mb, act) = (cfg.intermediate_size, cfg.mlp_bias, cfg.hidden_act);
        let mlp = match cfg.family {
            Family::Phi2 => Mlp::Plain {
                fc1: w.linear(&format!("{prefix}.mlp.fc1"), h, i, mb)?,
                fc2: w.linear(&format!("{prefix}.mlp.fc2"), i, h, mb)?,
                act,
            },
            _ => Mlp::Gated {
                gate_proj: w.linear(&format!("{prefix}.mlp.gate_proj"), h, i, mb)?,
                up_proj: w.linear(&format!("{prefix}.mlp.up_proj"), h, i, mb)?,
                down_proj: w.linear(&format!("{prefix}.mlp.down_proj"), i, h, mb)?,
                act,
            },
        };
        let input_layernorm = load_norm(cfg, w, &format!("{prefix}.input_layernorm"))?;
        let post_attention_layernorm = match cfg.family {
            Family::Phi2 => None,
            _ => Some(load_norm(cfg, w, &format!("{prefix}.post_attention_layernorm"))?),
        };
        Ok(Self {
            input_layernorm,
            post_attention_layernorm,
            self_attn,
            mlp,
            sliding_window: cfg.sliding_window,
        })
    }

    /// The layer's linears (projections, then the MLP's; a custom MLP's are
    /// its own business).
    fn linears(&self) -> Vec<&Linear> {
        let a = &self.self_attn;
        let mut out = vec![&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj];
        match &self.mlp {
            Mlp::Gated { gate_proj, up_proj, down_proj, .. } => out.extend([gate_proj, up_proj, down_proj]),
            Mlp::Plain { fc1, fc2, .. } => out.extend([fc1, fc2]),
            Mlp::Custom(_) => {}
        }
        out
    }

    /// [`DecoderLayer::forward`] as a [`checkpoint::CheckpointedLayer`] op
    /// (no KV cache: the training forward). An input that tracks no gradient
    /// is made a variable, so the layer's adapters still get theirs.
    fn checkpointed(
        &self,
        x: &Tensor,
        rope: &RotaryEmbedding,
        cos_sin: &(Tensor, Tensor),
        mask: Option<&Tensor>,
        causal: bool,
    ) -> Result<Tensor> {
        let x = x.contiguous()?;
        let x = if x.track_op() { x } else { candle_core::Var::from_tensor(&x)?.as_tensor().clone() };
        let dropout = self.linears().into_iter().find_map(|l| l.lora().map(|l| l.rng.clone()));
        let op = checkpoint::CheckpointedLayer {
            layer: self.clone(),
            rope: rope.clone(),
            cos_sin: cos_sin.clone(),
            mask: mask.cloned(),
            causal,
            dropout,
            dropout_state: std::sync::Mutex::new(None),
        };
        Ok(x.apply_op1(op)?)
    }

    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        x: &Tensor,
        rope: &RotaryEmbedding,
        cos_sin: &(Tensor, Tensor),
        mask: Option<&Tensor>,
        causal: bool,
        cache: &mut Option<(Tensor, Tensor)>,
        seen: usize,
    ) -> Result<Tensor> {
        let normed = self.input_layernorm.forward(x)?;
        let attn = self.self_attn.forward(&normed, rope, cos_sin, mask, causal, cache, seen)?;
        match &self.post_attention_layernorm {
            // phi-2: x + attn(ln(x)) + mlp(ln(x))
            None => residual_add(&residual_add(x, &attn)?, &self.mlp.forward(&normed)?),
            Some(post) => {
                let x = residual_add(x, &attn)?;
                let mlp = self.mlp.forward(&post.forward(&x)?)?;
                residual_add(&x, &mlp)
            }
        }
    }
}

impl DecoderLayer {
    /// [`DecoderLayer::forward`] for one position of each of several sequences
    /// with caches of their own; see [`CausalLm::decode_rows`].
    /// `counts[s]` consecutive rows of `x` are sequence `s`'s next positions
    /// ([`Attention::forward_rows`]).
    fn forward_rows(
        &self,
        x: &Tensor,
        rope: &RotaryEmbedding,
        cos_sin: &(Tensor, Tensor),
        caches: &mut [&mut Option<(Tensor, Tensor)>],
        seen: &[usize],
        counts: &[usize],
    ) -> Result<Tensor> {
        // Norms and residual adds work row by row (and element by element), so
        // each row's values are its values alone.
        let normed = self.input_layernorm.forward(x)?;
        let attn = self.self_attn.forward_rows(&normed, rope, cos_sin, caches, seen, counts, self.sliding_window)?;
        match &self.post_attention_layernorm {
            None => residual_add(&residual_add(x, &attn)?, &self.mlp.forward_rows(&normed)?),
            Some(post) => {
                let x = residual_add(x, &attn)?;
                let mlp = self.mlp.forward_rows(&post.forward(&x)?)?;
                residual_add(&x, &mlp)
            }
        }
    }
}

/// `x + y` for a residual stream: a prefill's rows over the kernels' pool
/// (candle's add runs on its one-thread pool, see `multitoken_kernels::lm::add`).
fn residual_add(x: &Tensor, y: &Tensor) -> Result<Tensor> {
    match multitoken_kernels::lm::add(x, y)? {
        Some(sum) => Ok(sum),
        None => Ok((x + y)?),
    }
}

fn load_norm(cfg: &ModelConfig, w: &dyn WeightSource, prefix: &str) -> Result<Norm> {
    let h = cfg.hidden_size;
    let weight = w.tensor(&format!("{prefix}.weight"), &[h])?;
    let eps = cfg.norm_eps as f32;
    Ok(match cfg.family {
        Family::Phi2 => Norm::Layer { weight, bias: w.tensor(&format!("{prefix}.bias"), &[h])?, eps },
        _ => Norm::Rms { weight, eps },
    })
}

/// Reject configurations the model code cannot run, with the reason.
fn check_config(cfg: &ModelConfig) -> Result<()> {
    let bad = |m: String| Err(Error::Msg(format!("invalid model configuration: {m}")));
    let dims = [
        ("vocab_size", cfg.vocab_size),
        ("hidden_size", cfg.hidden_size),
        ("intermediate_size", cfg.intermediate_size),
        ("num_attention_heads", cfg.num_heads),
        ("num_key_value_heads", cfg.num_kv_heads),
        ("head_dim", cfg.head_dim),
        ("max_position_embeddings", cfg.max_position_embeddings),
    ];
    if let Some((name, _)) = dims.iter().find(|(_, v)| *v == 0) {
        return bad(format!("{name} is 0"));
    }
    if cfg.num_heads.rem_euclid(cfg.num_kv_heads) != 0 {
        return bad(format!(
            "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
            cfg.num_heads, cfg.num_kv_heads
        ));
    }
    if cfg.sliding_window == Some(0) {
        return bad("sliding_window is 0".into());
    }
    // A zero or negative epsilon, or a zero base, runs without an error and yields
    // NaN logits (empty output); they are refused here instead.
    let positive = [
        ("rms_norm_eps / layer_norm_eps", cfg.norm_eps),
        ("rope_theta", cfg.rope_theta),
    ];
    if let Some((name, value)) = positive.iter().find(|(_, v)| !(v.is_finite() && *v > 0.0)) {
        return bad(format!("{name} must be a positive number, got {value}"));
    }
    if !(cfg.partial_rotary_factor > 0.0 && cfg.partial_rotary_factor <= 1.0) {
        return bad(format!("partial_rotary_factor must be in (0, 1], got {}", cfg.partial_rotary_factor));
    }
    Ok(())
}

impl LanguageModel for CausalLm {
    fn hidden_size(&self) -> usize {
        self.cfg.hidden_size
    }

    fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }

    fn num_layers(&self) -> usize {
        self.layers.len()
    }

    fn max_context(&self) -> usize {
        self.cfg.max_position_embeddings
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn dtype(&self) -> DType {
        self.dtype
    }

    fn embed_tokens(&self, ids: &Tensor) -> multitoken_core::Result<Tensor> {
        let _profile = crate::profile::scope(crate::profile::Part::Embedding);
        Ok(self.embed(ids)?)
    }

    fn forward_embeds(
        &self,
        embeds: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: &mut KvCache,
        logits: LogitsSelection,
    ) -> multitoken_core::Result<Tensor> {
        Ok(self.forward(embeds, attention_mask, cache, logits)?)
    }

    fn takes_positions(&self) -> bool {
        self.rotary.is_multimodal()
    }

    fn decode_step(&self, embeds: &Tensor, caches: &mut [&mut KvCache]) -> multitoken_core::Result<Tensor> {
        match self.decode_rows(embeds, caches)? {
            Some(logits) => Ok(logits),
            None => {
                // Some cache this path does not take: each sequence alone.
                let mut rows = Vec::with_capacity(caches.len());
                for (i, cache) in caches.iter_mut().enumerate() {
                    rows.push(self.forward(&embeds.narrow(0, i, 1)?, None, cache, LogitsSelection::Last)?);
                }
                Ok(Tensor::cat(&rows, 0).map_err(Error::from)?)
            }
        }
    }

    fn forward_embeds_at(
        &self,
        embeds: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: &mut KvCache,
        logits: LogitsSelection,
        positions: Option<&Tensor>,
    ) -> multitoken_core::Result<Tensor> {
        Ok(self.forward_at(embeds, attention_mask, cache, logits, positions)?)
    }

    fn runs_ragged(&self) -> bool {
        CausalLm::runs_ragged(self)
    }

    fn forward_ragged(&self, embeds: &Tensor, counts: &[usize], caches: &mut [&mut KvCache], logits: &[bool]) -> multitoken_core::Result<Tensor> {
        Ok(CausalLm::forward_ragged(self, embeds, counts, caches, logits)?)
    }
}

#[cfg(test)]
mod tests {
    use super::attention::build_mask;

    /// Which keys each query may see, as strings of 1/0 per row.
    fn visible(padding: Option<&[Vec<f32>]>, b: usize, seen: usize, t: usize, w: Option<usize>) -> Vec<String> {
        let Ok(Some(m)) = build_mask(padding, b, seen, t, w, &candle_core::Device::Cpu) else {
            return vec!["none".into()];
        };
        let Ok(rows) = m.flatten_to(3).and_then(|m| m.to_vec2::<f32>()) else {
            return vec!["error".into()];
        };
        rows.iter().map(|r| r.iter().map(|v| if *v == 0.0 { '1' } else { '0' }).collect()).collect()
    }

    #[test]
    fn masks() {
        let check = |got: Vec<String>, expect: &[&str]| assert_eq!(got, expect);
        check(visible(None, 1, 0, 3, None), &["100", "110", "111"]);
        check(visible(None, 1, 0, 4, Some(2)), &["1000", "1100", "0110", "0011"]);
        check(visible(None, 1, 3, 1, None), &["none"]);
        check(visible(None, 1, 3, 1, Some(2)), &["0011"]);
        let pad = vec![vec![0.0, 1.0, 1.0], vec![1.0, 1.0, 1.0]];
        check(visible(Some(&pad), 2, 0, 3, None), &["100", "010", "011", "100", "110", "111"]);
        // Decode after a padded prefill: the cached padding stays masked.
        let pad = vec![vec![0.0, 1.0, 1.0, 1.0]];
        check(visible(Some(&pad), 1, 3, 1, Some(2)), &["0011"]);
    }
}
