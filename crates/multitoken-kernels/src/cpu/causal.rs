//! Causal grouped-query attention for a decoder's prefill, in blocks of
//! queries, without the `[heads, queries, keys]` score tensor.
//!
//! The decoder's general path writes every score of a layer (SmolVLM's 1166
//! prompt tokens: 49 MB per layer), adds the causal mask to all of it, runs a
//! softmax over it and multiplies it by V: four passes over memory, and half of
//! the scores are masked anyway. Here each unit (batch, query head, 48 queries)
//! computes only the keys its last query can see, in the AVX-512 tiles of the
//! encoders' attention ([`super::avx512`]): the scores of a block stay in L2,
//! the keys past the diagonal are set to `-inf` before the exponentials, and
//! the key blocks past the block's last query are never touched. Query heads
//! read their key head (`h / n_rep`) in place: the grouped heads are never
//! repeated, and each thread packs a key head once for all its query heads.

use std::cell::RefCell;
use std::mem::MaybeUninit;


/// A `[batch, heads, positions, head_dim]` operand whose last axis is dense.
#[derive(Debug, Clone, Copy)]
pub struct Strided4<'a> {
    /// The data, starting at the operand's first element.
    pub data: &'a [f32],
    /// Elements between consecutive batches, heads and positions.
    pub strides: [usize; 3],
}

impl Strided4<'_> {
    /// The offset of `[b, h, position, 0]`.
    fn at(&self, b: usize, h: usize, position: usize) -> usize {
        b * self.strides[0] + h * self.strides[1] + position * self.strides[2]
    }
}

/// The shape of a [`causal_attention`] call.
#[derive(Debug, Clone, Copy)]
pub struct CausalShape {
    /// Batch size.
    pub batch: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads; `heads` is a multiple of it.
    pub kv_heads: usize,
    /// New positions (queries): the last `queries` of the `keys` positions.
    pub queries: usize,
    /// Every position, cached ones first: at least `queries`.
    pub keys: usize,
    /// Width of one head.
    pub head_dim: usize,
}

impl CausalShape {
    /// Panics unless the heads group evenly over the key heads, the queries
    /// are the last of the keys and an output of `out_len` holds the result
    /// (a caller's bug, not input).
    fn check(&self, out_len: usize, name: &str) {
        let CausalShape { batch, heads, kv_heads, queries, keys, head_dim } = *self;
        assert!(
            kv_heads > 0 && heads.is_multiple_of(kv_heads) && keys >= queries,
            "{name}: {heads} heads over {kv_heads} key heads, {queries} queries over {keys} keys"
        );
        assert!(out_len >= batch * queries * heads * head_dim, "{name}: output too short");
    }
}

/// Whether [`causal_attention`] runs its fast tiles for this head width (on
/// other CPUs or widths it runs a plain loop, correct but slower than a GEMM:
/// a caller with a faster path should keep it then).
pub fn causal_fast(head_dim: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::avx512::applies(head_dim)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = head_dim;
        false
    }
}

/// Causal attention with grouped key heads: query `i` (at position
/// `keys - queries + i`) of head `h` attends to keys `0..=keys - queries + i` of
/// key head `h / (heads / kv_heads)`;
/// `out[b, i, h * head_dim..] = softmax(scale · q k^T) v` with `out`
/// `[batch, queries, heads * head_dim]` (dense). Every element of `out` is
/// written, so it may start uninitialised.
pub fn causal_attention(q: Strided4, k: Strided4, v: Strided4, shape: CausalShape, scale: f32, out: &mut [MaybeUninit<f32>]) {
    let CausalShape { batch, heads, queries, head_dim, .. } = shape;
    shape.check(out.len(), "causal_attention");
    if batch == 0 || queries == 0 || heads == 0 || head_dim == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if causal_fast(head_dim) {
        tiles::attention(q, k, v, shape, scale, out);
        return;
    }
    plain(q, k, v, shape, scale, out);
}

/// Whether [`causal_attention_bf16`] runs on this CPU for this head width:
/// AVX-512 F and BF16, and a width [`causal_fast`] takes.
pub fn causal_bf16_fast(head_dim: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::avx512_bf16::applies(head_dim)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = head_dim;
        false
    }
}

/// [`causal_attention`] with its two products in bf16 (`--dtype bf16`): q,
/// the scaled k, v and the softmax numerators rounded to bf16, each product
/// summed in f32, the softmax itself in f32 (see `avx512_bf16`). Returns
/// `false`, writing nothing, where [`causal_bf16_fast`] says no; the caller
/// then takes the f32 path.
pub fn causal_attention_bf16(q: Strided4, k: Strided4, v: Strided4, shape: CausalShape, scale: f32, out: &mut [MaybeUninit<f32>]) -> bool {
    let CausalShape { batch, heads, queries, head_dim, .. } = shape;
    shape.check(out.len(), "causal_attention_bf16");
    if !causal_bf16_fast(head_dim) {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    if batch > 0 && queries > 0 && heads > 0 {
        tiles::attention_bf16(q, k, v, shape, scale, out);
    }
    true
}

/// Query rows per unit of the plain loop.
const PLAIN_BLOCK: usize = 64;

/// [`causal_attention`] one query row at a time.
fn plain(q: Strided4, k: Strided4, v: Strided4, shape: CausalShape, scale: f32, out: &mut [MaybeUninit<f32>]) {
    let CausalShape { batch, heads, kv_heads, queries, keys, head_dim } = shape;
    let (n_rep, width, seen) = (heads / kv_heads, heads * head_dim, keys - queries);
    let blocks = queries.div_ceil(PLAIN_BLOCK);
    let out_ptr = crate::Shared(out.as_mut_ptr().cast::<f32>());
    super::for_each_unit(batch * heads * blocks, |unit| {
        let (b, h, block) = (unit / (heads * blocks), unit / blocks % heads, unit % blocks);
        let mut scores = vec![0f32; keys];
        for i in block * PLAIN_BLOCK..((block + 1) * PLAIN_BLOCK).min(queries) {
            let visible = seen + i + 1;
            let qi = &q.data[q.at(b, h, i)..][..head_dim];
            let mut max = f32::NEG_INFINITY;
            for (j, s) in scores[..visible].iter_mut().enumerate() {
                *s = crate::math::dot(qi, &k.data[k.at(b, h / n_rep, j)..][..head_dim]) * scale;
                max = max.max(*s);
            }
            let mut sum = 0f32;
            for s in &mut scores[..visible] {
                *s = (*s - max).exp();
                sum += *s;
            }
            let mut acc = vec![0f32; head_dim];
            for (j, &p) in scores[..visible].iter().enumerate() {
                for (a, &x) in acc.iter_mut().zip(&v.data[v.at(b, h / n_rep, j)..][..head_dim]) {
                    *a += p * x;
                }
            }
            for (d, a) in acc.iter().enumerate() {
                // SAFETY: row i of head h of batch b belongs to this unit only.
                unsafe { *out_ptr.at((b * queries + i) * width + h * head_dim + d) = a / sum };
            }
        }
    });
}

#[cfg(target_arch = "x86_64")]
mod tiles {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::super::avx512::{exp_block, pack_head, scores_block, values_block, PANEL, QUERY_BLOCK};
    use super::super::{for_each_unit, Rows};
    use super::*;

    /// One pool thread's buffers, kept between calls.
    #[derive(Default)]
    struct Scratch {
        /// The (call, batch, key head) whose K and V are packed below.
        head: Option<(u64, usize, usize)>,
        /// That key head's K, scaled, in panels (see [`pack_head`]).
        keys: Vec<f32>,
        /// That key head's V rows side by side.
        values: Vec<f32>,
        /// A unit's score block.
        scores: Vec<f32>,
        /// The bf16 path's packed K, V, query rows and probabilities (see
        /// `avx512_bf16`); `head` names the head in these when it runs.
        keys_bf16: Vec<u32>,
        values_bf16: Vec<u32>,
        queries_bf16: Vec<u32>,
        probs_bf16: Vec<u32>,
    }

    thread_local! {
        static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
    }

    /// Numbers the calls, so that a thread's packed head is never taken for the
    /// same head of another call.
    static CALLS: AtomicU64 = AtomicU64::new(0);

    /// One unit of the tiles' loop: query rows `r0..r0 + rows` of head `h`
    /// of batch `b`, which see at most `visible` keys, their score block
    /// `rows` rows of `padded` (= `panels` × [`PANEL`]), and `out_rows`,
    /// where its output rows start (`width` floats apart).
    struct Block {
        b: usize,
        h: usize,
        r0: usize,
        rows: usize,
        seen: usize,
        visible: usize,
        panels: usize,
        padded: usize,
        out_rows: *mut f32,
        width: usize,
    }

    impl Block {
        /// Sets the scores of keys past each row's position to `-inf` (query
        /// `r0 + i` sees keys `0..=seen + r0 + i`).
        fn mask(&self, scores: &mut [f32]) {
            for (i, row) in scores.chunks_exact_mut(self.padded).enumerate() {
                row[self.seen + self.r0 + i + 1..self.visible].fill(f32::NEG_INFINITY);
            }
        }
    }

    /// Runs `run` for every (batch, query head, [`QUERY_BLOCK`] queries)
    /// unit on the pool, in that order: the query heads of one key head are
    /// consecutive, so a thread packs each key head (with `pack`, given the
    /// head's K and V as the head 0 of `Rows` operands, and the batch) about
    /// once. `run` gets the thread's scratch with `scores` at least the
    /// block's size.
    fn for_each_block(
        k: Strided4,
        v: Strided4,
        shape: CausalShape,
        out: &mut [MaybeUninit<f32>],
        pack: impl Fn(&mut Scratch, Rows, Rows, usize) + Sync,
        run: impl Fn(&mut Scratch, &Block) + Sync,
    ) {
        let CausalShape { batch, heads, kv_heads, queries, keys, head_dim } = shape;
        let (n_rep, width, seen) = (heads / kv_heads, heads * head_dim, keys - queries);
        let blocks = queries.div_ceil(QUERY_BLOCK);
        let call = CALLS.fetch_add(1, Ordering::Relaxed);
        let out_ptr = crate::Shared(out.as_mut_ptr().cast::<f32>());
        for_each_unit(batch * heads * blocks, |unit| {
            let (b, h, block) = (unit / (heads * blocks), unit / blocks % heads, unit % blocks);
            let kvh = h / n_rep;
            let (r0, r1) = (block * QUERY_BLOCK, ((block + 1) * QUERY_BLOCK).min(queries));
            // The keys the block's last query sees; the ones before it see fewer.
            let visible = seen + r1;
            let panels = visible.div_ceil(PANEL);
            let out_rows = out_ptr.at((b * queries + r0) * width + h * head_dim);
            let block = Block { b, h, r0, rows: r1 - r0, seen, visible, panels, padded: panels * PANEL, out_rows, width };
            SCRATCH.with_borrow_mut(|scratch| {
                if scratch.head != Some((call, b, kvh)) {
                    scratch.head = Some((call, b, kvh));
                    pack(scratch, head_rows(k, kvh), head_rows(v, kvh), b);
                }
                if scratch.scores.len() < block.rows * block.padded {
                    scratch.scores.resize(block.rows * block.padded, 0.0);
                }
                run(scratch, &block);
            });
        });
    }

    /// [`causal_attention_bf16`] on the bf16 tiles of `avx512_bf16`; the
    /// caller checked [`causal_bf16_fast`].
    pub(super) fn attention_bf16(q: Strided4, k: Strided4, v: Strided4, shape: CausalShape, scale: f32, out: &mut [MaybeUninit<f32>]) {
        use super::super::avx512_bf16 as bf;
        let (keys, head_dim) = (shape.keys, shape.head_dim);
        let pack = |s: &mut Scratch, kr: Rows, vr: Rows, b| bf::pack_head(&mut s.keys_bf16, &mut s.values_bf16, kr, vr, (b, 0), keys, head_dim, scale);
        for_each_block(k, v, shape, out, pack, |scratch, blk| {
            let Block { b, h, r0, rows, visible, panels, padded, out_rows, width, .. } = *blk;
            let Scratch { keys_bf16: packed, values_bf16: values, queries_bf16: qs, probs_bf16: probs, scores, .. } = scratch;
            if probs.len() < rows * padded / 2 {
                probs.resize(rows * padded / 2, 0);
            }
            let scores = &mut scores[..rows * padded];
            bf::pack_queries(&q.data[q.at(b, h, r0)..], q.strides[2], rows, head_dim, qs);
            let mut sums = [0f32; QUERY_BLOCK];
            // SAFETY: the CPU has AVX-512 F and BF16 (`causal_bf16_fast`);
            // `qs` holds the block's rows, the packed K and V every key (of
            // which `visible` are read), `scores` and `probs` `rows` rows of
            // `padded`, and the block's output rows belong to this unit only.
            unsafe {
                bf::scores_block(qs, rows, packed, head_dim, panels, scores);
                blk.mask(scores);
                exp_block(scores, padded, visible, &mut sums[..rows]);
                bf::round_probs(scores, padded, visible, rows, probs);
                bf::values_block(probs, padded, visible, &sums[..rows], values, head_dim, out_rows, width);
            }
        });
    }

    /// Key head `kvh` of `t` as a [`Rows`] operand whose head 0 it is.
    fn head_rows(t: Strided4<'_>, kvh: usize) -> Rows<'_> {
        Rows { data: &t.data[kvh * t.strides[1]..], row_stride: t.strides[2], batch_stride: t.strides[0] }
    }

    /// [`causal_attention`] on the AVX-512 tiles; the caller checked [`causal_fast`].
    pub(super) fn attention(q: Strided4, k: Strided4, v: Strided4, shape: CausalShape, scale: f32, out: &mut [MaybeUninit<f32>]) {
        let (keys, head_dim) = (shape.keys, shape.head_dim);
        let pack = |s: &mut Scratch, kr: Rows, vr: Rows, b| pack_head(&mut s.keys, &mut s.values, kr, vr, (b, 0), keys, head_dim, scale);
        for_each_block(k, v, shape, out, pack, |scratch, blk| {
            let Block { b, h, r0, rows, visible, panels, padded, out_rows, width, .. } = *blk;
            let Scratch { keys: packed, values, scores, .. } = scratch;
            let scores = &mut scores[..rows * padded];
            let mut sums = [0f32; QUERY_BLOCK];
            // SAFETY: the CPU has AVX-512F (`causal_fast`); the query rows
            // r0..r1 of head h lie in `q` at stride strides[2], the packed K
            // and V hold every key (of which `visible` are read), and the
            // block's output rows belong to this unit only.
            unsafe {
                scores_block(&q.data[q.at(b, h, r0)..], q.strides[2], rows, packed, head_dim, panels, None, scores);
                blk.mask(scores);
                exp_block(scores, padded, visible, &mut sums[..rows]);
                values_block(scores, padded, visible, &sums[..rows], values, head_dim, out_rows, width);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..len)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// The textbook computation in f64.
    fn naive(q: Strided4, k: Strided4, v: Strided4, shape: CausalShape, scale: f32) -> Vec<f32> {
        let CausalShape { batch, heads, kv_heads, queries, keys, head_dim } = shape;
        let n_rep = heads / kv_heads;
        let mut out = vec![0f32; batch * queries * heads * head_dim];
        for b in 0..batch {
            for h in 0..heads {
                for i in 0..queries {
                    let visible = keys - queries + i + 1;
                    let s: Vec<f64> = (0..visible)
                        .map(|j| {
                            (0..head_dim)
                                .map(|d| q.data[q.at(b, h, i) + d] as f64 * k.data[k.at(b, h / n_rep, j) + d] as f64)
                                .sum::<f64>()
                                * scale as f64
                        })
                        .collect();
                    let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
                    let sum: f64 = e.iter().sum();
                    for d in 0..head_dim {
                        let o: f64 = (0..visible).map(|j| e[j] * v.data[v.at(b, h / n_rep, j) + d] as f64).sum();
                        out[((b * queries + i) * heads + h) * head_dim + d] = (o / sum) as f32;
                    }
                }
            }
        }
        out
    }

    fn check(kernel: fn(Strided4, Strided4, Strided4, CausalShape, f32, &mut [MaybeUninit<f32>]), name: &str, tolerance: f32) {
        // (batch, heads, kv heads, queries, keys, head_dim, key capacity): odd
        // query counts across block edges, n_rep 1/3/4, a cache prefix (keys >
        // queries) in a buffer with room to spare (strided like the KV cache).
        let cases = [
            (1, 2, 2, 1, 1, 16, 1),
            (1, 3, 1, 7, 7, 16, 7),
            (2, 4, 1, 50, 50, 32, 64),
            (1, 9, 3, 97, 97, 64, 97),
            (1, 6, 2, 49, 130, 64, 200),
            (2, 4, 4, 5, 70, 16, 80),
            (1, 3, 3, 1, 65, 64, 65),
            (1, 8, 2, 131, 131, 48, 140),
        ];
        for (seed, &(batch, heads, kv_heads, queries, keys, head_dim, capacity)) in cases.iter().enumerate() {
            let shape = CausalShape { batch, heads, kv_heads, queries, keys, head_dim };
            // q dense [b, h, t, d]; k and v in buffers [b, kvh, capacity, d].
            let qd = values(batch * heads * queries * head_dim, seed as u64);
            let kd = values(batch * kv_heads * capacity * head_dim, 50 + seed as u64);
            let vd = values(batch * kv_heads * capacity * head_dim, 90 + seed as u64);
            let q = Strided4 { data: &qd, strides: [heads * queries * head_dim, queries * head_dim, head_dim] };
            let kv_strides = [kv_heads * capacity * head_dim, capacity * head_dim, head_dim];
            let k = Strided4 { data: &kd, strides: kv_strides };
            let v = Strided4 { data: &vd, strides: kv_strides };
            let scale = 1.0 / (head_dim as f32).sqrt();
            let want = naive(q, k, v, shape, scale);
            for _ in 0..2 {
                let mut out = crate::output_buffer(want.len());
                kernel(q, k, v, shape, scale, &mut out);
                // SAFETY: the kernel writes every element.
                let got = unsafe { crate::assume_init(out) };
                let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(diff < tolerance, "{name} case {seed}: max diff {diff}");
            }
        }
    }

    #[test]
    fn causal_attention_matches_a_naive_reference() {
        check(causal_attention, "dispatched", 1e-5);
        check(plain, "plain", 1e-5);
    }

    #[test]
    fn bf16_causal_attention_is_within_bf16_rounding_of_the_reference() {
        if !causal_bf16_fast(64) {
            eprintln!("skipped: no AVX-512 BF16 here");
            return;
        }
        fn bf16(q: Strided4, k: Strided4, v: Strided4, shape: CausalShape, scale: f32, out: &mut [MaybeUninit<f32>]) {
            if !causal_attention_bf16(q, k, v, shape, scale, out) {
                // A width the bf16 tiles do not take: the f32 path.
                causal_attention(q, k, v, shape, scale, out);
            }
        }
        check(bf16, "bf16", 1e-2);
    }
}
