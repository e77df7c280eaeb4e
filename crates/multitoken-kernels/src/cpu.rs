//! The kernels on plain f32 slices, split over candle's CPU thread pool.
//!
//! gemm's own threading splits a product only when it is large; the encoder
//! towers' products (400×768 by 768×768 for a CLIP batch, 50×64 by 64×50 per
//! attention head) are below that line, so gemm ran them on one core, or paid
//! a rayon wake-up for each head. Here each call is cut into units first
//! (column blocks of a linear layer, (batch, head, query block) triples of an
//! attention), and every unit runs a single-threaded gemm on [`crate::pool`],
//! which spins briefly between calls and never waits for a descheduled thread.

use std::cell::RefCell;
use std::mem::MaybeUninit;

use gemm::{gemm, Parallelism};

use crate::math;

#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
mod avx512_bf16;
mod causal;
mod gemv;

pub use causal::{causal_attention, causal_attention_bf16, causal_bf16_fast, causal_fast, CausalShape, Strided4};
pub use gemv::{gemv, gemv_many};

/// The activation a linear layer applies to its output while it is still in cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// None: `x W^T + b`.
    Identity,
    /// Exact GELU (`erf` form), as `nn.GELU()` and BERT's / Whisper's `gelu`.
    Gelu,
    /// CLIP's `quick_gelu`: `x · sigmoid(1.702 x)`.
    QuickGelu,
}

impl Activation {
    fn apply(self, xs: &mut [f32]) {
        match self {
            Activation::Identity => {}
            Activation::Gelu => math::gelu_in_place(xs),
            Activation::QuickGelu => math::quick_gelu_in_place(xs),
        }
    }
}

/// The output pointer every kernel here hands its units.
pub(crate) type SharedOut = crate::Shared<f32>;

/// Runs `f(unit)` for `0..units` on [`crate::pool`] (inline when there is one unit or one thread).
pub(crate) fn for_each_unit(units: usize, f: impl Fn(usize) + Sync) {
    crate::pool::for_each_item(units, f);
}

/// The sizes of a linear layer's product: `x` is `[m, k]`, the weight `[n, k]`.
#[derive(Debug, Clone, Copy)]
pub struct LinearShape {
    /// Input rows.
    pub m: usize,
    /// Input width.
    pub k: usize,
    /// Output width.
    pub n: usize,
}

/// How a linear layer's weight is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightLayout {
    /// `[n, k]`, PyTorch's `nn.Linear.weight`.
    Rows,
    /// `[k, n]`: gemm packs this one with vector loads rather than a strided
    /// gather, 5–14% faster per product (measured on 400×768 by 768×3072 and
    /// 400×3072 by 3072×768 products, AVX-512, 2 threads).
    Columns,
}

/// The operands of a linear layer's product besides `x` and the weight.
#[derive(Debug, Clone, Copy, Default)]
pub struct LinearExtras<'a> {
    /// `[n]`, added to every output row.
    pub bias: Option<&'a [f32]>,
    /// `[m, n]`, added to the output before the activation: a residual
    /// connection (`x + out_proj(attn)`) folded into the product, which saves
    /// the separate add's pass over three `[m, n]` arrays and its allocation.
    pub residual: Option<&'a [f32]>,
}

/// `out[m, n] = act(x[m, k] · W^T + bias[n] + residual[m, n])` with `w` holding
/// `W` `[n, k]` in `layout`; every slice row-major and dense. Every element of
/// `out` is written, so it may start uninitialised.
pub fn linear(
    x: &[f32],
    w: &[f32],
    layout: WeightLayout,
    extras: LinearExtras,
    shape: LinearShape,
    act: Activation,
    out: &mut [MaybeUninit<f32>],
) {
    let LinearShape { m, k, n } = shape;
    let LinearExtras { bias, residual } = extras;
    debug_assert!(x.len() >= m * k && w.len() >= n * k && out.len() >= m * n);
    debug_assert!(bias.is_none_or(|b| b.len() >= n));
    debug_assert!(residual.is_none_or(|r| r.len() >= m * n));
    if m == 0 || n == 0 {
        return;
    }
    // Column blocks: each unit packs its own part of `w` and all of `x` (the small operand).
    // A multiple of 32 keeps every block on whole AVX-512 micro-tiles; with more rows
    // than columns, rows are split too so each core gets several units.
    let threads = candle_core::utils::get_num_threads().max(1);
    let col_blocks = if m * n * k < 1 << 18 {
        1
    } else {
        threads.min(n.div_ceil(32)).max(1)
    };
    let block = n.div_ceil(col_blocks).next_multiple_of(32).min(n);
    let col_blocks = n.div_ceil(block);
    let row_blocks = if col_blocks < threads && m >= 2 * threads {
        threads
    } else {
        1
    };
    let row_block = m.div_ceil(row_blocks);
    let out_ptr = crate::Shared(out.as_mut_ptr().cast::<f32>());
    let prefill = bias.is_some() || residual.is_some();
    for_each_unit(col_blocks * row_blocks, |unit| {
        let (rb, cb) = (unit / col_blocks, unit % col_blocks);
        let (r0, r1) = (rb * row_block, ((rb + 1) * row_block).min(m));
        let (c0, c1) = (cb * block, ((cb + 1) * block).min(n));
        if r0 >= r1 || c0 >= c1 {
            return;
        }
        let width = c1 - c0;
        let dst = |r: usize| out_ptr.at(r * n + c0);
        // The bias and residual go in first and gemm adds the product to them
        // (read_dst), so the block is written once by the prefill and once by gemm.
        if prefill {
            for r in r0..r1 {
                // SAFETY: rows r0..r1 × columns c0..c1 of `out` belong to this unit
                // only; the prefill initialises every element of the row segment.
                unsafe {
                    match (residual, bias) {
                        (Some(res), Some(b)) => {
                            let res = &res[r * n + c0..r * n + c1];
                            for (j, (&a, &b)) in res.iter().zip(&b[c0..c1]).enumerate() {
                                dst(r).add(j).write(a + b);
                            }
                        }
                        (Some(res), None) => std::ptr::copy_nonoverlapping(
                            res.as_ptr().add(r * n + c0),
                            dst(r),
                            width,
                        ),
                        (None, Some(b)) => {
                            std::ptr::copy_nonoverlapping(b.as_ptr().add(c0), dst(r), width)
                        }
                        (None, None) => {}
                    }
                }
            }
        }
        let (rhs, rhs_cs, rhs_rs) = match layout {
            WeightLayout::Rows => (w.as_ptr().wrapping_add(c0 * k), k as isize, 1),
            WeightLayout::Columns => (w.as_ptr().wrapping_add(c0), 1, n as isize),
        };
        // SAFETY: the pointers and strides describe x[r0..r1, :], W[c0..c1, :]^T and
        // out[r0..r1, c0..c1], all inside their slices (checked above). Without a
        // prefill gemm writes the block without reading it.
        unsafe {
            gemm(
                r1 - r0,
                width,
                k,
                dst(r0),
                1,
                n as isize,
                prefill,
                x.as_ptr().add(r0 * k),
                1,
                k as isize,
                rhs,
                rhs_cs,
                rhs_rs,
                1.0,
                1.0,
                false,
                false,
                false,
                Parallelism::None,
            );
        }
        if act != Activation::Identity {
            for r in r0..r1 {
                // SAFETY: this unit's row segment, initialised by gemm above.
                act.apply(unsafe { std::slice::from_raw_parts_mut(dst(r), width) });
            }
        }
    });
}

/// `out[r] = (x[r] - mean) / sqrt(var + eps) · gamma + beta` for each of the
/// `rows` rows of width `gamma.len()` (LayerNorm over the last axis, biased
/// variance as PyTorch computes it), rows split over candle's pool: candle's
/// own LayerNorm runs on one thread while the other waits.
pub fn layer_norm(x: &[f32], gamma: &[f32], beta: &[f32], eps: f32, out: &mut [MaybeUninit<f32>]) {
    let width = gamma.len();
    debug_assert!(beta.len() == width && out.len() >= x.len());
    if width == 0 {
        return;
    }
    let rows = x.len() / width;
    // 32 rows of 768 is 96 KiB per unit: enough work to hide the pool's hand-off.
    for_each_row(rows, width, 32, out, |r, dst| {
        math::layer_norm_row(&x[r * width..(r + 1) * width], gamma, beta, eps, dst);
    });
}

/// Calls `f(r, row)` for each `width`-long row `r` of `out`, `per_unit` rows
/// per unit of candle's pool; `f` must write every element of its row.
pub(crate) fn for_each_row(
    rows: usize,
    width: usize,
    per_unit: usize,
    out: &mut [MaybeUninit<f32>],
    f: impl Fn(usize, &mut [MaybeUninit<f32>]) + Sync,
) {
    debug_assert!(out.len() >= rows * width && per_unit > 0);
    let out_ptr = crate::Shared(out.as_mut_ptr().cast::<f32>());
    for_each_unit(rows.div_ceil(per_unit), |unit| {
        for r in unit * per_unit..((unit + 1) * per_unit).min(rows) {
            // SAFETY: row r of `out` lies inside it and belongs to this unit only.
            let dst = unsafe {
                std::slice::from_raw_parts_mut(
                    out_ptr.at(r * width).cast::<MaybeUninit<f32>>(),
                    width,
                )
            };
            f(r, dst);
        }
    });
}

/// A `[batch, rows, heads * head_dim]` operand of an attention, rows `row_stride`
/// apart and batches `batch_stride` apart (a view into a fused QKV output works).
#[derive(Debug, Clone, Copy)]
pub struct Rows<'a> {
    /// The data, starting at the operand's first element.
    pub data: &'a [f32],
    /// Elements between consecutive rows.
    pub row_stride: usize,
    /// Elements between consecutive batches.
    pub batch_stride: usize,
}

/// The shape of an attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    /// Batch size.
    pub batch: usize,
    /// Query positions.
    pub queries: usize,
    /// Key (and value) positions.
    pub keys: usize,
    /// Heads.
    pub heads: usize,
    /// Width of one head.
    pub head_dim: usize,
}

/// Query rows per unit. Fewer, taller blocks repack K and V less often and give
/// the ·V product more rows; 512 rows of Whisper's 1500 keys is 3 MiB of scores per
/// thread. Measured on the whole Whisper-base encoder (30 s, 2 threads, three
/// alternating rounds, best of 5 each): 256 rows 334 / 304 / 299 ms, 512 rows
/// 309 / 290 / 285 ms, one block per head (1500 rows) 299 / 290 / 287 ms. On 8 heads ×
/// 1500² alone, earlier: 64 rows 24.9 ms, 128 rows 20.6 ms, 256 rows 18.4 ms.
const QUERY_BLOCK: usize = 512;

thread_local! {
    /// Each pool thread's score buffer, kept between calls so that a Whisper layer
    /// does not fault in fresh pages for every head.
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Multi-head scaled dot-product attention without a causal mask:
/// `out[b, i, h] = softmax(scale · q_h k_h^T + key_bias[b]) v_h`, written to
/// `out` `[batch, queries, heads * head_dim]` (dense).
///
/// `key_bias` (`[batch, keys]`, additive) masks padded keys; a row whose keys
/// are all `-inf` comes out as zeros.
/// Every element of `out` is written, so it may start uninitialised.
pub fn attention(
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
    debug_assert!(out.len() >= batch * queries * width);
    debug_assert!(key_bias.is_none_or(|b| b.len() >= batch * keys));
    if batch == 0 || queries == 0 || heads == 0 || head_dim == 0 {
        return;
    }
    if keys == 0 {
        // Nothing to attend to: every row is zeros, as a fully masked row is.
        out[..batch * queries * width].fill(MaybeUninit::new(0.0));
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if avx512::applies(head_dim) {
        avx512::attention(q, k, v, shape, scale, key_bias, out);
        return;
    }
    attention_gemm(q, k, v, shape, scale, key_bias, out);
}

/// How an attention is cut into units: (batch, head, block of query rows), in
/// that order, so that a thread's consecutive units share a head.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AttentionUnits {
    heads: usize,
    queries: usize,
    block: usize,
    blocks: usize,
    batch: usize,
}

impl AttentionUnits {
    pub(crate) fn new(shape: AttentionShape, block: usize) -> Self {
        let blocks = shape.queries.div_ceil(block);
        Self {
            heads: shape.heads,
            queries: shape.queries,
            block,
            blocks,
            batch: shape.batch,
        }
    }

    /// The number of units.
    pub(crate) fn count(&self) -> usize {
        self.batch * self.heads * self.blocks
    }

    /// Unit `unit`'s batch, head and query rows `r0..r1`.
    pub(crate) fn get(&self, unit: usize) -> (usize, usize, usize, usize) {
        let (b, rest) = (
            unit / (self.heads * self.blocks),
            unit % (self.heads * self.blocks),
        );
        let (h, block) = (rest / self.blocks, rest % self.blocks);
        let r0 = block * self.block;
        (b, h, r0, (r0 + self.block).min(self.queries))
    }
}

/// [`attention`] through gemm: what runs without AVX-512 or with a head width
/// that is not a multiple of 16.
pub(crate) fn attention_gemm(
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
    if batch == 0 || queries == 0 || heads == 0 || head_dim == 0 {
        return;
    }
    let units = AttentionUnits::new(shape, QUERY_BLOCK);
    let out_ptr = crate::Shared(out.as_mut_ptr().cast::<f32>());
    for_each_unit(units.count(), |unit| {
        let (b, h, r0, r1) = units.get(unit);
        let rows = r1 - r0;
        SCORES.with(|cell| {
            let mut scores = cell.borrow_mut();
            if scores.len() < rows * keys {
                scores.resize(rows * keys, 0.0);
            }
            let scores = &mut scores[..rows * keys];
            let q0 = b * q.batch_stride + r0 * q.row_stride + h * head_dim;
            let k0 = b * k.batch_stride + h * head_dim;
            let v0 = b * v.batch_stride + h * head_dim;
            // SAFETY: q[b, r0..r1, head h], k[b, :, head h]^T and v[b, :, head h] lie
            // inside their slices for a valid shape; scores is rows × keys; the output
            // block out[b, r0..r1, head h] belongs to this unit only.
            unsafe {
                gemm(
                    rows,
                    keys,
                    head_dim,
                    scores.as_mut_ptr(),
                    1,
                    keys as isize,
                    false,
                    q.data.as_ptr().add(q0),
                    1,
                    q.row_stride as isize,
                    k.data.as_ptr().add(k0),
                    k.row_stride as isize,
                    1,
                    0.0,
                    scale,
                    false,
                    false,
                    false,
                    Parallelism::None,
                );
            }
            if let Some(bias) = key_bias {
                math::add_row_bias(scores, &bias[b * keys..(b + 1) * keys]);
            }
            // The softmax's division is applied to the head_dim-wide output rows
            // instead of the keys-wide probability rows.
            let mut sums = [0f32; QUERY_BLOCK];
            math::exp_rows(scores, keys, &mut sums[..rows]);
            unsafe {
                gemm(
                    rows,
                    head_dim,
                    keys,
                    out_ptr.at((b * queries + r0) * width + h * head_dim),
                    1,
                    width as isize,
                    false,
                    scores.as_ptr(),
                    1,
                    keys as isize,
                    v.data.as_ptr().add(v0),
                    1,
                    v.row_stride as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    Parallelism::None,
                );
            }
            for (r, &sum) in sums[..rows].iter().enumerate() {
                let inv = if sum > 0.0 { 1.0 / sum } else { 0.0 };
                // SAFETY: row r0 + r of head h of batch b belongs to this unit.
                let row = unsafe {
                    std::slice::from_raw_parts_mut(
                        out_ptr.at((b * queries + r0 + r) * width + h * head_dim),
                        head_dim,
                    )
                };
                row.iter_mut().for_each(|x| *x *= inv);
            }
        });
    });
}
