//! The report's bar chart: one horizontal bar per category (accuracy 0-100%,
//! with its value and count), the overall score as the first bar, a title and
//! a 0/25/50/75/100% grid.
//!
//! Text is drawn from the embedded `font8x8` bitmap font, as `loss.png` is, so
//! the chart looks the same on a machine with no fonts.

use font8x8::UnicodeFonts;
use image::{Rgb, RgbImage};

const WIDTH: u32 = 900;
const ROW: u32 = 30;
const TOP: u32 = 64;
const LEFT: u32 = 300;
const RIGHT: u32 = 130;
const BOTTOM: u32 = 40;

const WHITE: Rgb<u8> = Rgb([255, 255, 255]);
const TEXT: Rgb<u8> = Rgb([20, 20, 20]);
const GRID: Rgb<u8> = Rgb([225, 225, 225]);
const AXIS: Rgb<u8> = Rgb([80, 80, 80]);
const BAR: Rgb<u8> = Rgb([40, 110, 200]);
const OVERALL: Rgb<u8> = Rgb([30, 150, 70]);

/// One bar: label, accuracy in [0, 1], questions.
#[derive(Debug, Clone, PartialEq)]
pub struct Bar {
    /// Category name.
    pub label: String,
    /// Accuracy in [0, 1].
    pub value: f64,
    /// Questions behind it.
    pub n: usize,
}

/// Draws `text` at (x, y), each font pixel `scale` pixels wide; characters
/// the font lacks are drawn as `?`.
fn draw_text(img: &mut RgbImage, x: u32, y: u32, text: &str, scale: u32, colour: Rgb<u8>) {
    for (i, c) in text.chars().enumerate() {
        let glyph = font8x8::BASIC_FONTS
            .get(c)
            .or_else(|| font8x8::BASIC_FONTS.get('?'))
            .unwrap_or([0; 8]);
        let gx = x + i as u32 * 8 * scale;
        for (row, bits) in glyph.iter().enumerate() {
            for col in 0..8u32 {
                if bits & (1 << col) == 0 {
                    continue;
                }
                for dy in 0..scale {
                    for dx in 0..scale {
                        let (px, py) = (gx + col * scale + dx, y + row as u32 * scale + dy);
                        if px < img.width() && py < img.height() {
                            img.put_pixel(px, py, colour);
                        }
                    }
                }
            }
        }
    }
}

fn fill(img: &mut RgbImage, x0: u32, y0: u32, x1: u32, y1: u32, colour: Rgb<u8>) {
    for y in y0..y1.min(img.height()) {
        for x in x0..x1.min(img.width()) {
            img.put_pixel(x, y, colour);
        }
    }
}

/// Cuts a label to `max` characters (an ellipsis of dots marks the cut).
fn fit(label: &str, max: usize) -> String {
    if label.chars().count() <= max {
        return label.to_string();
    }
    let kept: String = label.chars().take(max.saturating_sub(2)).collect();
    format!("{kept}..")
}

/// The chart: `title`, the overall bar, then `bars`.
pub fn render(title: &str, overall: &Bar, bars: &[Bar]) -> RgbImage {
    let rows = bars.len() as u32 + 1;
    let height = TOP + rows * ROW + BOTTOM;
    let mut img = RgbImage::from_pixel(WIDTH, height, WHITE);
    draw_text(&mut img, 16, 16, &fit(title, 54), 2, TEXT);
    let plot_w = WIDTH - LEFT - RIGHT;
    // Grid and its labels.
    for k in 0..=4u32 {
        let x = LEFT + plot_w * k / 4;
        fill(
            &mut img,
            x,
            TOP - 6,
            x + 1,
            TOP + rows * ROW,
            if k == 0 { AXIS } else { GRID },
        );
        let label = format!("{}%", k * 25);
        draw_text(
            &mut img,
            x.saturating_sub(label.len() as u32 * 4),
            TOP + rows * ROW + 10,
            &label,
            1,
            TEXT,
        );
    }
    for (i, bar) in std::iter::once(overall).chain(bars).enumerate() {
        let y = TOP + i as u32 * ROW;
        let value = if bar.value.is_finite() {
            bar.value.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let w = (value * f64::from(plot_w)).round() as u32;
        fill(
            &mut img,
            LEFT + 1,
            y + 6,
            LEFT + 1 + w,
            y + ROW - 6,
            if i == 0 { OVERALL } else { BAR },
        );
        draw_text(&mut img, 12, y + 11, &fit(&bar.label, 35), 1, TEXT);
        let text = format!("{:.1}% (n={})", 100.0 * value, bar.n);
        draw_text(&mut img, LEFT + w + 8, y + 11, &text, 1, TEXT);
    }
    img
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_are_as_long_as_their_values() {
        let overall = Bar {
            label: "overall".into(),
            value: 0.5,
            n: 4,
        };
        let bars = vec![
            Bar {
                label: "a".into(),
                value: 1.0,
                n: 2,
            },
            Bar {
                label: "b".into(),
                value: 0.0,
                n: 2,
            },
        ];
        let img = render("test", &overall, &bars);
        assert_eq!(img.height(), TOP + 3 * ROW + BOTTOM);
        let plot_w = WIDTH - LEFT - RIGHT;
        let mid = |i: u32| TOP + i * ROW + ROW / 2;
        // Overall: green up to half the plot, white after.
        assert_eq!(*img.get_pixel(LEFT + plot_w / 2 - 2, mid(0)), OVERALL);
        assert_ne!(*img.get_pixel(LEFT + plot_w / 2 + 30, mid(0)), OVERALL);
        // Bar a: full length; bar b: none.
        assert_eq!(*img.get_pixel(LEFT + plot_w - 2, mid(1)), BAR);
        assert_ne!(*img.get_pixel(LEFT + 4, mid(2)), BAR);
    }
}
