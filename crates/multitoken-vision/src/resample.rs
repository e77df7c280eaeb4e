//! Pillow's separable resampling (`src/libImaging/Resample.c`), bit for bit.
//!
//! `Image.resize(size, resample)` with a convolution filter computes, per output
//! column (then per output row), the filter weights over the input pixels whose
//! centres fall in the filter's support (scaled up when downsampling), normalises
//! them, turns them into 22-bit fixed point and accumulates in `i32` with a
//! rounding bias; the horizontal pass runs first over only the rows the vertical
//! pass needs (the vertical one first when the height shrinks by more than twice
//! as many pixels as the width, as Pillow 13 does), and each pass clamps its
//! result to `u8`. Reproducing that exactly is what makes our pixel values equal
//! to transformers' PIL-backed processors.
//!
//! [`resize_window`] computes only a window of the output: the result equals
//! cropping the full resize, because every output pixel depends only on its own
//! coefficients. CLIP preprocessing resizes then center-crops, so this skips the
//! pixels the crop throws away.

use crate::decode::RgbImage;
use crate::{Error, Result};

/// Bits of fixed-point precision of Pillow's 8-bit resampling.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Pillow's resampling filters, numbered as `PIL.Image.Resampling`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResampleFilter {
    /// `Resampling.BOX` (4).
    Box,
    /// `Resampling.BILINEAR` (2).
    Bilinear,
    /// `Resampling.HAMMING` (5).
    Hamming,
    /// `Resampling.BICUBIC` (3), what CLIP uses.
    Bicubic,
    /// `Resampling.LANCZOS` (1).
    Lanczos,
}

impl ResampleFilter {
    /// The filter for PIL's integer code; `NEAREST` (0) is not a convolution
    /// filter and is not supported.
    pub fn from_pil_code(code: u64) -> Result<Self> {
        match code {
            1 => Ok(Self::Lanczos),
            2 => Ok(Self::Bilinear),
            3 => Ok(Self::Bicubic),
            4 => Ok(Self::Box),
            5 => Ok(Self::Hamming),
            other => Err(Error::config(
                "resample",
                format!("PIL resampling filter {other} is not supported (1-5 are)"),
            )),
        }
    }

    fn support(self) -> f64 {
        match self {
            Self::Box => 0.5,
            Self::Bilinear | Self::Hamming => 1.0,
            Self::Bicubic => 2.0,
            Self::Lanczos => 3.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        match self {
            Self::Box => {
                if (-0.5..0.5).contains(&x) {
                    1.0
                } else {
                    0.0
                }
            }
            Self::Bilinear => {
                let x = x.abs();
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            Self::Hamming => {
                let x = x.abs();
                if x == 0.0 {
                    1.0
                } else if x >= 1.0 {
                    0.0
                } else {
                    let x = x * std::f64::consts::PI;
                    // Pillow writes these constants as C floats.
                    x.sin() / x * (f64::from(0.54f32) + f64::from(0.46f32) * x.cos())
                }
            }
            Self::Bicubic => {
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            Self::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let x = x * std::f64::consts::PI;
        x.sin() / x
    }
}

/// Fixed-point coefficients of one axis: per output index, the first input
/// index and its weights.
struct Coefficients {
    /// Weights per output index, `ksize` each (unused tail is zero).
    weights: Vec<i32>,
    /// `(first input index, number of inputs)` per output index.
    bounds: Vec<(usize, usize)>,
    ksize: usize,
}

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for the full input range.
fn precompute(in_size: usize, out_size: usize, filter: ResampleFilter) -> Coefficients {
    // Pillow passes the box edges as C floats.
    let in0 = 0.0f32;
    let in1 = in_size as f32;
    let scale = f64::from(in1 - in0) / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let inv_filterscale = 1.0 / filterscale;
    let mut weights = vec![0i32; out_size * ksize];
    let mut bounds = Vec::with_capacity(out_size);
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = f64::from(in0) + (xx as f64 + 0.5) * scale;
        // C's (int) truncates toward zero; the +0.5 rounds.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64).max(0) as usize;
        let count = xmax.saturating_sub(xmin).min(ksize);
        let mut ww = 0.0;
        for (x, slot) in k.iter_mut().enumerate().take(count) {
            let w = filter.weight((x as f64 + xmin as f64 - center + 0.5) * inv_filterscale);
            *slot = w;
            ww += w;
        }
        let row = &mut weights[xx * ksize..(xx + 1) * ksize];
        for x in 0..count {
            let w = if ww != 0.0 { k[x] / ww } else { k[x] };
            let fixed = w * f64::from(1u32 << PRECISION_BITS);
            row[x] = if w < 0.0 {
                (-0.5 + fixed) as i32
            } else {
                (0.5 + fixed) as i32
            };
        }
        bounds.push((xmin, count));
    }
    Coefficients {
        weights,
        bounds,
        ksize,
    }
}

#[inline]
fn clip8(value: i32) -> u8 {
    (value >> PRECISION_BITS).clamp(0, 255) as u8
}

/// A window `[x0, x0 + width) x [y0, y0 + height)` of the output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// First output column.
    pub x0: usize,
    /// First output row.
    pub y0: usize,
    /// Columns.
    pub width: usize,
    /// Rows.
    pub height: usize,
}

/// Resizes `src` to `out_width x out_height` as Pillow's `Image.resize` does.
pub fn resize(src: &RgbImage, out_width: usize, out_height: usize, filter: ResampleFilter) -> RgbImage {
    let window = Window {
        x0: 0,
        y0: 0,
        width: out_width,
        height: out_height,
    };
    resize_window(src, out_width, out_height, window, filter)
}

/// The `window` of Pillow's resize of `src` to `out_width x out_height`.
///
/// The window must lie inside the output; callers clamp it.
pub fn resize_window(
    src: &RgbImage,
    out_width: usize,
    out_height: usize,
    window: Window,
    filter: ResampleFilter,
) -> RgbImage {
    let need_horizontal = out_width != src.width;
    let need_vertical = out_height != src.height;
    if need_horizontal && need_vertical {
        let h = precompute(src.width, out_width, filter);
        let v = precompute(src.height, out_height, filter);
        if vertical_first(src.width, src.height, out_width, out_height) {
            let (col_first, col_last) = span(&h.bounds[window.x0..window.x0 + window.width]);
            let cols = crop_columns(src, col_first, col_last);
            let temp = vertical_pass(&cols, &v, 0, window.y0, window.height);
            return horizontal(&temp, &h, col_first, 0, temp.height, window.x0, window.width);
        }
        let (row_first, row_last) = span(&v.bounds[window.y0..window.y0 + window.height]);
        let temp = horizontal(src, &h, 0, row_first, row_last, window.x0, window.width);
        return vertical_pass(&temp, &v, row_first, window.y0, window.height);
    }
    if need_horizontal {
        let h = precompute(src.width, out_width, filter);
        return horizontal(src, &h, 0, window.y0, window.y0 + window.height, window.x0, window.width);
    }
    let cols = crop_columns(src, window.x0, window.x0 + window.width);
    if need_vertical {
        let v = precompute(src.height, out_height, filter);
        return vertical_pass(&cols, &v, 0, window.y0, window.height);
    }
    let start = window.y0 * cols.width * 3;
    RgbImage {
        width: cols.width,
        height: window.height,
        pixels: cols.pixels[start..start + window.height * cols.width * 3].to_vec(),
    }
}

/// Whether Pillow runs the vertical pass first: since 13.0
/// (`ImagingResampleInner`), when the height shrinks by more than twice as
/// many pixels as the width does; 12.x always ran the horizontal one first.
/// The passes round to 8 bits in between, so the order shows in the output.
fn vertical_first(in_width: usize, in_height: usize, out_width: usize, out_height: usize) -> bool {
    let shrink_y = in_height as i64 - out_height as i64;
    let shrink_x = in_width as i64 - out_width as i64;
    shrink_y > 0 && shrink_y > shrink_x * 2
}

/// `(first input index, one past the last)` read by these output indexes.
fn span(bounds: &[(usize, usize)]) -> (usize, usize) {
    let first = bounds.iter().map(|b| b.0).min().unwrap_or(0);
    let last = bounds.iter().map(|b| b.0 + b.1).max().unwrap_or(first);
    (first, last)
}

/// Columns `first..last` of every row.
fn crop_columns(src: &RgbImage, first: usize, last: usize) -> RgbImage {
    let width = last - first;
    let mut pixels = Vec::with_capacity(src.height * width * 3);
    for y in 0..src.height {
        let start = (y * src.width + first) * 3;
        pixels.extend_from_slice(&src.pixels[start..start + width * 3]);
    }
    RgbImage {
        width,
        height: src.height,
        pixels,
    }
}

/// Horizontal pass; `col_first` is the input column `src`'s column 0 stands for.
fn horizontal(
    src: &RgbImage,
    coeffs: &Coefficients,
    col_first: usize,
    row_first: usize,
    row_last: usize,
    x0: usize,
    width: usize,
) -> RgbImage {
    let rows = row_last - row_first;
    let mut pixels = vec![0u8; rows * width * 3];
    // Blocks of ROWS rows side by side in SIMD lanes, the rest one row at a time.
    let blocked = rows / ROWS * ROWS;
    let (head, tail) = pixels.split_at_mut(blocked * width * 3);
    horizontal_blocks(src, coeffs, col_first, row_first, x0, width, head);
    let half = 1i32 << (PRECISION_BITS - 1);
    for (out_row, y) in tail.chunks_exact_mut(width * 3).zip(row_first + blocked..row_last) {
        let line = &src.pixels[y * src.width * 3..(y + 1) * src.width * 3];
        for (xx, out) in out_row.chunks_exact_mut(3).enumerate() {
            let (xmin, count) = coeffs.bounds[x0 + xx];
            let k = &coeffs.weights[(x0 + xx) * coeffs.ksize..][..count];
            let input = &line[(xmin - col_first) * 3..(xmin - col_first + count) * 3];
            let (mut s0, mut s1, mut s2) = (half, half, half);
            for (&w, px) in k.iter().zip(input.chunks_exact(3)) {
                s0 += i32::from(px[0]) * w;
                s1 += i32::from(px[1]) * w;
                s2 += i32::from(px[2]) * w;
            }
            out[0] = clip8(s0);
            out[1] = clip8(s1);
            out[2] = clip8(s2);
        }
    }
    RgbImage {
        width,
        height: rows,
        pixels,
    }
}

/// Rows per block of [`horizontal_blocks`]: 8 i32 lanes per channel (one AVX2
/// register, half an AVX-512 one).
const ROWS: usize = 8;

/// The horizontal pass over whole blocks of [`ROWS`] rows (`out` holds
/// `out.len() / (width * 3)` rows, a multiple of ROWS).
///
/// Each block's input is transposed into `[column][channel][row]` lanes, so one
/// tap of one output pixel is a vector multiply-add over the block's rows with a
/// broadcast weight. The integer products and sums are Pillow's, per pixel, so
/// the result is bit-identical to the one-row loop.
fn horizontal_blocks(src: &RgbImage, coeffs: &Coefficients, col_first: usize, row_first: usize, x0: usize, width: usize, out: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2")]
        unsafe fn wide(src: &RgbImage, coeffs: &Coefficients, col_first: usize, row_first: usize, x0: usize, width: usize, out: &mut [u8]) {
            horizontal_blocks_generic(src, coeffs, col_first, row_first, x0, width, out)
        }
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2, checked just above.
            return unsafe { wide(src, coeffs, col_first, row_first, x0, width, out) };
        }
    }
    horizontal_blocks_generic(src, coeffs, col_first, row_first, x0, width, out)
}

#[inline(always)]
#[allow(clippy::needless_range_loop)] // index loops over fixed lanes are what vectorises
fn horizontal_blocks_generic(src: &RgbImage, coeffs: &Coefficients, col_first: usize, row_first: usize, x0: usize, width: usize, out: &mut [u8]) {
    let half = 1i32 << (PRECISION_BITS - 1);
    let mut lanes = vec![[[0i32; ROWS]; 3]; src.width];
    let stride = width * 3;
    for (block, out_block) in out.chunks_exact_mut(ROWS * stride).enumerate() {
        let y0 = row_first + block * ROWS;
        for r in 0..ROWS {
            let line = &src.pixels[(y0 + r) * src.width * 3..(y0 + r + 1) * src.width * 3];
            for (lane, px) in lanes.iter_mut().zip(line.chunks_exact(3)) {
                for c in 0..3 {
                    lane[c][r] = i32::from(px[c]);
                }
            }
        }
        for xx in 0..width {
            let (xmin, count) = coeffs.bounds[x0 + xx];
            let k = &coeffs.weights[(x0 + xx) * coeffs.ksize..][..count];
            let columns = &lanes[xmin - col_first..xmin - col_first + count];
            let mut acc = [[half; ROWS]; 3];
            for (&w, column) in k.iter().zip(columns) {
                for c in 0..3 {
                    for r in 0..ROWS {
                        acc[c][r] += column[c][r] * w;
                    }
                }
            }
            for r in 0..ROWS {
                let at = r * stride + xx * 3;
                for c in 0..3 {
                    out_block[at + c] = clip8(acc[c][r]);
                }
            }
        }
    }
}

fn vertical_pass(
    temp: &RgbImage,
    coeffs: &Coefficients,
    row_first: usize,
    y0: usize,
    height: usize,
) -> RgbImage {
    let stride = temp.width * 3;
    let mut pixels = vec![0u8; height * stride];
    vertical_rows(temp, coeffs, row_first, y0, height, &mut |yy, row| {
        pixels[yy * stride..(yy + 1) * stride].copy_from_slice(row)
    });
    RgbImage {
        width: temp.width,
        height,
        pixels,
    }
}

/// The vertical pass, handing each output row (`yy`, RGB bytes) to `sink`.
fn vertical_rows(
    temp: &RgbImage,
    coeffs: &Coefficients,
    row_first: usize,
    y0: usize,
    height: usize,
    sink: &mut dyn FnMut(usize, &[u8]),
) {
    let stride = temp.width * 3;
    let mut out_row = vec![0u8; stride];
    let half = 1i32 << (PRECISION_BITS - 1);
    let mut sums = vec![0i32; stride];
    for yy in 0..height {
        let (ymin, count) = coeffs.bounds[y0 + yy];
        let k = &coeffs.weights[(y0 + yy) * coeffs.ksize..][..count];
        sums.iter_mut().for_each(|s| *s = half);
        for (i, &w) in k.iter().enumerate() {
            let row = ymin + i - row_first;
            let line = &temp.pixels[row * stride..(row + 1) * stride];
            for (s, &v) in sums.iter_mut().zip(line) {
                *s += i32::from(v) * w;
            }
        }
        for (out, &s) in out_row.iter_mut().zip(&sums) {
            *out = clip8(s);
        }
        sink(yy, &out_row);
    }
}

/// [`resize_window`] handing each output row of the window (`y`, RGB bytes) to
/// `sink` instead of returning the image: the common resize (horizontal pass,
/// then vertical) never holds the output, which preprocessing turns straight
/// into normalised floats.
pub fn resize_window_rows(
    src: &RgbImage,
    out_width: usize,
    out_height: usize,
    window: Window,
    filter: ResampleFilter,
    sink: &mut dyn FnMut(usize, &[u8]),
) {
    if out_width != src.width && out_height != src.height {
        let h = precompute(src.width, out_width, filter);
        let v = precompute(src.height, out_height, filter);
        if !vertical_first(src.width, src.height, out_width, out_height) {
            let (row_first, row_last) = span(&v.bounds[window.y0..window.y0 + window.height]);
            let temp = horizontal(src, &h, 0, row_first, row_last, window.x0, window.width);
            vertical_rows(&temp, &v, row_first, window.y0, window.height, sink);
            return;
        }
    }
    let image = resize_window(src, out_width, out_height, window, filter);
    for (y, row) in image.pixels.chunks_exact(image.width * 3).enumerate() {
        sink(y, row);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_size_is_a_copy_and_flat_colour_stays_flat() {
        let flat = RgbImage::filled(7, 5, [12, 200, 99]);
        assert_eq!(resize(&flat, 7, 5, ResampleFilter::Bicubic), flat);
        for (w, h) in [(3, 2), (20, 11), (1, 1)] {
            let out = resize(&flat, w, h, ResampleFilter::Bicubic);
            assert_eq!(out, RgbImage::filled(w, h, [12, 200, 99]), "{w}x{h}");
        }
    }

    #[test]
    fn vertical_pass_first_when_the_height_shrinks_twice_as_much() {
        // Pillow 13.0.0: (in_h - out_h) > 0 and > 2 (in_w - out_w).
        assert!(vertical_first(97, 211, 73, 160));
        assert!(!vertical_first(200, 200, 100, 5));
        assert!(vertical_first(200, 200, 150, 99));
        assert!(!vertical_first(200, 200, 150, 100));
        assert!(vertical_first(10, 50, 40, 20));
        assert!(!vertical_first(10, 20, 5, 30));
    }

    #[test]
    fn window_equals_crop_of_full_resize() {
        let mut img = RgbImage::filled(9, 6, [0, 0, 0]);
        for (i, p) in img.pixels.iter_mut().enumerate() {
            *p = (i * 37 % 251) as u8;
        }
        let full = resize(&img, 14, 10, ResampleFilter::Bicubic);
        let window = Window {
            x0: 3,
            y0: 2,
            width: 8,
            height: 5,
        };
        let part = resize_window(&img, 14, 10, window, ResampleFilter::Bicubic);
        for y in 0..5 {
            for x in 0..8 {
                assert_eq!(part.pixel(x, y), full.pixel(x + 3, y + 2));
            }
        }
    }
}
