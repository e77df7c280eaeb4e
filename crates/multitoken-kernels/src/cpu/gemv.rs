//! `out[r, n] = x[r, k] · W[n, k]^T` for a handful of rows (a decode step):
//! a matrix-vector product that streams `W` once from memory.
//!
//! A decode step of a small f32 model is bound by the bandwidth it reads its
//! weights with (SmolVLM-256M's text model reads ~540 MB per token), and
//! candle's `x.matmul(&w.t())` on one row runs gemm's packing path on one
//! thread. Here the rows of `W` are split over the pool's threads in
//! contiguous chunks, each thread streams its rows four at a time (four
//! sequential read streams, which the hardware prefetcher follows), and every
//! output is one dot product in a fixed order: the result does not depend on
//! the thread count or on which thread ran which chunk.

use std::mem::MaybeUninit;

use super::{for_each_unit, SharedOut};

/// Rows of `W` per register block: four dot products in flight, each with two
/// accumulators, so eight independent FMA chains hide the FMA latency.
const W_BLOCK: usize = 4;

/// Below this many weights (`n · k`) the product runs on the calling thread:
/// the pool's hand-off costs a few microseconds, about what 32K floats take to
/// stream on one core.
const PARALLEL_FROM: usize = 1 << 15;

/// `out[r * n + j] = Σ_i x[r * k + i] · w[j * k + i]` for `r < rows`, `j < n`.
/// `x` is `[rows, k]` and `w` `[n, k]`, both row-major and dense. Every element
/// of `out` is written, so it may start uninitialised.
pub fn gemv(x: &[f32], rows: usize, k: usize, w: &[f32], n: usize, out: &mut [MaybeUninit<f32>]) {
    gemv_many(x, rows, k, &[(w, n)], &mut [out]);
}

/// Several products of one `x` in one call on the pool: `outs[p] = x ws[p]^T`
/// (`[rows, n_p]` for `ws[p] = (w_p, n_p)`), each bit for bit what [`gemv`]
/// gives it alone. A decode step's q / k / v (or gate / up) this way is one
/// hand-off to the pool instead of three, and each thread streams one run of
/// consecutive weight blocks across the matrices.
///
/// The matrices' four-row blocks, in order, are split into one contiguous run
/// per thread, so only a matrix's last block can be ragged and every output
/// takes the same operations whichever run holds it ([`gemv`] is this with
/// one matrix).
///
/// # Panics
/// When an operand is too short (a caller's bug, not input).
pub fn gemv_many(x: &[f32], rows: usize, k: usize, ws: &[(&[f32], usize)], outs: &mut [&mut [MaybeUninit<f32>]]) {
    assert!(ws.len() == outs.len() && x.len() >= rows * k, "gemv: operands do not fit");
    for ((w, n), out) in ws.iter().zip(outs.iter()) {
        assert!(w.len() >= n * k && out.len() >= rows * n, "gemv: operands too short");
    }
    if rows == 0 {
        return;
    }
    if k == 0 {
        for ((_, n), out) in ws.iter().zip(outs.iter_mut()) {
            out[..rows * n].fill(MaybeUninit::new(0.0));
        }
        return;
    }
    let blocks: usize = ws.iter().map(|(_, n)| n.div_ceil(W_BLOCK)).sum();
    let weights: usize = ws.iter().map(|(_, n)| n * k).sum();
    let threads = candle_core::utils::get_num_threads().max(1);
    let units = if weights < PARALLEL_FROM { 1 } else { threads.min(blocks).max(1) };
    let per_unit = blocks.div_ceil(units);
    let out_ptrs: Vec<SharedOut> = outs.iter_mut().map(|o| crate::Shared(o.as_mut_ptr().cast::<f32>())).collect();
    for_each_unit(units, |unit| {
        let (start, end) = (unit * per_unit, ((unit + 1) * per_unit).min(blocks));
        // Each matrix's share of the run `start..end` of global block indices.
        let mut first = 0;
        for (&(w, n), &out) in ws.iter().zip(&out_ptrs) {
            let count = n.div_ceil(W_BLOCK);
            let (lo, hi) = (start.max(first), end.min(first + count));
            if lo < hi {
                // SAFETY: rows (lo - first) * 4 .. of this matrix belong to this
                // unit only; the operands were checked above.
                unsafe { gemv_columns(x, rows, k, w, n, (lo - first) * W_BLOCK, ((hi - first) * W_BLOCK).min(n), out) };
            }
            first += count;
        }
    });
}

/// Columns `j0..j1` of [`gemv`]'s output.
///
/// # Safety
/// `out` points at `rows * n` writable floats of which this call owns columns
/// `j0..j1`; `x` and `w` hold `[rows, k]` and `[n, k]`.
#[allow(clippy::too_many_arguments)]
unsafe fn gemv_columns(x: &[f32], rows: usize, k: usize, w: &[f32], n: usize, j0: usize, j1: usize, out: SharedOut) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F; the caller's guarantees carry over.
        unsafe { avx512::columns(x, rows, k, w, n, j0, j1, out) };
        return;
    }
    for j in j0..j1 {
        let wj = &w[j * k..(j + 1) * k];
        for r in 0..rows {
            let value = dot_generic(&x[r * k..(r + 1) * k], wj);
            // SAFETY: (r, j) is inside `out` and owned by this call.
            unsafe { *out.at(r * n + j) = value };
        }
    }
}

/// `a · b` in sixteen lanes (the same order on every call).
fn dot_generic(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let (ac, bc) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ac.remainder().iter().zip(bc.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ac.zip(bc) {
        for l in 0..16 {
            lanes[l] = x[l].mul_add(y[l], lanes[l]);
        }
    }
    lanes.iter().sum::<f32>() + tail
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{SharedOut, W_BLOCK};

    /// [`super::gemv_columns`] with AVX-512: blocks of four W rows, each block
    /// multiplied by every x row while it is in L1.
    ///
    /// # Safety
    /// AVX-512F, and [`super::gemv_columns`]'s contract.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn columns(x: &[f32], rows: usize, k: usize, w: &[f32], n: usize, j0: usize, j1: usize, out: SharedOut) {
        unsafe {
            let mut j = j0;
            while j + W_BLOCK <= j1 {
                let wp = w.as_ptr().add(j * k);
                // Two x rows per pass share each loaded weight vector (a batched
                // decode step); a row left over goes alone. Both compute every
                // output with block4's operations in block4's order.
                let mut r = 0;
                while r + 2 <= rows {
                    let [first, second] = block4x2(x.as_ptr().add(r * k), x.as_ptr().add((r + 1) * k), wp, k);
                    for c in 0..W_BLOCK {
                        *out.at(r * n + j + c) = first[c];
                        *out.at((r + 1) * n + j + c) = second[c];
                    }
                    r += 2;
                }
                if r < rows {
                    let sums = block4(x.as_ptr().add(r * k), wp, k);
                    for (c, &s) in sums.iter().enumerate() {
                        *out.at(r * n + j + c) = s;
                    }
                }
                j += W_BLOCK;
            }
            while j < j1 {
                let wp = w.as_ptr().add(j * k);
                for r in 0..rows {
                    *out.at(r * n + j) = block1(x.as_ptr().add(r * k), wp, k);
                }
                j += 1;
            }
        }
    }

    /// The mask of the last `k % 16` lanes.
    #[inline]
    fn tail_mask(k: usize) -> __mmask16 {
        ((1u32 << (k % 16)) - 1) as __mmask16
    }

    /// `x · w[c]` for the four consecutive rows `w[c]` (`k` apart) at `w`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn block4(x: *const f32, w: *const f32, k: usize) -> [f32; 4] {
        unsafe {
            let mut a = [_mm512_setzero_ps(); 4];
            let mut b = [_mm512_setzero_ps(); 4];
            let mut i = 0;
            // Two vectors per step and row: eight independent FMA chains.
            while i + 32 <= k {
                let x0 = _mm512_loadu_ps(x.add(i));
                let x1 = _mm512_loadu_ps(x.add(i + 16));
                for c in 0..4 {
                    let row = w.add(c * k + i);
                    a[c] = _mm512_fmadd_ps(x0, _mm512_loadu_ps(row), a[c]);
                    b[c] = _mm512_fmadd_ps(x1, _mm512_loadu_ps(row.add(16)), b[c]);
                }
                i += 32;
            }
            if i + 16 <= k {
                let x0 = _mm512_loadu_ps(x.add(i));
                for (c, a) in a.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(x0, _mm512_loadu_ps(w.add(c * k + i)), *a);
                }
                i += 16;
            }
            if i < k {
                let mask = tail_mask(k);
                let x0 = _mm512_maskz_loadu_ps(mask, x.add(i));
                for (c, b) in b.iter_mut().enumerate() {
                    *b = _mm512_fmadd_ps(x0, _mm512_maskz_loadu_ps(mask, w.add(c * k + i)), *b);
                }
            }
            [
                _mm512_reduce_add_ps(_mm512_add_ps(a[0], b[0])),
                _mm512_reduce_add_ps(_mm512_add_ps(a[1], b[1])),
                _mm512_reduce_add_ps(_mm512_add_ps(a[2], b[2])),
                _mm512_reduce_add_ps(_mm512_add_ps(a[3], b[3])),
            ]
        }
    }

    /// [`block4`] for two x rows at once (`x` and `y`): each weight vector is
    /// loaded once for both, which halves the loads per FMA, and every one of
    /// the eight outputs goes through exactly block4's FMAs in block4's order,
    /// so it is bit for bit what block4 gives that row alone.
    #[inline]
    #[target_feature(enable = "avx512f")]
    // `c` indexes the two rows' accumulators and the weight rows together.
    #[allow(clippy::needless_range_loop)]
    unsafe fn block4x2(x: *const f32, y: *const f32, w: *const f32, k: usize) -> [[f32; 4]; 2] {
        unsafe {
            let mut a = [[_mm512_setzero_ps(); 4]; 2];
            let mut b = [[_mm512_setzero_ps(); 4]; 2];
            let mut i = 0;
            while i + 32 <= k {
                let (x0, x1) = (_mm512_loadu_ps(x.add(i)), _mm512_loadu_ps(x.add(i + 16)));
                let (y0, y1) = (_mm512_loadu_ps(y.add(i)), _mm512_loadu_ps(y.add(i + 16)));
                for c in 0..4 {
                    let row = w.add(c * k + i);
                    let (w0, w1) = (_mm512_loadu_ps(row), _mm512_loadu_ps(row.add(16)));
                    a[0][c] = _mm512_fmadd_ps(x0, w0, a[0][c]);
                    b[0][c] = _mm512_fmadd_ps(x1, w1, b[0][c]);
                    a[1][c] = _mm512_fmadd_ps(y0, w0, a[1][c]);
                    b[1][c] = _mm512_fmadd_ps(y1, w1, b[1][c]);
                }
                i += 32;
            }
            if i + 16 <= k {
                let (x0, y0) = (_mm512_loadu_ps(x.add(i)), _mm512_loadu_ps(y.add(i)));
                for c in 0..4 {
                    let w0 = _mm512_loadu_ps(w.add(c * k + i));
                    a[0][c] = _mm512_fmadd_ps(x0, w0, a[0][c]);
                    a[1][c] = _mm512_fmadd_ps(y0, w0, a[1][c]);
                }
                i += 16;
            }
            if i < k {
                let mask = tail_mask(k);
                let (x0, y0) = (_mm512_maskz_loadu_ps(mask, x.add(i)), _mm512_maskz_loadu_ps(mask, y.add(i)));
                for c in 0..4 {
                    let w0 = _mm512_maskz_loadu_ps(mask, w.add(c * k + i));
                    b[0][c] = _mm512_fmadd_ps(x0, w0, b[0][c]);
                    b[1][c] = _mm512_fmadd_ps(y0, w0, b[1][c]);
                }
            }
            let mut out = [[0f32; 4]; 2];
            for (row, (a, b)) in out.iter_mut().zip(a.iter().zip(&b)) {
                for c in 0..4 {
                    row[c] = _mm512_reduce_add_ps(_mm512_add_ps(a[c], b[c]));
                }
            }
            out
        }
    }

    /// `x · w` for one row.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn block1(x: *const f32, w: *const f32, k: usize) -> f32 {
        unsafe {
            let (mut a, mut b) = (_mm512_setzero_ps(), _mm512_setzero_ps());
            let mut i = 0;
            while i + 32 <= k {
                a = _mm512_fmadd_ps(_mm512_loadu_ps(x.add(i)), _mm512_loadu_ps(w.add(i)), a);
                b = _mm512_fmadd_ps(_mm512_loadu_ps(x.add(i + 16)), _mm512_loadu_ps(w.add(i + 16)), b);
                i += 32;
            }
            if i + 16 <= k {
                a = _mm512_fmadd_ps(_mm512_loadu_ps(x.add(i)), _mm512_loadu_ps(w.add(i)), a);
                i += 16;
            }
            if i < k {
                let mask = tail_mask(k);
                b = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, x.add(i)), _mm512_maskz_loadu_ps(mask, w.add(i)), b);
            }
            _mm512_reduce_add_ps(_mm512_add_ps(a, b))
        }
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

    fn run(x: &[f32], rows: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
        let mut out = crate::output_buffer(rows * n);
        gemv(x, rows, k, w, n, &mut out);
        // SAFETY: gemv writes every element.
        unsafe { crate::assume_init(out) }
    }

    #[test]
    fn gemv_matches_a_naive_product() {
        // Odd widths, tails of every length, n not a multiple of the block,
        // sizes on both sides of the parallel threshold.
        let shapes = [(1, 1, 1), (1, 7, 5), (3, 17, 9), (1, 33, 130), (2, 48, 31), (15, 95, 67), (1, 576, 197), (1, 577, 1003), (4, 1536, 77), (1, 64, 1)];
        for (seed, &(rows, k, n)) in shapes.iter().enumerate() {
            let x = values(rows * k, seed as u64);
            let w = values(n * k, 100 + seed as u64);
            let got = run(&x, rows, k, &w, n);
            for r in 0..rows {
                for j in 0..n {
                    let want: f64 = (0..k).map(|i| x[r * k + i] as f64 * w[j * k + i] as f64).sum();
                    let g = got[r * n + j];
                    assert!((g as f64 - want).abs() < 1e-4 * (1.0 + (k as f64).sqrt()), "rows {rows} k {k} n {n} at ({r}, {j}): {g} vs {want}");
                }
            }
        }
    }

    #[test]
    fn gemv_is_deterministic_and_per_row_identical() {
        // A row's result is the same alone or among other rows, and twice.
        // Odd and even row counts (rows go two at a time, one left over), widths
        // with every kind of tail.
        for (rows, k, n) in [(5, 577, 1001), (4, 576, 67), (7, 600, 130), (2, 15, 9)] {
            let x = values(rows * k, 1);
            let w = values(n * k, 2);
            let all = run(&x, rows, k, &w, n);
            assert_eq!(all, run(&x, rows, k, &w, n));
            for r in 0..rows {
                let one = run(&x[r * k..(r + 1) * k], 1, k, &w, n);
                assert!(
                    all[r * n..(r + 1) * n].iter().zip(&one).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "rows {rows} k {k} n {n}: row {r} differs from the row alone"
                );
            }
        }
    }

    /// Several products in one call are each, bit for bit, the product alone:
    /// the same four-row blocks, so the same operations (widths with every
    /// tail, sizes on both sides of the parallel threshold, one and several
    /// rows).
    #[test]
    fn gemv_many_is_each_product_alone() {
        for (rows, k, ns) in [(1, 576, vec![576, 192, 192]), (3, 577, vec![1, 5, 130, 7]), (1, 64, vec![3]), (2, 1536, vec![99, 1003]), (15, 33, vec![4, 8])] {
            let x = values(rows * k, 7);
            let ws: Vec<Vec<f32>> = ns.iter().enumerate().map(|(p, &n)| values(n * k, 20 + p as u64)).collect();
            let pairs: Vec<(&[f32], usize)> = ws.iter().zip(&ns).map(|(w, &n)| (&w[..], n)).collect();
            let mut outs: Vec<Vec<MaybeUninit<f32>>> = ns.iter().map(|&n| crate::output_buffer(rows * n)).collect();
            let mut refs: Vec<&mut [MaybeUninit<f32>]> = outs.iter_mut().map(|o| &mut o[..]).collect();
            gemv_many(&x, rows, k, &pairs, &mut refs);
            for ((out, w), &n) in outs.into_iter().zip(&ws).zip(&ns) {
                // SAFETY: gemv_many writes every element.
                let got = unsafe { crate::assume_init(out) };
                let alone = run(&x, rows, k, w, n);
                assert!(got.iter().zip(&alone).all(|(a, b)| a.to_bits() == b.to_bits()), "rows {rows} k {k} n {n} of {ns:?}");
            }
        }
    }

    #[test]
    fn gemv_with_no_width_is_zeros() {
        let got = run(&[], 2, 0, &[], 3);
        assert_eq!(got, vec![0.0; 6]);
    }
}
