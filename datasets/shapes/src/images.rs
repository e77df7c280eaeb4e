//! Images of one coloured shape on a plain light background.

use image::{Rgb, RgbImage};

use crate::Rng;

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
    /// Image side in pixels (images are square).
    pub size: u32,
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
            centre: (cx, cy),
            radius,
        }
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

/// PNG bytes of an image.
pub fn png_bytes(image: &RgbImage) -> std::result::Result<Vec<u8>, String> {
    let mut out = std::io::Cursor::new(Vec::new());
    image
        .write_to(&mut out, image::ImageFormat::Png)
        .map_err(|e| e.to_string())?;
    Ok(out.into_inner())
}
