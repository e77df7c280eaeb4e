//! CPU matrix-vector kernels for GGUF `Q4_1` and `Q8_0` weights times f32 activations.
//!
//! Why our own: candle 0.11 has no SIMD path for `Q4_1` (its `vec_dot` falls back
//! to `vec_dot_unopt`), which made the quantized linears ~60% of a SmolLM2 decode
//! step; and candle rounds the activations to 8 bits before every quantized
//! product (`Q8_1`/`Q8_0`), which moved SmolLM2's logits by a few hundredths and
//! its greedy ids away from transformers'. These kernels read the blocks in place
//! (no copy, no dequantized matrix) and multiply them with the activations in
//! f32, so a quantized decode step computes what the dequantized f32 model
//! computes, up to summation order. `cargo xtask bench lm-parts` measures them.
//!
//! Block layouts (ggml), 32 weights per block:
//! - `block_q4_1` (20 bytes): `d: f16`, `m: f16`, `qs: [u8; 16]`; weight `j` is
//!   `d * q_j + m`, `q_j` the low nibble of `qs[j]` for `j < 16`, else the high
//!   nibble of `qs[j - 16]`. So `w · x = Σ_blocks d Σ_j q_j x_j + m Σ_j x_j`, and
//!   the per-block sums of `x` are computed once per input row.
//! - `block_q8_0` (34 bytes): `d: f16`, `qs: [i8; 32]`; weight `j` is `d * qs[j]`.

use half::f16;

/// Weights per block, in both formats.
pub(crate) const BLOCK: usize = 32;

/// The block formats these kernels read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    /// ggml `Q4_1`.
    Q4_1,
    /// ggml `Q8_0`.
    Q8_0,
}

impl Format {
    /// Bytes per block of 32 weights.
    pub(crate) fn block_bytes(self) -> usize {
        match self {
            Format::Q4_1 => 20,
            Format::Q8_0 => 34,
        }
    }
}

/// Below this many weights one thread does the whole product: spreading a
/// small matrix over threads costs more than it saves.
const PARALLEL_FROM_WEIGHTS: usize = 1 << 17;

/// `y[r, o] = Σ_i W[o, i] x[r, i]` for `W` given as `out_dim` rows of blocks.
///
/// `x` is `rows × in_dim` row-major, `y` is `rows × out_dim` row-major.
/// Callers check the sizes: `blocks.len() == out_dim * in_dim / 32 * block_bytes`,
/// `in_dim % 32 == 0`, `x.len() == rows * in_dim`, `y.len() == rows * out_dim`.
pub(crate) fn matmul(format: Format, blocks: &[u8], out_dim: usize, in_dim: usize, x: &[f32], rows: usize, y: &mut [f32]) {
    let per_row = in_dim / BLOCK * format.block_bytes();
    let sums: Vec<f32> = match format {
        Format::Q4_1 => x.chunks_exact(BLOCK).map(|c| c.iter().sum()).collect(),
        Format::Q8_0 => Vec::new(),
    };
    // Results are produced per output row (all input rows at once, so each block
    // is unpacked once), laid out `[out_dim, rows]`, then transposed if needed.
    let mut by_out = vec![0f32; out_dim * rows];
    let work = |first_out: usize, chunk: &mut [f32]| {
        for (k, dst) in chunk.chunks_exact_mut(rows).enumerate() {
            let o = first_out + k;
            let w = &blocks[o * per_row..(o + 1) * per_row];
            dot_rows(format, w, in_dim, x, &sums, dst);
        }
    };
    crate::parallel::fill_items(&mut by_out, rows, out_dim * in_dim >= PARALLEL_FROM_WEIGHTS, work);
    if rows == 1 {
        y.copy_from_slice(&by_out);
    } else {
        for (o, vals) in by_out.chunks_exact(rows).enumerate() {
            for (r, v) in vals.iter().enumerate() {
                y[r * out_dim + o] = *v;
            }
        }
    }
}

/// The `[out_dim, in_dim]` f32 matrix of `W`, row-major, exactly as candle's
/// `QTensor::dequantize` computes it (`q * d + m`, `q * d`), spread over the
/// kernels' pool. For the prefill's dequantize-then-GEMM path: candle
/// dequantizes on its own barrier pool, which the binary sizes to one thread
/// (`CANDLE_NUM_THREADS=1`) so that it cannot stall under contention.
/// Callers check `blocks.len() == out_dim * in_dim / 32 * block_bytes`.
pub(crate) fn dequantize(format: Format, blocks: &[u8], out_dim: usize, in_dim: usize) -> Vec<f32> {
    let per_row = in_dim / BLOCK * format.block_bytes();
    let mut out = vec![0f32; out_dim * in_dim];
    let work = |first_out: usize, chunk: &mut [f32]| {
        for (k, dst) in chunk.chunks_exact_mut(in_dim).enumerate() {
            let o = first_out + k;
            let row = &blocks[o * per_row..(o + 1) * per_row];
            for (block, ys) in row.chunks_exact(format.block_bytes()).zip(dst.chunks_exact_mut(BLOCK)) {
                let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
                match format {
                    Format::Q4_1 => {
                        let m = f16::from_le_bytes([block[2], block[3]]).to_f32();
                        for (j, q) in block[4..20].iter().enumerate() {
                            ys[j] = f32::from(q & 0x0f) * d + m;
                            ys[j + 16] = f32::from(q >> 4) * d + m;
                        }
                    }
                    Format::Q8_0 => {
                        for (y, q) in ys.iter_mut().zip(&block[2..34]) {
                            *y = f32::from(*q as i8) * d;
                        }
                    }
                }
            }
        }
    };
    crate::parallel::fill_items(&mut out, in_dim, out_dim * in_dim >= PARALLEL_FROM_WEIGHTS, work);
    out
}

/// One weight row against every input row: `dst[r] = w · x[r]`.
fn dot_rows(format: Format, w: &[u8], in_dim: usize, x: &[f32], sums: &[f32], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx512f() {
            // SAFETY: the CPU supports AVX-512F (checked above); the slices are as
            // for the AVX2 body below.
            unsafe { avx512::dot_rows(format, w, in_dim, x, sums, dst) };
            return;
        }
        if has_avx2_fma() {
            // SAFETY: the CPU supports AVX2 and FMA (checked above); the slices
            // hold `in_dim / 32` blocks, `rows * in_dim` activations and (Q4_1)
            // their `rows * in_dim / 32` block sums.
            unsafe { avx2::dot_rows(format, w, in_dim, x, sums, dst) };
            return;
        }
    }
    dot_rows_scalar(format, w, in_dim, x, sums, dst);
}

/// The portable version of [`dot_rows`].
fn dot_rows_scalar(format: Format, w: &[u8], in_dim: usize, x: &[f32], sums: &[f32], dst: &mut [f32]) {
    let nb = in_dim / BLOCK;
    let bytes = format.block_bytes();
    for (r, out) in dst.iter_mut().enumerate() {
        let xr = &x[r * in_dim..(r + 1) * in_dim];
        let mut acc = 0f32;
        for b in 0..nb {
            let blk = &w[b * bytes..(b + 1) * bytes];
            let d = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
            let xb = &xr[b * BLOCK..(b + 1) * BLOCK];
            match format {
                Format::Q4_1 => {
                    let m = f16::from_le_bytes([blk[2], blk[3]]).to_f32();
                    let mut s = 0f32;
                    for j in 0..16 {
                        let q = blk[4 + j];
                        s += (q & 0x0F) as f32 * xb[j] + (q >> 4) as f32 * xb[j + 16];
                    }
                    acc += d * s + m * sums[r * nb + b];
                }
                Format::Q8_0 => {
                    let s: f32 = blk[2..].iter().zip(xb).map(|(q, x)| (*q as i8) as f32 * x).sum();
                    acc += d * s;
                }
            }
        }
        *out = acc;
    }
}

#[cfg(target_arch = "x86_64")]
fn has_avx2_fma() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

/// The SIMD bodies' `dot_rows`: the input rows in groups of up to four, each
/// through `$group::<Q4, N>` (format and group size as constants, so the
/// accumulators live in registers). Expands to unsafe calls: the caller
/// upholds `dot_rows`' contract.
#[cfg(target_arch = "x86_64")]
macro_rules! in_groups {
    ($group:ident, $format:expr, $w:expr, $in_dim:expr, $x:expr, $sums:expr, $dst:expr) => {{
        let dst: &mut [f32] = $dst;
        let rows = dst.len();
        let mut r0 = 0;
        while r0 < rows {
            let n = (rows - r0).min(4);
            let out = &mut dst[r0..r0 + n];
            match ($format, n) {
                (Format::Q4_1, 1) => $group::<true, 1>($w, $in_dim, $x, $sums, r0, out),
                (Format::Q4_1, 2) => $group::<true, 2>($w, $in_dim, $x, $sums, r0, out),
                (Format::Q4_1, 3) => $group::<true, 3>($w, $in_dim, $x, $sums, r0, out),
                (Format::Q4_1, _) => $group::<true, 4>($w, $in_dim, $x, $sums, r0, out),
                (Format::Q8_0, 1) => $group::<false, 1>($w, $in_dim, $x, $sums, r0, out),
                (Format::Q8_0, 2) => $group::<false, 2>($w, $in_dim, $x, $sums, r0, out),
                (Format::Q8_0, 3) => $group::<false, 3>($w, $in_dim, $x, $sums, r0, out),
                (Format::Q8_0, _) => $group::<false, 4>($w, $in_dim, $x, $sums, r0, out),
            }
            r0 += n;
        }
    }};
}
#[cfg(target_arch = "x86_64")]
use in_groups;

#[cfg(target_arch = "x86_64")]
fn has_avx512f() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| is_x86_feature_detected!("avx512f"))
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    //! The AVX-512 body of `dot_rows`: a block's 32 weights become two vectors
    //! of sixteen f32 (half the instructions of the AVX2 body; 13% faster on
    //! Q8_0, as fast on Q4_1, see [`group`]). Each input row still accumulates
    //! on its own, so a row's result does not depend on how many rows share the
    //! call.

    use std::arch::x86_64::*;

    use half::f16;

    use super::{Format, BLOCK};

    /// See `super::dot_rows`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn dot_rows(format: Format, w: &[u8], in_dim: usize, x: &[f32], sums: &[f32], dst: &mut [f32]) {
        // SAFETY: forwarded from this function's contract.
        unsafe { super::in_groups!(group, format, w, in_dim, x, sums, dst) };
    }

    /// Rows `r0..r0 + N` of `x` against one weight row. Block `b` goes to
    /// accumulator `b % CHAINS` (vector and, for Q4_1, the scalar `m` term), so
    /// a block need not wait for the previous block's FMA: one thread, a
    /// 1536 × 576 row each, 1 / 2 / 4 chains gave Q4_1 2.25 / 2.10 / 2.15 ns per
    /// block and Q8_0 1.72 / 1.57 / 1.61 (the AVX2 body: 2.12 and 1.81). Q4_1's
    /// limit is the unpacking (nibbles widened to 32 bits and converted), whose
    /// 512-bit shuffles run on one port: wider vectors do not make it faster.
    #[target_feature(enable = "avx512f")]
    unsafe fn group<const Q4: bool, const N: usize>(
        w: &[u8],
        in_dim: usize,
        x: &[f32],
        sums: &[f32],
        r0: usize,
        out: &mut [f32],
    ) {
        let nb = in_dim / BLOCK;
        let mut acc = [[_mm512_setzero_ps(); N]; CHAINS];
        let mut mterm = [[0f32; N]; CHAINS];
        let mut b = 0;
        while b < nb {
            for (c, (acc, mterm)) in acc.iter_mut().zip(mterm.iter_mut()).enumerate() {
                if b + c < nb {
                    // SAFETY: block `b + c < nb` lies within `w`; `x` holds rows
                    // `r0..r0 + N` of `in_dim` values and (Q4_1) `sums` their `nb`
                    // block sums each.
                    unsafe { block::<Q4, N>(w, in_dim, x, sums, r0, b + c, acc, mterm) };
                }
            }
            b += CHAINS;
        }
        for k in 0..N {
            let (mut v, mut m) = (acc[0][k], mterm[0][k]);
            for c in 1..CHAINS {
                v = _mm512_add_ps(v, acc[c][k]);
                m += mterm[c][k];
            }
            out[k] = _mm512_reduce_add_ps(v) + m;
        }
    }

    /// Independent accumulation chains per row in [`group`].
    const CHAINS: usize = 2;

    /// Block `b` of the weight row against rows `r0..r0 + N`, added to `acc`
    /// (and, for Q4_1, `m * Σ x` to `mterm`).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn block<const Q4: bool, const N: usize>(
        w: &[u8],
        in_dim: usize,
        x: &[f32],
        sums: &[f32],
        r0: usize,
        b: usize,
        acc: &mut [__m512; N],
        mterm: &mut [f32; N],
    ) {
        let nb = in_dim / BLOCK;
        let bytes = if Q4 { 20 } else { 34 };
        // SAFETY: the caller guarantees block `b` and rows `r0..r0 + N` exist.
        unsafe {
            let blk = w.as_ptr().add(b * bytes);
            let d = f16::from_bits(u16::from_le_bytes([*blk, *blk.add(1)])).to_f32();
            let (e0, e1, m) = if Q4 {
                let m = f16::from_bits(u16::from_le_bytes([*blk.add(2), *blk.add(3)])).to_f32();
                let mask = _mm_set1_epi8(0x0F);
                let qs = _mm_loadu_si128(blk.add(4) as *const __m128i);
                // Weights 0..16 are the low nibbles, 16..32 the high ones.
                let lo = _mm_and_si128(qs, mask);
                let hi = _mm_and_si128(_mm_srli_epi16::<4>(qs), mask);
                (_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo)), _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi)), m)
            } else {
                let q0 = _mm_loadu_si128(blk.add(2) as *const __m128i);
                let q1 = _mm_loadu_si128(blk.add(18) as *const __m128i);
                (_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q0)), _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q1)), 0.0)
            };
            let dv = _mm512_set1_ps(d);
            for k in 0..N {
                let r = r0 + k;
                let xp = x.as_ptr().add(r * in_dim + b * BLOCK);
                let s = _mm512_mul_ps(e0, _mm512_loadu_ps(xp));
                let s = _mm512_fmadd_ps(e1, _mm512_loadu_ps(xp.add(16)), s);
                acc[k] = _mm512_fmadd_ps(dv, s, acc[k]);
                if Q4 {
                    mterm[k] += m * *sums.get_unchecked(r * nb + b);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    //! The AVX2 + FMA body of `dot_rows`: a block's 32 weights become four
    //! vectors of eight f32, multiplied with the activations and scaled by `d`.

    use std::arch::x86_64::*;

    use half::f16;

    use super::{Format, BLOCK};

    /// See `super::dot_rows`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_rows(format: Format, w: &[u8], in_dim: usize, x: &[f32], sums: &[f32], dst: &mut [f32]) {
        // Up to four input rows share each unpacked block; the group size and the
        // format are constants so the accumulators live in registers.
        // SAFETY: forwarded from this function's contract.
        unsafe { super::in_groups!(group, format, w, in_dim, x, sums, dst) };
    }

    /// Rows `r0..r0 + N` of `x` against one weight row (`Q4` true: Q4_1, else
    /// Q8_0). Even and odd blocks go to separate accumulators so two FMA chains
    /// are in flight.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn group<const Q4: bool, const N: usize>(
        w: &[u8],
        in_dim: usize,
        x: &[f32],
        sums: &[f32],
        r0: usize,
        out: &mut [f32],
    ) {
        let nb = in_dim / BLOCK;
        let mut even = [_mm256_setzero_ps(); N];
        let mut odd = [_mm256_setzero_ps(); N];
        let mut mterm = [0f32; N];
        let mut b = 0;
        while b < nb {
            // SAFETY: block `b < nb` lies within `w`; `x` holds rows `r0..r0 + N`
            // of `in_dim` values and (Q4_1) `sums` their `nb` block sums each.
            unsafe {
                block::<Q4, N>(w, in_dim, x, sums, r0, b, &mut even, &mut mterm);
                if b + 1 < nb {
                    block::<Q4, N>(w, in_dim, x, sums, r0, b + 1, &mut odd, &mut mterm);
                }
            }
            b += 2;
        }
        for k in 0..N {
            out[k] = hsum(_mm256_add_ps(even[k], odd[k])) + mterm[k];
        }
    }

    /// Block `b` of the weight row against rows `r0..r0 + N`, added to `acc`
    /// (and, for Q4_1, `m * Σ x` to `mterm`).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn block<const Q4: bool, const N: usize>(
        w: &[u8],
        in_dim: usize,
        x: &[f32],
        sums: &[f32],
        r0: usize,
        b: usize,
        acc: &mut [__m256; N],
        mterm: &mut [f32; N],
    ) {
        let nb = in_dim / BLOCK;
        let bytes = if Q4 { 20 } else { 34 };
        // SAFETY: the caller guarantees block `b` and rows `r0..r0 + N` exist.
        unsafe {
            let blk = w.as_ptr().add(b * bytes);
            let d = f16::from_bits(u16::from_le_bytes([*blk, *blk.add(1)])).to_f32();
            let (e0, e1, e2, e3, m) = if Q4 {
                let m = f16::from_bits(u16::from_le_bytes([*blk.add(2), *blk.add(3)])).to_f32();
                let mask = _mm_set1_epi8(0x0F);
                let qs = _mm_loadu_si128(blk.add(4) as *const __m128i);
                let lo = _mm_and_si128(qs, mask);
                let hi = _mm_and_si128(_mm_srli_epi16::<4>(qs), mask);
                (
                    _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)),
                    _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128::<8>(lo))),
                    _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)),
                    _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128::<8>(hi))),
                    m,
                )
            } else {
                let q0 = _mm_loadu_si128(blk.add(2) as *const __m128i);
                let q1 = _mm_loadu_si128(blk.add(18) as *const __m128i);
                (
                    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q0)),
                    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128::<8>(q0))),
                    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q1)),
                    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128::<8>(q1))),
                    0.0,
                )
            };
            let dv = _mm256_set1_ps(d);
            for k in 0..N {
                let r = r0 + k;
                let xp = x.as_ptr().add(r * in_dim + b * BLOCK);
                let s = _mm256_mul_ps(e0, _mm256_loadu_ps(xp));
                let s = _mm256_fmadd_ps(e1, _mm256_loadu_ps(xp.add(8)), s);
                let s = _mm256_fmadd_ps(e2, _mm256_loadu_ps(xp.add(16)), s);
                let s = _mm256_fmadd_ps(e3, _mm256_loadu_ps(xp.add(24)), s);
                acc[k] = _mm256_fmadd_ps(dv, s, acc[k]);
                if Q4 {
                    mterm[k] += m * *sums.get_unchecked(r * nb + b);
                }
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
        _mm_cvtss_f32(s)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    use super::*;

    /// The kernels against candle's dequantized matrix times `x` in f32, for
    /// shapes that take the one-thread and the parallel paths, 1 to 9 rows.
    #[test]
    fn dequantize_is_candles_bit_for_bit() {
        // (1536, 576) takes the pool's parallel path, the others one thread.
        for (format, dtype) in [(Format::Q4_1, GgmlDType::Q4_1), (Format::Q8_0, GgmlDType::Q8_0)] {
            for (out_dim, in_dim) in [(8, 32), (100, 64), (1536, 576)] {
                let w = Tensor::randn(0f32, 1.0, (out_dim, in_dim), &Device::Cpu).unwrap();
                let q = QTensor::quantize(&w, dtype).unwrap();
                let want: Vec<f32> = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                let got = dequantize(format, &q.data().unwrap(), out_dim, in_dim);
                let same = got.iter().zip(&want).all(|(g, w)| g.to_bits() == w.to_bits());
                assert!(same && got.len() == want.len(), "{format:?} {out_dim}x{in_dim}");
            }
        }
    }

    #[test]
    fn match_dequantized_matmul() {
        for (format, dtype) in [(Format::Q4_1, GgmlDType::Q4_1), (Format::Q8_0, GgmlDType::Q8_0)] {
            for (out_dim, in_dim, rows) in [(8, 32, 1), (192, 576, 1), (1536, 576, 3), (576, 1536, 9), (100, 64, 5)] {
                let w = Tensor::randn(0f32, 1.0, (out_dim, in_dim), &Device::Cpu).unwrap();
                let q = QTensor::quantize(&w, dtype).unwrap();
                let deq = q.dequantize(&Device::Cpu).unwrap();
                let x = Tensor::randn(0f32, 1.0, (rows, in_dim), &Device::Cpu).unwrap();
                let want: Vec<f32> = x.matmul(&deq.t().unwrap()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                let data = q.data().unwrap();
                let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
                let mut got = vec![0f32; rows * out_dim];
                matmul(format, &data, out_dim, in_dim, &xs, rows, &mut got);
                let case = format!("{format:?} {out_dim}x{in_dim} rows {rows}");
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()), "{case} [{i}]: {g} vs {w}");
                }
                // The portable path agrees too (first weight row).
                let per_row = in_dim / BLOCK * format.block_bytes();
                let sums: Vec<f32> = xs.chunks_exact(BLOCK).map(|c| c.iter().sum()).collect();
                let mut scalar = vec![0f32; rows];
                dot_rows_scalar(format, &data[..per_row], in_dim, &xs, &sums, &mut scalar);
                for r in 0..rows {
                    let w = want[r * out_dim];
                    assert!((scalar[r] - w).abs() <= 1e-4 * (1.0 + w.abs()), "{case} scalar row {r}: {} vs {w}", scalar[r]);
                }
                // So does the AVX2 body, which an AVX-512 CPU never takes in `matmul`.
                #[cfg(target_arch = "x86_64")]
                if has_avx2_fma() {
                    let mut avx2 = vec![0f32; rows];
                    // SAFETY: AVX2 + FMA checked; the slices are one weight row and all of `x`.
                    unsafe { avx2::dot_rows(format, &data[..per_row], in_dim, &xs, &sums, &mut avx2) };
                    for r in 0..rows {
                        let w = want[r * out_dim];
                        assert!((avx2[r] - w).abs() <= 1e-4 * (1.0 + w.abs()), "{case} avx2 row {r}: {} vs {w}", avx2[r]);
                    }
                }
            }
        }
    }
}
