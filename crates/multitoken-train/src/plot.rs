//! `loss.png`: a titled chart of the training loss (blue, left axis), the eval
//! loss when there is one (green, left axis) and the learning rate (orange,
//! right axis) over optimizer steps, with ticks, tick labels, axis labels and a
//! legend.
//!
//! Text is drawn from an embedded 8×8 bitmap font (`font8x8`, public domain
//! glyphs), never from system fonts: the plot looks the same on a machine with
//! no fonts installed and needs no fontconfig.

use std::path::Path;

use font8x8::UnicodeFonts;
use image::{Rgb, RgbImage};

use crate::trainer::StepLog;
use crate::{Error, Result};

/// Image width.
pub const WIDTH: u32 = 800;
/// Image height.
pub const HEIGHT: u32 = 450;
/// The plot area: left, top, right, bottom edges in pixels.
pub const PLOT: (u32, u32, u32, u32) = (80, 56, WIDTH - 88, HEIGHT - 52);

const WHITE: Rgb<u8> = Rgb([255, 255, 255]);
const AXIS: Rgb<u8> = Rgb([60, 60, 60]);
const GRID: Rgb<u8> = Rgb([228, 228, 228]);
const TEXT: Rgb<u8> = Rgb([20, 20, 20]);
const TRAIN: Rgb<u8> = Rgb([30, 90, 200]);
const EVAL: Rgb<u8> = Rgb([30, 150, 60]);
const LR: Rgb<u8> = Rgb([235, 140, 30]);

/// Draws the curves of `log` into a PNG at `path` (temporary file + rename).
pub fn write_loss_png(log: &[StepLog], path: &Path) -> Result<()> {
    let img = render(log, &[]);
    let tmp = crate::data::temp_path(path);
    img.save_with_format(&tmp, image::ImageFormat::Png)
        .map_err(|e| {
            Error::Config(format!(
                "{}: cannot write the loss plot: {e}",
                tmp.display()
            ))
        })?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// The chart of `log` and `eval` (`(step, loss)` pairs; empty when the run has
/// no eval set) as a `WIDTH`×`HEIGHT` image. Non-finite values are skipped.
pub fn render(log: &[StepLog], eval: &[(usize, f64)]) -> RgbImage {
    let mut img = RgbImage::from_pixel(WIDTH, HEIGHT, WHITE);
    let (left, top, right, bottom) = (PLOT.0 as f64, PLOT.1 as f64, PLOT.2 as f64, PLOT.3 as f64);
    let train: Vec<(f64, f64)> = log
        .iter()
        .filter(|l| l.loss.is_finite())
        .map(|l| (l.step as f64, l.loss))
        .collect();
    let lr: Vec<(f64, f64)> = log
        .iter()
        .filter(|l| l.lr.is_finite())
        .map(|l| (l.step as f64, l.lr))
        .collect();
    let eval: Vec<(f64, f64)> = eval
        .iter()
        .filter(|(_, v)| v.is_finite())
        .map(|&(s, v)| (s as f64, v))
        .collect();

    // Ranges: steps from the first to the last logged, losses and LR from 0.
    let steps = train.iter().chain(&eval).chain(&lr).map(|p| p.0);
    let (x_lo, x_hi) = steps.fold((f64::MAX, f64::MIN), |(lo, hi), x| (lo.min(x), hi.max(x)));
    let (x_lo, x_hi) = if x_lo > x_hi { (0.0, 1.0) } else { (x_lo, x_hi.max(x_lo + 1.0)) };
    let loss_max = train.iter().chain(&eval).map(|p| p.1).fold(0.0, f64::max);
    let loss_ticks = ticks(0.0, if loss_max > 0.0 { loss_max * 1.05 } else { 1.0 });
    let loss_hi = loss_ticks.last().copied().unwrap_or(1.0).max(1e-12);
    let lr_max = lr.iter().map(|p| p.1).fold(0.0, f64::max);
    let lr_ticks = ticks(0.0, if lr_max > 0.0 { lr_max * 1.05 } else { 1.0 });
    let lr_hi = lr_ticks.last().copied().unwrap_or(1.0).max(1e-30);
    // Whole steps inside the range.
    let mut x_ticks: Vec<f64> = ticks(x_lo, x_hi)
        .into_iter()
        .map(f64::round)
        .filter(|&t| t >= x_lo && t <= x_hi)
        .collect();
    x_ticks.dedup();

    let px = |x: f64| left + (x - x_lo) / (x_hi - x_lo) * (right - left);
    let py = |v: f64, hi: f64| bottom - (v / hi).clamp(0.0, 1.0) * (bottom - top);

    // Grid and tick labels: loss on the left, learning rate on the right, steps below.
    let loss_decimals = decimals(&loss_ticks);
    for &t in &loss_ticks {
        let y = py(t, loss_hi);
        line(&mut img, (left, y), (right, y), GRID);
        line(&mut img, (left - 5.0, y), (left, y), AXIS);
        let label = format!("{t:.loss_decimals$}");
        text(&mut img, &label, left as i64 - 8 - width(&label, 1), y as i64 - 4, 1, TEXT);
    }
    if !lr.is_empty() {
        for &t in &lr_ticks {
            let y = py(t, lr_hi);
            line(&mut img, (right, y), (right + 5.0, y), AXIS);
            text(&mut img, &lr_label(t), right as i64 + 8, y as i64 - 4, 1, TEXT);
        }
    }
    for &t in &x_ticks {
        let x = px(t);
        line(&mut img, (x, top), (x, bottom), GRID);
        line(&mut img, (x, bottom), (x, bottom + 5.0), AXIS);
        let label = format!("{t:.0}");
        text(&mut img, &label, x as i64 - width(&label, 1) / 2, bottom as i64 + 9, 1, TEXT);
    }
    // The plot frame.
    line(&mut img, (left, top), (right, top), AXIS);
    line(&mut img, (left, bottom), (right, bottom), AXIS);
    line(&mut img, (left, top), (left, bottom), AXIS);
    line(&mut img, (right, top), (right, bottom), AXIS);

    // Curves: the LR first, so that the loss is drawn over it.
    polyline(&mut img, &lr, |(x, v)| (px(x), py(v, lr_hi)), LR);
    polyline(&mut img, &train, |(x, v)| (px(x), py(v, loss_hi)), TRAIN);
    polyline(&mut img, &eval, |(x, v)| (px(x), py(v, loss_hi)), EVAL);
    for &(x, v) in &eval {
        dot(&mut img, px(x), py(v, loss_hi), EVAL);
    }

    // Title and axis labels.
    let title = if train.is_empty() {
        "Training loss (no steps logged yet)".to_string()
    } else {
        format!("Training loss ({} steps)", train.len())
    };
    text(&mut img, &title, (WIDTH as i64 - width(&title, 2)) / 2, 10, 2, TEXT);
    text(&mut img, "loss", left as i64 - 8 - width("loss", 1), top as i64 - 20, 1, TEXT);
    if !lr.is_empty() {
        text(&mut img, "learning rate", (right as i64 + 8 - width("learning rate", 1) / 2).min(WIDTH as i64 - width("learning rate", 1) - 4), top as i64 - 20, 1, LR);
    }
    text(&mut img, "step", ((left + right) / 2.0) as i64 - width("step", 1) / 2, HEIGHT as i64 - 20, 1, TEXT);

    // Legend, in the plot's upper right corner.
    let mut entries: Vec<(&str, Rgb<u8>)> = vec![("train loss", TRAIN)];
    if !eval.is_empty() {
        entries.push(("eval loss", EVAL));
    }
    if !lr.is_empty() {
        entries.push(("learning rate (right axis)", LR));
    }
    let text_w = entries.iter().map(|(t, _)| width(t, 1)).max().unwrap_or(0);
    let (box_w, box_h) = (text_w + 44, entries.len() as i64 * 14 + 8);
    let (bx, by) = (right as i64 - box_w - 8, top as i64 + 8);
    fill(&mut img, bx, by, box_w, box_h, WHITE);
    let (bxf, byf, bwf, bhf) = (bx as f64, by as f64, box_w as f64, box_h as f64);
    line(&mut img, (bxf, byf), (bxf + bwf, byf), AXIS);
    line(&mut img, (bxf, byf + bhf), (bxf + bwf, byf + bhf), AXIS);
    line(&mut img, (bxf, byf), (bxf, byf + bhf), AXIS);
    line(&mut img, (bxf + bwf, byf), (bxf + bwf, byf + bhf), AXIS);
    for (k, (label, color)) in entries.iter().enumerate() {
        let y = by + 8 + k as i64 * 14;
        let yf = (y + 3) as f64;
        line(&mut img, ((bx + 8) as f64, yf), ((bx + 30) as f64, yf), *color);
        line(&mut img, ((bx + 8) as f64, yf + 1.0), ((bx + 30) as f64, yf + 1.0), *color);
        text(&mut img, label, bx + 36, y, 1, TEXT);
    }
    img
}

/// "Nice" tick values (1, 2 or 5 times a power of ten apart, about six of
/// them) covering `[lo, hi]`: the first at or below `lo`, the last at or above `hi`.
fn ticks(lo: f64, hi: f64) -> Vec<f64> {
    if !(lo.is_finite() && hi.is_finite()) || hi <= lo {
        return vec![lo, lo + 1.0];
    }
    let raw = (hi - lo) / 6.0;
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * magnitude);
    // The slack keeps 0.001 / 0.0002 = 5.000000000000001 from adding a tick.
    let first = (lo / step + 1e-9).floor();
    let last = (hi / step - 1e-9).ceil();
    let count = ((last - first) as usize).min(20);
    // Multiplying (not adding) keeps 0.3 from printing as 0.30000000000000004.
    (0..=count).map(|i| (first + i as f64) * step).collect()
}

/// Decimals that tell the ticks apart (none for whole numbers).
fn decimals(ticks: &[f64]) -> usize {
    let step = match ticks {
        [a, b, ..] => b - a,
        _ => 1.0,
    };
    if step >= 1.0 {
        0
    } else {
        (-step.log10().floor()).max(0.0) as usize
    }
}

/// A learning-rate tick: `0` or scientific (`2.0e-4`).
fn lr_label(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else {
        format!("{v:.1e}")
    }
}

/// Pixel width of `s` at `scale`.
fn width(s: &str, scale: i64) -> i64 {
    s.chars().count() as i64 * 8 * scale
}

/// Draws `s` with its top-left corner at `(x, y)`, each font pixel a
/// `scale`×`scale` block; characters the font lacks are drawn as `?`.
fn text(img: &mut RgbImage, s: &str, x: i64, y: i64, scale: i64, color: Rgb<u8>) {
    for (k, c) in s.chars().enumerate() {
        let glyph = font8x8::BASIC_FONTS
            .get(c)
            .or_else(|| font8x8::BASIC_FONTS.get('?'))
            .unwrap_or([0; 8]);
        let gx = x + k as i64 * 8 * scale;
        for (row, bits) in glyph.iter().enumerate() {
            for col in 0..8 {
                if bits & (1 << col) != 0 {
                    fill(img, gx + col * scale, y + row as i64 * scale, scale, scale, color);
                }
            }
        }
    }
}

/// A filled rectangle, clipped to the image.
fn fill(img: &mut RgbImage, x: i64, y: i64, w: i64, h: i64, color: Rgb<u8>) {
    for yy in y.max(0)..(y + h).min(img.height() as i64) {
        for xx in x.max(0)..(x + w).min(img.width() as i64) {
            img.put_pixel(xx as u32, yy as u32, color);
        }
    }
}

/// A small filled square marking a point.
fn dot(img: &mut RgbImage, x: f64, y: f64, color: Rgb<u8>) {
    fill(img, x as i64 - 2, y as i64 - 2, 5, 5, color);
}

/// Consecutive points joined by two-pixel-wide lines.
fn polyline(img: &mut RgbImage, points: &[(f64, f64)], to_px: impl Fn((f64, f64)) -> (f64, f64), color: Rgb<u8>) {
    for pair in points.windows(2) {
        let (a, b) = (to_px(pair[0]), to_px(pair[1]));
        line(img, a, b, color);
        line(img, (a.0, a.1 + 1.0), (b.0, b.1 + 1.0), color);
    }
}

/// A straight line, one pixel wide, clipped to the image.
fn line(img: &mut RgbImage, from: (f64, f64), to: (f64, f64), color: Rgb<u8>) {
    let steps = (to.0 - from.0)
        .abs()
        .max((to.1 - from.1).abs())
        .ceil()
        .max(1.0) as usize;
    for i in 0..=steps {
        let t = i as f64 / steps as f64;
        let (x, y) = (from.0 + (to.0 - from.0) * t, from.1 + (to.1 - from.1) * t);
        if x >= 0.0 && y >= 0.0 && (x as u32) < img.width() && (y as u32) < img.height() {
            img.put_pixel(x as u32, y as u32, color);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(n: usize) -> Vec<StepLog> {
        (1..=n)
            .map(|step| StepLog {
                step,
                epoch: step as f64 / 10.0,
                loss: 4.0 / (1.0 + step as f64 * 0.1),
                lr: 1e-3 * (1.0 - step as f64 / n as f64),
                grad_norm: 1.0,
                tokens: 10,
            })
            .collect()
    }

    /// Pixels in a rectangle that are neither white nor grid grey.
    fn inked(img: &RgbImage, (x0, y0, x1, y1): (u32, u32, u32, u32)) -> usize {
        let mut n = 0;
        for y in y0..y1 {
            for x in x0..x1 {
                let p = *img.get_pixel(x, y);
                if p != WHITE && p != GRID {
                    n += 1;
                }
            }
        }
        n
    }

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        assert_eq!(ticks(0.0, 4.2), vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
        let lr = ticks(0.0, 1e-3);
        assert_eq!(lr.len(), 6, "{lr:?}");
        assert!((lr[5] - 1e-3).abs() < 1e-12 && (lr[1] - 2e-4).abs() < 1e-12, "{lr:?}");
        assert_eq!(ticks(1.0, 30.0).first(), Some(&0.0));
        assert_eq!(decimals(&[0.0, 0.5, 1.0]), 1);
        assert_eq!(decimals(&[0.0, 2.0]), 0);
        assert_eq!(lr_label(2e-4), "2.0e-4");
    }

    #[test]
    fn chart_has_title_ticks_labels_and_legend() {
        let img = render(&log(30), &[(10, 3.0), (20, 2.5), (30, 2.2)]);
        assert_eq!(img.dimensions(), (WIDTH, HEIGHT));
        let (left, top, right, bottom) = PLOT;
        // Title band, left tick labels, right (LR) tick labels, step labels.
        assert!(inked(&img, (0, 0, WIDTH, 40)) > 200, "no title");
        assert!(inked(&img, (0, top, left - 6, bottom)) > 40, "no loss tick labels");
        assert!(inked(&img, (right + 6, top, WIDTH, bottom)) > 60, "no LR tick labels");
        assert!(inked(&img, (left, bottom + 6, right, HEIGHT)) > 40, "no step labels");
        // Legend: three entries, with a sample of each curve's colour.
        let legend = (right - 260, top + 4, right - 4, top + 60);
        assert!(inked(&img, legend) > 300, "no legend");
        for color in [TRAIN, EVAL, LR] {
            let found = (legend.1..legend.3).any(|y| (legend.0..legend.2).any(|x| *img.get_pixel(x, y) == color));
            assert!(found, "legend lacks {color:?}");
        }
    }

    #[test]
    fn empty_and_single_step_logs_still_draw_axes() {
        for n in [0, 1] {
            let img = render(&log(n), &[]);
            assert_eq!(img.dimensions(), (WIDTH, HEIGHT));
            assert!(inked(&img, (0, 0, WIDTH, 40)) > 100);
        }
    }
}
