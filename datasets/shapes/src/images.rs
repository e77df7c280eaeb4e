//! Images of one coloured shape: on a plain light background (the classic
//! style, [`ShapeSpec::random`] and [`render`]), or in the varied and unlike
//! styles of [`crate::Style`] ([`ShapeSpec::random_styled`] and
//! [`render_styled`]): any aspect ratio from 1:4 to 4:1, small to large
//! shapes anywhere, a little tilted or stretched, in a wider range of shades,
//! on backgrounds that are plain, tinted, noisy, checkered, blotchy,
//! vignetted, ruled, mid-grey, graded, dark, speckled, striped, cloudy,
//! camouflaged, newsprint or bokeh (out-of-focus lights) (varied) or,
//! unlike style only and never in training (unlike v9), a woven tartan,
//! hexagonal tiles, herringbone parquet or patches of pencil hatching.

use image::{Rgb, RgbImage};

use crate::{mix64, unit_f64, Rng, Style};

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

    /// A shade for the styled images: half the time [`Colour::rgb`]'s, else
    /// any hue, saturation and value that a person would still call by this
    /// name (pure `#ff0000`, dark `#008000` and pale yellows included), so a
    /// model does not learn one exact paint per colour.
    fn rgb_styled(self, rng: &mut Rng) -> [u8; 3] {
        if rng.range(0, 1) == 0 {
            return self.rgb(rng);
        }
        let (hue, saturation, value) = match self {
            Colour::Red => (
                rng.range_f(-12.0, 10.0),
                rng.range_f(0.6, 1.0),
                rng.range_f(0.6, 1.0),
            ),
            Colour::Green => (
                rng.range_f(95.0, 145.0),
                rng.range_f(0.5, 1.0),
                rng.range_f(0.45, 1.0),
            ),
            Colour::Blue => (
                rng.range_f(205.0, 240.0),
                rng.range_f(0.55, 1.0),
                rng.range_f(0.5, 1.0),
            ),
            Colour::Yellow => (
                rng.range_f(47.0, 60.0),
                rng.range_f(0.65, 1.0),
                rng.range_f(0.82, 1.0),
            ),
        };
        hsv_to_rgb(hue, saturation, value)
    }
}

/// RGB bytes of a hue in degrees (any real, wrapped), saturation and value in `[0, 1]`.
fn hsv_to_rgb(hue: f64, saturation: f64, value: f64) -> [u8; 3] {
    let h = hue.rem_euclid(360.0) / 60.0;
    let c = value * saturation;
    let x = c * (1.0 - (h % 2.0 - 1.0).abs());
    let (r, g, b) = match h as u32 {
        0 => (c, x, 0.0),
        1 => (x, c, 0.0),
        2 => (0.0, c, x),
        3 => (0.0, x, c),
        4 => (x, 0.0, c),
        _ => (c, 0.0, x),
    };
    let m = value - c;
    [r, g, b].map(|v| ((v + m) * 255.0).round().clamp(0.0, 255.0) as u8)
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
    /// Rotation of the shape in radians (0 for classic images).
    pub tilt: f64,
    /// Width over height of the shape (1 for classic images).
    pub stretch: f64,
    /// A triangle's apex shifted sideways by this fraction of `radius` (0:
    /// isosceles with the apex centred, the classic triangle).
    pub apex: f64,
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
            tilt: 0.0,
            stretch: 1.0,
            apex: 0.0,
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
        // Tilt and stretch move corners out to ~1.2 r (square) or ~1.45 r
        // (triangle) from the centre: `extent` is how far the shape reaches,
        // the radius that far over `reach`, so that it stays whole.
        let reach = match shape {
            Shape::Circle => 1.08,
            Shape::Square => 1.25,
            Shape::Triangle => 1.45,
        };
        let extent = (short * rng.range_f(0.10, 0.45))
            .max(long * 0.05 * reach)
            .max(5.0 * reach)
            .min(short / 2.0 - 2.0);
        let margin = extent + 2.0;
        let cx = rng.range_f(margin, (w - margin).max(margin + 0.5));
        let cy = rng.range_f(margin, (h - margin).max(margin + 0.5));
        // A little tilted or stretched, never so much that a square reads as
        // a diamond or a rectangle, or a circle as an oval. The varied style
        // tilts up to 0.4 rad (23 degrees; 0.2-0.25 rad before phase 8 of the
        // demo model: people's drawings are turned further, and the probe
        // `blind2.py` turns shapes up to 25 degrees); the unlike style keeps
        // its draws.
        let max_tilt = |others: f64| if style == Style::Varied { 0.4 } else { others };
        let (tilt, stretch, apex) = match shape {
            Shape::Circle => (0.0, rng.range_f(0.92, 1.08), 0.0),
            Shape::Square => (
                rng.range_f(-max_tilt(0.2), max_tilt(0.2)),
                rng.range_f(0.93, 1.07),
                0.0,
            ),
            Shape::Triangle => (
                rng.range_f(-max_tilt(0.25), max_tilt(0.25)),
                rng.range_f(0.8, 1.25),
                rng.range_f(-0.5, 0.5),
            ),
        };
        Self {
            shape,
            colour,
            size: w.round() as u32,
            height: Some(h.round() as u32),
            centre: (cx, cy),
            radius: extent / reach,
            tilt,
            stretch,
            apex,
        }
    }

    /// Image height in pixels.
    pub fn height(&self) -> u32 {
        self.height.unwrap_or(self.size)
    }

    /// Whether the point `(x, y)` lies inside the shape.
    pub fn contains(&self, x: f64, y: f64) -> bool {
        let (dx, dy) = (x - self.centre.0, y - self.centre.1);
        // Into the shape's own frame: undo the tilt, then the stretch.
        let (sin, cos) = self.tilt.sin_cos();
        let (dx, dy) = (dx * cos + dy * sin, -dx * sin + dy * cos);
        let stretch = self.stretch.sqrt();
        let (dx, dy) = (dx / stretch, dy * stretch);
        let r = self.radius;
        match self.shape {
            Shape::Circle => dx * dx + dy * dy <= r * r,
            // Same area as the circle would be too big; 0.85 r keeps sizes comparable.
            Shape::Square => dx.abs() <= 0.85 * r && dy.abs() <= 0.85 * r,
            Shape::Triangle => {
                // Apex at (apex r, -r), base from (-r, 0.8 r) to (r, 0.8 r).
                let bottom = 0.8 * r;
                if dy < -r || dy > bottom {
                    return false;
                }
                let t = (dy + r) / (bottom + r);
                let (left, right) = (
                    self.apex * r * (1.0 - t) - r * t,
                    self.apex * r * (1.0 - t) + r * t,
                );
                (left..=right).contains(&dx)
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
    /// Varied only: a checkerboard of two light colours, cells this many pixels wide.
    Checker([f64; 3], [f64; 3], u32),
    /// Varied only: soft blotches between two light colours (a product of
    /// two sines of these angular frequencies and phases).
    Blotches([f64; 3], [f64; 3], [f64; 4]),
    /// Varied only: a light centre darkening towards the corners to this colour.
    Vignette([f64; 3], [f64; 3]),
    /// Varied only: thin lines of the second colour every this many pixels,
    /// horizontal, vertical or both (`[rows, columns]`).
    Ruled([f64; 3], [f64; 3], u32, [bool; 2]),
    /// Varied only: a mid-grey tint (luminance 100-200) with light noise.
    MidTone([f64; 3], f64),
    /// Varied only: a gradient between two colours along this direction
    /// (a unit vector in pixel space).
    Gradient([f64; 3], [f64; 3], [f64; 2]),
    /// Varied only: a dark grey or dark tint.
    Dark([f64; 3]),
    /// Varied only: a light colour with sparse black and white specks.
    Speckled([f64; 3]),
    /// Varied only: stripes of two shades, this many pixels wide, at this
    /// angle (`[cos, sin]` of the stripes' normal).
    Stripes([f64; 3], [f64; 3], u32, [f64; 2]),
    /// Varied only: wisps of cloud or fog, a photo's sky rather than a
    /// pattern: a pale sky under lighter (or greyer) cloud, soft-edged,
    /// where warped fractal noise (`[cell in pixels, sideways stretch,
    /// cover]`) exceeds one less the cover (the seed draws the noise).
    Clouds([f64; 3], [f64; 3], [f64; 3], u64),
    /// Varied only: camouflage, hard-edged irregular blobs that no flat or
    /// soft kind has: three muted tones of one earthy tint, light to dark,
    /// laid by two fields of warped fractal noise of this cell size in
    /// pixels (the seed draws them).
    Camouflage([[f64; 3]; 3], f64, u64),
    /// Varied only: a newspaper page from afar, the print an image of a
    /// document shows: columns of grey word-dashes on light paper,
    /// `[line pitch, dash height, column width, gutter]` in pixels, in
    /// paragraphs with indented first and short last lines (the seed draws
    /// the words' lengths and the paragraphs' breaks).
    Newsprint([f64; 3], [f64; 3], [u32; 4], u64),
    /// Varied only: bokeh, a photo's out-of-focus lights: a muted mid-tone
    /// lifted faintly towards a light tint inside soft, overlapping discs,
    /// `[count, size, strength]` (how many; mean radius as a share of the
    /// geometric mean of width and height, at least 7 pixels; a disc's
    /// largest lift, overlaps up to 1.5 times it); the seed draws each
    /// disc's place, size and lift. Faint and soft so that none reads as a
    /// shape.
    Bokeh([f64; 3], [f64; 3], [f64; 3], u64),
    /// Unlike only: a tartan woven in a 2/2 twill (each pixel shows the
    /// thread across or the thread down, in diagonal steps): the same sett
    /// both ways, a light ground with bands of the second colour and thin
    /// lines of the third (`[period, band width, line offset, line width]`
    /// in pixels).
    Tartan([f64; 3], [f64; 3], [f64; 3], [u32; 4]),
    /// Unlike only: pointy-topped hexagonal tiles of a light colour between
    /// grout lines of the second, `[inradius, grout width, tile shading]` in
    /// pixels (each tile lighter or darker by up to the shading, by a hash
    /// of its place under the seed).
    Hexagons([f64; 3], [f64; 3], [f64; 3], u64),
    /// Unlike only: herringbone parquet: planks of a pale wood (or pastel)
    /// colour, `[width in pixels, length in widths]`, each lighter or darker
    /// by up to this much, with grain along them and darker seams between
    /// them (the seed hashes the shades and the grain).
    Herringbone([f64; 3], [u32; 2], f64, u64),
    /// Unlike only: a light paper with patches of pencil hatching in the
    /// second colour: `[patch size, line spacing, share of patches hatched]`
    /// (pixels, pixels, fraction), patches with wavy edges, each hatched at
    /// its own angle and some cross-hatched (the seed hashes it all).
    Hatching([f64; 3], [f64; 3], [f64; 3], u64),
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
    /// A background for a `style` image.
    fn random(style: Style, rng: &mut Rng) -> Self {
        match style {
            // Unlike v9's four families (v8's sunburst, marble and slate
            // veins, scratches and crumpled paper are gone, as v7's rings,
            // diagonal splits, dot grids and dark washes before them): each
            // unlike to every varied kind, and all of them light and
            // greyish, so that the saturated shape stands out.
            Style::Unlike => match rng.range(0, 3) {
                0 => {
                    let period = rng.range(24, 64) as u32;
                    let band = (f64::from(period) * rng.range_f(0.2, 0.4)).round() as u32;
                    let line = rng.range(1, 3) as u32;
                    let gap = f64::from(period - band - line);
                    let offset = band + (gap * rng.range_f(0.35, 0.65)).round() as u32;
                    let ground = if rng.range(0, 1) == 0 {
                        light(rng)
                    } else {
                        pastel(rng, 0.15)
                    };
                    let dim = rng.range_f(0.78, 0.92);
                    let band_colour = pastel(rng, 0.3).map(|v| v * dim);
                    let grey = rng.range_f(135.0, 175.0);
                    let line_colour = [0, 1, 2].map(|_| grey + rng.range_f(-10.0, 10.0));
                    Background::Tartan(
                        ground,
                        band_colour,
                        line_colour,
                        [period, band, offset, line],
                    )
                }
                1 => {
                    let tile = if rng.range(0, 1) == 0 {
                        light(rng)
                    } else {
                        pastel(rng, 0.22)
                    };
                    let grout = rng.range_f(150.0, 195.0);
                    let grout = [0, 1, 2].map(|_| grout + rng.range_f(-6.0, 6.0));
                    let geometry = [
                        rng.range_f(6.0, 18.0),
                        rng.range_f(1.2, 2.4),
                        rng.range_f(4.0, 14.0),
                    ];
                    Background::Hexagons(tile, grout, geometry, rng.next_u64())
                }
                2 => {
                    let wood = if rng.range(0, 2) == 0 {
                        pastel(rng, 0.2)
                    } else {
                        let l = rng.range_f(205.0, 232.0);
                        let warm = rng.range_f(14.0, 30.0);
                        [l + warm * 0.45, l, l - warm]
                    };
                    let plank = [rng.range(5, 12) as u32, rng.range(3, 5) as u32];
                    Background::Herringbone(wood, plank, rng.range_f(5.0, 14.0), rng.next_u64())
                }
                _ => {
                    let lead = rng.range_f(105.0, 165.0);
                    let lead = if rng.range(0, 3) == 0 {
                        // Blue-black ink rather than graphite.
                        [lead * 0.8, lead * 0.85, lead * 1.1]
                    } else {
                        [lead; 3]
                    };
                    let hatch = [
                        rng.range_f(14.0, 32.0),
                        rng.range_f(3.0, 6.0),
                        rng.range_f(0.45, 0.85),
                    ];
                    Background::Hatching(light(rng), lead, hatch, rng.next_u64())
                }
            },
            // Seventeen kinds (plain twice as often) of flat colours, textures,
            // tones and gradients, none of them an unlike family: the tower
            // learns to ignore backgrounds in general, and the unlike set
            // measures that on ones it never saw. The last four (clouds,
            // camouflage, newsprint, bokeh) widen the textures it learns to
            // ignore, each far from every unlike family so far (no weave,
            // tiles, planks, pencil lines, rays, veins, scratches, creases,
            // rings, splits or dot grids), and all light or muted and greyish
            // so that the saturated shape stands out.
            _ => match rng.range(0, 17) {
                0 | 1 => Background::Plain(light(rng)),
                2 => Background::Tinted(pastel(rng, 0.3)),
                3 => Background::Noisy(light(rng), rng.range_f(8.0, 30.0)),
                4 => Background::Noisy(pastel(rng, 0.3), rng.range_f(8.0, 30.0)),
                5 => Background::Checker(pastel(rng, 0.25), light(rng), rng.range(4, 24) as u32),
                6 => {
                    let period = |rng: &mut Rng| std::f64::consts::TAU / rng.range_f(16.0, 90.0);
                    let params = [
                        period(rng),
                        period(rng),
                        rng.range_f(0.0, 6.3),
                        rng.range_f(0.0, 6.3),
                    ];
                    Background::Blotches(pastel(rng, 0.3), pastel(rng, 0.3), params)
                }
                7 => {
                    let centre = pastel(rng, 0.2);
                    let dim = rng.range_f(0.5, 0.85);
                    Background::Vignette(centre, centre.map(|v| v * dim))
                }
                8 => {
                    let line = rng.range_f(110.0, 200.0);
                    let lines = [[true, false], [false, true], [true, true]][rng.range(0, 2)];
                    Background::Ruled(light(rng), [line; 3], rng.range(6, 20) as u32, lines)
                }
                9 => {
                    let grey = rng.range_f(100.0, 200.0);
                    Background::MidTone(
                        [0, 1, 2].map(|_| grey + rng.range_f(-25.0, 25.0)),
                        rng.range_f(0.0, 10.0),
                    )
                }
                10 => {
                    let angle = rng.range_f(0.0, std::f64::consts::TAU);
                    Background::Gradient(
                        pastel(rng, 0.3),
                        pastel(rng, 0.3),
                        [angle.cos(), angle.sin()],
                    )
                }
                11 => Background::dark(rng, 20.0, 90.0),
                12 => Background::Speckled(pastel(rng, 0.2)),
                13 => {
                    let angle = rng.range_f(0.0, std::f64::consts::PI);
                    Background::Stripes(
                        pastel(rng, 0.2),
                        light(rng),
                        rng.range(3, 12) as u32,
                        [angle.cos(), angle.sin()],
                    )
                }
                14 => {
                    // A greyish blue sky (or any pale tint) under white
                    // cloud, or a light one under grey fog.
                    let (sky, cloud) = if rng.range(0, 1) == 0 {
                        let l = rng.range_f(198.0, 232.0);
                        let blue = rng.range_f(8.0, 22.0);
                        let sky = [l - blue, l - blue * 0.4, l + blue * 0.6];
                        (sky, [rng.range_f(240.0, 252.0); 3])
                    } else {
                        let grey = rng.range_f(172.0, 205.0);
                        (
                            pastel(rng, 0.2),
                            [0, 1, 2].map(|_| grey + rng.range_f(-5.0, 5.0)),
                        )
                    };
                    let wisps = [
                        rng.range_f(28.0, 70.0),
                        rng.range_f(1.2, 3.0),
                        rng.range_f(0.35, 0.6),
                    ];
                    Background::Clouds(sky, cloud, wisps, rng.next_u64())
                }
                15 => {
                    // Olive, khaki, sage, taupe or slate, never far from grey.
                    let tints = [
                        [1.0, 1.0, 0.88],
                        [1.0, 0.96, 0.87],
                        [0.94, 1.0, 0.94],
                        [1.0, 0.95, 0.92],
                        [0.94, 0.97, 1.0],
                    ];
                    let tint = tints[rng.range(0, tints.len() - 1)];
                    let top = rng.range_f(205.0, 240.0);
                    let step = rng.range_f(0.09, 0.14);
                    let tones = [0.0, 1.0, 2.0].map(|k| tint.map(|c| c * top * (1.0 - step * k)));
                    Background::Camouflage(tones, rng.range_f(16.0, 40.0), rng.next_u64())
                }
                16 => {
                    let l = rng.range_f(222.0, 248.0);
                    let warm = rng.range_f(0.0, 14.0);
                    let paper = [l, l - warm * 0.35, l - warm];
                    let ink = [rng.range_f(80.0, 150.0); 3];
                    let pitch = rng.range(5, 9) as u32;
                    let layout = [
                        pitch,
                        (f64::from(pitch) * rng.range_f(0.4, 0.6)).round().max(2.0) as u32,
                        rng.range(28, 80) as u32,
                        rng.range(5, 12) as u32,
                    ];
                    Background::Newsprint(paper, ink, layout, rng.next_u64())
                }
                _ => {
                    let grey = rng.range_f(105.0, 175.0);
                    let base = [0, 1, 2].map(|_| grey + rng.range_f(-10.0, 10.0));
                    let lights = [
                        rng.range(6, 18) as f64,
                        rng.range_f(0.08, 0.18),
                        rng.range_f(0.12, 0.22),
                    ];
                    Background::Bokeh(base, pastel(rng, 0.25), lights, rng.next_u64())
                }
            },
        }
    }

    /// A flat dark grey: luminance drawn from `low..high`, each channel within 12 of it.
    fn dark(rng: &mut Rng, low: f64, high: f64) -> Self {
        let grey = rng.range_f(low, high);
        Background::Dark([0, 1, 2].map(|_| (grey + rng.range_f(-12.0, 12.0)).max(0.0)))
    }

    fn at(&self, x: u32, y: u32, (width, height): (u32, u32), rng: &mut Rng) -> [f64; 3] {
        match *self {
            Background::Plain(c) | Background::Tinted(c) | Background::Dark(c) => c,
            Background::Noisy(c, amplitude) | Background::MidTone(c, amplitude) => {
                let n = rng.range_f(-amplitude, amplitude);
                c.map(|v| v + n + rng.range_f(-amplitude, amplitude) * 0.3)
            }
            Background::Checker(a, b, cell) => {
                let cell = cell.max(1);
                if (x / cell + y / cell).is_multiple_of(2) {
                    a
                } else {
                    b
                }
            }
            Background::Blotches(a, b, [kx, ky, px, py]) => {
                let t = 0.5 + 0.5 * (kx * f64::from(x) + px).sin() * (ky * f64::from(y) + py).sin();
                [0, 1, 2].map(|i| a[i] * (1.0 - t) + b[i] * t)
            }
            Background::Vignette(centre, edge) => {
                let u = 2.0 * f64::from(x) / f64::from(width.max(2)) - 1.0;
                let v = 2.0 * f64::from(y) / f64::from(height.max(2)) - 1.0;
                let t = ((u * u + v * v) / 2.0).min(1.0);
                [0, 1, 2].map(|i| centre[i] * (1.0 - t) + edge[i] * t)
            }
            Background::Ruled(base, line, every, [rows, columns]) => {
                let every = every.max(2);
                if (rows && y.is_multiple_of(every)) || (columns && x.is_multiple_of(every)) {
                    line
                } else {
                    base
                }
            }
            Background::Gradient(from, to, [dx, dy]) => {
                // Position along the direction, 0 at one corner, 1 at the opposite one.
                let (w, h) = (f64::from(width.max(2) - 1), f64::from(height.max(2) - 1));
                let along = |x: f64, y: f64| x * dx + y * dy;
                let corners = [along(0.0, 0.0), along(w, 0.0), along(0.0, h), along(w, h)];
                let lo = corners.iter().copied().fold(f64::INFINITY, f64::min);
                let hi = corners.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let t = (along(f64::from(x), f64::from(y)) - lo) / (hi - lo).max(1.0);
                [0, 1, 2].map(|i| from[i] * (1.0 - t) + to[i] * t)
            }
            Background::Speckled(c) => match rng.range(0, 19) {
                0 => [10.0; 3],
                1 => [250.0; 3],
                _ => c,
            },
            Background::Stripes(a, b, width, [nx, ny]) => {
                let along = f64::from(x) * nx + f64::from(y) * ny;
                if ((along / f64::from(width.max(1))).floor() as i64).rem_euclid(2) == 0 {
                    a
                } else {
                    b
                }
            }
            Background::Clouds(sky, cloud, [cell, stretch, cover], seed) => {
                let (fx, fy) = (f64::from(x) / (cell * stretch), f64::from(y) / cell);
                // Noise warped by noise: drawn-out wisps, not round puffs.
                let warp = fractal_noise(0.7 * fx + 3.1, 0.7 * fy + 1.3, seed.rotate_left(7));
                let n = fractal_noise(fx + 1.6 * warp, fy + 0.8 * warp, seed);
                let t = smoothstep((n - (1.0 - cover)) / 0.32 + 0.5);
                let grain = rng.range_f(-1.5, 1.5);
                [0, 1, 2].map(|i| sky[i] * (1.0 - t) + cloud[i] * t + grain)
            }
            Background::Camouflage(tones, cell, seed) => {
                let (fx, fy) = (f64::from(x) / cell, f64::from(y) / cell);
                let blob = |salt: u64| {
                    let seed = seed ^ salt;
                    let warp = fractal_noise(fx + 5.2, fy + 9.7, seed.rotate_left(11)) - 0.5;
                    fractal_noise(fx + warp, fy - warp, seed)
                };
                let grain = rng.range_f(-1.5, 1.5);
                // The dark blobs over the middle ones over the light ground.
                let tone = if blob(0x5A17) > 0.58 {
                    tones[2]
                } else if blob(0xC0DE) > 0.5 {
                    tones[1]
                } else {
                    tones[0]
                };
                tone.map(|v| v + grain)
            }
            Background::Newsprint(paper, ink, [pitch, tall, column, gutter], seed) => {
                let grain = rng.range_f(-2.0, 2.0);
                let (pitch, column) = (pitch.max(3), column.max(8));
                let (u, v) = (x % (column + gutter), y % pitch);
                if u >= column || v >= tall {
                    return paper.map(|v| v + grain);
                }
                let (c, r) = (i64::from(x / (column + gutter)), i64::from(y / pitch));
                // About one line in eleven is the blank between paragraphs;
                // the line before it ends short, the line after it indents.
                let blank = |r: i64| lattice(c, r, seed) < 0.09;
                if blank(r) {
                    return paper.map(|v| v + grain);
                }
                let end = if blank(r + 1) {
                    f64::from(column) * (0.25 + 0.65 * lattice(r, c, seed.rotate_left(5)))
                } else {
                    f64::from(column)
                };
                let mut start = if blank(r - 1) {
                    2.0 * f64::from(pitch)
                } else {
                    0.0
                };
                let u = f64::from(u);
                for word in 0..i64::from(column) {
                    let pick = lattice(r * 131 + word, c, seed.rotate_left(23));
                    let length = (3.0 + 11.0 * pick * pick).round();
                    if start >= end || u < start {
                        break;
                    }
                    if u < (start + length).min(end) {
                        return ink.map(|v| v + grain);
                    }
                    start += length + 2.0 + (3.0 * pick).floor().min(1.0);
                }
                paper.map(|v| v + grain)
            }
            Background::Bokeh(base, glow, [count, size, strength], seed) => {
                let (w, h) = (f64::from(width), f64::from(height));
                let (px, py) = (f64::from(x) + 0.5, f64::from(y) + 0.5);
                let mut lift = 0.0;
                for k in 0..count.clamp(0.0, 32.0) as i64 {
                    let at = |i: i64| lattice(k, i, seed);
                    let (cx, cy) = (at(0) * w, at(1) * h);
                    let radius = ((w * h).sqrt() * size * (0.6 + 0.8 * at(2))).max(7.0);
                    let d = (px - cx).hypot(py - cy) / radius;
                    // Flat inside 0.55 of the radius, fading to nothing at it.
                    lift += strength * (0.4 + 0.6 * at(3)) * smoothstep((1.0 - d) / 0.45);
                }
                let t = lift.min(1.5 * strength);
                let grain = rng.range_f(-1.5, 1.5);
                [0, 1, 2].map(|i| base[i] * (1.0 - t) + glow[i] * t + grain)
            }
            Background::Tartan(ground, band, line, [period, width, offset, thin]) => {
                let thread = |u: u32| {
                    let u = u % period.max(1);
                    if u < width {
                        band
                    } else if (offset..offset + thin).contains(&u) {
                        line
                    } else {
                        ground
                    }
                };
                // Two pixels of the thread down, two of the thread across,
                // one pixel further along on the next row.
                if ((x + y) / 2).is_multiple_of(2) {
                    thread(x)
                } else {
                    thread(y)
                }
            }
            Background::Hexagons(tile, grout, [inradius, line, shading], seed) => {
                let a = inradius.max(3.0);
                let (px, py) = (f64::from(x) + 0.5, f64::from(y) + 0.5);
                // Centres 2a apart in a row, rows a sqrt(3) apart, every
                // other row shifted by a: the nearest centre is the tile's.
                let row_step = a * 3f64.sqrt();
                let row = (py / row_step).round() as i64;
                let mut nearest = (f64::INFINITY, (0, 0), (0.0, 0.0));
                for r in row - 1..=row + 1 {
                    let shift = if r.rem_euclid(2) == 1 { a } else { 0.0 };
                    let col = ((px - shift) / (2.0 * a)).round() as i64;
                    for c in col - 1..=col + 1 {
                        let (dx, dy) =
                            (px - (c as f64 * 2.0 * a + shift), py - r as f64 * row_step);
                        let d = dx.hypot(dy);
                        if d < nearest.0 {
                            nearest = (d, (c, r), (dx, dy));
                        }
                    }
                }
                let (_, (c, r), (dx, dy)) = nearest;
                // The hexagon's own norm: `a` on its edges.
                let edge = [0.0f64, 60.0, 120.0]
                    .iter()
                    .map(|deg| {
                        let (sin, cos) = deg.to_radians().sin_cos();
                        (dx * cos + dy * sin).abs()
                    })
                    .fold(0.0, f64::max);
                let t = (edge - (a - line)).clamp(0.0, 1.0);
                let tint = (lattice(c, r, seed) * 2.0 - 1.0) * shading;
                [0, 1, 2].map(|i| (tile[i] + tint) * (1.0 - t) + grout[i] * t)
            }
            Background::Herringbone(wood, [width, length], shading, seed) => {
                let (w, n) = (width.max(2), i64::from(length.max(2)));
                // Units of one plank width: runs of n units across where
                // (i + j) mod 2n < n, down where not; each plank by its
                // first unit.
                let plank = |x: u32, y: u32| {
                    let (i, j) = (i64::from(x / w), i64::from(y / w));
                    let k = (i + j).rem_euclid(2 * n);
                    if k < n {
                        (i - k, j, true)
                    } else {
                        (i, j - (k - n), false)
                    }
                };
                let here = plank(x, y);
                let seam = plank(x + 1, y) != here || plank(x, y + 1) != here;
                let (i, j, across) = here;
                let tint = (lattice(i, j, seed) * 2.0 - 1.0) * shading;
                let (along, over) = if across { (x, y) } else { (y, x) };
                let grain = (value_noise(
                    f64::from(along) / 9.0 + i as f64 * 3.7,
                    f64::from(over) * 0.6 + j as f64 * 5.3,
                    seed.rotate_left(29),
                ) - 0.5)
                    * 16.0;
                let dim = if seam { 0.74 } else { 1.0 };
                wood.map(|v| (v + tint + grain) * dim)
            }
            Background::Hatching(paper, lead, [patch, spacing, share], seed) => {
                let (fx, fy) = (f64::from(x), f64::from(y));
                // Patches on a grid whose lines wander by up to half a patch.
                let wobble =
                    |salt: u64| (value_noise(fx / patch, fy / patch, seed ^ salt) - 0.5) * patch;
                let (cx, cy) = (
                    ((fx + wobble(1)) / patch).floor() as i64,
                    ((fy + wobble(2)) / patch).floor() as i64,
                );
                let grain = rng.range_f(-3.0, 3.0);
                let pick = lattice(cx, cy, seed);
                if pick >= share {
                    return paper.map(|v| v + grain);
                }
                let angle = (pick / share * 4.0).floor() * std::f64::consts::FRAC_PI_4
                    + (lattice(cy, cx, seed.rotate_left(13)) - 0.5) * 0.5;
                let spacing = spacing.max(2.0);
                // Ink of a line a pixel wide at angle `a`, by this pixel's distance from it.
                let ink = |a: f64| {
                    let (sin, cos) = f64::sin_cos(a);
                    let across = (fx + 0.5) * cos + (fy + 0.5) * sin;
                    let off = (across / spacing - (across / spacing).round()).abs() * spacing;
                    (1.0 - off).clamp(0.0, 1.0)
                };
                let mut t = ink(angle);
                if lattice(cx + 7, cy - 3, seed) < 0.35 {
                    t = t.max(ink(angle + std::f64::consts::FRAC_PI_2));
                }
                let t = t * 0.8;
                [0, 1, 2].map(|i| paper[i] * (1.0 - t) + lead[i] * t + grain)
            }
        }
    }
}

/// A hash of a lattice point to `[0, 1)` (SplitMix64's finaliser, as [`Rng`] uses).
fn lattice(ix: i64, iy: i64, seed: u64) -> f64 {
    let z = seed
        ^ (ix as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (iy as u64).wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    unit_f64(mix64(z))
}

/// Smooth value noise in `[0, 1]` with one lattice cell per unit.
fn value_noise(x: f64, y: f64, seed: u64) -> f64 {
    let (fx, fy) = (x.floor(), y.floor());
    let (ix, iy) = (fx as i64, fy as i64);
    let (u, v) = (smoothstep(x - fx), smoothstep(y - fy));
    let top = lattice(ix, iy, seed) * (1.0 - u) + lattice(ix + 1, iy, seed) * u;
    let bottom = lattice(ix, iy + 1, seed) * (1.0 - u) + lattice(ix + 1, iy + 1, seed) * u;
    top * (1.0 - v) + bottom * v
}

/// Fractal value noise in `[0, 1]`: three octaves, each half the size and
/// weight of the one before.
fn fractal_noise(x: f64, y: f64, seed: u64) -> f64 {
    (4.0 * value_noise(x, y, seed)
        + 2.0 * value_noise(2.0 * x, 2.0 * y, seed.rotate_left(17))
        + value_noise(4.0 * x, 4.0 * y, seed.rotate_left(34)))
        / 7.0
}

/// `t` clamped to `[0, 1]` and eased at both ends.
fn smoothstep(t: f64) -> f64 {
    let t = t.clamp(0.0, 1.0);
    t * t * (3.0 - 2.0 * t)
}

/// Renders `spec` in `style` (2x2 supersampled edges); the classic style is
/// exactly [`render`].
pub fn render_styled(spec: &ShapeSpec, style: Style, rng: &mut Rng) -> RgbImage {
    if style == Style::Classic {
        return render(spec, rng);
    }
    let background = Background::random(style, rng);
    // A fifth of the varied images dim their whole background to 20-60% of
    // its light (a dark checkerboard, dark stripes, a dark gradient): phase 9
    // of the demo model misnamed small shapes on dark, textured or graded
    // backgrounds (unlike v6's washes), having seen darkness only flat.
    let shade = if style == Style::Varied && rng.range(0, 4) == 0 {
        rng.range_f(0.2, 0.6)
    } else {
        1.0
    };
    render_on(spec, &background, shade, rng)
}

/// A varied-style image of `spec` on a flat dark grey (luminance 15-100, each
/// channel within 12 of it): the varied style's `Dark` kind, which the tower's
/// pretraining draws far more often than the varied rows do (1 in 18). Shapes
/// on flat dark grey were the tower's weakest case: Pillow-drawn shapes on
/// `(40..85, 40..85, 40..85)` were named right 75% of the time, against 94% on
/// other backgrounds; green ones on the darkest greys never.
pub fn render_on_dark(spec: &ShapeSpec, rng: &mut Rng) -> RgbImage {
    render_on(spec, &Background::dark(rng, 15.0, 100.0), 1.0, rng)
}

/// `spec` drawn over `background` (its light scaled by `shade`) in a
/// varied-style shade of its colour.
fn render_on(spec: &ShapeSpec, background: &Background, shade: f64, rng: &mut Rng) -> RgbImage {
    let fill = spec.colour.rgb_styled(rng).map(f64::from);
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
            let back = background
                .at(x, y, (spec.size, height), rng)
                .map(|v| v * shade);
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
