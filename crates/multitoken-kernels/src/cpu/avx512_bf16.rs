//! The causal prefill attention's two products in bf16 (`--dtype bf16` on a
//! CPU with AVX-512 BF16): the tiles of [`super::avx512`] with `vdpbf16ps`,
//! which does two multiply-adds of bf16 pairs per f32 lane where `vfmadd`
//! does one, at the same issue rate (two a cycle on Zen 5, measured).
//!
//! Layouts (a *pair* is two bf16 in one 32-bit lane, the lower index low,
//! as `vdpbf16ps` multiplies them with the other operand's pair):
//! - K, scaled: `[panel][d / 2][64 keys]` pairs along d, zero-padded;
//! - V: `[key / 2][d]` pairs along keys (the last pair's second key 0);
//! - a unit's queries: `[row][d / 2]` pairs along d, one broadcast per step;
//! - its probabilities: `[row][key / 2]` pairs along keys, rounded after the
//!   f32 softmax numerators (which stay f32: the sums that divide them too).
//!
//! Each product sums in f32. Rounding q, k, v and p to bf16 is what
//! transformers' bf16 attention does too; the f32 path stays the default.

use std::arch::x86_64::*;

use super::avx512::{for_each_values_tile, reciprocal_sums, ValuesTile, KEY_CHUNK, PANEL, QUERY_BLOCK, TILE_ROWS};
use super::Rows;
use crate::bf16::avx512::as_bh;
use crate::bf16::{bf16_pair as pair, round_pairs_into};

/// Whether this CPU and head width can take the bf16 tiles: AVX-512 F and
/// BF16, and a head width the f32 tiles take (a multiple of 16).
pub(super) fn applies(head_dim: usize) -> bool {
    super::avx512::applies(head_dim) && std::arch::is_x86_feature_detected!("avx512bf16")
}

/// Packs key head `h` of batch `b` in the layouts above: K scaled into panels
/// of pairs along d, V into pairs along keys.
#[allow(clippy::too_many_arguments)]
pub(super) fn pack_head(packed: &mut Vec<u32>, values: &mut Vec<u32>, k: Rows, v: Rows, (b, h): (usize, usize), keys: usize, head_dim: usize, scale: f32) {
    let (panels, half) = (keys.div_ceil(PANEL), head_dim / 2);
    packed.clear();
    packed.resize(panels * half * PANEL, 0);
    for key in 0..keys {
        let src = &k.data[b * k.batch_stride + key * k.row_stride + h * head_dim..][..head_dim];
        let panel = &mut packed[(key / PANEL) * half * PANEL..][..half * PANEL];
        let lane = key % PANEL;
        for (dp, two) in src.chunks_exact(2).enumerate() {
            panel[dp * PANEL + lane] = pair(two[0] * scale, two[1] * scale);
        }
    }
    values.clear();
    values.resize(keys.div_ceil(2) * head_dim, 0);
    let row = |key: usize| &v.data[b * v.batch_stride + key * v.row_stride + h * head_dim..][..head_dim];
    for (kp, dst) in values.chunks_exact_mut(head_dim).enumerate() {
        let first = row(2 * kp);
        if 2 * kp + 1 < keys {
            for ((d, &lo), &hi) in dst.iter_mut().zip(first).zip(row(2 * kp + 1)) {
                *d = pair(lo, hi);
            }
        } else {
            for (d, &lo) in dst.iter_mut().zip(first) {
                *d = pair(lo, 0.0);
            }
        }
    }
}

/// `rows` query rows of `head_dim` floats, `stride` apart, into pairs along d.
pub(super) fn pack_queries(q: &[f32], stride: usize, rows: usize, head_dim: usize, out: &mut Vec<u32>) {
    let half = head_dim / 2;
    out.clear();
    out.resize(rows * half, 0);
    for (r, dst) in out.chunks_exact_mut(half.max(1)).enumerate() {
        round_pairs_into(&q[r * stride..][..head_dim], head_dim, half, dst);
    }
}

/// `scores[i, key] = q[i] · k_scaled[key]` for the `rows` query rows in
/// `queries` (pairs, `head_dim / 2` a row), every panel (padded keys included).
///
/// # Safety
/// AVX-512 F and BF16; `packed` holds `panels` panels and `scores` `rows`
/// rows of `panels × 64`.
#[target_feature(enable = "avx512f,avx512bf16")]
pub(super) unsafe fn scores_block(queries: &[u32], rows: usize, packed: &[u32], head_dim: usize, panels: usize, scores: &mut [f32]) {
    let (padded, half) = (panels * PANEL, head_dim / 2);
    debug_assert!(scores.len() >= rows * padded && packed.len() >= panels * half * PANEL && queries.len() >= rows * half);
    // SAFETY: the bounds above, checked by the caller.
    unsafe {
        for p in 0..panels {
            let panel = packed.as_ptr().add(p * half * PANEL);
            let mut r = 0;
            while r < rows {
                let tile = (rows - r).min(TILE_ROWS);
                let (q, dst) = (queries.as_ptr().add(r * half), scores.as_mut_ptr().add(r * padded + p * PANEL));
                match tile {
                    6 => scores_tile::<6>(q, half, panel, dst, padded),
                    5 => scores_tile::<5>(q, half, panel, dst, padded),
                    4 => scores_tile::<4>(q, half, panel, dst, padded),
                    3 => scores_tile::<3>(q, half, panel, dst, padded),
                    2 => scores_tile::<2>(q, half, panel, dst, padded),
                    _ => scores_tile::<1>(q, half, panel, dst, padded),
                }
                r += tile;
            }
        }
    }
}

/// One `R` × 64 tile of scores: one panel row of pairs and `R` broadcast
/// query pairs per step of two dims.
#[inline]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn scores_tile<const R: usize>(q: *const u32, half: usize, panel: *const u32, dst: *mut f32, dst_stride: usize) {
    // SAFETY: forwarded from `scores_block`.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); 4]; R];
        for dp in 0..half {
            let row = panel.add(dp * PANEL);
            let k: [__m512bh; 4] = std::array::from_fn(|j| as_bh(_mm512_loadu_si512(row.add(16 * j).cast())));
            for (i, acc) in acc.iter_mut().enumerate() {
                let qi = as_bh(_mm512_set1_epi32(*q.add(i * half + dp) as i32));
                for (a, &kj) in acc.iter_mut().zip(&k) {
                    *a = _mm512_dpbf16_ps(*a, kj, qi);
                }
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            for (j, &a) in acc.iter().enumerate() {
                _mm512_storeu_ps(dst.add(i * dst_stride + 16 * j), a);
            }
        }
    }
}

/// Each `stride`-long row of `probs` (its first `keys` values) into pairs
/// along keys, `stride / 2` pairs a row of `out`; an odd last key is paired
/// with 0.
///
/// # Safety
/// AVX-512 F and BF16; `keys <= stride`, `stride` even, `probs` and `out`
/// hold `rows` rows.
#[target_feature(enable = "avx512f,avx512bf16")]
pub(super) unsafe fn round_probs(probs: &[f32], stride: usize, keys: usize, rows: usize, out: &mut [u32]) {
    debug_assert!(keys <= stride && stride.is_multiple_of(2) && probs.len() >= rows * stride && out.len() >= rows * stride / 2);
    for r in 0..rows {
        let (src, dst) = (&probs[r * stride..][..keys], &mut out[r * stride / 2..][..keys.div_ceil(2)]);
        let mut chunks = src.chunks_exact(32);
        let mut at = 0;
        for c in &mut chunks {
            // SAFETY: 32 floats in, 16 pairs out; `cvtne2ps_pbh(hi, lo)` puts
            // `lo`'s 16 values first, so consecutive values share a lane.
            unsafe {
                let (lo, hi) = (_mm512_loadu_ps(c.as_ptr()), _mm512_loadu_ps(c.as_ptr().add(16)));
                let bh = _mm512_cvtne2ps_pbh(hi, lo);
                _mm512_storeu_si512(dst.as_mut_ptr().add(at).cast(), std::mem::transmute::<__m512bh, __m512i>(bh));
            }
            at += 16;
        }
        let rest = chunks.remainder();
        for (d, two) in dst[at..].iter_mut().zip(rest.chunks(2)) {
            *d = pair(two[0], two.get(1).copied().unwrap_or(0.0));
        }
    }
}

/// `out[i, ..head_dim] = Σ_key p[i, key] v[key] / sums[i]` for every row of
/// `probs` (pairs, `stride / 2` a row) over its first `keys` keys, `v` in
/// pairs along keys; rows whose sum is 0 come out as zeros.
///
/// # Safety
/// AVX-512 F and BF16; the operands hold what they say, `out` rows
/// `out_stride` apart hold `head_dim` floats each and belong to the caller.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bf16")]
pub(super) unsafe fn values_block(probs: &[u32], stride: usize, keys: usize, sums: &[f32], v: &[u32], head_dim: usize, out: *mut f32, out_stride: usize) {
    let (rows, pairs, half_stride) = (sums.len(), keys.div_ceil(2), stride / 2);
    let inv = reciprocal_sums(sums);
    debug_assert!(rows <= QUERY_BLOCK && probs.len() >= rows * half_stride && v.len() >= pairs * head_dim);
    // SAFETY: the bounds above, checked by the caller; chunks of pairs
    // cover the f32 path's key chunks.
    unsafe {
        for_each_values_tile(probs, half_stride, pairs, &inv[..rows], v, head_dim, out, out_stride, KEY_CHUNK / 2, |tile, vectors, t| {
            macro_rules! dispatch {
                ($($r:literal),*) => {
                    match (tile, vectors) {
                        $(($r, 4) => values_tile::<$r, 4>(t), ($r, 3) => values_tile::<$r, 3>(t), ($r, 2) => values_tile::<$r, 2>(t), ($r, _) => values_tile::<$r, 1>(t),)*
                        (_, 4) => values_tile::<1, 4>(t),
                        (_, 3) => values_tile::<1, 3>(t),
                        (_, 2) => values_tile::<1, 2>(t),
                        (_, _) => values_tile::<1, 1>(t),
                    }
                };
            }
            dispatch!(6, 5, 4, 3, 2)
        });
    }
}

/// One `R` rows × `C` vectors tile of the ·V product over one chunk of key
/// pairs (`t.keys` pairs).
#[inline]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn values_tile<const R: usize, const C: usize>(t: ValuesTile<u32>) {
    // SAFETY: forwarded from `values_block`.
    unsafe {
        let mut acc = t.start::<R, C>();
        for kp in 0..t.keys {
            let row = t.v.add(kp * t.v_stride);
            let vs: [__m512bh; C] = std::array::from_fn(|j| as_bh(_mm512_loadu_si512(row.add(16 * j).cast())));
            for (i, acc) in acc.iter_mut().enumerate() {
                let pi = as_bh(_mm512_set1_epi32(*t.probs.add(i * t.stride + kp) as i32));
                for (a, &vj) in acc.iter_mut().zip(&vs) {
                    *a = _mm512_dpbf16_ps(*a, vj, pi);
                }
            }
        }
        t.finish(&acc);
    }
}
