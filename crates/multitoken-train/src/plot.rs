//! `loss.png`: the loss curve (blue) and the learning rate (orange, scaled to
//! the plot height) over steps, drawn without fonts (no text, so no system
//! font dependency); the axes span step 1..last and loss 0..max.

use std::path::Path;

use image::{Rgb, RgbImage};

use crate::trainer::StepLog;
use crate::{Error, Result};

const WIDTH: u32 = 640;
const HEIGHT: u32 = 360;
const MARGIN: u32 = 24;

/// Draws the curves of `log` into a PNG at `path` (temporary file + rename).
pub fn write_loss_png(log: &[StepLog], path: &Path) -> Result<()> {
    let mut img = RgbImage::from_pixel(WIDTH, HEIGHT, Rgb([255, 255, 255]));
    let axis = Rgb([80, 80, 80]);
    let (x0, y0, x1, y1) = (MARGIN, HEIGHT - MARGIN, WIDTH - MARGIN, MARGIN);
    line(
        &mut img,
        (x0 as f64, y0 as f64),
        (x1 as f64, y0 as f64),
        axis,
    );
    line(
        &mut img,
        (x0 as f64, y0 as f64),
        (x0 as f64, y1 as f64),
        axis,
    );
    let finite: Vec<&StepLog> = log.iter().filter(|l| l.loss.is_finite()).collect();
    if finite.len() >= 2 {
        let max_loss = finite
            .iter()
            .map(|l| l.loss)
            .fold(f64::MIN, f64::max)
            .max(1e-12);
        let max_lr = finite.iter().map(|l| l.lr).fold(0.0, f64::max).max(1e-30);
        let (first, last) = (finite[0].step as f64, finite[finite.len() - 1].step as f64);
        let span = (last - first).max(1.0);
        let px = |step: usize| x0 as f64 + (step as f64 - first) / span * (x1 - x0) as f64;
        let py = |v: f64, max: f64| y0 as f64 - (v / max).clamp(0.0, 1.0) * (y0 - y1) as f64;
        for pair in finite.windows(2) {
            let (a, b) = (pair[0], pair[1]);
            line(
                &mut img,
                (px(a.step), py(a.lr, max_lr)),
                (px(b.step), py(b.lr, max_lr)),
                Rgb([240, 150, 40]),
            );
            line(
                &mut img,
                (px(a.step), py(a.loss, max_loss)),
                (px(b.step), py(b.loss, max_loss)),
                Rgb([30, 90, 200]),
            );
        }
    }
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
