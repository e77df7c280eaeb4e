//! Images of one coloured shape: on a plain light background (the classic
//! style, [`ShapeSpec::random`] and [`render`]), or in the varied and unlike
//! styles of [`crate::Style`] ([`ShapeSpec::random_styled`] and
//! [`render_styled`]): any aspect ratio from 1:4 to 4:1, small to large
//! shapes anywhere, and backgrounds that are tinted, noisy or (unlike style
//! only, never in training) graded, dark, speckled or striped.

use image::{Rgb, RgbImage};

use crate::{Rng, Style};

/// The shapes drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Shape {
    /// A filled disc.
    Circle,
    /// A filled axis-aligned square.
    Square,
    /// A filled upward triangle.
    Triangle,
}

impl Shape {
    /// Every shape, in class order.
    pub const ALL: [Shape; 3] = [Shape::Circle, Shape::Square, Shape::Triangle];

    /// The English name (`circle`).
    pub fn name(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
        }
    }
}

/// The colours a shape is drawn in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Colour {
    /// Red.
    Red,
    /// Green.
    Green,
    /// Blue.
    Blue,
    /// Yellow.
    Yellow,
}

impl Colour {
    /// Every colour, in class order.
    pub const ALL: [Colour; 4] = [Colour::Red, Colour::Green, Colour::Blue, Colour::Yellow];

    /// The English name (`red`).
    pub fn name(self) -> &'static str {
        match self {
            Colour::Red => "red",
            Colour::Green => "green",
            Colour::Blue => "blue",
            Colour::Yellow => "yellow",
        }
    }

    /// A base RGB value, jittered a little by `rng`.
    fn rgb(self, rng: &mut Rng) -> [u8; 3] {
        let base: [i32; 3] = match self {
            Colour::Red => [215, 35, 35],
            Colour::Green => [35, 165, 55],
            Colour::Blue => [35, 70, 215],
            Colour::Yellow => [230, 200, 25],
        };
        base.map(|c| (c + rng.range(0, 30) as i32 - 15).clamp(0, 255) as u8)
    }
}

/// What one image shows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ShapeSpec {
    /// The shape.
    pub shape: Shape,
    /// Its colour.
    pub colour: Colour,
    /// Image width in pixels (and height too, unless `height` is set).
    pub size: u32,
    /// Image height in pixels when it differs from `size` (styled images);
    /// `None` for the classic square images.
    pub height: Option<u32>,
    /// Centre, in pixels.
    pub centre: (f64, f64),
    /// Half extent of the shape, in pixels.
    pub radius: f64,
}

impl ShapeSpec {
    /// A random placement of `shape` in `colour`: image side 64–160 px, shape
    /// half-extent 18–40% of the side, anywhere it fits whole.
    pub fn random(shape: Shape, colour: Colour, rng: &mut Rng) -> Self {
        let size = rng.range(64, 160) as u32;
        let side = f64::from(size);
        let radius = side * rng.range_f(0.18, 0.40);
        let margin = radius + 2.0;
        let cx = rng.range_f(margin, side - margin);
        let cy = rng.range_f(margin, side - margin);
        Self {
            shape,
            colour,
            size,
            height: None,
            centre: (cx, cy),
            radius,
        }
    }

    /// A random placement for a non-classic `style`: aspect ratio 1:4 to 4:1
    /// (long side 96-224 px varied, 128-288 px unlike), shape half-extent 10-45%
    /// of the short side (at least 5% of the long side and 5 px), anywhere it
    /// fits whole.
    pub fn random_styled(shape: Shape, colour: Colour, style: Style, rng: &mut Rng) -> Self {
        let long = match style {
            Style::Unlike => rng.range(128, 288),
            _ => rng.range(96, 224),
        } as f64;
        // Log-uniform ratio so 1:4 and 4:1 are as likely as 1:1.5.
        let ratio = (rng.range_f(-1.0, 1.0) * 4f64.ln()).exp();
        let (w, h) = if ratio >= 1.0 {
            (long, (long / ratio).max(24.0))
        } else {
            ((long * ratio).max(24.0), long)
        };
        let short = w.min(h);
        // At least 5% of the long side: a model looks at the image padded to
        // a square and scaled down, and a smaller shape shrinks to a few
        // pixels there, too few to tell a circle from a square.
        let radius = (short * rng.range_f(0.10, 0.45))
            .max(long * 0.05)
            .max(5.0)
            .min(short / 2.0 - 2.0);
        let margin = radius + 2.0;
        let cx = rng.range_f(margin, (w - margin).max(margin + 0.5));
        let cy = rng.range_f(margin, (h - margin).max(margin + 0.5));
        Self {
            shape,
            colour,
            size: w.round() as u32,
            height: Some(h.round() as u32),
            centre: (cx, cy),
            radius,
        }
    }

    /// Image height in pixels.
    pub fn height(&self) -> u32 {
        self.height.unwrap_or(self.size)
    }

    /// Whether the point `(x, y)` lies inside the shape.
    pub fn contains(&self, x: f64, y: f64) -> bool {
        let (dx, dy) = (x - self.centre.0, y - self.centre.1);
        let r = self.radius;
        match self.shape {
            Shape::Circle => dx * dx + dy * dy <= r * r,
            // Same area as the circle would be too big; 0.85 r keeps sizes comparable.
            Shape::Square => dx.abs() <= 0.85 * r && dy.abs() <= 0.85 * r,
            Shape::Triangle => {
                // Apex at (0, -r), base from (-r, 0.8 r) to (r, 0.8 r).
                let bottom = 0.8 * r;
                if dy < -r || dy > bottom {
                    return false;
                }
                let half_width = r * (dy + r) / (bottom + r);
                dx.abs() <= half_width
            }
        }
    }
}

/// Renders `spec` on a light, nearly grey background (2x2 supersampled edges).
pub fn render(spec: &ShapeSpec, rng: &mut Rng) -> RgbImage {
    let grey = rng.range(222, 250) as i32;
    let background = [0, 1, 2].map(|_| (grey + rng.range(0, 8) as i32 - 4).clamp(0, 255) as u8);
    let fill = spec.colour.rgb(rng);
    RgbImage::from_fn(spec.size, spec.size, |x, y| {
        let mut hits = 0u32;
        for (ox, oy) in [(0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75)] {
            if spec.contains(f64::from(x) + ox, f64::from(y) + oy) {
                hits += 1;
            }
        }
        let mix = |b: u8, f: u8| ((u32::from(b) * (4 - hits) + u32::from(f) * hits + 2) / 4) as u8;
        Rgb([
            mix(background[0], fill[0]),
            mix(background[1], fill[1]),
            mix(background[2], fill[2]),
        ])
    })
}

/// How a styled image's background is painted.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Background {
    /// Light, nearly grey (the classic background).
    Plain([f64; 3]),
    /// A light pastel tint.
    Tinted([f64; 3]),
    /// A light colour with per-pixel noise of this amplitude.
    Noisy([f64; 3], f64),
    /// Unlike only: a vertical gradient between two light colours.
    Gradient([f64; 3], [f64; 3]),
    /// Unlike only: a dark grey.
    Dark([f64; 3]),
    /// Unlike only: a light colour with sparse black and white specks.
    Speckled([f64; 3]),
    /// Unlike only: light stripes of two shades, this many pixels wide.
    Stripes([f64; 3], [f64; 3], u32),
}

fn light(rng: &mut Rng) -> [f64; 3] {
    let grey = rng.range_f(222.0, 250.0);
    [0, 1, 2].map(|_| grey + rng.range_f(-4.0, 4.0))
}

/// A pastel: white mixed with up to 30% of a random colour, so it never reads
/// as one of the shape colours.
fn pastel(rng: &mut Rng, strength: f64) -> [f64; 3] {
    let mix = rng.range_f(0.08, strength);
    [0, 1, 2].map(|_| 250.0 * (1.0 - mix) + rng.range_f(0.0, 255.0) * mix)
}

impl Background {
    fn random(style: Style, rng: &mut Rng) -> Self {
        match style {
            Style::Unlike => match rng.range(0, 3) {
                0 => Background::Gradient(pastel(rng, 0.3), pastel(rng, 0.3)),
                1 => Background::Dark([rng.range_f(30.0, 70.0); 3]),
                2 => Background::Speckled(pastel(rng, 0.2)),
                _ => Background::Stripes(pastel(rng, 0.2), light(rng), rng.range(3, 12) as u32),
            },
            _ => match rng.range(0, 3) {
                0 => Background::Plain(light(rng)),
                1 => Background::Tinted(pastel(rng, 0.3)),
                2 => Background::Noisy(light(rng), rng.range_f(8.0, 30.0)),
                _ => Background::Noisy(pastel(rng, 0.3), rng.range_f(8.0, 30.0)),
            },
        }
    }

    fn at(&self, x: u32, y: u32, height: u32, rng: &mut Rng) -> [f64; 3] {
        match *self {
            Background::Plain(c) | Background::Tinted(c) | Background::Dark(c) => c,
            Background::Noisy(c, amplitude) => {
                let n = rng.range_f(-amplitude, amplitude);
                c.map(|v| v + n + rng.range_f(-amplitude, amplitude) * 0.3)
            }
            Background::Gradient(top, bottom) => {
                let t = f64::from(y) / f64::from(height.max(2) - 1);
                [0, 1, 2].map(|i| top[i] * (1.0 - t) + bottom[i] * t)
            }
            Background::Speckled(c) => match rng.range(0, 19) {
                0 => [10.0; 3],
                1 => [250.0; 3],
                _ => c,
            },
            Background::Stripes(a, b, width) => {
                if ((x + y) / width.max(1)).is_multiple_of(2) {
                    a
                } else {
                    b
                }
            }
        }
    }
}

/// Renders `spec` in `style` (2x2 supersampled edges); the classic style is
/// exactly [`render`].
pub fn render_styled(spec: &ShapeSpec, style: Style, rng: &mut Rng) -> RgbImage {
    if style == Style::Classic {
        return render(spec, rng);
    }
    let background = Background::random(style, rng);
    let fill = spec.colour.rgb(rng).map(f64::from);
    let height = spec.height();
    let mut image = RgbImage::new(spec.size, height);
    for y in 0..height {
        for x in 0..spec.size {
            let mut hits = 0.0;
            for (ox, oy) in [(0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75)] {
                if spec.contains(f64::from(x) + ox, f64::from(y) + oy) {
                    hits += 0.25;
                }
            }
            let back = background.at(x, y, height, rng);
            let pixel = [0, 1, 2].map(|i| {
                (back[i] * (1.0 - hits) + fill[i] * hits)
                    .round()
                    .clamp(0.0, 255.0) as u8
            });
            image.put_pixel(x, y, Rgb(pixel));
        }
    }
    image
}

/// PNG bytes of an image.
pub fn png_bytes(image: &RgbImage) -> std::result::Result<Vec<u8>, String> {
    let mut out = std::io::Cursor::new(Vec::new());
    image
        .write_to(&mut out, image::ImageFormat::Png)
        .map_err(|e| e.to_string())?;
    Ok(out.into_inner())
}
