//! Multi-head self-attention with grouped key/value heads, rotary positions, an
//! explicit KV cache and additive masks (causal, sliding window, left padding).
//!
//! Masking follows transformers' `masking_utils.py`: query at absolute index `q`
//! sees key `k` when `k <= q`, the key is not padding and, with a sliding window
//! `w`, `k > q - w`. Grouped heads are never materialised by repeating keys:
//! the `n_rep` query heads that share one key head are folded into the query
//! sequence axis, so one batched matmul covers them.

use candle_core::{DType, Device, Tensor};
use multitoken_kernels::math::{attend_groups, CachedHead, QueryGroup};

use crate::linear::Linear;
use crate::model::rope::RotaryEmbedding;
use crate::Result;

/// The attention block of one decoder layer.
#[derive(Debug, Clone)]
pub(crate) struct Attention {
    pub(crate) q_proj: Linear,
    pub(crate) k_proj: Linear,
    pub(crate) v_proj: Linear,
    /// `o_proj` (llama family) or `dense` (phi).
    pub(crate) o_proj: Linear,
    pub(crate) num_heads: usize,
    pub(crate) num_kv_heads: usize,
    pub(crate) head_dim: usize,
}

impl Attention {
    /// `x`: `[b, t, hidden]`; `mask`: additive f32 `[b|1, 1, 1, t, kv]`;
    /// `cache`: this layer's key/value buffers `[b, kv_heads, capacity, head_dim]`
    /// of which the first `seen` positions are filled. `causal`: the mask is
    /// exactly the causal one (no padding, no window that bites), so the fused
    /// causal kernel may replace it.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        rope: &RotaryEmbedding,
        cos_sin: &(Tensor, Tensor),
        mask: Option<&Tensor>,
        causal: bool,
        cache: &mut Option<(Tensor, Tensor)>,
        seen: usize,
    ) -> Result<Tensor> {
        // The projections and rope inside are timed as their own parts.
        let _profile = crate::profile::scope(crate::profile::Part::Attention);
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let heads = |y: Tensor, n: usize| -> Result<Tensor> {
            Ok(y.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()?)
        };
        let (q, k, v) = self.project(x, false)?;
        let (q, k, v) = (heads(q, nh)?, heads(k, nkv)?, heads(v, nkv)?);
        let (cos, sin) = cos_sin;
        let q = rope.apply(&q, cos, sin)?;
        let k = rope.apply(&k, cos, sin)?;
        let (k, v) = append_to_cache(cache, k, v, seen, false)?;
        let kv_len = k.dim(2)?;
        let n_rep = nh / nkv;
        if t == 1 && mask.is_none() {
            if let Some(out) = decode_attention(&q, &k, &v, n_rep)? {
                return self.o_proj.forward(&out);
            }
        }

        let scale = 1.0 / (hd as f64).sqrt();
        if causal && t > 1 {
            // Inference prefill under a plain causal mask: blocks of queries
            // against only the keys they see, without the [n_rep * t, kv] score
            // tensor (half of it masked) and its three passes (issue 19). `None`
            // for tracked tensors (training), other dtypes and devices.
            // `--dtype bf16` runs its products in bf16 here too.
            let bf16 = self.q_proj.computes_in_bf16();
            if let Some(out) = multitoken_kernels::lm::causal_attention(&q, &k, &v, scale, bf16)? {
                return self.o_proj.forward(&out);
            }
        }
        if q.track_op() && q.dtype() == DType::F32 {
            // Training: the scaling, the mask and the softmax as one op each way.
            let q = q.reshape((b, nkv, n_rep * t, hd))?;
            let scores = q.matmul(&k.t()?)?;
            let probs = multitoken_kernels::train::scaled_masked_softmax(&scores, scale, mask)?;
            let out = probs.matmul(&v)?;
            let out = out.reshape((b, nh, t, hd))?.transpose(1, 2)?.reshape((b, t, nh * hd))?;
            return self.o_proj.forward(&out);
        }
        // [b, nkv, n_rep * t, hd]: the query heads sharing a key head, stacked.
        let q = (q * scale)?.reshape((b, nkv, n_rep * t, hd))?;
        let scores = q.matmul(&k.t()?)?;
        let dtype = scores.dtype();
        let scores = if dtype == DType::F32 { scores } else { scores.to_dtype(DType::F32)? };
        let scores = match mask {
            Some(m) => scores
                .reshape((b, nkv, n_rep, t, kv_len))?
                .broadcast_add(m)?
                .reshape((b, nkv, n_rep * t, kv_len))?,
            None => scores,
        };
        // candle's fused softmax has no backward pass; training takes ours.
        let probs = if scores.track_op() {
            multitoken_kernels::train::softmax_last_dim(&scores)?
        } else {
            candle_nn::ops::softmax_last_dim(&scores)?
        };
        let probs = if dtype == DType::F32 { probs } else { probs.to_dtype(dtype)? };
        let out = probs.matmul(&v)?; // [b, nkv, n_rep * t, hd]
        let out = out.reshape((b, nh, t, hd))?.transpose(1, 2)?.reshape((b, t, nh * hd))?;
        self.o_proj.forward(&out)
    }
}

impl Attention {
    /// The q / k / v projections of `x`, through [`Linear::forward`]
    /// (`batched`: [`Linear::forward_rows`]); when all three can, in one
    /// kernel call ([`Linear::products_together`]), which gives the same values.
    fn project(&self, x: &Tensor, batched: bool) -> Result<(Tensor, Tensor, Tensor)> {
        if let Some(mut qkv) = Linear::products_together(&[&self.q_proj, &self.k_proj, &self.v_proj], x, batched)? {
            if let (Some(v), Some(k), Some(q)) = (qkv.pop(), qkv.pop(), qkv.pop()) {
                return Ok((q, k, v));
            }
        }
        Ok((self.q_proj.forward_as(x, batched)?, self.k_proj.forward_as(x, batched)?, self.v_proj.forward_as(x, batched)?))
    }

    /// [`Attention::forward`] for new positions of several sequences with
    /// caches of their own (no mask), every row computed as a lone decode
    /// step at its position computes it: `x` `[n, 1, hidden]` holds
    /// `counts[s]` consecutive rows for sequence `s` (its next positions, in
    /// order), `cos_sin` per-row tables `[n, 1, rot / 2]`, `caches[s]` /
    /// `seen[s]` sequence `s`'s buffers and length. The products go through
    /// [`Linear::forward_rows`], keys and values are appended to each
    /// sequence's own buffers, and each row attends over the keys up to its
    /// own position through [`attend_groups`] (within `window` positions when
    /// the layer has a sliding window). With every count 1 this is the batched
    /// decode step, bit for bit what `forward` gives each row alone; with
    /// larger counts it is a prefill (or a chunk of one) whose rows get the
    /// same bits however the prompt is split and whatever runs beside it.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn forward_rows(
        &self,
        x: &Tensor,
        rope: &RotaryEmbedding,
        cos_sin: &(Tensor, Tensor),
        caches: &mut [&mut Option<(Tensor, Tensor)>],
        seen: &[usize],
        counts: &[usize],
        window: Option<usize>,
    ) -> Result<Tensor> {
        // The projections and rope inside are timed as their own parts.
        let _profile = crate::profile::scope(crate::profile::Part::Attention);
        let (n, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        if t != 1 || caches.len() != counts.len() || seen.len() != counts.len() || counts.iter().sum::<usize>() != n || counts.contains(&0) {
            return Err(crate::Error::Msg(format!(
                "a ragged step takes one position per row and at least one row per sequence: {n} rows of {t}, {} caches, counts {counts:?}",
                caches.len()
            )));
        }
        let heads = |y: Tensor, h: usize| -> Result<Tensor> {
            Ok(y.reshape((n, t, h, hd))?.transpose(1, 2)?.contiguous()?)
        };
        let (q, k, v) = self.project(x, true)?;
        let (q, k, v) = (heads(q, nh)?, heads(k, nkv)?, heads(v, nkv)?);
        let (cos, sin) = cos_sin;
        let q = rope.apply(&q, cos, sin)?;
        let k = rope.apply(&k, cos, sin)?;
        let mut kv = Vec::with_capacity(caches.len());
        let mut spans = Vec::with_capacity(n);
        let mut row = 0;
        for (s, cache) in caches.iter_mut().enumerate() {
            let c = counts[s];
            // [c, kv_heads, 1, hd] -> [1, kv_heads, c, hd]: the sequence's new positions.
            let (ks, vs) = (k.narrow(0, row, c)?.transpose(0, 2)?.contiguous()?, v.narrow(0, row, c)?.transpose(0, 2)?.contiguous()?);
            // A sequence's first positions go straight into a growable
            // buffer (`buffered`), so its next step appends instead of
            // moving the prompt's keys and values into one.
            kv.push(append_to_cache(cache, ks, vs, seen[s], true)?);
            for j in 0..c {
                let end = seen[s] + j + 1;
                let first = window.map_or(0, |w| end.saturating_sub(w));
                spans.push(RowSpan { sequence: s, first, end });
            }
            row += c;
        }
        let n_rep = nh / nkv;
        let out = match rows_attention(&q, &kv, &spans, n_rep)? {
            Some(out) => out,
            None => {
                // Other dtypes and devices: each row through the general path.
                let mut outs = Vec::with_capacity(n);
                for (i, span) in spans.iter().enumerate() {
                    let (ki, vi) = &kv[span.sequence];
                    let len = span.end - span.first;
                    outs.push(general_decode(&q.narrow(0, i, 1)?, &ki.narrow(2, span.first, len)?, &vi.narrow(2, span.first, len)?, n_rep, hd)?);
                }
                Tensor::cat(&outs, 0)?
            }
        };
        self.o_proj.forward_rows(&out)
    }
}

/// The keys one query row of a ragged step sees: positions `first..end` of
/// sequence `sequence`'s cache.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RowSpan {
    pub(crate) sequence: usize,
    pub(crate) first: usize,
    pub(crate) end: usize,
}

/// The general path's attention for one query position of one sequence with
/// no mask, `[1, 1, heads * head_dim]`: what [`Attention::forward`] computes
/// when [`decode_attention`] does not apply.
fn general_decode(q: &Tensor, k: &Tensor, v: &Tensor, n_rep: usize, hd: usize) -> Result<Tensor> {
    let (b, nh, t, _) = q.dims4()?;
    let nkv = nh / n_rep;
    let scale = 1.0 / (hd as f64).sqrt();
    let q = (q * scale)?.reshape((b, nkv, n_rep * t, hd))?;
    let scores = q.matmul(&k.t()?)?;
    let dtype = scores.dtype();
    let scores = if dtype == DType::F32 { scores } else { scores.to_dtype(DType::F32)? };
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    let probs = if dtype == DType::F32 { probs } else { probs.to_dtype(dtype)? };
    let out = probs.matmul(v)?;
    Ok(out.reshape((b, nh, t, hd))?.transpose(1, 2)?.reshape((b, t, nh * hd))?)
}

/// One new query per sequence against every cached position, with no mask: the
/// decode step's attention in a single pass, `[b, 1, heads * head_dim]` out.
///
/// The general path costs eight tensor ops per layer (scale, transpose, two
/// matmuls, softmax, reshapes), each a few microseconds of dispatch and
/// allocation for little work; this reads the cache buffers in place through
/// [`attend_groups`]. `None` when it does not apply (not f32 on the CPU, or an
/// unusual layout): the caller then takes the general path.
fn decode_attention(q: &Tensor, k: &Tensor, v: &Tensor, n_rep: usize) -> Result<Option<Tensor>> {
    let (b, len) = (k.dim(0)?, k.dim(2)?);
    let kv: Vec<(Tensor, Tensor)> = (0..b).map(|i| Ok((k.narrow(0, i, 1)?, v.narrow(0, i, 1)?))).collect::<Result<_>>()?;
    let spans: Vec<RowSpan> = (0..b).map(|sequence| RowSpan { sequence, first: 0, end: len }).collect();
    rows_attention(q, &kv, &spans, n_rep)
}

/// The attention of query rows over the caches of several sequences (no
/// padding, no copies): `q` `[n, heads, 1, head_dim]`, `kv[s]` the
/// `[1, kv_heads, len_s, head_dim]` keys and values of sequence `s` (views
/// into its cache buffers), `spans[i]` the sequence and positions row `i`
/// sees. Returns `[n, 1, heads * head_dim]`. Every (row, key/value head) is
/// one [`QueryGroup`] of its `n_rep` query heads, and [`attend_groups`] gives
/// each group what it gives that group alone, so a row in a batch gets the
/// bits it gets by itself. `None` when it does not apply (not f32 on the
/// CPU, an unusual layout).
pub(crate) fn rows_attention(q: &Tensor, kv: &[(Tensor, Tensor)], spans: &[RowSpan], n_rep: usize) -> Result<Option<Tensor>> {
    use candle_core::Storage;
    let (n, nh, _, hd) = q.dims4()?;
    if q.dtype() != DType::F32 || !q.device().is_cpu() || spans.len() != n || n_rep == 0 || nh % n_rep != 0 {
        return Ok(None);
    }
    let qs: Vec<f32> = q.flatten_all()?.to_vec1()?;
    let guards: Vec<_> = kv.iter().map(|(k, v)| (k.storage_and_layout(), v.storage_and_layout())).collect();
    let nkv = nh / n_rep;
    let mut heads = Vec::with_capacity(kv.len());
    for ((k, _), ((ks, kl), (vs, vl))) in kv.iter().zip(&guards) {
        let (Storage::Cpu(kc), Storage::Cpu(vc)) = (&**ks, &**vs) else { return Ok(None) };
        let (k_stride, v_stride) = (kl.stride(), vl.stride());
        if k.dtype() != DType::F32 || k_stride.len() != 4 || k_stride[3] != 1 || v_stride != k_stride || kl.start_offset() != vl.start_offset() || k.dim(3)? != hd || k.dim(1)? != nkv {
            return Ok(None);
        }
        heads.push((kc.as_slice::<f32>()?, vc.as_slice::<f32>()?, kl.start_offset(), k_stride[1], k_stride[2], k.dim(2)?));
    }
    let mut groups = Vec::with_capacity(n * nkv);
    for (i, span) in spans.iter().enumerate() {
        let Some(&(keys, values, start, head_stride, step, len)) = heads.get(span.sequence) else { return Ok(None) };
        if span.first >= span.end || span.end > len {
            return Ok(None);
        }
        for kvh in 0..nkv {
            let q0 = (i * nh + kvh * n_rep) * hd;
            let head = CachedHead { keys, values, base: start + kvh * head_stride + span.first * step, step, len: span.end - span.first };
            groups.push(QueryGroup { queries: &qs[q0..q0 + n_rep * hd], head });
        }
    }
    let mut out = vec![0f32; n * nh * hd];
    attend_groups(&groups, n_rep, hd, 1.0 / (hd as f32).sqrt(), &mut out);
    Ok(Some(Tensor::from_vec(out, (n, 1, nh * hd), q.device())?))
}

/// Writes the new keys/values into the layer's buffers and returns views of
/// every position so far.
///
/// The buffers have room to grow along the sequence axis (doubling), so a
/// decode step writes one position instead of copying the whole cache, which
/// was about a third of the bytes a quantized decode step reads. On a fresh
/// cache the new keys/values themselves are returned and kept, not buffer
/// views: `slice_set` is not tracked by autograd, and training runs on fresh
/// caches. `buffered`: a fresh cache gets a buffer too (a ragged step, which
/// never trains).
fn append_to_cache(
    cache: &mut Option<(Tensor, Tensor)>,
    k: Tensor,
    v: Tensor,
    seen: usize,
    buffered: bool,
) -> Result<(Tensor, Tensor)> {
    let (b, heads, t, head_dim) = k.dims4()?;
    let total = seen + t;
    if seen == 0 && !buffered {
        // A first call (a prefill, a training forward) keeps its own keys and
        // values as the cache: no buffer is zeroed and filled here, and the
        // first decode step, which needs room, copies them into one. Training
        // never decodes, and zeroing two buffers per layer was a visible part
        // of a training step's memset.
        *cache = Some((k.clone(), v.clone()));
        return Ok((k, v));
    }
    let (k_buf, v_buf) = match cache.take() {
        Some((kb, vb)) if kb.dim(2)? >= total && kb.dim(0)? == b => (kb, vb),
        previous => {
            let capacity = (total * 2).max(CACHE_MIN_CAPACITY);
            let kb = Tensor::zeros((b, heads, capacity, head_dim), k.dtype(), k.device())?;
            let vb = Tensor::zeros((b, heads, capacity, head_dim), v.dtype(), v.device())?;
            if let (Some((pk, pv)), true) = (previous, seen > 0) {
                kb.slice_set(&pk.narrow(2, 0, seen)?.contiguous()?, 2, 0)?;
                vb.slice_set(&pv.narrow(2, 0, seen)?.contiguous()?, 2, 0)?;
            }
            (kb, vb)
        }
    };
    k_buf.slice_set(&k, 2, seen)?;
    v_buf.slice_set(&v, 2, seen)?;
    let out = (k_buf.narrow(2, 0, total)?, v_buf.narrow(2, 0, total)?);
    *cache = Some((k_buf, v_buf));
    Ok(out)
}

/// Smallest key/value buffer, in positions.
const CACHE_MIN_CAPACITY: usize = 64;

/// Build the additive f32 mask `[b|1, 1, 1, t, kv]` for `t` new queries after
/// `seen` cached positions, or `None` when nothing needs masking.
///
/// `padding` is the `[b, seen + t]` 0/1 mask of every position (None = no padding).
/// Masked entries are `-inf`, which `exp` handles on its fast path (a large
/// finite value takes libm's slow underflow path). A padding query, whose row
/// would otherwise be all `-inf` (NaN after softmax), may see itself; no real
/// query ever sees a padding key, so that output is never read.
pub(crate) fn build_mask(
    padding: Option<&[Vec<f32>]>,
    batch: usize,
    seen: usize,
    t: usize,
    window: Option<usize>,
    device: &Device,
) -> Result<Option<Tensor>> {
    let kv = seen + t;
    let window_bites = window.is_some_and(|w| kv > w);
    if padding.is_none() && t == 1 && !window_bites {
        return Ok(None);
    }
    let rows = padding.map_or(1, |_| batch);
    let mut data = vec![0f32; rows * t * kv];
    for r in 0..rows {
        for i in 0..t {
            let q = seen + i;
            let query_is_padding = padding.is_some_and(|p| p[r][q] <= 0.0);
            let row = &mut data[(r * t + i) * kv..(r * t + i + 1) * kv];
            for (k, slot) in row.iter_mut().enumerate() {
                let causal = k <= q;
                let in_window = window.is_none_or(|w| k + w > q);
                let real = padding.is_none_or(|p| p[r][k] > 0.0);
                let visible = (causal && in_window && real) || (query_is_padding && k == q);
                if !visible {
                    *slot = f32::NEG_INFINITY;
                }
            }
        }
    }
    Ok(Some(Tensor::from_vec(data, (rows, 1, 1, t, kv), device)?))
}
