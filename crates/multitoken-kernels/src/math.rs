//! Element-wise maths over f32 slices that the compiler can vectorise.
//!
//! candle's CPU `exp`, `erf` and friends call libm once per element; in an
//! encoder tower that is most of the time left outside the matrix products
//! (softmax over 1500×1500 scores per Whisper head, GELU over every MLP
//! activation). The functions here are branch-free polynomial forms that LLVM
//! turns into AVX-512 or AVX2 code, picked at run time so one binary runs
//! everywhere.
//!
//! The polynomials use `mul_add`: Rust never fuses `a * b + c` on its own, and
//! each function is compiled with FMA enabled (or a libm `fmaf` off x86).
//!
//! Accuracy: `exp` has a relative error under 2e-7 on its whole range (the
//! Cephes `expf` polynomial); `erf` an absolute error under 1.5e-7 (Abramowitz
//! and Stegun 7.1.26). Both are far inside the 1e-4 parity the towers are held to.

use std::mem::MaybeUninit;

/// Applies `$generic` through the widest instruction set this CPU has.
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) => $generic:ident, avx512: $fast:path) => {
        multiversion!(@emit [$(#[$meta])*] $vis $name ($($arg: $ty),*) $generic {
            // SAFETY: the CPU was checked for AVX-512F.
            return unsafe { $fast($($arg),*) };
        });
    };
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) => $generic:ident) => {
        multiversion!(@emit [$(#[$meta])*] $vis $name ($($arg: $ty),*) $generic {
            // SAFETY: the CPU was checked for these features.
            return unsafe { wide($($arg),*) };
        });
    };
    (@emit [$(#[$meta:meta])*] $vis:vis $name:ident ($($arg:ident: $ty:ty),*) $generic:ident $on_avx512:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                #[allow(dead_code)]
                unsafe fn wide($($arg: $ty),*) { $generic($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn narrow($($arg: $ty),*) { $generic($($arg),*) }
                if std::is_x86_feature_detected!("avx512f") $on_avx512
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: as above.
                    return unsafe { narrow($($arg),*) };
                }
            }
            $generic($($arg),*)
        }
    };
}

const LANES: usize = 16;

/// `e^x`, clamped to the range where f32 is finite and normal (NaN stays NaN).
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in two so that `x - n ln 2` loses no bits.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 · 2^23: adding it leaves an integer-valued f32's value in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    // `max`/`min` (not `clamp`) so that NaN maps into range here and is restored below.
    #[allow(clippy::manual_clamp)]
    let c = x.max(-87.336_54).min(88.376_26);
    let n = c.mul_add(LOG2E, 0.5).floor();
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, c));
    let mut p = 1.987_569_1e-4f32;
    p = p.mul_add(r, 1.398_199_9e-3);
    p = p.mul_add(r, 8.333_452e-3);
    p = p.mul_add(r, 4.166_579_6e-2);
    p = p.mul_add(r, 1.666_666_5e-1);
    p = p.mul_add(r, 0.5);
    let e = (p * r).mul_add(r, r + 1.0);
    // 2^n from the exponent bits (n is in [-126, 127]), with integer ops only: a
    // float-to-int cast would be scalarised for its saturating semantics.
    let n_int = (n + ROUND).to_bits().wrapping_sub(ROUND.to_bits()) as i32;
    let scaled = e * f32::from_bits(((n_int + 127) as u32) << 23);
    if x.is_nan() {
        x
    } else if x < -87.336_54 {
        // Exactly 0 below the clamp (-inf: a masked key), as libm's underflow
        // gives, not e^-87.3: products with that come out subnormal, which made
        // every later product that read them several times slower.
        0.0
    } else {
        scaled
    }
}

/// `erf(x)`.
#[inline(always)]
fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let mut p = 1.061_405_4f32;
    p = p.mul_add(t, -1.453_152_1);
    p = p.mul_add(t, 1.421_413_8);
    p = p.mul_add(t, -0.284_496_74);
    p = p.mul_add(t, 0.254_829_6);
    let y = 1.0 - p * t * exp(-a * a);
    y.copysign(x)
}

#[inline(always)]
fn gelu_generic(xs: &mut [f32]) {
    for x in xs.iter_mut() {
        *x = 0.5 * *x * (1.0 + erf(*x * std::f32::consts::FRAC_1_SQRT_2));
    }
}

#[inline(always)]
fn quick_gelu_generic(xs: &mut [f32]) {
    for x in xs.iter_mut() {
        *x /= 1.0 + exp(-1.702 * *x);
    }
}

#[inline(always)]
fn max_of(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(chunk) {
            *a = a.max(x);
        }
    }
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    acc.iter().fold(tail, |m, &x| m.max(x))
}

/// `xs[i] = e^(xs[i] - shift)`, returning the sum.
#[inline(always)]
fn exp_sum(xs: &mut [f32], shift: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = xs.chunks_exact_mut(LANES);
    for chunk in &mut chunks {
        for (a, x) in acc.iter_mut().zip(chunk.iter_mut()) {
            *x = exp(*x - shift);
            *a += *x;
        }
    }
    let mut tail = 0.0;
    for x in chunks.into_remainder() {
        *x = exp(*x - shift);
        tail += *x;
    }
    acc.iter().sum::<f32>() + tail
}

/// `row[i] = e^(row[i] - row max)`, returning their sum; a row of -inf (every
/// key masked) becomes zeros with a sum of 0, not NaN.
#[inline(always)]
fn exp_row(row: &mut [f32]) -> f32 {
    max_and_exp_row(row).1
}

/// [`exp_row`], also returning the row's maximum (first), which a split
/// attention needs to rescale its parts.
#[inline(always)]
fn max_and_exp_row(row: &mut [f32]) -> (f32, f32) {
    let max = max_of(row);
    if max == f32::NEG_INFINITY {
        row.fill(0.0);
        return (max, 0.0);
    }
    (max, exp_sum(row, max))
}

#[inline(always)]
fn softmax_rows_generic(scores: &mut [f32], width: usize) {
    if width == 0 {
        return;
    }
    for row in scores.chunks_exact_mut(width) {
        let sum = exp_row(row);
        let inv = if sum > 0.0 { 1.0 / sum } else { 0.0 };
        for x in row.iter_mut() {
            *x *= inv;
        }
    }
}

/// [`exp_row`] over each `width`-long row, the sums in `sums`: a softmax whose
/// division is left to the caller, who can apply it to a narrower result.
#[inline(always)]
fn exp_rows_generic(scores: &mut [f32], width: usize, sums: &mut [f32]) {
    if width == 0 {
        return;
    }
    for (row, sum) in scores.chunks_exact_mut(width).zip(sums.iter_mut()) {
        *sum = exp_row(row);
    }
}

/// `Σ a[i] · b[i]` over the shorter length, in 16 lanes.
#[inline(always)]
fn dot_generic(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; LANES];
    let (mut ca, mut cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    for (x, y) in (&mut ca).zip(&mut cb) {
        for i in 0..LANES {
            acc[i] = x[i].mul_add(y[i], acc[i]);
        }
    }
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    acc.iter().sum::<f32>() + tail
}

/// `out = dot(a, b)`: a statement form of [`dot_generic`] for the dispatch macro.
#[inline(always)]
fn dot_into_generic(a: &[f32], b: &[f32], out: &mut f32) {
    *out = dot_generic(a, b);
}

#[inline(always)]
fn add_row_bias_generic(rows: &mut [f32], bias: &[f32]) {
    if bias.is_empty() {
        return;
    }
    for row in rows.chunks_exact_mut(bias.len()) {
        for (x, &b) in row.iter_mut().zip(bias) {
            *x += b;
        }
    }
}

/// `Σ xs[i]` in 16 lanes.
#[inline(always)]
fn sum_generic(xs: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for x in &mut chunks {
        for i in 0..LANES {
            acc[i] += x[i];
        }
    }
    acc.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

/// One LayerNorm row: the mean, then the variance of the deviations (two
/// passes, as PyTorch's CPU kernel, rather than E[x²] − E[x]², which loses
/// digits when the mean is large).
#[inline(always)]
fn layer_norm_row_generic(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
    out: &mut [MaybeUninit<f32>],
) {
    let width = x.len();
    if width == 0 {
        return;
    }
    let mean = sum_generic(x) / width as f32;
    let mut acc = [0f32; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            let d = c[i] - mean;
            acc[i] = d.mul_add(d, acc[i]);
        }
    }
    let tail: f32 = chunks
        .remainder()
        .iter()
        .map(|&v| (v - mean) * (v - mean))
        .sum();
    let var = (acc.iter().sum::<f32>() + tail) / width as f32;
    let inv = 1.0 / (var + eps).sqrt();
    for (((o, &v), &g), &b) in out.iter_mut().zip(x).zip(gamma).zip(beta) {
        o.write(((v - mean) * inv).mul_add(g, b));
    }
}

multiversion! {
    /// LayerNorm of one row `x` into `out` (every element written), with
    /// scale `gamma` and shift `beta` of `x`'s width.
    pub fn layer_norm_row(x: &[f32], gamma: &[f32], beta: &[f32], eps: f32, out: &mut [MaybeUninit<f32>]) => layer_norm_row_generic
}

multiversion! {
    /// GELU with the exact (erf) form, in place: `0.5 x (1 + erf(x / √2))`.
    pub fn gelu_in_place(xs: &mut [f32]) => gelu_generic, avx512: avx512::gelu_in_place
}

multiversion! {
    /// CLIP's quick GELU in place: `x · sigmoid(1.702 x)`.
    pub fn quick_gelu_in_place(xs: &mut [f32]) => quick_gelu_generic, avx512: avx512::quick_gelu_in_place
}

#[inline(always)]
fn silu_times_generic(gate: &[f32], up: &mut [f32]) {
    for (u, &g) in up.iter_mut().zip(gate) {
        let silu = g / (1.0 + exp(-g));
        // Where e^-g leaves f32's range, libm's sigmoid is exactly 0, and so
        // is this: a silu of about -4e-37 times a small `up` would be
        // subnormal, and the down product reading it several times slower.
        *u *= if g < -88.0 { 0.0 } else { silu };
    }
}

multiversion! {
    /// `up[i] ← silu(gate[i]) · up[i]`, silu(g) = `g / (1 + e^-g)`: the llama
    /// MLP's gated activation, vectorised (libm's `expf` one element at a time
    /// was most of a prefill's activation time). Every path that applies it,
    /// [`crate::train::silu_mul`] and the fused quantized gate / up product,
    /// calls this one function, so they give the same bits.
    pub fn silu_times_in_place(gate: &[f32], up: &mut [f32]) => silu_times_generic
}

multiversion! {
    /// Softmax of each `width`-long row of `scores`, in place.
    pub fn softmax_rows(scores: &mut [f32], width: usize) => softmax_rows_generic
}

multiversion! {
    /// Unnormalised softmax of each `width`-long row of `scores`, sums in `sums`.
    pub fn exp_rows(scores: &mut [f32], width: usize, sums: &mut [f32]) => exp_rows_generic, avx512: avx512::exp_rows
}

multiversion! {
    /// `*out = Σ a[i] · b[i]` (over the shorter of the two), vectorised.
    pub fn dot_into(a: &[f32], b: &[f32], out: &mut f32) => dot_into_generic
}

/// `Σ a[i] · b[i]` over the shorter of the two slices, vectorised (16 partial sums,
/// so the rounding differs from a sequential sum by a few ulps).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut out = 0.0;
    dot_into(a, b, &mut out);
    out
}

/// What a decode step's attention reads for one key/value head: `len` cached
/// positions from `base` in `keys` / `values`, `step` floats apart.
#[derive(Debug, Clone, Copy)]
pub struct CachedHead<'a> {
    /// The key buffer.
    pub keys: &'a [f32],
    /// The value buffer (same layout as the keys).
    pub values: &'a [f32],
    /// Offset of position 0.
    pub base: usize,
    /// Floats between consecutive positions.
    pub step: usize,
    /// Positions to attend to.
    pub len: usize,
}

/// One query group of a decode step: the query heads that share one
/// key/value head (`group × head_dim` floats, one sequence's one position)
/// and that head's cache.
#[derive(Debug, Clone, Copy)]
pub struct QueryGroup<'a> {
    /// The group's query heads, one after another.
    pub queries: &'a [f32],
    /// The keys and values they attend to.
    pub head: CachedHead<'a>,
}

/// How many key rows ahead [`attend_group_part`] asks for the keys it will
/// read. The hardware prefetcher alone left a streamed step's attention at
/// 35-37 GB/s (scratch bench: SmolLM2's 30 layers at 512 cached positions,
/// a weight-sized read between layers); 16 rows (4 KiB at head dim 64) ahead
/// gave 40-43 GB/s; 8 and 32 were within noise of 16 (Zen 5, 2026-12-07).
const KEY_PREFETCH_ROWS: usize = 16;

/// Cached positions per work item of [`attend_groups`]. A constant, not a
/// share of the threads: a head's output depends only on its own keys, so a
/// sequence decoded alone or in a batch, on one thread or many, gives the same
/// bits.
pub const KEYS_PER_PART: usize = 64;

/// Floats one part leaves in [`attend_groups`]' scratch: the group's
/// unnormalised outputs, then each head's score maximum and exponent sum.
fn part_len(group: usize, hd: usize) -> usize {
    group * (hd + 2)
}

/// A decode step's attention (one new query per sequence, no mask) for every
/// query group in `groups`, each `group` heads of `hd` floats: `out` receives
/// the groups' outputs one after another (`groups.len() × group × hd`).
///
/// Flash-decoding's split: each group's keys are cut into parts of
/// [`KEYS_PER_PART`] positions, the parts run on the pool (a part reads its
/// keys and values once for every head of its group, from L1 after the first),
/// and each group's parts are merged with the softmax rescaling. Splitting by
/// keys rather than by head keeps both threads busy whatever the head count
/// (SmolLM2's 3 key/value heads would split 2:1 over 2 threads), and grouping
/// the heads reads the cache once per key/value head instead of once per
/// query head: at a 640-token context that cache is most of the bytes the
/// attention moves.
pub fn attend_groups(groups: &[QueryGroup<'_>], group: usize, hd: usize, scale: f32, out: &mut [f32]) {
    let width = group * hd;
    out.fill(0.0);
    if width == 0 || out.len() < groups.len() * width {
        return;
    }
    // (group index, first key, keys) of every part, each group's parts together.
    let parts: Vec<(usize, usize, usize)> = groups
        .iter()
        .enumerate()
        .flat_map(|(i, g)| (0..g.head.len.div_ceil(KEYS_PER_PART)).map(move |p| (i, p * KEYS_PER_PART, KEYS_PER_PART.min(g.head.len - p * KEYS_PER_PART))))
        .collect();
    let item = part_len(group, hd);
    let mut scratch = vec![0f32; parts.len() * item];
    let work: usize = groups.iter().map(|g| g.head.len).sum::<usize>() * width;
    crate::pool::fill_items(&mut scratch, item, work >= 1 << 15, |first, items| {
        let mut scores = vec![0f32; group * KEYS_PER_PART];
        for (k, dst) in items.chunks_exact_mut(item).enumerate() {
            let (i, start, len) = parts[first + k];
            let QueryGroup { queries, head } = groups[i];
            let part = CachedHead { base: head.base + start * head.step, len, ..head };
            let (outs, stats) = dst.split_at_mut(width);
            attend_group_part(&queries[..width.min(queries.len())], part, scale, &mut scores[..group * len], outs, stats);
        }
    });
    let mut at = 0;
    for (i, dst) in out.chunks_exact_mut(width).take(groups.len()).enumerate() {
        let n = groups[i].head.len.div_ceil(KEYS_PER_PART);
        merge_group_parts(&scratch[at * item..(at + n) * item], group, hd, dst);
        at += n;
    }
}

#[inline(always)]
fn attend_group_part_generic(queries: &[f32], head: CachedHead<'_>, scale: f32, scores: &mut [f32], out: &mut [f32], stats: &mut [f32]) {
    let CachedHead { keys, values, base, step, len } = head;
    let group = stats.len() / 2;
    out.fill(0.0);
    if group == 0 || len == 0 || scores.len() < group * len {
        stats.fill(0.0);
        return;
    }
    let hd = out.len() / group;
    // Each key row is read once for every query head of the group.
    for j in 0..len {
        let key = &keys[base + j * step..base + j * step + hd];
        for g in 0..group {
            scores[g * len + j] = dot_generic(&queries[g * hd..(g + 1) * hd], key) * scale;
        }
    }
    for (row, stat) in scores.chunks_exact_mut(len).zip(stats.chunks_exact_mut(2)) {
        (stat[0], stat[1]) = max_and_exp_row(row);
    }
    for j in 0..len {
        let value = &values[base + j * step..base + j * step + hd];
        for g in 0..group {
            let p = scores[g * len + j];
            for (o, v) in out[g * hd..(g + 1) * hd].iter_mut().zip(value) {
                *o = p.mul_add(*v, *o);
            }
        }
    }
}

multiversion! {
    /// One part of [`attend_groups`]: the query heads of one group (`queries`,
    /// `group × head_dim`, `group = stats.len() / 2`) against `head.len`
    /// positions, `scores` room for `group × head.len` values. For each head
    /// `g` it leaves `Σ_j e^(s_j - m) v_j` in `out[g]` (not yet divided),
    /// the score maximum `m` in `stats[2g]` and `Σ_j e^(s_j - m)` in
    /// `stats[2g + 1]`. A head's results do not depend on the heads beside it.
    pub fn attend_group_part(queries: &[f32], head: CachedHead<'_>, scale: f32, scores: &mut [f32], out: &mut [f32], stats: &mut [f32]) => attend_group_part_generic, avx512: avx512::attend_group_part
}

#[inline(always)]
fn merge_group_parts_generic(parts: &[f32], group: usize, hd: usize, out: &mut [f32]) {
    let item = part_len(group, hd);
    if item == 0 {
        return;
    }
    for (g, dst) in out.chunks_exact_mut(hd).take(group).enumerate() {
        dst.fill(0.0);
        let stat = |p: &[f32], k: usize| p[group * hd + 2 * g + k];
        let max = parts.chunks_exact(item).map(|p| stat(p, 0)).fold(f32::NEG_INFINITY, f32::max);
        let mut total = 0.0f32;
        for p in parts.chunks_exact(item) {
            let sum = stat(p, 1);
            if sum == 0.0 {
                // No key in this part (or none with any weight): nothing to add.
                continue;
            }
            let weight = exp(stat(p, 0) - max);
            total = weight.mul_add(sum, total);
            for (o, x) in dst.iter_mut().zip(&p[g * hd..(g + 1) * hd]) {
                *o = weight.mul_add(*x, *o);
            }
        }
        let inv = if total > 0.0 { 1.0 / total } else { 0.0 };
        for o in dst.iter_mut() {
            *o *= inv;
        }
    }
}

multiversion! {
    /// Joins the parts of one group left by [`attend_group_part`] (one after
    /// another in `parts`, each [`part_len`] floats) into the group's softmax
    /// attention, `out` `group × hd`: each part's sums and outputs are scaled
    /// by `e^(m_part - m)` for the largest maximum `m`, then divided by the
    /// total. No parts give zeros.
    fn merge_group_parts(parts: &[f32], group: usize, hd: usize, out: &mut [f32]) => merge_group_parts_generic
}

multiversion! {
    /// Adds `bias` to each `bias.len()`-long row of `rows`.
    pub fn add_row_bias(rows: &mut [f32], bias: &[f32]) => add_row_bias_generic
}

/// The same functions written with AVX-512 intrinsics: LLVM's vectorisation of
/// the portable forms above keeps the power of two and the division as integer
/// and divide instructions; here they are `vscalefps` and a `vrcp14ps`
/// estimate refined by one Newton step (relative error about 2^-28 before
/// rounding). Measured on one thread over 18M softmax entries: 8.8 ms → 5.0 ms.
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    use std::arch::x86_64::*;

    use super::CachedHead;

    /// [`super::attend_group_part`] with each query head and its output held
    /// in registers (head dims 32, 64, 128; others take the portable form): a
    /// key row's dot product is one FMA chain and a tree reduction, where the
    /// portable form's sixteen-lane sum ends in fifteen dependent adds, and
    /// value rows are added into two sets of accumulators (even and odd keys)
    /// that never leave the registers, so the adds do not wait on each other.
    /// The heads run one after another over the part's rows, which stay in L1.
    ///
    /// # Safety
    /// AVX-512F.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(crate) unsafe fn attend_group_part(queries: &[f32], head: CachedHead<'_>, scale: f32, scores: &mut [f32], out: &mut [f32], stats: &mut [f32]) {
        let CachedHead { keys, values, base, step, len } = head;
        let group = stats.len() / 2;
        let fits = group > 0
            && len > 0
            && scores.len() >= group * len
            && out.len().is_multiple_of(group)
            && queries.len() >= out.len()
            && base + (len - 1) * step + out.len() / group <= keys.len().min(values.len());
        let hd = if fits { out.len() / group } else { 0 };
        // SAFETY: AVX-512F; `fits` checked every row read lies inside the buffers.
        unsafe {
            match hd {
                32 => part_heads::<2>(queries, head, scale, scores, out, stats),
                64 => part_heads::<4>(queries, head, scale, scores, out, stats),
                128 => part_heads::<8>(queries, head, scale, scores, out, stats),
                _ => super::attend_group_part_generic(queries, head, scale, scores, out, stats),
            }
        }
    }

    /// [`attend_group_part`] for a head dim of `16 V`: the heads two at a time
    /// where their registers fit (`V <= 4`), else one at a time. In pairs,
    /// SmolLM2's 30 layers at a 640-token context, in-process on 2 threads:
    /// 1167-1337 → 1037-1254 µs a token with the cache in L2, 2.25-2.41 →
    /// 2.21-2.34 ms streamed (2026-12-06).
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn part_heads<const V: usize>(queries: &[f32], head: CachedHead<'_>, scale: f32, scores: &mut [f32], out: &mut [f32], stats: &mut [f32]) {
        let group = stats.len() / 2;
        let mut g = 0;
        // SAFETY: forwarded; `scores` holds `group × len` values.
        unsafe {
            if V <= 4 {
                while g + 2 <= group {
                    heads_of::<V, 2>(queries, head, scale, scores, out, stats, g);
                    g += 2;
                }
            }
            while g < group {
                heads_of::<V, 1>(queries, head, scale, scores, out, stats, g);
                g += 1;
            }
        }
    }

    /// Heads `g0..g0 + W` of [`part_heads`], interleaved: each key row is
    /// loaded once for the `W` heads and their products and value sums are
    /// independent chains, while each head's own operations are the ones it
    /// gets alone, in the same order (the same bits whatever the pairing).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn heads_of<const V: usize, const W: usize>(queries: &[f32], head: CachedHead<'_>, scale: f32, scores: &mut [f32], out: &mut [f32], stats: &mut [f32], g0: usize) {
        let CachedHead { keys, values, base, step, len } = head;
        let hd = 16 * V;
        // SAFETY (block): the caller checked that every row read lies inside
        // `keys` / `values`, that `queries` / `out` hold the group's heads and
        // `scores` a row of `len` for each.
        unsafe {
            let q: [[__m512; V]; W] = std::array::from_fn(|h| std::array::from_fn(|c| _mm512_loadu_ps(queries.as_ptr().add((g0 + h) * hd + c * 16))));
            let rows = scores.as_mut_ptr().add(g0 * len);
            for j in 0..len {
                let k = keys.as_ptr().add(base + j * step);
                if g0 == 0 {
                    // The value rows are read after the scores: ask for them
                    // now, while the first heads' dot products run (about a
                    // tenth off a long-context step's attention).
                    let v = values.as_ptr().add(base + j * step);
                    for c in 0..V {
                        _mm_prefetch::<_MM_HINT_T0>(v.add(c * 16) as *const i8);
                    }
                    // And keys further on: `wrapping_add`, as rows past the
                    // part's end may lie outside the buffer (a prefetch never
                    // faults).
                    let ahead = k.wrapping_add(super::KEY_PREFETCH_ROWS * step);
                    for c in 0..V {
                        _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(c * 16) as *const i8);
                    }
                }
                let kv: [__m512; V] = std::array::from_fn(|c| _mm512_loadu_ps(k.add(c * 16)));
                for (h, q) in q.iter().enumerate() {
                    let mut acc = _mm512_mul_ps(q[0], kv[0]);
                    for c in 1..V {
                        acc = _mm512_fmadd_ps(q[c], kv[c], acc);
                    }
                    *rows.add(h * len + j) = _mm512_reduce_add_ps(acc) * scale;
                }
            }
            for h in 0..W {
                let row = std::slice::from_raw_parts_mut(rows.add(h * len), len);
                (stats[2 * (g0 + h)], stats[2 * (g0 + h) + 1]) = super::max_and_exp_row(row);
            }
            let mut even = [[_mm512_setzero_ps(); V]; W];
            let mut odd = [[_mm512_setzero_ps(); V]; W];
            let mut j = 0;
            while j + 2 <= len {
                let v = values.as_ptr().add(base + j * step);
                let v0: [__m512; V] = std::array::from_fn(|c| _mm512_loadu_ps(v.add(c * 16)));
                let v1: [__m512; V] = std::array::from_fn(|c| _mm512_loadu_ps(v.add(step + c * 16)));
                for h in 0..W {
                    let (p0, p1) = (_mm512_set1_ps(*rows.add(h * len + j)), _mm512_set1_ps(*rows.add(h * len + j + 1)));
                    for c in 0..V {
                        even[h][c] = _mm512_fmadd_ps(p0, v0[c], even[h][c]);
                        odd[h][c] = _mm512_fmadd_ps(p1, v1[c], odd[h][c]);
                    }
                }
                j += 2;
            }
            if j < len {
                let v = values.as_ptr().add(base + j * step);
                for (h, even) in even.iter_mut().enumerate() {
                    let p = _mm512_set1_ps(*rows.add(h * len + j));
                    for (c, e) in even.iter_mut().enumerate() {
                        *e = _mm512_fmadd_ps(p, _mm512_loadu_ps(v.add(c * 16)), *e);
                    }
                }
            }
            for h in 0..W {
                for c in 0..V {
                    _mm512_storeu_ps(out.as_mut_ptr().add((g0 + h) * hd + c * 16), _mm512_add_ps(even[h][c], odd[h][c]));
                }
            }
        }
    }

    /// `e^x` on 16 lanes: the Cephes polynomial of [`super::exp`] (relative error
    /// under 2e-7), the power of two applied by `vscalefps`. `x` is clamped to
    /// [-87.34, 88.38] as there, and below that range the result is 0; NaN stays
    /// NaN (`vmaxps` and `vminps` return their second operand when one is NaN, and
    /// the unordered compare keeps its lane).
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(crate) fn exp16(x: __m512) -> __m512 {
        // Below the clamp (a masked key's -inf) the result is exactly 0, as in [`super::exp`].
        let live = _mm512_cmp_ps_mask::<_CMP_NLT_UQ>(x, _mm512_set1_ps(-87.336_54));
        let x = _mm512_min_ps(
            _mm512_set1_ps(88.376_26),
            _mm512_max_ps(_mm512_set1_ps(-87.336_54), x),
        );
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm512_set1_ps(1.987_569_1e-4);
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.398_199_9e-3));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.333_452e-3));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.166_579_6e-2));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.666_666_5e-1));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5));
        let e = _mm512_fmadd_ps(
            _mm512_mul_ps(p, r),
            r,
            _mm512_add_ps(r, _mm512_set1_ps(1.0)),
        );
        _mm512_maskz_mov_ps(live, _mm512_scalef_ps(e, n))
    }

    /// `1 / d` on 16 lanes: the 14-bit estimate and one Newton step.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn recip16(d: __m512) -> __m512 {
        let r = _mm512_rcp14_ps(d);
        _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.0)))
    }

    /// Applies `f` to `xs` 16 lanes at a time, the tail through masked loads and stores.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn map16(xs: &mut [f32], f: impl Fn(__m512) -> __m512) {
        let mut chunks = xs.chunks_exact_mut(16);
        for chunk in &mut chunks {
            // SAFETY: the chunk holds 16 floats.
            unsafe { _mm512_storeu_ps(chunk.as_mut_ptr(), f(_mm512_loadu_ps(chunk.as_ptr()))) };
        }
        let tail = chunks.into_remainder();
        if !tail.is_empty() {
            let mask = ((1u32 << tail.len()) - 1) as __mmask16;
            // SAFETY: the mask covers exactly the tail's elements.
            unsafe {
                _mm512_mask_storeu_ps(
                    tail.as_mut_ptr(),
                    mask,
                    f(_mm512_maskz_loadu_ps(mask, tail.as_ptr())),
                )
            };
        }
    }

    /// GELU (erf form, as [`super::gelu_in_place`]) on 16 lanes:
    /// `0.5 x (1 + erf(x / √2))` with erf as in [`super::erf`], written as
    /// `x - 0.5 x w` for x ≥ 0 and `0.5 x w` below, where `w = 1 - erf(|x| / √2)`,
    /// rounded as `1 - erf` would be.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(crate) fn gelu16(x: __m512) -> __m512 {
        let a = _mm512_abs_ps(_mm512_mul_ps(
            x,
            _mm512_set1_ps(std::f32::consts::FRAC_1_SQRT_2),
        ));
        let t = recip16(_mm512_fmadd_ps(
            a,
            _mm512_set1_ps(0.327_591_1),
            _mm512_set1_ps(1.0),
        ));
        let mut p = _mm512_set1_ps(1.061_405_4);
        p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-1.453_152_1));
        p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.421_413_8));
        p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-0.284_496_74));
        p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.254_829_6));
        let w = _mm512_mul_ps(
            _mm512_mul_ps(p, t),
            exp16(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(a, a))),
        );
        // Rounded through `1 - erf` (the portable form and PyTorch's `0.5 x (1 +
        // erf)`): below 2^-25 w becomes 0, so that GELU of a very negative x is 0,
        // not a subnormal that would slow every product reading it tenfold
        // (measured: the Whisper encoder 0.57 s → 3.0 s).
        let one = _mm512_set1_ps(1.0);
        let w = _mm512_sub_ps(one, _mm512_sub_ps(one, w));
        let half_xw = _mm512_mul_ps(_mm512_mul_ps(x, _mm512_set1_ps(0.5)), w);
        let negative = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, _mm512_setzero_ps());
        _mm512_mask_blend_ps(negative, _mm512_sub_ps(x, half_xw), half_xw)
    }

    /// CLIP's quick GELU on 16 lanes: `x / (1 + e^(-1.702 x))`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(crate) fn quick_gelu16(x: __m512) -> __m512 {
        let e = exp16(_mm512_mul_ps(x, _mm512_set1_ps(-1.702)));
        _mm512_mul_ps(x, recip16(_mm512_add_ps(e, _mm512_set1_ps(1.0))))
    }

    /// [`super::gelu_in_place`].
    #[target_feature(enable = "avx512f")]
    pub(crate) fn gelu_in_place(xs: &mut [f32]) {
        map16(xs, |x| gelu16(x));
    }

    /// [`super::quick_gelu_in_place`].
    #[target_feature(enable = "avx512f")]
    pub(crate) fn quick_gelu_in_place(xs: &mut [f32]) {
        map16(xs, |x| quick_gelu16(x));
    }

    /// `row[..len] = e^(row - max)` at `row`, returning the sum; a row of -inf
    /// (every key masked) becomes zeros with a sum of 0, as [`super::exp_rows`].
    ///
    /// # Safety
    /// `row` points at `len` writable floats.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn exp_row(row: *mut f32, len: usize) -> f32 {
        let full = len / 16;
        let mask = ((1u32 << (len % 16)) - 1) as __mmask16;
        // SAFETY (every access below): chunks 0..full are whole, the tail is masked.
        unsafe {
            let mut max = _mm512_set1_ps(f32::NEG_INFINITY);
            for c in 0..full {
                max = _mm512_max_ps(max, _mm512_loadu_ps(row.add(16 * c)));
            }
            max = _mm512_mask_max_ps(
                max,
                mask,
                max,
                _mm512_maskz_loadu_ps(mask, row.add(16 * full)),
            );
            let max = _mm512_reduce_max_ps(max);
            if max == f32::NEG_INFINITY {
                std::slice::from_raw_parts_mut(row, len).fill(0.0);
                return 0.0;
            }
            let shift = _mm512_set1_ps(max);
            let mut acc = _mm512_setzero_ps();
            for c in 0..full {
                let e = exp16(_mm512_sub_ps(_mm512_loadu_ps(row.add(16 * c)), shift));
                _mm512_storeu_ps(row.add(16 * c), e);
                acc = _mm512_add_ps(acc, e);
            }
            let e = _mm512_maskz_mov_ps(
                mask,
                exp16(_mm512_sub_ps(
                    _mm512_maskz_loadu_ps(mask, row.add(16 * full)),
                    shift,
                )),
            );
            _mm512_mask_storeu_ps(row.add(16 * full), mask, e);
            _mm512_reduce_add_ps(_mm512_add_ps(acc, e))
        }
    }

    /// [`super::exp_rows`].
    #[target_feature(enable = "avx512f")]
    pub(crate) fn exp_rows(scores: &mut [f32], width: usize, sums: &mut [f32]) {
        if width == 0 {
            return;
        }
        for (row, sum) in scores.chunks_exact_mut(width).zip(sums.iter_mut()) {
            // SAFETY: the row holds `width` floats.
            *sum = unsafe { exp_row(row.as_mut_ptr(), width) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Points across the range that matters, including both clamps.
    fn grid() -> Vec<f32> {
        (-2000..=2000)
            .map(|i| i as f32 * 0.01)
            .chain([-100.0, -87.0, 0.0, 88.0, 100.0])
            .collect()
    }

    /// Keys, values and queries for the decode-attention tests: `len` cached
    /// rows `step` floats apart from `base`, and `group` query heads.
    fn cache(hd: usize, group: usize, len: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>, usize, usize) {
        let value = |i: usize| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.8;
        let (step, base) = (2 * hd, hd);
        let keys: Vec<f32> = (0..base + len * step).map(value).collect();
        let values: Vec<f32> = (0..base + len * step).map(|i| value(i + 11)).collect();
        let queries: Vec<f32> = (0..group * hd).map(|i| value(i + 5)).collect();
        (keys, values, queries, step, base)
    }

    #[test]
    fn a_group_is_its_heads_alone_bit_for_bit() {
        // Decode steps run a key/value head's query heads as one group; a head's
        // output must not depend on the group it ran in. Lengths below, at and
        // over one part, and over several.
        for hd in [32usize, 64, 128, 48] {
            for group in [1usize, 2, 3, 4, 5, 7, 9] {
                for len in [29, KEYS_PER_PART, 3 * KEYS_PER_PART + 7] {
                    let (keys, values, queries, step, base) = cache(hd, group, len);
                    let head = CachedHead { keys: &keys, values: &values, base, step, len };
                    let mut together = vec![0f32; group * hd];
                    attend_groups(&[QueryGroup { queries: &queries, head }], group, hd, 0.125, &mut together);
                    for g in 0..group {
                        let mut alone = vec![0f32; hd];
                        let one = QueryGroup { queries: &queries[g * hd..(g + 1) * hd], head };
                        attend_groups(&[one], 1, hd, 0.125, &mut alone);
                        let same = alone.iter().zip(&together[g * hd..]).all(|(a, t)| a.to_bits() == t.to_bits());
                        assert!(same, "head dim {hd}, group {group}, {len} keys, head {g}");
                    }
                }
            }
        }
    }

    #[test]
    fn groups_in_one_call_are_each_group_alone_bit_for_bit() {
        // A batched decode step attends every sequence's groups in one call,
        // with caches of their own lengths; each must equal its lone step.
        let (hd, group) = (64, 3);
        let lens = [1usize, 70, 5, 300, 64, 129];
        let caches: Vec<_> = lens.iter().map(|&len| (cache(hd, group, len), len)).collect();
        let groups: Vec<QueryGroup<'_>> = caches
            .iter()
            .map(|((keys, values, queries, step, base), len)| QueryGroup {
                queries,
                head: CachedHead { keys, values, base: *base, step: *step, len: *len },
            })
            .collect();
        let mut together = vec![0f32; groups.len() * group * hd];
        attend_groups(&groups, group, hd, 0.125, &mut together);
        for (i, g) in groups.iter().enumerate() {
            let mut alone = vec![0f32; group * hd];
            attend_groups(std::slice::from_ref(g), group, hd, 0.125, &mut alone);
            let same = alone.iter().zip(&together[i * group * hd..]).all(|(a, t)| a.to_bits() == t.to_bits());
            assert!(same, "group {i} ({} keys)", g.head.len);
        }
    }

    /// Plain softmax attention per query head, in f64.
    fn plain_attention(queries: &[f32], head: CachedHead<'_>, hd: usize, scale: f64) -> Vec<f64> {
        let CachedHead { keys, values, base, step, len } = head;
        let mut out = Vec::new();
        for q in queries.chunks_exact(hd) {
            let s: Vec<f64> = (0..len)
                .map(|j| (0..hd).map(|d| f64::from(q[d]) * f64::from(keys[base + j * step + d])).sum::<f64>() * scale)
                .collect();
            let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            out.extend((0..hd).map(|d| (0..len).map(|j| e[j] / sum * f64::from(values[base + j * step + d])).sum::<f64>()));
        }
        out
    }

    #[test]
    fn attend_groups_matches_plain_attention() {
        // Both bodies (the dispatched one and the portable one, merged the same
        // way), one part and several, a head dim the AVX-512 body declines.
        let scale = 0.125;
        for (hd, len) in [(64, 37), (64, 3 * KEYS_PER_PART + 5), (128, 200), (48, 90)] {
            let group = 3;
            let (keys, values, queries, step, base) = cache(hd, group, len);
            let head = CachedHead { keys: &keys, values: &values, base, step, len };
            let want = plain_attention(&queries, head, hd, scale as f64);
            let mut out = vec![0f32; group * hd];
            attend_groups(&[QueryGroup { queries: &queries, head }], group, hd, scale, &mut out);
            let item = part_len(group, hd);
            let mut parts = vec![0f32; len.div_ceil(KEYS_PER_PART) * item];
            for (p, dst) in parts.chunks_exact_mut(item).enumerate() {
                let start = p * KEYS_PER_PART;
                let part = CachedHead { base: base + start * step, len: KEYS_PER_PART.min(len - start), ..head };
                let mut scores = vec![0f32; group * part.len];
                let (outs, stats) = dst.split_at_mut(group * hd);
                attend_group_part_generic(&queries, part, scale, &mut scores, outs, stats);
            }
            let mut portable = vec![0f32; group * hd];
            merge_group_parts_generic(&parts, group, hd, &mut portable);
            for (name, got) in [("dispatched", &out), ("portable", &portable)] {
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!((f64::from(*g) - w).abs() < 1e-5, "{name}, head dim {hd}, {len} keys, [{i}]: {g} vs {w}");
                }
            }
        }
    }

    #[test]
    fn attention_over_no_cached_keys_is_zeros() {
        let (keys, values, queries, step, base) = cache(64, 2, 0);
        let head = CachedHead { keys: &keys, values: &values, base, step, len: 0 };
        let mut out = vec![1f32; 2 * 64];
        attend_groups(&[QueryGroup { queries: &queries, head }], 2, 64, 0.125, &mut out);
        assert!(out.iter().all(|&x| x == 0.0));
    }

    #[test]
    fn exp_below_the_clamp_is_zero_not_subnormal() {
        for x in [-87.34f32, -90.0, -1e4, f32::NEG_INFINITY] {
            assert_eq!(exp(x), 0.0, "exp({x})");
        }
        let mut rows = vec![0.0f32, -90.0, f32::NEG_INFINITY, -1e4, 1.0];
        let mut sums = [0.0];
        exp_rows(&mut rows, 5, &mut sums);
        assert_eq!(&rows[1..4], &[0.0, 0.0, 0.0]);
        assert!(rows[0] > 0.3 && rows[4] == 1.0);
    }

    #[test]
    fn exp_is_within_2e7_relative_of_libm() {
        for x in (-8700..=8830).map(|i| i as f32 * 0.01) {
            let want = x.exp();
            let got = exp(x);
            assert!(
                ((got - want) / want).abs() < 2e-7,
                "exp({x}) = {got}, libm {want}"
            );
        }
    }

    /// The dispatched form (AVX-512 intrinsics on a CPU that has them) and the portable one.
    type InPlace = fn(&mut [f32]);
    fn both(dispatched: InPlace, generic: InPlace) -> [(&'static str, InPlace); 2] {
        [("dispatched", dispatched), ("portable", generic)]
    }

    #[test]
    fn gelu_matches_the_erf_form() {
        // The grid's length is not a multiple of 16: the masked tail is covered.
        let xs = grid();
        for (name, gelu) in both(gelu_in_place, gelu_generic) {
            let mut got = xs.clone();
            gelu(&mut got);
            for (&x, &g) in xs.iter().zip(&got) {
                let want = 0.5 * x as f64 * (1.0 + libm_erf(x as f64 / std::f64::consts::SQRT_2));
                assert!(
                    (g as f64 - want).abs() <= 1e-6 * want.abs().max(1.0),
                    "{name}: gelu({x}) = {g}, want {want}"
                );
            }
        }
    }

    #[test]
    fn silu_times_matches_the_sigmoid_form_and_is_element_wise() {
        let gates = grid();
        let ups: Vec<f32> = gates.iter().enumerate().map(|(i, _)| ((i * 37 % 101) as f32 - 50.0) * 0.07).collect();
        let mut got = ups.clone();
        silu_times_in_place(&gates, &mut got);
        for ((&g, &u), &y) in gates.iter().zip(&ups).zip(&got) {
            let want = g as f64 / (1.0 + (-g as f64).exp()) * u as f64;
            assert!((y as f64 - want).abs() <= 1e-6 * want.abs().max(1e-3), "silu({g}) · {u} = {y}, want {want}");
            assert!(y == 0.0 || y.is_normal(), "silu({g}) · {u} = {y:e} is subnormal");
        }
        // The fused gate / up product combines chunks of any length: each
        // element must come out alike alone, in the vector body or the tail.
        for (i, (&g, &u)) in gates.iter().zip(&ups).enumerate() {
            let mut one = [u];
            silu_times_in_place(&[g], &mut one);
            assert_eq!(one[0].to_bits(), got[i].to_bits(), "silu({g}) · {u} alone");
        }
        let (mut far, mut nan) = ([1.0f32; 3], [1.0f32]);
        silu_times_in_place(&[-1000.0, 1000.0, f32::NEG_INFINITY], &mut far);
        silu_times_in_place(&[f32::NAN], &mut nan);
        assert_eq!(far, [0.0, 1000.0, 0.0]);
        assert!(nan[0].is_nan());
    }

    #[test]
    fn gelu_of_a_very_negative_input_is_zero_not_subnormal() {
        // Subnormal activations slow every product that reads them about tenfold.
        let xs: Vec<f32> = (0..200).map(|i| -5.0 - i as f32 * 0.5).collect();
        for (name, gelu) in both(gelu_in_place, gelu_generic) {
            let mut got = xs.clone();
            gelu(&mut got);
            for (&x, &g) in xs.iter().zip(&got) {
                assert!(
                    g == 0.0 || g.is_normal(),
                    "{name}: gelu({x}) = {g:e} is subnormal"
                );
            }
        }
    }

    #[test]
    fn quick_gelu_matches_its_definition() {
        let xs = grid();
        for (name, quick_gelu) in both(quick_gelu_in_place, quick_gelu_generic) {
            let mut got = xs.clone();
            quick_gelu(&mut got);
            for (&x, &g) in xs.iter().zip(&got) {
                let x64 = x as f64;
                let want = x64 / (1.0 + (-1.702 * x64).exp());
                assert!(
                    (g as f64 - want).abs() <= 1e-6 * want.abs().max(1.0),
                    "{name}: quick_gelu({x}) = {g}, want {want}"
                );
            }
        }
    }

    #[test]
    fn exp_rows_match_the_softmax_numerators_with_tails_and_masked_rows() {
        for width in [1usize, 5, 16, 37, 1500] {
            let mut rows: Vec<f32> = (0..width * 3)
                .map(|i| ((i * 7919) % 113) as f32 * 0.37 - 20.0)
                .collect();
            // The last row is fully masked, the first has one masked key.
            rows[2 * width..].fill(f32::NEG_INFINITY);
            rows[0] = f32::NEG_INFINITY;
            let original = rows.clone();
            let dispatched = |scores: &mut [f32], sums: &mut [f32]| exp_rows(scores, width, sums);
            let portable =
                |scores: &mut [f32], sums: &mut [f32]| exp_rows_generic(scores, width, sums);
            for (name, kernel) in [
                ("dispatched", &dispatched as &dyn Fn(&mut [f32], &mut [f32])),
                ("portable", &portable),
            ] {
                let mut got = original.clone();
                let mut sums = [f32::NAN; 3];
                kernel(&mut got, &mut sums);
                for ((row, orig), &sum) in got.chunks(width).zip(original.chunks(width)).zip(&sums)
                {
                    let max = orig.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                    if max == f32::NEG_INFINITY {
                        assert!(
                            row.iter().all(|&p| p == 0.0) && sum == 0.0,
                            "{name}: width {width}, masked row"
                        );
                        continue;
                    }
                    let want_sum: f64 = orig.iter().map(|&x| ((x - max) as f64).exp()).sum();
                    assert!(
                        (sum as f64 - want_sum).abs() < 1e-5 * want_sum,
                        "{name}: width {width}: sum {sum} vs {want_sum}"
                    );
                    for (&p, &x) in row.iter().zip(orig) {
                        let want = ((x - max) as f64).exp();
                        assert!(
                            (p as f64 - want).abs() <= 2e-7 * want + 1e-30,
                            "{name}: width {width}: {p} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn softmax_rows_sum_to_one_and_keep_order() {
        let width = 37;
        let mut rows: Vec<f32> = (0..width * 3)
            .map(|i| ((i * 7919) % 113) as f32 * 0.37 - 20.0)
            .collect();
        let original = rows.clone();
        softmax_rows(&mut rows, width);
        for (row, orig) in rows.chunks(width).zip(original.chunks(width)) {
            let max = orig.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let sum: f64 = orig.iter().map(|&x| ((x - max) as f64).exp()).sum();
            for (&p, &x) in row.iter().zip(orig) {
                let want = ((x - max) as f64).exp() / sum;
                assert!((p as f64 - want).abs() < 1e-7, "softmax {p} vs {want}");
            }
        }
    }

    #[test]
    fn dot_matches_a_sequential_sum() {
        for n in [0usize, 1, 15, 16, 17, 142, 1000] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let want: f64 = a.iter().zip(&b).map(|(&x, &y)| x as f64 * y as f64).sum();
            assert!((dot(&a, &b) as f64 - want).abs() < 1e-5, "n {n}");
        }
    }

    #[test]
    fn a_fully_masked_row_becomes_zeros() {
        let mut row = vec![f32::NEG_INFINITY; 5];
        softmax_rows(&mut row, 5);
        assert_eq!(row, vec![0.0; 5]);
    }

    /// erf in f64 by its series / continued fraction, the test's own reference.
    fn libm_erf(x: f64) -> f64 {
        // Abramowitz-Stegun 7.1.5 series converges fast for |x| < 3; beyond, erf is 1 to f32 precision.
        if x.abs() > 4.0 {
            return x.signum();
        }
        let mut term = x;
        let mut sum = x;
        for n in 1..200 {
            term *= -x * x / n as f64;
            sum += term / (2 * n + 1) as f64;
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }
}
