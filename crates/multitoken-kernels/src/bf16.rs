//! bf16 linear layers on the CPU: the weight kept in bf16 (half the bytes of
//! f32), the activations f32 and rounded to bf16 (nearest even) for the
//! product, every sum in f32. llama.cpp's BF16 matrices and PyTorch's CPU
//! autocast compute the same way; everything around the product (norms,
//! attention, activations) stays in f32, where candle's bf16 element-wise ops
//! on the CPU ran at less than half the speed of its f32 ones.
//!
//! The weight is stored once, in the layout AMX's `tdpbf16ps` reads (pairs of
//! consecutive inputs, "VNNI" order): for each block of 16 output columns and
//! each chunk of 32 inputs, a 1 KiB tile whose row `i` holds, for each column
//! `j`, the weights of inputs `2i` and `2i + 1`. AVX-512 BF16's `vdpbf16ps`
//! reads the same rows one at a time, so the decode and the prefill share it.
//!
//! Four ways to run a product, picked per CPU (once per process):
//! - [`Bf16Matrix::matmul`] of 16 rows and more on a CPU with AMX: 32×32
//!   output blocks from four tile accumulators (a prefill);
//! - the same on a CPU with AVX-512 BF16 but no AMX (AMD Zen 4 / 5): register
//!   tiles of 8 rows × 48 columns, 24 `vdpbf16ps` accumulators, each weight
//!   tile row loaded once for the 8 rows (`Bf16Matrix::gemm`). On the 2-core
//!   Zen 5 dev VM (2026-12-07) 750-840 GFLOP/s on SmolLM2's 512-row
//!   products, of a 920 peak (`vdpbf16ps` issues two a cycle there, measured,
//!   as `vfmadd` does, so bf16 is at most twice f32's 32 MACs a cycle), where
//!   the row chains below ran 380-500 and the f32 GEMM 320-440;
//! - everything else: one 16-column `vdpbf16ps` chain per output block and
//!   row, inputs in a fixed order, so a row's outputs do not depend on the
//!   rows beside it ([`Bf16Matrix::matmul_rows`], the batched decode step's
//!   contract); portable code with the same arithmetic where the CPU lacks
//!   AVX-512 BF16.
//!
//! `MULTITOKEN_NO_AMX=1` keeps AMX unused (to compare the paths).

use std::mem::MaybeUninit;
use std::sync::OnceLock;

use candle_core::{Result, Tensor};

use crate::{assume_init, cpu_data, fast_path, output_buffer, Shared};

/// Output columns per packed block (one AMX accumulator's width in f32).
const BLOCK_COLS: usize = 16;
/// Inputs per packed chunk (one AMX tile row of bf16).
const CHUNK_K: usize = 32;
/// bf16 values per packed tile: 16 rows of 32.
const TILE: usize = BLOCK_COLS * CHUNK_K;
/// Rows of an AMX output block (two 16-row accumulators).
const STRIP_ROWS: usize = 32;
/// 32-row strips one AMX work unit computes for its column pair.
const STRIPS_PER_UNIT: usize = 4;
/// Weights from which packing and the row-by-row product spread over the pool.
const PARALLEL_FROM: usize = 1 << 16;
/// From this many rows on, [`Bf16Matrix::matmul`] uses AMX where it can.
pub const AMX_FROM_ROWS: usize = 16;

/// `x` rounded to bf16, nearest even (a NaN stays a quiet NaN), as its bits:
/// what `half::bf16::from_f32` gives, written so that it vectorises.
#[inline(always)]
pub fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    if b & 0x7fff_ffff > 0x7f80_0000 {
        return ((b >> 16) as u16) | 0x0040;
    }
    (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// `lo` and `hi` rounded to bf16 in one `u32`, `lo` in the low half: the
/// pair `vdpbf16ps` multiplies with the other operand's pair.
#[inline(always)]
pub(crate) fn bf16_pair(lo: f32, hi: f32) -> u32 {
    u32::from(bf16_bits(lo)) | u32::from(bf16_bits(hi)) << 16
}

/// The f32 value of bf16 bits (exact).
#[inline(always)]
fn bf16_value(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

/// A `[n, k]` linear weight (PyTorch's `nn.Linear.weight` layout) in bf16,
/// packed in tiles (see the module docs). Columns and inputs beyond `n` and `k`
/// are zero.
#[derive(Clone)]
pub struct Bf16Matrix {
    n: usize,
    k: usize,
    /// 16-column blocks, an even number (AMX takes them in pairs).
    blocks: usize,
    /// 32-input chunks.
    chunks: usize,
    data: Vec<u16>,
}

impl std::fmt::Debug for Bf16Matrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bf16Matrix").field("n", &self.n).field("k", &self.k).finish()
    }
}

impl Bf16Matrix {
    /// Packs a row-major `[n, k]` f32 weight, each value rounded to bf16.
    ///
    /// # Panics
    /// When `w.len() != n * k` (a caller's bug, not input).
    pub fn from_f32(w: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(w.len(), n * k, "Bf16Matrix::from_f32: {} values for [{n}, {k}]", w.len());
        Self::from_rows(n, k, |col, dst| dst.copy_from_slice(&w[col * k..(col + 1) * k]))
    }

    /// Packs the `[n, k]` matrix of a Q4_1 / Q8_0 weight (`n` rows of `k / 32`
    /// blocks), each dequantized value (exactly candle's) rounded to bf16: the
    /// weights of a `--dtype bf16` prefill through a quantized model.
    /// `None` when `blocks` is not that many bytes or `k` not whole blocks.
    pub fn from_blocks(format: crate::quantized::Format, blocks: &[u8], n: usize, k: usize) -> Option<Self> {
        let block = crate::quantized::BLOCK;
        let per_row = k / block * format.block_bytes();
        if !k.is_multiple_of(block) || blocks.len() != n * per_row {
            return None;
        }
        Some(Self::from_rows(n, k, |col, dst| {
            crate::quantized::dequantize_row(format, &blocks[col * per_row..(col + 1) * per_row], dst)
        }))
    }

    /// Packs the matrix whose row `col` `row(col, dst)` writes into `dst` (`k`
    /// f32), 16-column blocks spread over the pool.
    fn from_rows(n: usize, k: usize, row: impl Fn(usize, &mut [f32]) + Sync) -> Self {
        let blocks = n.div_ceil(2 * BLOCK_COLS) * 2;
        let chunks = k.div_ceil(CHUNK_K).max(1);
        let mut data = vec![0u16; blocks * chunks * TILE];
        let block_len = chunks * TILE;
        let data_ptr = Shared(data.as_mut_ptr());
        let used = n.div_ceil(BLOCK_COLS);
        let pack = |block: usize, values: &mut Vec<f32>| {
            // SAFETY: each block's tiles are written by this call alone.
            let tiles = unsafe { std::slice::from_raw_parts_mut(data_ptr.at(block * block_len), block_len) };
            values.resize(k, 0.0);
            for j in 0..BLOCK_COLS.min(n - block * BLOCK_COLS) {
                row(block * BLOCK_COLS + j, values);
                for (input, &v) in values.iter().enumerate() {
                    let (chunk, within) = (input / CHUNK_K, input % CHUNK_K);
                    tiles[chunk * TILE + (within / 2) * 2 * BLOCK_COLS + j * 2 + within % 2] = bf16_bits(v);
                }
            }
        };
        if n * k >= PARALLEL_FROM {
            crate::pool::for_each_range(used, |range| {
                let mut values = Vec::new();
                range.for_each(|b| pack(b, &mut values));
            });
        } else {
            let mut values = Vec::new();
            (0..used).for_each(|b| pack(b, &mut values));
        }
        Self { n, k, blocks, chunks, data }
    }

    /// Packs a contiguous 2-D f32 tensor `[n, k]` on the CPU.
    pub fn from_tensor(w: &Tensor) -> Result<Self> {
        let (n, k) = w.dims2()?;
        let w = w.to_dtype(candle_core::DType::F32)?.contiguous()?;
        let values = w.flatten_all()?.to_vec1::<f32>()?;
        Ok(Self::from_f32(&values, n, k))
    }

    /// Output width (`n`).
    pub fn out_dim(&self) -> usize {
        self.n
    }

    /// Input width (`k`).
    pub fn in_dim(&self) -> usize {
        self.k
    }

    /// Bytes of packed weights held.
    pub fn bytes(&self) -> usize {
        self.data.len() * 2
    }

    /// The weight as a row-major `[n, k]` f32 matrix (exact: every bf16 is an f32).
    pub fn to_f32(&self) -> Vec<f32> {
        let mut w = vec![0f32; self.n * self.k];
        for (col, row) in w.chunks_mut(self.k.max(1)).enumerate().take(self.n) {
            for (input, v) in row.iter_mut().enumerate() {
                *v = bf16_value(self.data[self.index(col, input)]);
            }
        }
        w
    }

    /// The weight as an f32 `[n, k]` tensor on `device`.
    pub fn to_tensor(&self, device: &candle_core::Device) -> Result<Tensor> {
        Tensor::from_vec(self.to_f32(), (self.n, self.k), device)
    }

    /// Where weight `(col, input)` lives in `data`.
    fn index(&self, col: usize, input: usize) -> usize {
        let (block, j) = (col / BLOCK_COLS, col % BLOCK_COLS);
        let (chunk, within) = (input / CHUNK_K, input % CHUNK_K);
        (block * self.chunks + chunk) * TILE + (within / 2) * 2 * BLOCK_COLS + j * 2 + within % 2
    }

    /// The packed tiles of one 16-column block, all chunks.
    fn block(&self, block: usize) -> &[u16] {
        &self.data[block * self.chunks * TILE..(block + 1) * self.chunks * TILE]
    }

    /// `x W^T` for row-major `x` `[rows, k]` into `out` `[rows, n]`: AMX from
    /// [`AMX_FROM_ROWS`] rows where the CPU has it, else [`Self::matmul_rows`].
    pub fn matmul(&self, x: &[f32], rows: usize, out: &mut [MaybeUninit<f32>]) {
        self.check(x, rows, out);
        #[cfg(target_arch = "x86_64")]
        if rows >= AMX_FROM_ROWS && kernel() == Kernel::Amx {
            // SAFETY: `kernel()` found AMX and the OS granted its tile state.
            unsafe { amx::matmul(self, x, rows, out) };
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if rows >= AMX_FROM_ROWS && kernel() == Kernel::Avx512 {
            self.gemm(x, rows, out);
            return;
        }
        self.matmul_rows(x, rows, out);
    }

    /// [`Self::matmul`] of many rows on a CPU with AVX-512 BF16 but no AMX
    /// (AMD Zen 4 / 5): register tiles of [`GEMM_ROWS`] rows × two 16-column
    /// blocks, each tile row of weights loaded once for all the rows (the
    /// row-by-row chains of [`Self::matmul_rows`] load it once per four rows
    /// and re-read the whole weight for every four rows). Every output is one
    /// `vdpbf16ps` chain over its inputs in order.
    #[cfg(target_arch = "x86_64")]
    fn gemm(&self, x: &[f32], rows: usize, out: &mut [MaybeUninit<f32>]) {
        let per_row = self.chunks * CHUNK_K / 2;
        let pairs = round_pairs_threaded(x, rows, self.k, self.chunks * CHUNK_K);
        let used_blocks = self.n.div_ceil(BLOCK_COLS);
        let out_ptr = Shared(out.as_mut_ptr().cast::<f32>());
        // A unit is [`GEMM_BLOCKS`] column blocks (their weights, 3 × k × 4
        // bytes, stay in L1 / L2 while the rows pass them) and a share of the
        // rows: the shares make at least eight units a thread, so that a thread
        // that starts late is not left a whole unit behind (q_proj's 36 blocks
        // are 12 units of ~40 µs).
        let block_units = used_blocks.div_ceil(GEMM_BLOCKS);
        let n_groups = rows.div_ceil(GEMM_ROWS);
        let shares = (8 * crate::pool::threads()).div_ceil(block_units).clamp(1, n_groups);
        let per_share = n_groups.div_ceil(shares);
        crate::pool::for_each_item(block_units * shares, |unit| {
            let (b0, share) = (GEMM_BLOCKS * (unit / shares), unit % shares);
            let n_blocks = (used_blocks - b0).min(GEMM_BLOCKS);
            for g in share * per_share..((share + 1) * per_share).min(n_groups) {
                let r0 = g * GEMM_ROWS;
                let n_rows = (rows - r0).min(GEMM_ROWS);
                // SAFETY: `kernel()` found AVX-512 BF16; blocks `b0..b0 + n_blocks`
                // exist, `pairs` holds `per_row` pairs of every row, and this
                // unit alone writes these rows of these blocks.
                unsafe { avx512::gemm_tile(self, b0, n_blocks, &pairs, per_row, r0, n_rows, out_ptr) };
            }
        });
    }

    /// `x W^T` where every output is one chain of products summed in a fixed
    /// order, whatever `rows` is: a row's outputs are bit for bit those of
    /// that row alone.
    pub fn matmul_rows(&self, x: &[f32], rows: usize, out: &mut [MaybeUninit<f32>]) {
        self.check(x, rows, out);
        if rows == 0 || self.n == 0 {
            return;
        }
        let pairs = round_pairs(x, rows, self.k, self.chunks * CHUNK_K);
        let out_ptr = Shared(out.as_mut_ptr().cast::<f32>());
        let kernel = kernel();
        let used_blocks = self.n.div_ceil(BLOCK_COLS);
        // One contiguous run of blocks per thread (as the f32 gemv): a decode
        // step's ~200 calls of tens of microseconds each pay for every hand-off.
        let units = if self.n * self.k < PARALLEL_FROM { 1 } else { crate::pool::threads().min(used_blocks) };
        let per_unit = used_blocks.div_ceil(units);
        crate::pool::for_each_item(units, |unit| {
            for block in unit * per_unit..((unit + 1) * per_unit).min(used_blocks) {
                self.rows_block(kernel, block, &pairs, rows, out_ptr);
            }
        });
    }

    /// One 16-column block of [`Self::matmul_rows`] for every row, four rows at a time.
    fn rows_block(&self, kernel: Kernel, block: usize, pairs: &[u32], rows: usize, out: Shared<f32>) {
        let tiles = self.block(block);
        let per_row = self.chunks * CHUNK_K / 2;
        let col0 = block * BLOCK_COLS;
        let cols = BLOCK_COLS.min(self.n - col0);
        let mut row = 0;
        while row < rows {
            let group = (rows - row).min(4);
            let mut acc = [[0f32; BLOCK_COLS]; 4];
            let xs: [&[u32]; 4] = std::array::from_fn(|g| {
                let r = row + g.min(group - 1);
                &pairs[r * per_row..(r + 1) * per_row]
            });
            match kernel {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `kernel()` found AVX-512 BF16 (AMX implies it).
                Kernel::Avx512 | Kernel::Amx => unsafe { avx512::dot_block(tiles, &xs, group, &mut acc) },
                _ => portable_dot_block(tiles, &xs, group, &mut acc),
            }
            for (g, values) in acc.iter().enumerate().take(group) {
                let at = (row + g) * self.n + col0;
                for (c, &v) in values.iter().enumerate().take(cols) {
                    // SAFETY: each (row, column) is written by exactly one block's unit.
                    unsafe { *out.at(at + c) = v };
                }
            }
            row += group;
        }
    }

    fn check(&self, x: &[f32], rows: usize, out: &[MaybeUninit<f32>]) {
        assert!(x.len() >= rows * self.k && out.len() >= rows * self.n, "Bf16Matrix: buffers too short");
    }
}

/// Input rows per register tile of [`Bf16Matrix::gemm`]: 8 rows × 3 column
/// blocks is 24 accumulators, with the three weight rows and a broadcast in
/// the 32 vector registers, and the 8 row pointers and 3 block pointers in the
/// general ones (12 rows × 2 blocks spilled its 12 row pointers to the stack).
const GEMM_ROWS: usize = 8;

/// Column blocks per register tile of [`Bf16Matrix::gemm`].
const GEMM_BLOCKS: usize = 3;

/// [`round_pairs`] spread over the pool (a prefill's many rows).
fn round_pairs_threaded(x: &[f32], rows: usize, k: usize, k_pad: usize) -> Vec<u32> {
    if rows * k < PARALLEL_FROM {
        return round_pairs(x, rows, k, k_pad);
    }
    let per_row = k_pad / 2;
    let mut pairs = vec![0u32; rows * per_row];
    let ptr = Shared(pairs.as_mut_ptr());
    crate::pool::for_each_range(rows, |range| {
        // SAFETY: each range of rows owns its rows of `pairs`.
        let dst = unsafe { std::slice::from_raw_parts_mut(ptr.at(range.start * per_row), range.len() * per_row) };
        round_pairs_into(&x[range.start * k..range.end * k], k, per_row, dst);
    });
    pairs
}

/// The rows of `x` (`[rows, k]`) rounded to bf16 and zero-padded to `k_pad`,
/// as pairs of consecutive inputs in one `u32` (low half first), the form
/// `vdpbf16ps` broadcasts.
fn round_pairs(x: &[f32], rows: usize, k: usize, k_pad: usize) -> Vec<u32> {
    let mut pairs = vec![0u32; rows * k_pad / 2];
    round_pairs_into(&x[..rows * k], k, k_pad / 2, &mut pairs);
    pairs
}

/// [`round_pairs`] of the rows of `x` into `dst` (`per_row` pairs a row, the
/// padding already zero).
pub(crate) fn round_pairs_into(x: &[f32], k: usize, per_row: usize, dst: &mut [u32]) {
    for (src, dst) in x.chunks_exact(k.max(1)).zip(dst.chunks_exact_mut(per_row)) {
        for (d, two) in dst.iter_mut().zip(src.chunks_exact(2)) {
            *d = bf16_pair(two[0], two[1]);
        }
        if k % 2 == 1 {
            dst[k / 2] = u32::from(bf16_bits(src[k - 1]));
        }
    }
}

/// [`avx512::dot_block`]'s products in portable code: for each pair, the odd
/// input's product is added first, then the even one's (`vdpbf16ps`' order),
/// all tile rows in one chain (the AVX-512 body splits them into an even and
/// an odd chain, so the two need not agree to the last bit).
fn portable_dot_block(tiles: &[u16], xs: &[&[u32]; 4], group: usize, acc: &mut [[f32; BLOCK_COLS]; 4]) {
    for (q, w) in tiles.chunks_exact(2 * BLOCK_COLS).enumerate() {
        for g in 0..group {
            let pair = xs[g][q];
            let (x0, x1) = (bf16_value(pair as u16), bf16_value((pair >> 16) as u16));
            for j in 0..BLOCK_COLS {
                acc[g][j] += bf16_value(w[2 * j + 1]) * x1;
                acc[g][j] += bf16_value(w[2 * j]) * x0;
            }
        }
    }
}

/// Which code runs the products on this CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// Portable code (no AVX-512 BF16).
    Portable,
    /// AVX-512 BF16 `vdpbf16ps` chains.
    Avx512,
    /// AMX tiles for many rows, AVX-512 BF16 for a few.
    Amx,
}

/// The kernel this process uses, found once.
pub fn kernel() -> Kernel {
    static KERNEL: OnceLock<Kernel> = OnceLock::new();
    *KERNEL.get_or_init(detect)
}

#[cfg(target_arch = "x86_64")]
fn detect() -> Kernel {
    if !(std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bf16")) {
        return Kernel::Portable;
    }
    let no_amx = std::env::var("MULTITOKEN_NO_AMX").is_ok_and(|v| !v.is_empty() && v != "0");
    if !no_amx && amx::enable() {
        Kernel::Amx
    } else {
        Kernel::Avx512
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> Kernel {
    Kernel::Portable
}

/// `x W^T` for `x` `[rows, k]` f32 and a packed bf16 weight: `[rows, n]` f32,
/// AMX for many rows ([`Bf16Matrix::matmul`]). `None` when the fast path does
/// not apply (a tracked input, another dtype or device).
pub fn linear(x: &Tensor, w: &Bf16Matrix) -> Result<Option<Tensor>> {
    linear_impl(x, w, false)
}

/// [`linear`] where each row's outputs are those of the row alone
/// ([`Bf16Matrix::matmul_rows`]): the batched decode step's product.
pub fn linear_each_row(x: &Tensor, w: &Bf16Matrix) -> Result<Option<Tensor>> {
    linear_impl(x, w, true)
}

fn linear_impl(x: &Tensor, w: &Bf16Matrix, each_row: bool) -> Result<Option<Tensor>> {
    let (rows, k) = x.dims2()?;
    if k != w.k {
        candle_core::bail!("bf16 linear: x {:?} does not fit a [{}, {}] weight", x.dims(), w.n, w.k);
    }
    if !fast_path(&[x]) {
        return Ok(None);
    }
    let x = x.contiguous()?;
    let mut out = output_buffer(rows * w.n);
    {
        let (xs, xl) = x.storage_and_layout();
        let data = cpu_data(&xs, xl)?;
        if each_row {
            w.matmul_rows(data, rows, &mut out);
        } else {
            w.matmul(data, rows, &mut out);
        }
    }
    // SAFETY: both products write every element of their output.
    let out = unsafe { assume_init(out) };
    Ok(Some(Tensor::from_vec(out, (rows, w.n), x.device())?))
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    use std::arch::x86_64::*;

    use super::BLOCK_COLS;

    /// 32 bf16 lanes from 512 bits (a reinterpretation: the types differ only in name).
    #[inline(always)]
    pub(crate) fn as_bh(v: __m512i) -> __m512bh {
        // SAFETY: both are 64-byte plain vectors; every bit pattern is valid.
        unsafe { std::mem::transmute::<__m512i, __m512bh>(v) }
    }

    /// `acc[g] = Σ_q W-row(q) · x_g(pair q)` for `group` rows: each packed
    /// tile row (16 columns × one pair of inputs) is loaded once and fed to
    /// every row's `vdpbf16ps` chain.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F and BF16; `xs[g]` must hold a pair for
    /// every tile row of `tiles`.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn dot_block(tiles: &[u16], xs: &[&[u32]; 4], group: usize, acc: &mut [[f32; BLOCK_COLS]; 4]) {
        match group {
            4 => unsafe { chain::<4>(tiles, xs, acc) },
            3 => unsafe { chain::<3>(tiles, xs, acc) },
            2 => unsafe { chain::<2>(tiles, xs, acc) },
            _ => unsafe { chain::<1>(tiles, xs, acc) },
        }
    }

    /// bf16 values between a loaded tile row and the one prefetched.
    const PREFETCH_AHEAD: usize = 1024;

    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn chain<const G: usize>(tiles: &[u16], xs: &[&[u32]; 4], acc: &mut [[f32; BLOCK_COLS]; 4]) {
        // Two chains per row (even and odd tile rows), so that one row's
        // products are not one long dependency chain; the split is the same
        // for every `G`, so a row's sums do not depend on the rows beside it.
        let mut even = [_mm512_setzero_ps(); G];
        let mut odd = [_mm512_setzero_ps(); G];
        let pairs = tiles.chunks_exact(4 * BLOCK_COLS);
        let last = pairs.remainder();
        for (p, two) in pairs.enumerate() {
            // Ask for the lines a few hundred bytes ahead: the prefetcher
            // starts each new stream slowly, and a decode step's ~200 products
            // are short streams.
            _mm_prefetch::<_MM_HINT_T0>(two.as_ptr().wrapping_add(PREFETCH_AHEAD).cast());
            _mm_prefetch::<_MM_HINT_T0>(two.as_ptr().wrapping_add(PREFETCH_AHEAD + 32).cast());
            // SAFETY: `two` is 64 bf16: two tile rows of 64 bytes.
            let (w0, w1): (__m512bh, __m512bh) = unsafe {
                (
                    as_bh(_mm512_loadu_si512(two.as_ptr().cast())),
                    as_bh(_mm512_loadu_si512(two.as_ptr().add(2 * BLOCK_COLS).cast())),
                )
            };
            for g in 0..G {
                let x0 = as_bh(_mm512_set1_epi32(xs[g][2 * p] as i32));
                let x1 = as_bh(_mm512_set1_epi32(xs[g][2 * p + 1] as i32));
                even[g] = _mm512_dpbf16_ps(even[g], w0, x0);
                odd[g] = _mm512_dpbf16_ps(odd[g], w1, x1);
            }
        }
        if !last.is_empty() {
            let q = tiles.len() / (2 * BLOCK_COLS) - 1;
            // SAFETY: `last` is one tile row of 64 bytes.
            let w0: __m512bh = unsafe { as_bh(_mm512_loadu_si512(last.as_ptr().cast())) };
            for g in 0..G {
                let x0 = as_bh(_mm512_set1_epi32(xs[g][q] as i32));
                even[g] = _mm512_dpbf16_ps(even[g], w0, x0);
            }
        }
        for g in 0..G {
            // SAFETY: acc[g] holds 16 f32.
            unsafe { _mm512_storeu_ps(acc[g].as_mut_ptr(), _mm512_add_ps(even[g], odd[g])) };
        }
    }

    /// Rows `r0..r0 + n_rows` (at most [`super::GEMM_ROWS`]) of `pairs`
    /// against column blocks `b0..b0 + n_blocks` (at most
    /// [`super::GEMM_BLOCKS`]), written to `out` (`[rows, n]`).
    ///
    /// # Safety
    /// AVX-512 F and BF16; the blocks exist in `w`, `pairs` holds `per_row`
    /// pairs of every row, and no other thread writes these outputs.
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn gemm_tile(
        w: &super::Bf16Matrix,
        b0: usize,
        n_blocks: usize,
        pairs: &[u32],
        per_row: usize,
        r0: usize,
        n_rows: usize,
        out: super::Shared<f32>,
    ) {
        // Missing rows of a last, short tile repeat its first row (computed,
        // never stored).
        let xs: [*const u32; super::GEMM_ROWS] = std::array::from_fn(|r| pairs[(r0 + if r < n_rows { r } else { 0 }) * per_row..].as_ptr());
        // SAFETY: forwarded from this function's contract.
        unsafe {
            match n_blocks {
                3 => tile::<3>(w, b0, xs, per_row, n_rows, r0, out),
                2 => tile::<2>(w, b0, xs, per_row, n_rows, r0, out),
                _ => tile::<1>(w, b0, xs, per_row, n_rows, r0, out),
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn tile<const NB: usize>(
        w: &super::Bf16Matrix,
        b0: usize,
        xs: [*const u32; super::GEMM_ROWS],
        per_row: usize,
        n_rows: usize,
        r0: usize,
        out: super::Shared<f32>,
    ) {
        let mut acc = [[_mm512_setzero_ps(); NB]; super::GEMM_ROWS];
        let ws: [*const u16; NB] = std::array::from_fn(|j| w.block(b0 + j).as_ptr());
        for q in 0..per_row {
            // SAFETY: a block holds `per_row` tile rows of 32 bf16; each row of
            // `xs` `per_row` pairs.
            unsafe {
                let wv: [__m512bh; NB] = std::array::from_fn(|j| as_bh(_mm512_loadu_si512(ws[j].add(q * 2 * BLOCK_COLS).cast())));
                for (acc, x) in acc.iter_mut().zip(&xs) {
                    let xv = as_bh(_mm512_set1_epi32(*x.add(q) as i32));
                    for j in 0..NB {
                        acc[j] = _mm512_dpbf16_ps(acc[j], wv[j], xv);
                    }
                }
            }
        }
        for (r, acc) in acc.iter().enumerate().take(n_rows) {
            for (j, &v) in acc.iter().enumerate() {
                let col0 = (b0 + j) * BLOCK_COLS;
                if col0 >= w.n {
                    continue;
                }
                let cols = BLOCK_COLS.min(w.n - col0);
                let mask: __mmask16 = if cols == BLOCK_COLS { !0 } else { (1u16 << cols) - 1 };
                // SAFETY: row `r0 + r`, columns `col0..col0 + cols` lie in `out` and are this unit's.
                unsafe { _mm512_mask_storeu_ps(out.at((r0 + r) * w.n + col0), mask, v) };
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod amx {
    use std::arch::asm;
    use std::mem::MaybeUninit;

    use super::{bf16_bits, Bf16Matrix, Shared, BLOCK_COLS, CHUNK_K, STRIPS_PER_UNIT, STRIP_ROWS, TILE};

    /// Whether the CPU has AMX-BF16 and the kernel lets this process use the
    /// tile registers (Linux hands out their 8 KiB of state only on request).
    pub(super) fn enable() -> bool {
        // CPUID leaf 7: EDX bit 22 AMX-BF16, bit 24 AMX-TILE.
        let leaf = std::arch::x86_64::__cpuid_count(7, 0);
        if leaf.edx & (1 << 22) == 0 || leaf.edx & (1 << 24) == 0 {
            return false;
        }
        request_tile_state()
    }

    #[cfg(target_os = "linux")]
    fn request_tile_state() -> bool {
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: arch_prctl with this request only changes the process's
        // permitted extended state; it reads no memory of ours.
        unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
    }

    #[cfg(not(target_os = "linux"))]
    fn request_tile_state() -> bool {
        false
    }

    /// Palette 1, all eight tiles 16 rows of 64 bytes: tmm0-3 accumulate a
    /// 32×32 f32 block, tmm4-5 hold two 16-row strips of inputs, tmm6-7 two
    /// 16-column blocks of weights.
    #[repr(C, align(64))]
    struct TileConfig([u8; 64]);

    const CONFIG: TileConfig = {
        let mut c = [0u8; 64];
        c[0] = 1;
        let mut t = 0;
        while t < 8 {
            c[16 + 2 * t] = 64;
            c[48 + t] = 16;
            t += 1;
        }
        TileConfig(c)
    };

    /// `x W^T` by AMX: the inputs rounded to bf16 once (`[rows rounded up to
    /// 32, k rounded up to 32]`, zero-padded), then units of (a pair of column
    /// blocks, up to four 32-row strips) spread over the pool.
    ///
    /// # Safety
    /// AMX must be enabled for this process ([`enable`]).
    pub(super) unsafe fn matmul(w: &Bf16Matrix, x: &[f32], rows: usize, out: &mut [MaybeUninit<f32>]) {
        let k_pad = w.chunks * CHUNK_K;
        let rows_pad = rows.div_ceil(STRIP_ROWS) * STRIP_ROWS;
        let mut a = vec![0u16; rows_pad * k_pad];
        let a_ptr = Shared(a.as_mut_ptr());
        crate::pool::for_each_range(rows, |range| {
            for r in range {
                // SAFETY: each row of `a` is written by one range.
                let dst = unsafe { std::slice::from_raw_parts_mut(a_ptr.at(r * k_pad), w.k) };
                for (d, &v) in dst.iter_mut().zip(&x[r * w.k..(r + 1) * w.k]) {
                    *d = bf16_bits(v);
                }
            }
        });
        let strips = rows_pad / STRIP_ROWS;
        let row_units = strips.div_ceil(STRIPS_PER_UNIT);
        let pairs = w.blocks / 2;
        let out_ptr = Shared(out.as_mut_ptr().cast::<f32>());
        let a = &a;
        crate::pool::for_each_item(pairs * row_units, |unit| {
            let (pair, row_unit) = (unit / row_units, unit % row_units);
            let first = row_unit * STRIPS_PER_UNIT;
            let last = (first + STRIPS_PER_UNIT).min(strips);
            // SAFETY: AMX is enabled; the unit's strips and columns are its own.
            unsafe { unit_product(w, a, k_pad, rows, pair, first..last, out_ptr) };
        });
    }


    /// One unit: columns `32 pair .. 32 pair + 32`, rows of `strips`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn unit_product(
        w: &Bf16Matrix,
        a: &[u16],
        k_pad: usize,
        rows: usize,
        pair: usize,
        strips: std::ops::Range<usize>,
        out: Shared<f32>,
    ) {
        let n = w.n;
        let col0 = pair * 2 * BLOCK_COLS;
        let b0 = w.block(2 * pair).as_ptr();
        let b1 = w.block(2 * pair + 1).as_ptr();
        let a_stride = k_pad * 2;
        let mut scratch = [0f32; STRIP_ROWS * 2 * BLOCK_COLS];
        // SAFETY (whole block): the config describes 16×64-byte tiles; every
        // load reads 16 rows of 64 bytes inside `a` (rows_pad × k_pad) or one
        // 1 KiB tile of `w`; every store writes 16 rows of 64 bytes inside
        // `scratch` or inside this unit's part of `out`.
        unsafe {
            asm!("ldtilecfg [{0}]", in(reg) CONFIG.0.as_ptr(), options(nostack, readonly));
            for strip in strips {
                let r0 = strip * STRIP_ROWS;
                let a0 = a.as_ptr().add(r0 * k_pad);
                let a1 = a0.add(16 * k_pad);
                asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
                for chunk in 0..w.chunks {
                    asm!(
                        "tileloadd tmm4, [{a0} + {sa}*1]",
                        "tileloadd tmm5, [{a1} + {sa}*1]",
                        "tileloadd tmm6, [{b0} + {sb}*1]",
                        "tileloadd tmm7, [{b1} + {sb}*1]",
                        "tdpbf16ps tmm0, tmm4, tmm6",
                        "tdpbf16ps tmm1, tmm4, tmm7",
                        "tdpbf16ps tmm2, tmm5, tmm6",
                        "tdpbf16ps tmm3, tmm5, tmm7",
                        a0 = in(reg) a0.add(chunk * CHUNK_K),
                        a1 = in(reg) a1.add(chunk * CHUNK_K),
                        b0 = in(reg) b0.add(chunk * TILE),
                        b1 = in(reg) b1.add(chunk * TILE),
                        sa = in(reg) a_stride,
                        sb = in(reg) 2 * 2 * BLOCK_COLS,
                        options(nostack, readonly),
                    );
                }
                let width = 2 * BLOCK_COLS;
                if r0 + STRIP_ROWS <= rows && col0 + width <= n {
                    // A whole block: straight into the output.
                    store_block(out.at(r0 * n + col0), n);
                } else {
                    store_block(scratch.as_mut_ptr(), width);
                    let cols = width.min(n.saturating_sub(col0));
                    for r in 0..STRIP_ROWS.min(rows.saturating_sub(r0)) {
                        for j in 0..cols {
                            *out.at((r0 + r) * n + col0 + j) = scratch[r * width + j];
                        }
                    }
                }
            }
            asm!("tilerelease", options(nostack, nomem));
        }
    }

    /// Stores the 32×32 f32 block in tmm0-3 at `c`, rows `row_stride` floats apart.
    ///
    /// # Safety
    /// AMX tiles configured as in [`CONFIG`]; 32 rows of 32 floats, `row_stride`
    /// apart from `c`, must be writable.
    #[inline(always)]
    unsafe fn store_block(c: *mut f32, row_stride: usize) {
        // SAFETY: the caller's contract.
        unsafe {
            asm!(
                "tilestored [{c00} + {so}*1], tmm0",
                "tilestored [{c01} + {so}*1], tmm1",
                "tilestored [{c10} + {so}*1], tmm2",
                "tilestored [{c11} + {so}*1], tmm3",
                c00 = in(reg) c,
                c01 = in(reg) c.add(BLOCK_COLS),
                c10 = in(reg) c.add(16 * row_stride),
                c11 = in(reg) c.add(16 * row_stride + BLOCK_COLS),
                so = in(reg) row_stride * 4,
                options(nostack),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random(len: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    /// The product of the bf16-rounded inputs and weights, summed in f64.
    fn reference(x: &[f32], rows: usize, w: &[f32], n: usize, k: usize) -> Vec<f32> {
        let r = |v: f32| f64::from(bf16_value(bf16_bits(v)));
        let mut out = vec![0f32; rows * n];
        for i in 0..rows {
            for j in 0..n {
                out[i * n + j] = (0..k).map(|t| r(x[i * k + t]) * r(w[j * k + t])).sum::<f64>() as f32;
            }
        }
        out
    }

    fn run(w: &Bf16Matrix, x: &[f32], rows: usize, each_row: bool) -> Vec<f32> {
        let mut out = output_buffer(rows * w.n);
        if each_row {
            w.matmul_rows(x, rows, &mut out);
        } else {
            w.matmul(x, rows, &mut out);
        }
        // SAFETY: both write every element.
        unsafe { assume_init(out) }
    }

    #[test]
    fn rounding_matches_half() {
        for v in [0.0f32, -0.0, 1.0, 1.00390625, 1.0078125, 3.1415927, -2.7182817, 1e-40, f32::MAX, f32::INFINITY, f32::NAN, 65504.0] {
            let ours = bf16_bits(v);
            let theirs = half::bf16::from_f32(v).to_bits();
            if v.is_nan() {
                assert!(bf16_value(ours).is_nan());
            } else {
                assert_eq!(ours, theirs, "{v}");
            }
        }
        let xs = random(10_000, 9);
        for v in xs.iter().map(|v| v * 1000.0) {
            assert_eq!(bf16_bits(v), half::bf16::from_f32(v).to_bits(), "{v}");
        }
    }

    #[test]
    fn packing_round_trips_and_pads_with_zeros() {
        let (n, k) = (37, 45);
        let w = random(n * k, 1);
        let m = Bf16Matrix::from_f32(&w, n, k);
        let back = m.to_f32();
        for (a, b) in w.iter().zip(&back) {
            assert_eq!(bf16_bits(*a), bf16_bits(*b));
            assert!((a - b).abs() <= a.abs() / 128.0);
        }
        // Padding columns and inputs are zero, so they add nothing.
        assert_eq!(m.data.len(), 4 * 2 * TILE);
        assert_eq!(m.data[m.index(n, 0)], 0);
        assert_eq!(m.data[m.index(0, k)], 0);
    }

    /// A quantized weight packs to its dequantized values rounded to bf16.
    #[test]
    fn blocks_pack_to_their_dequantized_values() {
        use crate::quantized::{dequantize, Format};
        let (n, k) = (40, 96);
        let mut rng = rand::rngs::StdRng::seed_from_u64(8);
        for format in [Format::Q4_1, Format::Q8_0] {
            let row_bytes = k / 32 * format.block_bytes();
            let mut blocks: Vec<u8> = (0..n * row_bytes).map(|_| rng.random::<u8>()).collect();
            // Finite scales: small f16 values in every block's header.
            for block in blocks.chunks_exact_mut(format.block_bytes()) {
                block[..2].copy_from_slice(&half::f16::from_f32(0.01).to_le_bytes());
                if format == Format::Q4_1 {
                    block[2..4].copy_from_slice(&half::f16::from_f32(-0.05).to_le_bytes());
                }
            }
            let m = Bf16Matrix::from_blocks(format, &blocks, n, k).expect("whole blocks");
            let want = dequantize(format, &blocks, n, k);
            let got = m.to_f32();
            for (a, b) in got.iter().zip(&want) {
                assert_eq!(bf16_bits(*a), bf16_bits(*b), "{format:?}");
            }
            assert!(Bf16Matrix::from_blocks(format, &blocks[1..], n, k).is_none());
            assert!(Bf16Matrix::from_blocks(format, &blocks, n, k - 1).is_none());
        }
    }

    /// Every path against the f64 sum of the same bf16 values, at shapes that
    /// are not whole blocks or strips, and at SmolLM2's.
    #[test]
    fn products_match_the_rounded_reference() {
        for &(rows, n, k) in &[(1, 576, 576), (3, 192, 576), (5, 37, 45), (16, 50, 70), (20, 33, 45), (33, 64, 96), (70, 576, 1536), (129, 200, 64)] {
            let x = random(rows * k, rows as u64);
            let w = random(n * k, n as u64);
            let m = Bf16Matrix::from_f32(&w, n, k);
            let want = reference(&x, rows, &w, n, k);
            let tol = 1e-5 * k as f32;
            for each_row in [false, true] {
                let got = run(&m, &x, rows, each_row);
                for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                    assert!((a - b).abs() <= tol, "{rows}x{n}x{k} each_row={each_row} [{i}]: {a} vs {b}");
                }
            }
            // The portable chain, whatever this CPU has.
            let pairs = round_pairs(&x, rows, k, m.chunks * CHUNK_K);
            let per_row = m.chunks * CHUNK_K / 2;
            for block in 0..n.div_ceil(BLOCK_COLS) {
                let mut acc = [[0f32; BLOCK_COLS]; 4];
                let xs: [&[u32]; 4] = std::array::from_fn(|g| &pairs[g.min(rows - 1) * per_row..(g.min(rows - 1) + 1) * per_row]);
                portable_dot_block(m.block(block), &xs, rows.min(4), &mut acc);
                for (g, values) in acc.iter().enumerate().take(rows.min(4)) {
                    for (j, v) in values.iter().enumerate().take(BLOCK_COLS.min(n - block * BLOCK_COLS)) {
                        let b = want[g * n + block * BLOCK_COLS + j];
                        assert!((v - b).abs() <= tol, "portable {rows}x{n}x{k}: {v} vs {b}");
                    }
                }
            }
        }
    }

    /// A row's outputs from `matmul_rows` do not depend on the rows around it.
    #[test]
    fn each_row_equals_the_row_alone() {
        let (rows, n, k) = (7, 100, 96);
        let x = random(rows * k, 3);
        let m = Bf16Matrix::from_f32(&random(n * k, 4), n, k);
        let all = run(&m, &x, rows, true);
        for r in 0..rows {
            let alone = run(&m, &x[r * k..(r + 1) * k], 1, true);
            assert_eq!(&all[r * n..(r + 1) * n], &alone[..], "row {r}");
        }
    }

    #[test]
    fn tensor_entry_points_skip_what_they_cannot_do() -> Result<()> {
        let dev = candle_core::Device::Cpu;
        let m = Bf16Matrix::from_f32(&random(8 * 64, 5), 8, 64);
        let x = Tensor::new(random(2 * 64, 6), &dev)?.reshape((2, 64))?;
        let y = linear(&x, &m)?.ok_or_else(|| candle_core::Error::Msg("no fast path".into()))?;
        let want = x.matmul(&m.to_tensor(&dev)?.t()?)?;
        let diff = (y - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 0.05, "{diff}");
        assert!(linear(&x.to_dtype(candle_core::DType::BF16)?, &m)?.is_none());
        assert!(linear(&Tensor::zeros((2, 63), candle_core::DType::F32, &dev)?, &m).is_err());
        Ok(())
    }
}
