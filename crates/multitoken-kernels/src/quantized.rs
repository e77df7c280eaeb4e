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

use std::cell::Cell;

use half::f16;

/// Weights per block, in both formats.
pub const BLOCK: usize = 32;

/// The block formats these kernels read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// ggml `Q4_1`.
    Q4_1,
    /// ggml `Q8_0`.
    Q8_0,
}

impl Format {
    /// The format of candle's `dtype`, if these kernels read it.
    pub fn of_ggml(dtype: candle_core::quantized::GgmlDType) -> Option<Format> {
        match dtype {
            candle_core::quantized::GgmlDType::Q4_1 => Some(Format::Q4_1),
            candle_core::quantized::GgmlDType::Q8_0 => Some(Format::Q8_0),
            _ => None,
        }
    }

    /// candle's name for the format.
    pub fn ggml_dtype(self) -> candle_core::quantized::GgmlDType {
        match self {
            Format::Q4_1 => candle_core::quantized::GgmlDType::Q4_1,
            Format::Q8_0 => candle_core::quantized::GgmlDType::Q8_0,
        }
    }

    /// Bytes per block of 32 weights.
    pub fn block_bytes(self) -> usize {
        match self {
            Format::Q4_1 => 20,
            Format::Q8_0 => 34,
        }
    }
}

/// Below this many weights one thread does the whole product: spreading a
/// small matrix over threads costs more than it saves. At 2^17, SmolLM2's
/// `k_proj` / `v_proj` (576 × 192 = 110,592 weights) ran on one thread while
/// the other waited; at 2^16 they are split: 200-token decodes, `--profile`,
/// 12 alternating pairs on the 2-core VM (2026-12-06), step time new/old
/// median 0.963 (Q4_1, 10 of 12 pairs faster) and 0.971 (Q8_0, 8 of 12).
const PARALLEL_FROM_WEIGHTS: usize = 1 << 16;

/// `y[r, o] = Σ_i W[o, i] x[r, i]` for `W` given as `out_dim` rows of blocks.
///
/// `x` is `rows × in_dim` row-major, `y` is `rows × out_dim` row-major.
/// Callers check the sizes: `blocks.len() == out_dim * in_dim / 32 * block_bytes`,
/// `in_dim % 32 == 0`, `x.len() == rows * in_dim`, `y.len() == rows * out_dim`.
pub fn matmul(format: Format, blocks: &[u8], out_dim: usize, in_dim: usize, x: &[f32], rows: usize, y: &mut [f32]) {
    matmul_many(&[Weights { format, blocks, out_dim }], in_dim, x, rows, &mut [y]);
}

/// One weight matrix of [`matmul_many`] / [`matmul_gated`]: `out_dim` rows of
/// `format` blocks, `blocks.len() == out_dim * in_dim / 32 * block_bytes`.
#[derive(Debug, Clone, Copy)]
pub struct Weights<'a> {
    /// The block format.
    pub format: Format,
    /// The rows of blocks, PyTorch's `[out, in]` order.
    pub blocks: &'a [u8],
    /// Rows (outputs).
    pub out_dim: usize,
}

/// Several products of one input in one call on the pool: `ys[p] = x W_p^T`
/// (`rows × out_dim_p` each), what [`matmul`] gives each of them bit for bit
/// (every output is still one dot product, summed in the same order by one
/// thread). A decode step's q / k / v projections this way are one pool call
/// instead of three, and k / v (192 rows in SmolLM2) no longer pay a call's
/// fixed cost for a few microseconds of work each. Sizes as for [`matmul`],
/// for every matrix, and `ys.len() == weights.len()`.
pub fn matmul_many(weights: &[Weights], in_dim: usize, x: &[f32], rows: usize, ys: &mut [&mut [f32]]) {
    if int8_activations() && !KEEP_EXACT.with(Cell::get) {
        // The activations rounded once for every matrix.
        let act = int8::Rows::quantize(x, in_dim);
        for (w, y) in weights.iter().zip(ys.iter_mut()) {
            int8::matmul(w.format, w.blocks, w.out_dim, &act, rows, y);
        }
        return;
    }
    let by_out = exact_by_output(weights, in_dim, x, rows);
    let mut first = 0;
    for (w, y) in weights.iter().zip(ys.iter_mut()) {
        by_output_into(&by_out[first * rows..(first + w.out_dim) * rows], rows, w.out_dim, y);
        first += w.out_dim;
    }
}

/// A gated MLP's two products and its activation in one call on the pool:
/// `y[r, o] = f(x W_gate[o], x W_up[o])` for an element-wise `f` (e.g. silu(g) ·
/// u), each product bit for bit what [`matmul`] gives it. `combine(gates, ups)`
/// applies `f` to slices of both laid out alike, leaving its results in `ups`;
/// it must treat each element alone, as the slices it gets are of any length.
/// Saves a decode step two of its three calls per MLP (the products and the
/// activation's own pass).
/// Sizes as for [`matmul`], `gate.out_dim == up.out_dim`, `y.len() == rows * gate.out_dim`.
pub fn matmul_gated(
    gate: Weights,
    up: Weights,
    in_dim: usize,
    x: &[f32],
    rows: usize,
    combine: impl Fn(&[f32], &mut [f32]) + Sync,
    y: &mut [f32],
) {
    let out_dim = gate.out_dim;
    if int8_activations() && !KEEP_EXACT.with(Cell::get) {
        let act = int8::Rows::quantize(x, in_dim);
        let mut g = vec![0f32; rows * out_dim];
        int8::matmul(gate.format, gate.blocks, out_dim, &act, rows, &mut g);
        int8::matmul(up.format, up.blocks, out_dim, &act, rows, y);
        combine(&g, y);
        return;
    }
    let by_out = exact_gated(gate, up, in_dim, x, rows, &combine);
    by_output_into(&by_out, rows, out_dim, y);
}

/// `[out, rows]` results to `y`'s `[rows, out]`.
fn by_output_into(by_out: &[f32], rows: usize, out_dim: usize, y: &mut [f32]) {
    if rows == 1 {
        y.copy_from_slice(by_out);
        return;
    }
    for (o, vals) in by_out.chunks_exact(rows).enumerate() {
        for (r, v) in vals.iter().enumerate() {
            y[r * out_dim + o] = *v;
        }
    }
}

/// The input rows of the exact products as the kernels read them: the rows,
/// their per-block sums (Q4_1's `m` term) and, where the AVX-512 body runs, the
/// rows with each block's values in the order of that body's Q4_1 lanes.
struct Input<'a> {
    x: &'a [f32],
    /// Per-block sums of each row (Q4_1's `m · Σx` in the AVX2 and portable
    /// bodies; empty when no matrix is Q4_1 or the AVX-512 body runs).
    sums: Vec<f32>,
    /// `x` in the AVX-512 Q4_1 body's lane order (`avx512::q4_lanes`; empty
    /// when no matrix is Q4_1 or that body does not run).
    q4_lanes: Vec<f32>,
}

impl<'a> Input<'a> {
    /// `x`'s rows prepared for products with matrices of `formats`.
    fn new(formats: impl IntoIterator<Item = Format>, x: &'a [f32]) -> Self {
        if !formats.into_iter().any(|f| f == Format::Q4_1) {
            return Input { x, sums: Vec::new(), q4_lanes: Vec::new() };
        }
        #[cfg(target_arch = "x86_64")]
        if has_avx512f() {
            // That body's table holds whole weights (`d · q + m`): no sums.
            return Input { x, sums: Vec::new(), q4_lanes: avx512::q4_lanes(x) };
        }
        let sums = x.chunks_exact(BLOCK).map(|c| c.iter().sum()).collect();
        Input { x, sums, q4_lanes: Vec::new() }
    }

    /// The rows as the AVX-512 body of `format` reads them.
    #[cfg(target_arch = "x86_64")]
    fn avx512_rows(&self, format: Format) -> &[f32] {
        match format {
            Format::Q4_1 => &self.q4_lanes,
            Format::Q8_0 => self.x,
        }
    }
}

/// The exact products of every matrix in `weights`, laid out `[Σ out, rows]`
/// (all input rows of one output at once, so each block is unpacked once).
fn exact_by_output(
    weights: &[Weights],
    in_dim: usize,
    x: &[f32],
    rows: usize,
) -> Vec<f32> {
    let input = Input::new(weights.iter().map(|w| w.format), x);
    let total: usize = weights.iter().map(|w| w.out_dim).sum();
    let mut by_out = vec![0f32; total * rows];
    let work = |first_out: usize, chunk: &mut [f32]| {
        if rows >= TILED_FROM_ROWS {
            // The weight row of global output `o`: its matrix found by a walk
            // over the (few) matrices.
            let weight_row = |o: usize| {
                let (mut p, mut start) = (0, 0);
                while o >= start + weights[p].out_dim {
                    start += weights[p].out_dim;
                    p += 1;
                }
                let w = &weights[p];
                let per_row = in_dim / BLOCK * w.format.block_bytes();
                (w.format, &w.blocks[(o - start) * per_row..(o - start + 1) * per_row])
            };
            in_tiles(chunk.len() / rows, rows, |k, r0, n| {
                let (format, w) = weight_row(first_out + k);
                dot_rows_from(format, w, in_dim, &input, r0, &mut chunk[k * rows + r0..k * rows + r0 + n]);
            });
            return;
        }
        // The matrix holding output `first_out`, and its first global output.
        let (mut p, mut start) = (0, 0);
        let mut k = 0;
        while k < chunk.len() / rows.max(1) {
            let o = first_out + k;
            while o >= start + weights[p].out_dim {
                start += weights[p].out_dim;
                p += 1;
            }
            let w = &weights[p];
            let per_row = in_dim / BLOCK * w.format.block_bytes();
            let local = o - start;
            prefetch_ahead(w.blocks, local, per_row);
            if rows <= PAIRED_ROWS && local + 1 < w.out_dim && (k + 2) * rows <= chunk.len() {
                // A decode step's next two outputs of this matrix, together
                // (see `dot_rows_together`).
                prefetch_ahead(w.blocks, local + 1, per_row);
                let (a, b) = chunk[k * rows..(k + 2) * rows].split_at_mut(rows);
                let pair = &w.blocks[local * per_row..(local + 2) * per_row];
                let (w0, w1) = pair.split_at(per_row);
                dot_rows_together(w.format, [w0, w1], in_dim, &input, [a, b]);
                k += 2;
                continue;
            }
            dot_rows(w.format, &w.blocks[local * per_row..(local + 1) * per_row], in_dim, &input, &mut chunk[k * rows..(k + 1) * rows]);
            k += 1;
        }
    };
    crate::pool::fill_items(&mut by_out, rows, total * in_dim >= PARALLEL_FROM_WEIGHTS, work);
    by_out
}

/// [`matmul_gated`]'s exact products, combined, laid out `[out, rows]`: item
/// `o` is gate row `o` and up row `o`, so one thread has both values.
fn exact_gated(gate: Weights, up: Weights, in_dim: usize, x: &[f32], rows: usize, combine: &(impl Fn(&[f32], &mut [f32]) + Sync)) -> Vec<f32> {
    let input = Input::new([gate.format, up.format], x);
    let out_dim = gate.out_dim;
    let mut by_out = vec![0f32; out_dim * rows];
    let work = |first_out: usize, chunk: &mut [f32]| {
        if rows >= TILED_FROM_ROWS {
            // The gate's values wait in `g` until every tile is done.
            let (pg, pu) = (in_dim / BLOCK * gate.format.block_bytes(), in_dim / BLOCK * up.format.block_bytes());
            let mut g = vec![0f32; chunk.len()];
            in_tiles(chunk.len() / rows, rows, |k, r0, n| {
                let (o, at) = (first_out + k, k * rows + r0..k * rows + r0 + n);
                dot_rows_from(gate.format, &gate.blocks[o * pg..(o + 1) * pg], in_dim, &input, r0, &mut g[at.clone()]);
                dot_rows_from(up.format, &up.blocks[o * pu..(o + 1) * pu], in_dim, &input, r0, &mut chunk[at]);
            });
            combine(&g, chunk);
            return;
        }
        // The gate's values wait in `g` and are combined once for the whole
        // chunk (one call of a vectorised combine, not one per output).
        let mut gs = vec![0f32; chunk.len()];
        for (k, (dst, g)) in chunk.chunks_exact_mut(rows).zip(gs.chunks_exact_mut(rows)).enumerate() {
            let o = first_out + k;
            if rows <= PAIRED_ROWS && gate.format == up.format {
                // A decode step's gate and up rows, together.
                let per_row = in_dim / BLOCK * gate.format.block_bytes();
                prefetch_ahead(gate.blocks, o, per_row);
                prefetch_ahead(up.blocks, o, per_row);
                let (w0, w1) = (&gate.blocks[o * per_row..(o + 1) * per_row], &up.blocks[o * per_row..(o + 1) * per_row]);
                dot_rows_together(gate.format, [w0, w1], in_dim, &input, [&mut g[..], &mut dst[..]]);
            } else {
                for (w, out) in [(&gate, &mut g[..]), (&up, &mut dst[..])] {
                    let per_row = in_dim / BLOCK * w.format.block_bytes();
                    prefetch_ahead(w.blocks, o, per_row);
                    dot_rows(w.format, &w.blocks[o * per_row..(o + 1) * per_row], in_dim, &input, out);
                }
            }
        }
        combine(&gs, chunk);
    };
    crate::pool::fill_items(&mut by_out, rows, 2 * out_dim * in_dim >= PARALLEL_FROM_WEIGHTS, work);
    by_out
}

/// Input rows from which a product runs in tiles: [`OUTPUT_TILE`] weight rows
/// against groups of [`ROW_GROUP`] input rows, so a group's activations stay
/// in L1 while the tile's weight rows (a fifth of their bytes, Q4_1) are read
/// again for each group. Row by row, each weight row streamed every input row
/// through from L2 (64 rows of SmolLM2's down_proj input: 393 KB per weight
/// row), and a 64-row Q4_1 step cost more per row than a 16-row one
/// (`bench decode-rows`: 2.9 against 2.3 ms of products per row). Tiled, the
/// 64-row step's products take 0.89 of the time (three alternating pairs,
/// normalised by the one-row step's, 2026-12-06); 16 rows about the same.
/// Each value is the bits it has without tiles (every row keeps its own
/// accumulators).
const TILED_FROM_ROWS: usize = 16;

/// The order of a tiled product of `outs` outputs and `rows` input rows (see
/// [`TILED_FROM_ROWS`]): for each tile of [`OUTPUT_TILE`] outputs and each
/// group of up to [`ROW_GROUP`] input rows `r0..r0 + n`, `f(k, r0, n)` for
/// every output `k` of the tile.
fn in_tiles(outs: usize, rows: usize, mut f: impl FnMut(usize, usize, usize)) {
    for t0 in (0..outs).step_by(OUTPUT_TILE) {
        for r0 in (0..rows).step_by(ROW_GROUP) {
            let n = (rows - r0).min(ROW_GROUP);
            for k in t0..(t0 + OUTPUT_TILE).min(outs) {
                f(k, r0, n);
            }
        }
    }
}

/// Weight rows per tile (see [`TILED_FROM_ROWS`]).
const OUTPUT_TILE: usize = 16;

/// Input rows per group (see [`TILED_FROM_ROWS`]): the AVX-512 body's widest
/// group.
const ROW_GROUP: usize = 8;

/// Weight rows ahead of the one being multiplied whose bytes [`prefetch_ahead`]
/// asks the cache for. SmolLM2-135M Q4_1 decode, 400 tokens, six alternating
/// runs on the 2-core VM: 0 (no prefetch) 54.1-62.8 tokens/s (median 60.8),
/// 4 rows 52.0-67.8 (median 64.1); 2, 6 and 12 rows in shorter runs were no
/// better than 4. The VM's memory is noisy (±20% between runs), so the gain
/// is a few percent at best.
const PREFETCH_ROWS_AHEAD: usize = 4;

/// Asks the cache for weight row `o + PREFETCH_ROWS_AHEAD` (when there is one)
/// while row `o` is multiplied. A decode step streams each matrix from memory
/// once and the kernels wait on those loads (perf puts most of their samples
/// on the instructions that consume a block's first bytes); the hardware
/// prefetcher does not run far enough ahead for rows of a few hundred bytes.
#[inline(always)]
fn prefetch_ahead(blocks: &[u8], o: usize, per_row: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        let start = (o + PREFETCH_ROWS_AHEAD) * per_row;
        if let Some(row) = blocks.get(start..start + per_row) {
            for line in row.chunks(64) {
                // SAFETY: a prefetch only hints the cache; the address is in `blocks`.
                unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(line.as_ptr().cast()) };
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (blocks, o, per_row);
}

/// Whether [`matmul`] rounds its activations to 8 bits (opt-in, process-wide).
static INT8_ACTIVATIONS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Turns the 8-bit-activation mode of the Q4_1 / Q8_0 products on or off for the
/// whole process (`--int8-activations`); the output head stays exact ([`exact`]).
/// On, each activation row is rounded to
/// 8 bits per block of 32 (a scale per block, as llama.cpp's `Q8_0`/`Q8_1`) and
/// multiplied with the weights' integers by integer dot products (AVX-512 VNNI
/// where the CPU has it): faster, and no longer what the dequantized f32 model
/// computes (the default, exact mode). Rows stay independent of each other, so
/// a batched decode step still equals one-at-a-time decoding in this mode.
pub fn set_int8_activations(on: bool) {
    INT8_ACTIVATIONS.store(on, std::sync::atomic::Ordering::Relaxed);
}

thread_local! {
    /// Set by [`exact`] on the thread running a product that must stay exact.
    static KEEP_EXACT: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with this thread's Q4_1 / Q8_0 products in the exact mode whatever
/// [`set_int8_activations`] says: the output head. Its logits decide the token,
/// and a small model's top two are often close: SmolLM2-135M Q4_1 answering
/// "What is the capital of France?" has 25.33 vs 25.24 for its first token, and
/// 8-bit activations moved that head's logits by up to 0.26, so it answered
/// "L'Étoile, la Marseillaise, …" instead of "The capital of France is Paris."
pub fn exact<T>(f: impl FnOnce() -> T) -> T {
    let before = KEEP_EXACT.with(|k| k.replace(true));
    let out = f();
    KEEP_EXACT.with(|k| k.set(before));
    out
}

/// Whether the 8-bit-activation mode is on ([`set_int8_activations`]).
pub fn int8_activations() -> bool {
    INT8_ACTIVATIONS.load(std::sync::atomic::Ordering::Relaxed)
}

/// The `[out_dim, in_dim]` f32 matrix of `W`, row-major, exactly as candle's
/// `QTensor::dequantize` computes it (`q * d + m`, `q * d`), spread over the
/// kernels' pool. For the prefill's dequantize-then-GEMM path: candle
/// dequantizes on its own barrier pool, which the binary sizes to one thread
/// (`CANDLE_NUM_THREADS=1`) so that it cannot stall under contention.
/// Callers check `blocks.len() == out_dim * in_dim / 32 * block_bytes`.
pub fn dequantize(format: Format, blocks: &[u8], out_dim: usize, in_dim: usize) -> Vec<f32> {
    let per_row = in_dim / BLOCK * format.block_bytes();
    let mut out = vec![0f32; out_dim * in_dim];
    let work = |first_out: usize, chunk: &mut [f32]| {
        for (k, dst) in chunk.chunks_exact_mut(in_dim).enumerate() {
            let o = first_out + k;
            dequantize_row(format, &blocks[o * per_row..(o + 1) * per_row], dst);
        }
    };
    crate::pool::fill_items(&mut out, in_dim, out_dim * in_dim >= PARALLEL_FROM_WEIGHTS, work);
    out
}

/// One row of blocks (`dst.len() / 32` of them) to f32, as [`dequantize`] computes it.
pub(crate) fn dequantize_row(format: Format, row: &[u8], dst: &mut [f32]) {
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

/// One weight row against every input row: `dst[r] = w · x[r]`.
fn dot_rows(format: Format, w: &[u8], in_dim: usize, input: &Input, dst: &mut [f32]) {
    dot_rows_from(format, w, in_dim, input, 0, dst);
}

/// One weight row against input rows `r0..r0 + dst.len()`: each row's value
/// is the bits [`dot_rows`] gives it (every row has its own accumulators).
fn dot_rows_from(format: Format, w: &[u8], in_dim: usize, input: &Input, r0: usize, dst: &mut [f32]) {
    let (n, nb) = (dst.len(), in_dim / BLOCK);
    let x = &input.x[r0 * in_dim..(r0 + n) * in_dim];
    let sums = if input.sums.is_empty() { &input.sums[..] } else { &input.sums[r0 * nb..(r0 + n) * nb] };
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx512f() {
            let rows = &input.avx512_rows(format)[r0 * in_dim..(r0 + n) * in_dim];
            // SAFETY: the CPU supports AVX-512F (checked above); the slices are as
            // for the AVX2 body below, Q4_1's rows in that body's lane order.
            unsafe { avx512::dot_rows(format, w, in_dim, rows, sums, dst) };
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

/// `W` weight rows of one format against the input rows: `outs[i] = ws[i] · x`
/// (one value per input row, at most [`PAIRED_ROWS`] of them for the AVX-512
/// body), each the bits [`dot_rows`] gives that weight row alone. The AVX-512 body
/// interleaves the rows (see `avx512::dot_rows_together`). A decode step takes
/// its outputs two at a time: SmolLM2's shapes, 2026-12-06, in the same
/// process, Q4_1 1536 × 576 1.63-1.65 → 1.27-1.30 ns per block at two threads
/// over 32 MB of matrices (1.86-2.51 → 1.41-1.87 over one), 576 × 1536
/// 1.22-1.28 → 1.09-1.16; Q8_0 1536 × 576 2.05-2.49 → 1.67-1.99, 576 × 1536
/// unchanged. Four rows at once was slower than two streamed.
fn dot_rows_together<const W: usize>(format: Format, ws: [&[u8]; W], in_dim: usize, input: &Input, outs: [&mut [f32]; W]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx512f() && outs[0].len() <= PAIRED_ROWS && outs.iter().all(|o| o.len() == outs[0].len()) {
        // SAFETY: AVX-512F checked (F16C comes with it); the rows hold
        // `in_dim / 32` blocks of `format`, the input rows are in the body's
        // order.
        unsafe { avx512::dot_rows_together(format, ws, in_dim, input.avx512_rows(format), outs) };
        return;
    }
    for (w, out) in ws.iter().zip(outs) {
        dot_rows(format, w, in_dim, input, out);
    }
}

/// Input rows up to which a product takes its weight rows two at a time (the
/// AVX-512 body's registers hold two weight rows' accumulators for up to four
/// input rows). A batched decode step of two or four sequences, 1536 × 576
/// Q4_1 streamed from memory at two threads, same process (2026-12-06): two
/// rows 4.51-4.84 → 4.23-4.32 ns per block, four 6.59-7.02 → 6.12-6.48 (in
/// cache four rows were 2% slower, two 5-12% faster).
const PAIRED_ROWS: usize = 4;

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
            super::in_groups!(@one $group, $format, n, $w, $in_dim, $x, $sums, r0, out);
            r0 += n;
        }
    }};
    // Groups of eight rows where there are eight (the AVX-512 body, whose 32
    // registers hold eight rows' accumulators; a batched decode step of 16
    // sequences unpacks each block twice instead of four times), else of up to four.
    (wide $group:ident, $format:expr, $w:expr, $in_dim:expr, $x:expr, $sums:expr, $dst:expr) => {{
        let dst: &mut [f32] = $dst;
        let rows = dst.len();
        let mut r0 = 0;
        while r0 < rows {
            let n = if rows - r0 >= 8 { 8 } else { (rows - r0).min(4) };
            let out = &mut dst[r0..r0 + n];
            match ($format, n) {
                (Format::Q4_1, 8) => $group::<true, 8>($w, $in_dim, $x, $sums, r0, out),
                (Format::Q8_0, 8) => $group::<false, 8>($w, $in_dim, $x, $sums, r0, out),
                _ => super::in_groups!(@one $group, $format, n, $w, $in_dim, $x, $sums, r0, out),
            }
            r0 += n;
        }
    }};
    (@one $group:ident, $format:expr, $n:expr, $w:expr, $in_dim:expr, $x:expr, $sums:expr, $r0:expr, $out:expr) => {
        match ($format, $n) {
            (Format::Q4_1, 1) => $group::<true, 1>($w, $in_dim, $x, $sums, $r0, $out),
            (Format::Q4_1, 2) => $group::<true, 2>($w, $in_dim, $x, $sums, $r0, $out),
            (Format::Q4_1, 3) => $group::<true, 3>($w, $in_dim, $x, $sums, $r0, $out),
            (Format::Q4_1, _) => $group::<true, 4>($w, $in_dim, $x, $sums, $r0, $out),
            (Format::Q8_0, 1) => $group::<false, 1>($w, $in_dim, $x, $sums, $r0, $out),
            (Format::Q8_0, 2) => $group::<false, 2>($w, $in_dim, $x, $sums, $r0, $out),
            (Format::Q8_0, 3) => $group::<false, 3>($w, $in_dim, $x, $sums, $r0, $out),
            (Format::Q8_0, _) => $group::<false, 4>($w, $in_dim, $x, $sums, $r0, $out),
        }
    };
}
#[cfg(target_arch = "x86_64")]
use in_groups;

#[cfg(target_arch = "x86_64")]
fn has_avx512f() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("f16c"))
}

/// The two f16 values at `p` and `p + 2` (a block's `d` and, for Q4_1, `m`) as
/// f32, by one F16C conversion inside the SIMD bodies: `half`'s `to_f32` is a
/// call that checks the CPU each time, a fifth of a Q4_1 block's cost there.
/// Exact either way (every f16 is an f32).
///
/// # Safety
/// F16C, and four readable bytes at `p`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn f16_pair(p: *const u8) -> (f32, f32) {
    use std::arch::x86_64::*;
    // SAFETY: the caller guarantees F16C and the four bytes.
    unsafe {
        let v = _mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(p as *const i32)));
        (_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_shuffle_ps::<1>(v, v)))
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    //! The AVX-512 body of `dot_rows`: a block's 32 weights become two vectors
    //! of sixteen f32 (half the instructions of the AVX2 body; 13% faster on
    //! Q8_0, as fast on Q4_1, see [`group`]). Each input row still accumulates
    //! on its own, so a row's result does not depend on how many rows share the
    //! call.

    use std::arch::x86_64::*;

    use super::{Format, BLOCK};

    /// See `super::dot_rows`.
    #[target_feature(enable = "avx512f,f16c")]
    pub(super) unsafe fn dot_rows(format: Format, w: &[u8], in_dim: usize, x: &[f32], sums: &[f32], dst: &mut [f32]) {
        // SAFETY: forwarded from this function's contract.
        unsafe { super::in_groups!(wide group, format, w, in_dim, x, sums, dst) };
    }

    /// Rows `r0..r0 + N` of `x` against one weight row. Block `b` goes to
    /// accumulator `b % CHAINS` (Q4_1's `m · Σx` terms to a scalar chain per
    /// row), so a block need not wait for the previous block's FMA: one thread, a
    /// 1536 × 576 row each, 1 / 2 / 4 chains gave Q4_1 2.25 / 2.10 / 2.15 ns per
    /// block and Q8_0 1.72 / 1.57 / 1.61 (the AVX2 body: 2.12 and 1.81), on the
    /// dev VM's host of that day; on 2026-12-06's slower host the same row took
    /// 3.0-3.7 ns (Q4_1) and 1.9-3.4 (Q8_0), swinging within minutes. Q4_1's
    /// limit is the unpacking (the nibbles looked up in a table), whose 512-bit
    /// shuffles run on one port: wider vectors do not make it faster.
    #[target_feature(enable = "avx512f,f16c")]
    unsafe fn group<const Q4: bool, const N: usize>(
        w: &[u8],
        in_dim: usize,
        x: &[f32],
        _sums: &[f32],
        r0: usize,
        out: &mut [f32],
    ) {
        // SAFETY: forwarded from this function's contract.
        unsafe { group_of::<Q4, N, 1>([w], in_dim, x, r0, [out]) }
    }

    /// Weight rows `ws` (one format, one width) against input row 0 of `x`,
    /// into `outs`: a decode step's next outputs of one matrix, or its gate
    /// and up rows. Each row's operations are the ones [`group`] does for it
    /// alone, in the same order (the same bits); they are only interleaved,
    /// so the rows share the input's loads and the unpacking of one row's
    /// block overlaps the other's additions.
    ///
    /// # Safety
    /// AVX-512F and F16C; each of `ws` holds `in_dim / 32` blocks of `format`,
    /// `x` at least `in_dim` values (Q4_1: in [`q4_lanes`] order).
    #[target_feature(enable = "avx512f,f16c")]
    pub(super) unsafe fn dot_rows_together<const W: usize>(format: Format, ws: [&[u8]; W], in_dim: usize, x: &[f32], outs: [&mut [f32]; W]) {
        // SAFETY: forwarded from this function's contract.
        unsafe {
            match (format, outs[0].len()) {
                (Format::Q4_1, 1) => group_of::<true, 1, W>(ws, in_dim, x, 0, outs),
                (Format::Q4_1, 2) => group_of::<true, 2, W>(ws, in_dim, x, 0, outs),
                (Format::Q4_1, 3) => group_of::<true, 3, W>(ws, in_dim, x, 0, outs),
                (Format::Q4_1, _) => group_of::<true, 4, W>(ws, in_dim, x, 0, outs),
                (Format::Q8_0, 1) => group_of::<false, 1, W>(ws, in_dim, x, 0, outs),
                (Format::Q8_0, 2) => group_of::<false, 2, W>(ws, in_dim, x, 0, outs),
                (Format::Q8_0, 3) => group_of::<false, 3, W>(ws, in_dim, x, 0, outs),
                (Format::Q8_0, _) => group_of::<false, 4, W>(ws, in_dim, x, 0, outs),
            }
        }
    }

    /// [`group`] for `W` weight rows at once, each with accumulators of its own.
    ///
    /// Each block converts its own scales as it goes (Q4_1's `m · Σx` in a
    /// scalar chain per row). Gathering sixteen blocks' scales at once was
    /// faster with the weights in cache (one thread, 1536 × 576: 2.36-2.41
    /// against 2.58-2.59 ns per block) but slower streamed from memory, where
    /// a decode step reads them: 600 MB of 1536 × 576 Q4_1 matrices, in the
    /// same process, 2.81-3.85 against 2.71-2.95 ns per block on one thread and
    /// 1.57-2.22 against 1.61-1.92 on two; SmolLM2 Q4_1 decode, 6 alternating
    /// pairs, matmul time per token 0.95-0.99 of the gathering kernel's
    /// (2026-12-06). A gather waits for all sixteen of its loads.
    #[target_feature(enable = "avx512f,f16c")]
    unsafe fn group_of<const Q4: bool, const N: usize, const W: usize>(
        ws: [&[u8]; W],
        in_dim: usize,
        x: &[f32],
        r0: usize,
        outs: [&mut [f32]; W],
    ) {
        let nb = in_dim / BLOCK;
        let bytes = if Q4 { 20 } else { 34 };
        let mut acc = [[[_mm512_setzero_ps(); N]; CHAINS]; W];
        let mut b = 0;
        while b < nb {
            for c in 0..CHAINS {
                if b + c < nb {
                    for (w, acc) in ws.iter().zip(acc.iter_mut()) {
                        // SAFETY: block `b + c < nb` lies within `w`; `x` holds
                        // rows `r0..r0 + N` of `in_dim` values.
                        unsafe {
                            let (d, m) = super::f16_pair(w.as_ptr().add((b + c) * bytes));
                            block::<Q4, N>(w, in_dim, x, r0, b + c, d, m, &mut acc[c]);
                        }
                    }
                }
            }
            b += CHAINS;
        }
        for (acc, out) in acc.iter().zip(outs) {
            for (k, out) in out.iter_mut().enumerate().take(N) {
                *out = chains_sum(acc, k);
            }
        }
    }

    /// Row `k`'s accumulators over every chain, summed.
    #[target_feature(enable = "avx512f")]
    fn chains_sum<const N: usize>(acc: &[[__m512; N]; CHAINS], k: usize) -> f32 {
        let v = acc[1..].iter().fold(acc[0][k], |v, chain| _mm512_add_ps(v, chain[k]));
        _mm512_reduce_add_ps(v)
    }

    /// Independent accumulation chains per row in [`group`].
    const CHAINS: usize = 2;

    /// Block `b` of the weight row, whose scale is `d` (and Q4_1's offset
    /// `m`), against rows `r0..r0 + N`, added to `acc`.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn block<const Q4: bool, const N: usize>(
        w: &[u8],
        in_dim: usize,
        x: &[f32],
        r0: usize,
        b: usize,
        d: f32,
        m: f32,
        acc: &mut [__m512; N],
    ) {
        let bytes = if Q4 { 20 } else { 34 };
        // SAFETY: the caller guarantees block `b` and rows `r0..r0 + N` exist.
        unsafe {
            let blk = w.as_ptr().add(b * bytes);
            let dv = _mm512_set1_ps(d);
            if Q4 {
                // The block's sixteen bytes in each 128-bit lane; a per-lane
                // shift then brings lane `j`'s low nibble (`lo`) or high nibble
                // (`hi`) of byte `4 (j % 4) + j / 4` to its low four bits, which
                // are all `vpermps` reads: the weights `d · q` are looked up in a
                // table scaled once per block. No widening shuffle (the load
                // broadcasts), two lookups, and a row's share is two FMAs, so
                // rows sharing the block (a batched step) cost two FMAs each, not
                // three. The activations come in the same lane order ([`q4_lanes`]).
                // Against the widening unpack with an unscaled table (2026-12-06,
                // the same process, 1536 × 576 and 576 × 1536 Q4_1 streamed from
                // 600 MB at two threads): 1-4% less time per block; SmolLM2 Q4_1
                // decode, 8 alternating pairs, matmul time 0.97 of before
                // (median, against the unchanged Q8_0 head's time), same ids.
                //
                // The table holds the whole weight, `d · q + m` (one FMA per
                // block), so Q4_1's `m · Σx` needs no scalar chain per row: two
                // uops per row-block fewer, a ninth of a batched step's.
                let q = _mm512_broadcast_i32x4(_mm_loadu_si128(blk.add(4) as *const __m128i));
                let table = _mm512_fmadd_ps(_mm512_setr_ps(0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0), dv, _mm512_set1_ps(m));
                let shift_lo = _mm512_setr_epi32(0, 0, 0, 0, 8, 8, 8, 8, 16, 16, 16, 16, 24, 24, 24, 24);
                let lo = _mm512_permutexvar_ps(_mm512_srlv_epi32(q, shift_lo), table);
                let hi = _mm512_permutexvar_ps(_mm512_srlv_epi32(q, _mm512_add_epi32(shift_lo, _mm512_set1_epi32(4))), table);
                for (k, acc) in acc.iter_mut().enumerate() {
                    let xp = x.as_ptr().add((r0 + k) * in_dim + b * BLOCK);
                    *acc = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xp.add(16)), _mm512_fmadd_ps(lo, _mm512_loadu_ps(xp), *acc));
                }
            } else {
                let q0 = _mm_loadu_si128(blk.add(2) as *const __m128i);
                let q1 = _mm_loadu_si128(blk.add(18) as *const __m128i);
                let (e0, e1) = (_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q0)), _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q1)));
                for (k, acc) in acc.iter_mut().enumerate() {
                    let xp = x.as_ptr().add((r0 + k) * in_dim + b * BLOCK);
                    let s = _mm512_mul_ps(e0, _mm512_loadu_ps(xp));
                    let s = _mm512_fmadd_ps(e1, _mm512_loadu_ps(xp.add(16)), s);
                    *acc = _mm512_fmadd_ps(dv, s, *acc);
                }
            }
        }
    }

    /// Input rows (`in_dim`-wide, whole blocks) with each block's 32 values in
    /// the order of [`block`]'s Q4_1 lanes: lane `j < 16` holds weight
    /// `4 (j % 4) + j / 4`, lane `16 + j` weight `16 + 4 (j % 4) + j / 4`.
    /// Made once per product, shared by every weight row.
    pub(super) fn q4_lanes(x: &[f32]) -> Vec<f32> {
        let mut out = vec![0f32; x.len()];
        for (src, dst) in x.chunks_exact(BLOCK).zip(out.chunks_exact_mut(BLOCK)) {
            for j in 0..16 {
                dst[j] = src[4 * (j % 4) + j / 4];
                dst[16 + j] = src[16 + 4 * (j % 4) + j / 4];
            }
        }
        out
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

/// The 8-bit-activation products ([`set_int8_activations`]).
mod int8 {
    use half::f16;

    use super::{Format, BLOCK, PARALLEL_FROM_WEIGHTS};

    /// Activation rows rounded to 8 bits: per block of 32 a scale `d` (the
    /// block's largest magnitude / 127), the integers, and (for Q4_1's `m` term)
    /// the block's exact f32 sum.
    pub(super) struct Rows {
        pub(super) q: Vec<i8>,
        /// `q` with each pair of blocks `(2p, 2p + 1)` of a row in the order a
        /// Q4_1 pair's nibbles come out of `vnni::rows_q4_1`'s unpacking: the
        /// first block's first 16 values, the second's first 16, the first's
        /// last 16, the second's last 16 (an odd last block as it is).
        pub(super) paired: Vec<i8>,
        pub(super) d: Vec<f32>,
        pub(super) sums: Vec<f32>,
        pub(super) in_dim: usize,
    }

    impl Rows {
        pub(super) fn quantize(x: &[f32], in_dim: usize) -> Rows {
            let blocks = x.len() / BLOCK;
            let mut q = vec![0i8; x.len()];
            let mut d = Vec::with_capacity(blocks);
            let mut sums = Vec::with_capacity(blocks);
            for (xb, qb) in x.chunks_exact(BLOCK).zip(q.chunks_exact_mut(BLOCK)) {
                let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
                let scale = amax / 127.0;
                let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
                for (qv, &v) in qb.iter_mut().zip(xb) {
                    *qv = (v * inv).round().clamp(-127.0, 127.0) as i8;
                }
                d.push(scale);
                sums.push(xb.iter().sum());
            }
            let nb = in_dim / BLOCK;
            let mut paired = q.clone();
            if nb > 0 {
                for (row, out) in q.chunks_exact(in_dim).zip(paired.chunks_exact_mut(in_dim)) {
                    for (pair, dst) in row.chunks_exact(2 * BLOCK).zip(out.chunks_exact_mut(2 * BLOCK)) {
                        let (a, b) = pair.split_at(BLOCK);
                        dst[..16].copy_from_slice(&a[..16]);
                        dst[16..32].copy_from_slice(&b[..16]);
                        dst[32..48].copy_from_slice(&a[16..]);
                        dst[48..].copy_from_slice(&b[16..]);
                    }
                }
            }
            Rows { q, paired, d, sums, in_dim }
        }
    }

    /// [`super::matmul`] in the 8-bit-activation mode, with the activations
    /// already rounded (once per input, however many matrices it meets).
    pub(super) fn matmul(format: Format, blocks: &[u8], out_dim: usize, act: &Rows, rows: usize, y: &mut [f32]) {
        let in_dim = act.in_dim;
        let per_row = in_dim / BLOCK * format.block_bytes();
        let mut by_out = vec![0f32; out_dim * rows];
        let work = |first_out: usize, chunk: &mut [f32]| {
            let mut k = 0;
            while k < chunk.len() / rows.max(1) {
                let o = first_out + k;
                super::prefetch_ahead(blocks, o, per_row);
                #[cfg(target_arch = "x86_64")]
                if rows == 1 && format == Format::Q4_1 && k + 1 < chunk.len() && has_vnni() {
                    // A decode step's next two outputs, together.
                    super::prefetch_ahead(blocks, o + 1, per_row);
                    let (w0, w1) = blocks[o * per_row..(o + 2) * per_row].split_at(per_row);
                    // SAFETY: AVX-512 VNNI/VL and AVX2 checked; each row holds
                    // `in_dim / 32` blocks and `act` row 0's.
                    let [a, b] = unsafe { vnni::rows_q4_1([w0, w1], act, 0) };
                    chunk[k] = a;
                    chunk[k + 1] = b;
                    k += 2;
                    continue;
                }
                dot_rows(format, &blocks[o * per_row..(o + 1) * per_row], act, &mut chunk[k * rows..(k + 1) * rows]);
                k += 1;
            }
        };
        crate::pool::fill_items(&mut by_out, rows, out_dim * in_dim >= PARALLEL_FROM_WEIGHTS, work);
        super::by_output_into(&by_out, rows, out_dim, y);
    }

    /// One weight row against every activation row.
    fn dot_rows(format: Format, w: &[u8], act: &Rows, dst: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if has_vnni() {
            for (r, out) in dst.iter_mut().enumerate() {
                // SAFETY: AVX-512 VNNI/VL and AVX2 checked; `w` holds the row's
                // blocks and `act` row `r`'s.
                *out = unsafe {
                    match format {
                        Format::Q4_1 => vnni::rows_q4_1([w], act, r)[0],
                        Format::Q8_0 => vnni::row_q8_0(w, act, r),
                    }
                };
            }
            return;
        }
        for (r, out) in dst.iter_mut().enumerate() {
            *out = row_scalar(format, w, act, r);
        }
    }

    /// The portable body: the same integer sums, scaled per block.
    pub(super) fn row_scalar(format: Format, w: &[u8], act: &Rows, r: usize) -> f32 {
        let nb = act.in_dim / BLOCK;
        let bytes = format.block_bytes();
        let mut acc = 0f32;
        for b in 0..nb {
            let blk = &w[b * bytes..(b + 1) * bytes];
            let dw = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
            let xq = &act.q[(r * nb + b) * BLOCK..(r * nb + b + 1) * BLOCK];
            let dx = act.d[r * nb + b];
            match format {
                Format::Q4_1 => {
                    let m = f16::from_le_bytes([blk[2], blk[3]]).to_f32();
                    let mut isum = 0i32;
                    for j in 0..16 {
                        let q = blk[4 + j];
                        isum += i32::from(q & 0x0F) * i32::from(xq[j]) + i32::from(q >> 4) * i32::from(xq[j + 16]);
                    }
                    acc += dw * dx * isum as f32 + m * act.sums[r * nb + b];
                }
                Format::Q8_0 => {
                    let isum: i32 = blk[2..].iter().zip(xq).map(|(&q, &v)| i32::from(q as i8) * i32::from(v)).sum();
                    acc += dw * dx * isum as f32;
                }
            }
        }
        acc
    }

    #[cfg(target_arch = "x86_64")]
    pub(super) fn has_vnni() -> bool {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512dq")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512vnni")
                && is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
        })
    }

    #[cfg(target_arch = "x86_64")]
    pub(super) mod vnni {
        //! A block's 32 weight integers against the activation's with one
        //! `vpdpbusd` (unsigned × signed bytes, summed four at a time into eight
        //! i32 lanes), converted and scaled by `d_w · d_x` into an f32 vector.

        use std::arch::x86_64::*;

        use super::{Rows, BLOCK};

        /// Q4_1 weight rows `ws` · activation row `r`, two blocks per 512-bit
        /// `vpdpbusd`. The two blocks' 32 nibble bytes are unpacked as one
        /// 256-bit vector (mask, shift and mask) and joined as [low nibbles,
        /// high nibbles], which puts the first block's weights in lanes 0..4
        /// and 8..12 and the second's in 4..8 and 12..16; the activations are
        /// stored in that order ([`Rows::paired`]), so no shuffle is needed.
        /// Sixteen blocks' scales (`d_w · d_x`) and `m` come from one gather
        /// and one conversion, and `m · Σx` is one FMA per sixteen blocks:
        /// the Q4_1 body it replaced converted every block's scales on its own and
        /// was slower than the exact kernel (SmolLM2-135M decode 105-130 against
        /// 126-140 tokens/s, 2026-12-06).
        ///
        /// The rows are interleaved (the activation loads shared, each row's
        /// operations in its lone order) and `m · Σx` goes into the same
        /// accumulator: 1536 × 576 rows in the same process, one thread, in
        /// cache 4.36-4.57 → 3.06-3.13 ns per block, streamed from 600 MB at two
        /// threads 2.57-2.70 → 2.00-2.07 (2026-12-06).
        #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512dq,avx512bw,avx512vnni,avx512vl")]
        pub(in crate::quantized) unsafe fn rows_q4_1<const W: usize>(ws: [&[u8]; W], act: &Rows, r: usize) -> [f32; W] {
            const SEGMENT: usize = 16;
            let nb = act.in_dim / BLOCK;
            let mut acc = [_mm512_setzero_ps(); W];
            let mut tail = [0f32; W];
            // SAFETY: blocks `b < nb` lie within each `w`; the activation row `r`
            // holds `nb` blocks of integers, scales and sums; the gathers and the
            // masked loads touch only blocks of the current segment.
            unsafe {
                let xq = act.paired.as_ptr().add(r * nb * BLOCK);
                let (xd, xs) = (act.d.as_ptr().add(r * nb), act.sums.as_ptr().add(r * nb));
                let offsets = _mm512_mullo_epi32(
                    _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                    _mm512_set1_epi32(20),
                );
                let mask = _mm256_set1_epi8(0x0F);
                let mut first = 0;
                while first < nb {
                    let n = (nb - first).min(SEGMENT);
                    let lanes: __mmask16 = if n == SEGMENT { 0xFFFF } else { (1u16 << n) - 1 };
                    let dx = _mm512_maskz_loadu_ps(lanes, xd.add(first));
                    let sx = _mm512_maskz_loadu_ps(lanes, xs.add(first));
                    let mut scales = [_mm512_setzero_ps(); W];
                    for ((w, scale), acc) in ws.iter().zip(scales.iter_mut()).zip(acc.iter_mut()) {
                        let words = _mm512_mask_i32gather_epi32::<1>(_mm512_setzero_si512(), lanes, offsets, w.as_ptr().add(first * 20) as *const i32);
                        let dw = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(words));
                        let m = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(words)));
                        *scale = _mm512_mul_ps(dw, dx);
                        // `m · Σx` goes straight into the accumulator.
                        *acc = _mm512_fmadd_ps(m, sx, *acc);
                    }
                    let mut pick = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1);
                    let mut i = 0;
                    while i + 2 <= n {
                        let b = first + i;
                        let xv = _mm512_loadu_si512(xq.add(b * BLOCK) as *const __m512i);
                        for ((w, scale), acc) in ws.iter().zip(&scales).zip(acc.iter_mut()) {
                            let qs = _mm256_inserti128_si256::<1>(
                                _mm256_castsi128_si256(_mm_loadu_si128(w.as_ptr().add(b * 20 + 4) as *const __m128i)),
                                _mm_loadu_si128(w.as_ptr().add(b * 20 + 24) as *const __m128i),
                            );
                            let lo = _mm256_and_si256(qs, mask);
                            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(qs), mask);
                            let wv = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi);
                            let p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv, xv);
                            *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_permutexvar_ps(pick, *scale), *acc);
                        }
                        pick = _mm512_add_epi32(pick, _mm512_set1_epi32(2));
                        i += 2;
                    }
                    if i < n {
                        // An odd last block, alone (its activations in their own order).
                        let b = first + i;
                        for (w, tail) in ws.iter().zip(tail.iter_mut()) {
                            let qs = _mm_loadu_si128(w.as_ptr().add(b * 20 + 4) as *const __m128i);
                            let m4 = _mm_set1_epi8(0x0F);
                            let wv = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16::<4>(qs), m4), _mm_and_si128(qs, m4));
                            let p = _mm256_dpbusd_epi32(_mm256_setzero_si256(), wv, _mm256_loadu_si256(xq.add(b * BLOCK) as *const __m256i));
                            let v = _mm256_cvtepi32_ps(p);
                            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
                            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
                            let isum = _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)));
                            *tail += isum * super::super::f16_pair(w.as_ptr().add(b * 20)).0 * *xd.add(b);
                        }
                    }
                    first += n;
                }
                std::array::from_fn(|i| _mm512_reduce_add_ps(acc[i]) + tail[i])
            }
        }

        /// Q8_0 weight row `w` · activation row `r`: two blocks per 512-bit
        /// `vpdpbusd` (lanes 0..8 the even block, 8..16 the odd one), each
        /// scaled by its own `d_w · d_x`; an odd last block alone.
        #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512dq,avx512bw,avx512vnni,avx512vl")]
        pub(super) unsafe fn row_q8_0(w: &[u8], act: &Rows, r: usize) -> f32 {
            let nb = act.in_dim / BLOCK;
            let bytes = 34;
            let mut acc = _mm512_setzero_ps();
            // SAFETY: blocks `b < nb` lie within `w`; the activation row `r`
            // holds `nb` blocks of integers and scales.
            unsafe {
                let xq = act.q.as_ptr().add(r * nb * BLOCK);
                let xd = act.d.as_ptr().add(r * nb);
                let scale_of = |b: usize| super::super::f16_pair(w.as_ptr().add(b * bytes)).0 * *xd.add(b);
                let mut b = 0;
                while b + 2 <= nb {
                    let (b0, b1) = (w.as_ptr().add(b * bytes), w.as_ptr().add((b + 1) * bytes));
                    let xv = _mm512_loadu_si512(xq.add(b * BLOCK) as *const __m512i);
                    let w0 = _mm256_loadu_si256(b0.add(2) as *const __m256i);
                    let w1 = _mm256_loadu_si256(b1.add(2) as *const __m256i);
                    let wv = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(w0), w1);
                    // u8 × i8 products: |w| against x with w's sign.
                    let sx = _mm512_mask_sub_epi8(xv, _mm512_movepi8_mask(wv), _mm512_setzero_si512(), xv);
                    let p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_abs_epi8(wv), sx);
                    let scale = _mm512_insertf32x8::<1>(_mm512_set1_ps(scale_of(b)), _mm256_set1_ps(scale_of(b + 1)));
                    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), scale, acc);
                    b += 2;
                }
                let mut tail = 0f32;
                if b < nb {
                    let b0 = w.as_ptr().add(b * bytes);
                    let xv = _mm256_loadu_si256(xq.add(b * BLOCK) as *const __m256i);
                    let wv = _mm256_loadu_si256(b0.add(2) as *const __m256i);
                    let p = _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_abs_epi8(wv), _mm256_sign_epi8(xv, wv));
                    let v = _mm256_mul_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(scale_of(b)));
                    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
                    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
                    tail = _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)));
                }
                _mm512_reduce_add_ps(acc) + tail
            }
        }
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

    /// The 8-bit-activation mode: the SIMD body equals the portable one (the
    /// same integer sums; f32 order differs), and both stay within the error
    /// 8-bit activations bring of the exact product.
    #[test]
    fn int8_activations_match_the_portable_body_and_stay_near_the_exact_product() {
        for (format, dtype) in [(Format::Q4_1, GgmlDType::Q4_1), (Format::Q8_0, GgmlDType::Q8_0)] {
            // 19 blocks: a whole segment of sixteen, a pair and an odd block alone.
            for (out_dim, in_dim, rows) in [(8, 32, 1), (192, 576, 1), (1536, 576, 3), (576, 1536, 9), (16, 608, 2)] {
                let w = Tensor::randn(0f32, 1.0, (out_dim, in_dim), &Device::Cpu).unwrap();
                let q = QTensor::quantize(&w, dtype).unwrap();
                let data = q.data().unwrap();
                let x = Tensor::randn(0f32, 1.0, (rows, in_dim), &Device::Cpu).unwrap();
                let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
                let mut exact = vec![0f32; rows * out_dim];
                matmul(format, &data, out_dim, in_dim, &xs, rows, &mut exact);
                let mut got = vec![0f32; rows * out_dim];
                let act = int8::Rows::quantize(&xs, in_dim);
                int8::matmul(format, &data, out_dim, &act, rows, &mut got);
                let per_row = in_dim / BLOCK * format.block_bytes();
                let deq = dequantize(format, &data, out_dim, in_dim);
                let case = format!("{format:?} {out_dim}x{in_dim} rows {rows}");
                for r in 0..rows {
                    for o in 0..out_dim {
                        let g = got[r * out_dim + o];
                        let portable = int8::row_scalar(format, &data[o * per_row..(o + 1) * per_row], &act, r);
                        assert!((g - portable).abs() <= 1e-4 * (1.0 + portable.abs()), "{case} ({r}, {o}): {g} vs portable {portable}");
                        // Rounding moves each activation by at most half its block's
                        // step `d_x`, so the product moves by at most
                        // Σ |d_w q_j| · d_x / 2 (Q4_1's `m Σ x` stays exact).
                        let e = exact[r * out_dim + o];
                        let row = &deq[o * in_dim..(o + 1) * in_dim];
                        let blocks = &data[o * per_row..(o + 1) * per_row];
                        let bound: f32 = (0..in_dim)
                            .map(|i| {
                                let b = i / BLOCK;
                                let m = match format {
                                    Format::Q4_1 => {
                                        let blk = &blocks[b * 20..];
                                        f16::from_le_bytes([blk[2], blk[3]]).to_f32()
                                    }
                                    Format::Q8_0 => 0.0,
                                };
                                (row[i] - m).abs() * act.d[r * (in_dim / BLOCK) + b] / 2.0
                            })
                            .sum();
                        assert!((g - e).abs() <= bound * 1.001 + 1e-4 * (1.0 + e.abs()), "{case} ({r}, {o}): {g} vs exact {e}, bound {bound}");
                    }
                }
            }
        }
    }

    /// Each row of a many-row product is bit for bit that row's product alone
    /// (the batched decode step's contract), whatever group of rows the SIMD
    /// body puts it in (groups of eight, four and fewer).
    #[test]
    fn rows_together_are_each_row_alone() {
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let format = Format::of_ggml(dtype).unwrap();
            let (out_dim, in_dim) = (40, 608);
            let w = Tensor::randn(0f32, 1.0, (out_dim, in_dim), &Device::Cpu).unwrap();
            let blocks = QTensor::quantize(&w, dtype).unwrap().data().unwrap().into_owned();
            // From 16 rows the product runs in tiles (`TILED_FROM_ROWS`):
            // 16, 17, 35 and 40 rows, out_dim 40 = two whole tiles and a part.
            let rows = 40;
            let xs: Vec<f32> = Tensor::randn(0f32, 1.0, (rows, in_dim), &Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            for n in [2usize, 3, 4, 5, 8, 9, 12, 16, 17, 35, 40] {
                let mut together = vec![0f32; n * out_dim];
                matmul(format, &blocks, out_dim, in_dim, &xs[..n * in_dim], n, &mut together);
                for r in 0..n {
                    let mut alone = vec![0f32; out_dim];
                    matmul(format, &blocks, out_dim, in_dim, &xs[r * in_dim..(r + 1) * in_dim], 1, &mut alone);
                    let same = alone.iter().zip(&together[r * out_dim..]).all(|(a, t)| a.to_bits() == t.to_bits());
                    assert!(same, "{format:?}: row {r} of {n}");
                }
            }
        }
    }

    /// The 8-bit mode's Q4_1 rows taken two at a time (a decode step) give each
    /// row's lone bits, with an odd last block and a part segment of sixteen.
    #[test]
    fn int8_rows_in_pairs_are_each_row_alone() {
        #[cfg(target_arch = "x86_64")]
        if int8::has_vnni() {
            for in_dim in [576usize, 608, 1536] {
                let w = Tensor::randn(0f32, 1.0, (6, in_dim), &Device::Cpu).unwrap();
                let data = QTensor::quantize(&w, GgmlDType::Q4_1).unwrap().data().unwrap().into_owned();
                let xs: Vec<f32> = Tensor::randn(0f32, 1.0, (1, in_dim), &Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                let act = int8::Rows::quantize(&xs, in_dim);
                let per_row = in_dim / BLOCK * 20;
                let row = |o: usize| &data[o * per_row..(o + 1) * per_row];
                let mut together = vec![0f32; 6];
                int8::matmul(Format::Q4_1, &data, 6, &act, 1, &mut together);
                for (o, t) in together.iter().enumerate() {
                    // SAFETY: VNNI checked; each row holds `in_dim / 32` blocks.
                    let alone = unsafe { int8::vnni::rows_q4_1([row(o)], &act, 0) }[0];
                    assert_eq!(t.to_bits(), alone.to_bits(), "{in_dim} wide, row {o}");
                }
            }
        }
    }

    /// A decode step multiplies weight rows two at a time; each output must be
    /// what its row alone gives (odd row counts leave the last row alone, and
    /// the gated product pairs each gate row with its up row).
    #[test]
    fn weight_rows_in_pairs_are_each_row_alone() {
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let format = Format::of_ggml(dtype).unwrap();
            for (out_dim, in_dim) in [(7usize, 576usize), (33, 1536), (4, 64)] {
                let quantize = |seed: f64| {
                    let w = (Tensor::randn(0f32, 1.0, (out_dim, in_dim), &Device::Cpu).unwrap() * seed).unwrap();
                    QTensor::quantize(&w, dtype).unwrap().data().unwrap().into_owned()
                };
                let (gate, up) = (quantize(1.0), quantize(0.5));
                let x: Vec<f32> = Tensor::randn(0f32, 1.0, (1, in_dim), &Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                let input = Input::new([format], &x);
                let per_row = in_dim / BLOCK * format.block_bytes();
                let alone = |blocks: &[u8], o: usize| {
                    let mut y = [0f32];
                    dot_rows(format, &blocks[o * per_row..(o + 1) * per_row], in_dim, &input, &mut y);
                    y[0]
                };
                let mut y = vec![0f32; out_dim];
                matmul(format, &gate, out_dim, in_dim, &x, 1, &mut y);
                let mut gated = vec![0f32; out_dim];
                let weights = |blocks| Weights { format, blocks, out_dim };
                let twice_plus = |g: &[f32], u: &mut [f32]| u.iter_mut().zip(g).for_each(|(u, &g)| *u += g * 2.0);
                matmul_gated(weights(&gate), weights(&up), in_dim, &x, 1, twice_plus, &mut gated);
                for o in 0..out_dim {
                    assert_eq!(y[o].to_bits(), alone(&gate, o).to_bits(), "{format:?} {out_dim}x{in_dim}: row {o}");
                    let want = alone(&up, o) + alone(&gate, o) * 2.0;
                    assert_eq!(gated[o].to_bits(), want.to_bits(), "{format:?} {out_dim}x{in_dim}: gated row {o}");
                }
            }
        }
    }

    /// Products of one input taken together (q / k / v, gate / up) are bit for
    /// bit the products taken one by one, for mixed formats, sizes on either
    /// side of the parallel threshold, one row and several.
    #[test]
    fn products_together_are_the_products_alone() {
        let quantize = |out_dim: usize, in_dim: usize, dtype: GgmlDType| {
            let w = Tensor::randn(0f32, 1.0, (out_dim, in_dim), &Device::Cpu).unwrap();
            QTensor::quantize(&w, dtype).unwrap().data().unwrap().into_owned()
        };
        // 20 and 33 rows: tiles that span two matrices, and the gated tiles.
        for (in_dim, rows) in [(64, 1), (576, 1), (576, 3), (1536, 9), (576, 20), (1536, 33)] {
            let parts = [(Format::Q4_1, GgmlDType::Q4_1, 576), (Format::Q8_0, GgmlDType::Q8_0, 8), (Format::Q4_1, GgmlDType::Q4_1, 0), (Format::Q4_1, GgmlDType::Q4_1, 192)];
            let data: Vec<(Format, Vec<u8>, usize)> = parts.iter().map(|&(f, d, out)| (f, quantize(out, in_dim, d), out)).collect();
            let weights: Vec<Weights> = data.iter().map(|(format, blocks, out_dim)| Weights { format: *format, blocks, out_dim: *out_dim }).collect();
            let xs: Vec<f32> = Tensor::randn(0f32, 1.0, (rows, in_dim), &Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let alone: Vec<Vec<f32>> = weights
                .iter()
                .map(|w| {
                    let mut y = vec![0f32; rows * w.out_dim];
                    matmul(w.format, w.blocks, w.out_dim, in_dim, &xs, rows, &mut y);
                    y
                })
                .collect();
            let mut together: Vec<Vec<f32>> = weights.iter().map(|w| vec![f32::NAN; rows * w.out_dim]).collect();
            let mut ys: Vec<&mut [f32]> = together.iter_mut().map(|y| &mut y[..]).collect();
            matmul_many(&weights, in_dim, &xs, rows, &mut ys);
            for (p, (a, t)) in alone.iter().zip(&together).enumerate() {
                assert!(a.iter().zip(t).all(|(a, t)| a.to_bits() == t.to_bits()), "part {p}, in {in_dim}, rows {rows}");
            }
            // Gate (Q4_1) and up (Q8_0) of 576 rows, combined.
            let (gate, up) = (weights[0], Weights { format: Format::Q8_0, blocks: &quantize(576, in_dim, GgmlDType::Q8_0), out_dim: 576 });
            let mut u = vec![0f32; rows * 576];
            matmul(up.format, up.blocks, 576, in_dim, &xs, rows, &mut u);
            // The whole of both products combined at once, against the
            // kernel's combine of each unit's chunk.
            let mut want = u.clone();
            crate::math::silu_times_in_place(&alone[0], &mut want);
            let mut got = vec![f32::NAN; rows * 576];
            matmul_gated(gate, up, in_dim, &xs, rows, crate::math::silu_times_in_place, &mut got);
            assert!(want.iter().zip(&got).all(|(w, g)| w.to_bits() == g.to_bits()), "gated, in {in_dim}, rows {rows}");
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
