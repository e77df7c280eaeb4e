//! Multi-head attention with AVX-512 register tiles, for CPUs that have it.
//!
//! The gemm-based path in [`super::attention`] calls gemm twice per (head,
//! query block) with an inner dimension of 64 (the head width): gemm then
//! repacks K and V for every call, and the 512 × 1500 score block it writes
//! (3 MiB) leaves the L2 cache before the softmax and the ·V product read it
//! back. Measured on one thread over Whisper-base's 8 heads × 1500²: q·kᵀ ran
//! at 139 GFLOP/s, ·V at 165, and the softmax's exp took 8.8 ms of 39.
//!
//! Here each pool thread packs the K of a (batch, head) once, pre-scaled, into
//! 64-key panels (`[panel][d][64]`, zero-padded) and copies its V rows side by
//! side, then runs the units (batch, head, [`QUERY_BLOCK`] queries) it is given
//! with the score block in L2:
//! 1. scores: 6 query rows × 64 keys in 24 zmm accumulators, one panel row and
//!    six broadcast query values per step of d;
//! 2. `e^(s - row max)` in place ([`crate::math::avx512::exp_row`]), keeping
//!    each row's sum;
//! 3. out: 6 query rows × up to 64 output columns over chunks of 128 keys, one
//!    V row and six broadcast probabilities per key, divided by the row sums
//!    as they are stored.
//!
//! Measured the same way (one thread, the whole call): 30–32 ms against 39–42
//! for the gemm path's three steps; in a profile of the Whisper encoder the two
//! tile kernels take about the same time each and exp a third of either.

use std::arch::x86_64::*;
use std::cell::RefCell;
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicU64, Ordering};

use super::{for_each_unit, AttentionShape, AttentionUnits, Rows};
use crate::math;

/// Keys per packed panel: four zmm vectors.
pub(super) const PANEL: usize = 64;
/// Query rows per register tile.
pub(super) const TILE_ROWS: usize = 6;
/// Query rows per unit: a multiple of [`TILE_ROWS`]. 48 rows of 1500 keys is
/// 288 KiB of scores, which stays in L2 beside the head's packed K and its V
/// (384 KiB each).
pub(super) const QUERY_BLOCK: usize = 48;
/// Keys per chunk of the ·V product: 128 rows of V at width 64 is 32 KiB, inside L1.
pub(super) const KEY_CHUNK: usize = 128;

/// One pool thread's buffers, kept between calls so that no call faults in
/// fresh pages.
#[derive(Default)]
struct Scratch {
    /// The (call, batch, head) whose K and V are in `keys` and `values`.
    head: Option<(u64, usize, usize)>,
    /// That head's K, scaled and packed into panels (`[panel][d][64]`, zero-padded).
    keys: Vec<f32>,
    /// That head's V, its rows side by side: in place, the rows of one head
    /// are `width` (or 3 · width in a fused QKV) floats apart, and at that
    /// power-of-two stride they fall into a fraction of the cache's sets
    /// (measured: the ·V tile stalled on its loads and ran at a third of the
    /// speed of gemm's).
    values: Vec<f32>,
    /// A unit's queries, rows side by side (as V).
    queries: Vec<f32>,
    /// A unit's score block, rows `padded` apart.
    scores: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Numbers the calls, so that a thread's packed head is never taken for the
/// same head of another call.
static CALLS: AtomicU64 = AtomicU64::new(0);

/// Whether this CPU and head width can take this path: AVX-512F, and heads a
/// whole number of 16-float vectors wide (the ·V tile stores whole vectors).
pub(super) fn applies(head_dim: usize) -> bool {
    head_dim > 0 && head_dim.is_multiple_of(16) && std::is_x86_feature_detected!("avx512f")
}

/// [`super::attention`] on this path; the caller checked [`applies`].
pub(super) fn attention(
    q: Rows,
    k: Rows,
    v: Rows,
    shape: AttentionShape,
    scale: f32,
    key_bias: Option<&[f32]>,
    out: &mut [MaybeUninit<f32>],
) {
    let AttentionShape {
        batch,
        queries,
        keys,
        heads,
        head_dim,
    } = shape;
    let width = heads * head_dim;
    let panels = keys.div_ceil(PANEL);
    let padded = panels * PANEL;
    let call = CALLS.fetch_add(1, Ordering::Relaxed);
    // The key bias, padded to whole panels (the padded keys are never read back).
    let bias: Option<Vec<f32>> = key_bias.map(|bias| {
        let mut padded_bias = vec![0f32; batch * padded];
        for b in 0..batch {
            padded_bias[b * padded..][..keys].copy_from_slice(&bias[b * keys..(b + 1) * keys]);
        }
        padded_bias
    });

    let units = AttentionUnits::new(shape, QUERY_BLOCK);
    let out_ptr = crate::Shared(out.as_mut_ptr().cast::<f32>());
    // A thread's units are consecutive (the pool hands out ranges), so each
    // thread packs each head it meets once.
    for_each_unit(units.count(), |unit| {
        let (b, h, r0, r1) = units.get(unit);
        let rows = r1 - r0;
        SCRATCH.with_borrow_mut(|scratch| {
            if scratch.head != Some((call, b, h)) {
                scratch.head = Some((call, b, h));
                pack_head(
                    &mut scratch.keys,
                    &mut scratch.values,
                    k,
                    v,
                    (b, h),
                    keys,
                    head_dim,
                    scale,
                );
            }
            let Scratch {
                keys: packed,
                values,
                queries: queries_copy,
                scores,
                ..
            } = scratch;
            queries_copy.clear();
            for row in r0..r1 {
                queries_copy.extend_from_slice(
                    &q.data[b * q.batch_stride + row * q.row_stride + h * head_dim..][..head_dim],
                );
            }
            if scores.len() < rows * padded {
                scores.resize(rows * padded, 0.0);
            }
            let scores = &mut scores[..rows * padded];
            let unit_bias = bias.as_ref().map(|bias| &bias[b * padded..][..padded]);
            let mut sums = [0f32; QUERY_BLOCK];
            // SAFETY: the CPU has AVX-512F (`applies`). Every pointer the kernels
            // derive stays inside the slices handed to them for this shape, and
            // out rows r0..r1 of head h belong to this unit only.
            unsafe {
                scores_block(
                    queries_copy,
                    head_dim,
                    rows,
                    packed,
                    head_dim,
                    panels,
                    unit_bias,
                    scores,
                );
                exp_block(scores, padded, keys, &mut sums[..rows]);
                let out_rows = out_ptr.at((b * queries + r0) * width + h * head_dim);
                values_block(
                    scores,
                    padded,
                    keys,
                    &sums[..rows],
                    values,
                    head_dim,
                    out_rows,
                    width,
                );
            }
        });
    });
}

/// Packs head `h` of batch `b`: K scaled into 64-key panels, V rows side by side.
#[allow(clippy::too_many_arguments)]
pub(super) fn pack_head(
    packed: &mut Vec<f32>,
    values: &mut Vec<f32>,
    k: Rows,
    v: Rows,
    (b, h): (usize, usize),
    keys: usize,
    head_dim: usize,
    scale: f32,
) {
    let panels = keys.div_ceil(PANEL);
    packed.clear();
    packed.resize(panels * head_dim * PANEL, 0.0);
    for key in 0..keys {
        let src = &k.data[b * k.batch_stride + key * k.row_stride + h * head_dim..][..head_dim];
        let panel = &mut packed[(key / PANEL) * head_dim * PANEL..][..head_dim * PANEL];
        let lane = key % PANEL;
        for (d, &x) in src.iter().enumerate() {
            panel[d * PANEL + lane] = x * scale;
        }
    }
    values.clear();
    for key in 0..keys {
        values.extend_from_slice(
            &v.data[b * v.batch_stride + key * v.row_stride + h * head_dim..][..head_dim],
        );
    }
}

/// `scores[i, key] = q[i] · k_scaled[key] + bias[key]` for `rows` query rows,
/// every panel (padded keys included).
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn scores_block(
    q: &[f32],
    q_stride: usize,
    rows: usize,
    packed: &[f32],
    head_dim: usize,
    panels: usize,
    bias: Option<&[f32]>,
    scores: &mut [f32],
) {
    unsafe {
        let padded = panels * PANEL;
        debug_assert!(scores.len() >= rows * padded && packed.len() >= panels * head_dim * PANEL);
        debug_assert!(rows == 0 || q.len() >= (rows - 1) * q_stride + head_dim);
        // Panels outside, row tiles inside: one panel (16 KiB at width 64) and the
        // block's queries stay in L1 while every row tile uses them.
        for p in 0..panels {
            let panel = packed.as_ptr().add(p * head_dim * PANEL);
            let bias = bias.map(|b| b.as_ptr().add(p * PANEL));
            let mut r = 0;
            while r < rows {
                let tile = (rows - r).min(TILE_ROWS);
                let dst = scores.as_mut_ptr().add(r * padded + p * PANEL);
                let q_rows = q.as_ptr().add(r * q_stride);
                match tile {
                    6 => scores_tile::<6>(q_rows, q_stride, panel, head_dim, bias, dst, padded),
                    5 => scores_tile::<5>(q_rows, q_stride, panel, head_dim, bias, dst, padded),
                    4 => scores_tile::<4>(q_rows, q_stride, panel, head_dim, bias, dst, padded),
                    3 => scores_tile::<3>(q_rows, q_stride, panel, head_dim, bias, dst, padded),
                    2 => scores_tile::<2>(q_rows, q_stride, panel, head_dim, bias, dst, padded),
                    _ => scores_tile::<1>(q_rows, q_stride, panel, head_dim, bias, dst, padded),
                }
                r += tile;
            }
        }
    }
}

/// One `R` × 64 tile of scores.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn scores_tile<const R: usize>(
    q: *const f32,
    q_stride: usize,
    panel: *const f32,
    head_dim: usize,
    bias: Option<*const f32>,
    dst: *mut f32,
    dst_stride: usize,
) {
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); 4]; R];
        for d in 0..head_dim {
            let row = panel.add(d * PANEL);
            let k = [
                _mm512_loadu_ps(row),
                _mm512_loadu_ps(row.add(16)),
                _mm512_loadu_ps(row.add(32)),
                _mm512_loadu_ps(row.add(48)),
            ];
            for (i, acc) in acc.iter_mut().enumerate() {
                let qi = _mm512_set1_ps(*q.add(i * q_stride + d));
                for (a, &kj) in acc.iter_mut().zip(&k) {
                    *a = _mm512_fmadd_ps(qi, kj, *a);
                }
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            for (j, &a) in acc.iter().enumerate() {
                let value = match bias {
                    Some(bias) => _mm512_add_ps(a, _mm512_loadu_ps(bias.add(16 * j))),
                    None => a,
                };
                _mm512_storeu_ps(dst.add(i * dst_stride + 16 * j), value);
            }
        }
    }
}

/// `row[..keys] = e^(row - max)` for every `stride`-long row of `scores`,
/// the sums in `sums` (see [`crate::math::avx512::exp_row`]).
#[target_feature(enable = "avx512f")]
pub(super) fn exp_block(scores: &mut [f32], stride: usize, keys: usize, sums: &mut [f32]) {
    for (row, sum) in scores.chunks_exact_mut(stride).zip(sums.iter_mut()) {
        // SAFETY: the row holds stride >= keys floats.
        *sum = unsafe { math::avx512::exp_row(row.as_mut_ptr(), keys) };
    }
}

/// `out[i, ..head_dim] = Σ_key p[i, key] v[key] / sums[i]` for every row of
/// `probs`; rows whose sum is 0 (every key masked) come out as zeros. `v` is
/// dense, `keys` rows of `head_dim`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn values_block(
    probs: &[f32],
    stride: usize,
    keys: usize,
    sums: &[f32],
    v: &[f32],
    head_dim: usize,
    out: *mut f32,
    out_stride: usize,
) {
    unsafe {
        let rows = sums.len();
        debug_assert!(probs.len() >= rows * stride && v.len() >= keys * head_dim);
        let inv = reciprocal_sums(sums);
        for_each_values_tile(probs, stride, keys, &inv[..rows], v, head_dim, out, out_stride, KEY_CHUNK, |tile, vectors, args| match (tile, vectors) {
            (6, 4) => values_tile::<6, 4>(args),
            (6, 3) => values_tile::<6, 3>(args),
            (6, 2) => values_tile::<6, 2>(args),
            (6, _) => values_tile::<6, 1>(args),
            (5, 4) => values_tile::<5, 4>(args),
            (5, 3) => values_tile::<5, 3>(args),
            (5, 2) => values_tile::<5, 2>(args),
            (5, _) => values_tile::<5, 1>(args),
            (4, 4) => values_tile::<4, 4>(args),
            (4, 3) => values_tile::<4, 3>(args),
            (4, 2) => values_tile::<4, 2>(args),
            (4, _) => values_tile::<4, 1>(args),
            (3, 4) => values_tile::<3, 4>(args),
            (3, 3) => values_tile::<3, 3>(args),
            (3, 2) => values_tile::<3, 2>(args),
            (3, _) => values_tile::<3, 1>(args),
            (2, 4) => values_tile::<2, 4>(args),
            (2, 3) => values_tile::<2, 3>(args),
            (2, 2) => values_tile::<2, 2>(args),
            (2, _) => values_tile::<2, 1>(args),
            (_, 4) => values_tile::<1, 4>(args),
            (_, 3) => values_tile::<1, 3>(args),
            (_, 2) => values_tile::<1, 2>(args),
            (_, _) => values_tile::<1, 1>(args),
        });
    }
}

/// Each row's `1 / sum`, and 0 for a row whose sum is 0 (every key masked):
/// what the ·V tiles scale their rows by.
pub(super) fn reciprocal_sums(sums: &[f32]) -> [f32; QUERY_BLOCK] {
    let mut inv = [0f32; QUERY_BLOCK];
    for (inv, &sum) in inv.iter_mut().zip(sums) {
        *inv = if sum > 0.0 { 1.0 / sum } else { 0.0 };
    }
    inv
}

/// The ·V product's walk over its tiles: chunks of `chunk` keys (or key
/// pairs) outside, [`TILE_ROWS`]-row tiles inside, so that a chunk of V stays
/// in L1 while every row tile reads it (the partial sums wait in `out`), and
/// up to four vectors of output columns per tile. `tile(rows, vectors, t)`
/// runs one; `probs` rows are `stride` elements apart, `v` rows `head_dim`,
/// and `inv` holds each row's reciprocal sum.
///
/// # Safety
/// The operands hold `inv.len()` rows of `keys` probabilities, `keys` rows of
/// V and `inv.len()` output rows of `head_dim` floats, `out_stride` apart.
#[allow(clippy::too_many_arguments)]
#[inline]
pub(super) unsafe fn for_each_values_tile<T>(
    probs: &[T],
    stride: usize,
    keys: usize,
    inv: &[f32],
    v: &[T],
    head_dim: usize,
    out: *mut f32,
    out_stride: usize,
    chunk: usize,
    tile: impl Fn(usize, usize, ValuesTile<T>),
) {
    let rows = inv.len();
    let mut k0 = 0;
    while k0 < keys {
        let len = (keys - k0).min(chunk);
        let (first, last) = (k0 == 0, k0 + len == keys);
        let mut r = 0;
        while r < rows {
            let n = (rows - r).min(TILE_ROWS);
            let mut c = 0;
            while c < head_dim {
                let vectors = ((head_dim - c) / 16).min(4);
                // SAFETY: every pointer stays inside its operand (the contract).
                let t = unsafe {
                    ValuesTile {
                        probs: probs.as_ptr().add(r * stride + k0),
                        stride,
                        keys: len,
                        v: v.as_ptr().add(k0 * head_dim + c),
                        v_stride: head_dim,
                        out: out.add(r * out_stride + c),
                        out_stride,
                        first,
                        inv: if last { Some(inv.as_ptr().add(r)) } else { None },
                    }
                };
                tile(n, vectors, t);
                c += 16 * vectors;
            }
            r += n;
        }
        k0 += len;
    }
}

/// The operands of one ·V tile, each pointer at the tile's first element:
/// `T` is `f32` here and a pair of bf16 (`u32`) in `avx512_bf16`, where
/// `keys` counts key pairs and the strides are in pairs.
#[derive(Clone, Copy)]
pub(super) struct ValuesTile<T> {
    /// Probabilities, rows `stride` apart.
    pub(super) probs: *const T,
    pub(super) stride: usize,
    /// Keys (or key pairs) in this chunk.
    pub(super) keys: usize,
    /// V, rows `v_stride` apart.
    pub(super) v: *const T,
    pub(super) v_stride: usize,
    /// The output, rows `out_stride` apart: written on the first chunk, added to after.
    pub(super) out: *mut f32,
    pub(super) out_stride: usize,
    pub(super) first: bool,
    /// On the last chunk, the rows' reciprocal sums to scale the result by.
    pub(super) inv: Option<*const f32>,
}

impl<T> ValuesTile<T> {
    /// The tile's accumulators at the start of its chunk: zeros on the
    /// first chunk, else the partial sums waiting in `out`.
    ///
    /// # Safety
    /// AVX-512F; `out` holds `R` rows of `C` vectors.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn start<const R: usize, const C: usize>(&self) -> [[__m512; C]; R] {
        let mut acc = [[_mm512_setzero_ps(); C]; R];
        if !self.first {
            for (i, acc) in acc.iter_mut().enumerate() {
                for (j, a) in acc.iter_mut().enumerate() {
                    // SAFETY: the caller's contract.
                    *a = unsafe { _mm512_loadu_ps(self.out.add(i * self.out_stride + 16 * j)) };
                }
            }
        }
        acc
    }

    /// Stores the accumulators to `out`, scaled by each row's reciprocal sum
    /// on the last chunk.
    ///
    /// # Safety
    /// As [`ValuesTile::start`], and `inv` holds `R` values when present.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn finish<const R: usize, const C: usize>(&self, acc: &[[__m512; C]; R]) {
        for (i, acc) in acc.iter().enumerate() {
            // SAFETY: the caller's contract.
            unsafe {
                let scale = _mm512_set1_ps(match self.inv {
                    Some(inv) => *inv.add(i),
                    None => 1.0,
                });
                for (j, &a) in acc.iter().enumerate() {
                    _mm512_storeu_ps(self.out.add(i * self.out_stride + 16 * j), _mm512_mul_ps(a, scale));
                }
            }
        }
    }
}

/// One `R` rows × `C` vectors tile of the ·V product over one chunk of keys.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn values_tile<const R: usize, const C: usize>(t: ValuesTile<f32>) {
    unsafe {
        let mut acc = t.start::<R, C>();
        for key in 0..t.keys {
            let row = t.v.add(key * t.v_stride);
            let mut vs = [_mm512_setzero_ps(); C];
            for (j, x) in vs.iter_mut().enumerate() {
                *x = _mm512_loadu_ps(row.add(16 * j));
            }
            for (i, acc) in acc.iter_mut().enumerate() {
                let pi = _mm512_set1_ps(*t.probs.add(i * t.stride + key));
                for (a, &vj) in acc.iter_mut().zip(&vs) {
                    *a = _mm512_fmadd_ps(pi, vj, *a);
                }
            }
        }
        t.finish(&acc);
    }
}
