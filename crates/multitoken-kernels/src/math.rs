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
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) => $generic:ident) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn wide($($arg: $ty),*) { $generic($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn narrow($($arg: $ty),*) { $generic($($arg),*) }
                if std::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU was just checked for these features.
                    return unsafe { wide($($arg),*) };
                }
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
    let tail = chunks.remainder().iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
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
    let max = max_of(row);
    if max == f32::NEG_INFINITY {
        row.fill(0.0);
        return 0.0;
    }
    exp_sum(row, max)
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
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
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
fn layer_norm_row_generic(x: &[f32], gamma: &[f32], beta: &[f32], eps: f32, out: &mut [MaybeUninit<f32>]) {
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
    let tail: f32 = chunks.remainder().iter().map(|&v| (v - mean) * (v - mean)).sum();
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
    pub fn gelu_in_place(xs: &mut [f32]) => gelu_generic
}

multiversion! {
    /// CLIP's quick GELU in place: `x · sigmoid(1.702 x)`.
    pub fn quick_gelu_in_place(xs: &mut [f32]) => quick_gelu_generic
}

multiversion! {
    /// Softmax of each `width`-long row of `scores`, in place.
    pub fn softmax_rows(scores: &mut [f32], width: usize) => softmax_rows_generic
}

multiversion! {
    /// Unnormalised softmax of each `width`-long row of `scores`, sums in `sums`.
    pub fn exp_rows(scores: &mut [f32], width: usize, sums: &mut [f32]) => exp_rows_generic
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

multiversion! {
    /// Adds `bias` to each `bias.len()`-long row of `rows`.
    pub fn add_row_bias(rows: &mut [f32], bias: &[f32]) => add_row_bias_generic
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Points across the range that matters, including both clamps.
    fn grid() -> Vec<f32> {
        (-2000..=2000).map(|i| i as f32 * 0.01).chain([-100.0, -87.0, 0.0, 88.0, 100.0]).collect()
    }

    #[test]
    fn exp_is_within_2e7_relative_of_libm() {
        for x in (-8700..=8830).map(|i| i as f32 * 0.01) {
            let want = x.exp();
            let got = exp(x);
            assert!(((got - want) / want).abs() < 2e-7, "exp({x}) = {got}, libm {want}");
        }
    }

    #[test]
    fn gelu_matches_the_erf_form() {
        let xs = grid();
        let mut got = xs.clone();
        gelu_in_place(&mut got);
        for (&x, &g) in xs.iter().zip(&got) {
            let want = 0.5 * x as f64 * (1.0 + libm_erf(x as f64 / std::f64::consts::SQRT_2));
            assert!((g as f64 - want).abs() <= 1e-6 * want.abs().max(1.0), "gelu({x}) = {g}, want {want}");
        }
    }

    #[test]
    fn quick_gelu_matches_its_definition() {
        let xs = grid();
        let mut got = xs.clone();
        quick_gelu_in_place(&mut got);
        for (&x, &g) in xs.iter().zip(&got) {
            let x64 = x as f64;
            let want = x64 / (1.0 + (-1.702 * x64).exp());
            assert!((g as f64 - want).abs() <= 1e-6 * want.abs().max(1.0), "quick_gelu({x}) = {g}, want {want}");
        }
    }

    #[test]
    fn softmax_rows_sum_to_one_and_keep_order() {
        let width = 37;
        let mut rows: Vec<f32> = (0..width * 3).map(|i| ((i * 7919) % 113) as f32 * 0.37 - 20.0).collect();
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
