//! LLaVA-NeXT's AnyRes ("any resolution") image handling, as transformers'
//! `LlavaNextImageProcessorPil` / `LlavaOnevisionImageProcessorPil` and the
//! processors' token counts do it.
//!
//! An image of `h × w` picks the best of the `image_grid_pinpoints` resolutions
//! (`select_best_resolution`: the most effective pixels, then the least
//! waste), is resized into it keeping its aspect ratio (`get_patch_output_size`,
//! `ceil` of the scaled side, bounded by the target), padded with black to it
//! (centred, the odd pixel at the bottom/right) and cut into tiles of the
//! tower's side, row by row; the whole image squashed to the base size comes
//! first. Every tile then goes through the usual resize / center crop /
//! rescale / normalise.
//!
//! The model projects every tile's patch features, lays the tiles' features
//! out as one grid, crops the rows or columns that only saw padding
//! (`unpad_image`), OneVision shrinks a grid larger than `anyres_max_N` allows
//! by bilinear interpolation, and an `image_newline` embedding ends each row:
//! [`AnyResGeometry::slots`] counts the result exactly as the processors do.

use crate::decode::RgbImage;
use crate::resample::{resize, ResampleFilter};
use crate::{Error, Result};

/// The numbers that decide an image's tiles and positions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnyResGeometry {
    /// `image_grid_pinpoints` as `(height, width)`.
    pub pinpoints: Vec<(usize, usize)>,
    /// Side of one tile in pixels (the tower's `image_size`).
    pub tile: usize,
    /// Patches per side of one tile (`image_size / patch_size`).
    pub grid: usize,
    /// Features of the base image (`grid²`, less a dropped first position).
    pub base_positions: usize,
    /// OneVision's `anyres_max_N`: the unpadded grid is interpolated down when
    /// it holds more than about `N` tiles' worth of features.
    pub max_num_patches: Option<usize>,
}

impl AnyResGeometry {
    /// Checks the numbers: pinpoints present, positive, multiples of the tile.
    pub fn validate(&self) -> Result<()> {
        let bad = |reason: String| Err(Error::config("image_grid_pinpoints", reason));
        if self.pinpoints.is_empty() {
            return bad("needs at least one resolution".into());
        }
        if self.tile == 0 || self.grid == 0 {
            return bad("the tower's image and patch sizes must be positive".into());
        }
        for &(h, w) in &self.pinpoints {
            if h < self.tile || w < self.tile {
                return bad(format!("{h}x{w} is smaller than one {0}x{0} tile", self.tile));
            }
        }
        if self.max_num_patches == Some(0) {
            return Err(Error::config("vision_aspect_ratio", "anyres_max_N needs N of at least 1"));
        }
        Ok(())
    }

    /// transformers' `select_best_resolution` for an image `height × width`.
    pub fn best_resolution(&self, height: usize, width: usize) -> (usize, usize) {
        let (oh, ow) = (height as f64, width as f64);
        let mut best = self.pinpoints[0];
        let mut max_effective = 0usize;
        let mut min_wasted = usize::MAX;
        for &(h, w) in &self.pinpoints {
            let scale = (w as f64 / ow).min(h as f64 / oh);
            let (dw, dh) = ((ow * scale) as usize, (oh * scale) as usize);
            let effective = (dw * dh).min(width * height);
            let wasted = (w * h).saturating_sub(effective);
            if effective > max_effective || (effective == max_effective && wasted < min_wasted) {
                max_effective = effective;
                min_wasted = wasted;
                best = (h, w);
            }
        }
        best
    }

    /// Tile rows and columns of an image `height × width` (best resolution /
    /// tile side, as `get_anyres_image_grid_shape`).
    pub fn tile_grid(&self, height: usize, width: usize) -> (usize, usize) {
        let (bh, bw) = self.best_resolution(height, width);
        (bh / self.tile, bw / self.tile)
    }

    /// Rows and columns of the feature grid after `unpad_image`, with the
    /// first row / column kept (`(offset_rows, offset_cols, rows, cols)`).
    pub fn unpadded(&self, height: usize, width: usize) -> (usize, usize, usize, usize) {
        let (th, tw) = self.tile_grid(height, width);
        let (ch, cw) = (th * self.grid, tw * self.grid);
        let original = width as f64 / height as f64;
        let current = cw as f64 / ch as f64;
        if original > current {
            let new_h = round7(height as f64 * (cw as f64 / width as f64));
            let pad = ch.saturating_sub(new_h) / 2;
            (pad, 0, ch - 2 * pad, cw)
        } else {
            let new_w = round7(width as f64 * (ch as f64 / height as f64));
            let pad = cw.saturating_sub(new_w) / 2;
            (0, pad, ch, cw - 2 * pad)
        }
    }

    /// The grid after OneVision's `anyres_max_N` interpolation (unchanged
    /// when it is small enough, or without a maximum).
    pub fn pooled(&self, rows: usize, cols: usize) -> (usize, usize) {
        pooled_size(rows, cols, self.grid, self.max_num_patches)
    }

    /// Embedding slots of an image `height × width`: the base image's
    /// features, then each grid row with its `image_newline`.
    pub fn slots(&self, height: usize, width: usize) -> usize {
        let (_, _, rows, cols) = self.unpadded(height, width);
        let (rows, cols) = self.pooled(rows, cols);
        self.base_positions + rows * (cols + 1)
    }
}

/// OneVision's `anyres_max_N` size rule: with `ratio = sqrt(rows·cols / (N ·
/// grid²))`, a ratio above 1.1 shrinks the grid to `(⌊rows / ratio⌋, ⌊cols /
/// ratio⌋)`, in doubles as Python does.
pub fn pooled_size(rows: usize, cols: usize, grid: usize, max_num_patches: Option<usize>) -> (usize, usize) {
    let Some(max) = max_num_patches else {
        return (rows, cols);
    };
    let ratio = ((rows * cols) as f64 / (max * grid * grid) as f64).sqrt();
    if ratio > 1.1 {
        ((rows as f64 / ratio).floor() as usize, (cols as f64 / ratio).floor() as usize)
    } else {
        (rows, cols)
    }
}

/// Python's `int(round(x, 7))` for a positive `x`.
fn round7(x: f64) -> usize {
    ((x * 1e7).round() / 1e7).trunc().max(0.0) as usize
}

/// How the tiles are cut before the per-tile processing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TileSettings {
    /// `(height, width)` the base image is squashed to (`size`).
    pub base_size: (usize, usize),
    /// Side of the tiles the padded image is cut into (`crop_size.height`,
    /// else `size.height`, else `size.shortest_edge`).
    pub patch_size: usize,
    /// Pillow's filter for both resizes.
    pub filter: ResampleFilter,
}

/// The base image then the tiles of the padded best-resolution image, as RGB
/// images before the per-tile processing.
pub fn anyres_tiles(image: &RgbImage, geometry: &AnyResGeometry, settings: &TileSettings) -> Result<Vec<RgbImage>> {
    if image.width == 0 || image.height == 0 {
        return Err(Error::config("image", "an image needs at least one pixel"));
    }
    let (th, tw) = geometry.best_resolution(image.height, image.width);
    let (nh, nw) = patch_output_size(image.height, image.width, th, tw);
    if nh == 0 || nw == 0 {
        return Err(Error::config(
            "image",
            format!("{}x{} resizes to an empty {nw}x{nh} image", image.width, image.height),
        ));
    }
    let resized = resize(image, nw, nh, settings.filter);
    let mut padded = RgbImage::filled(tw, th, [0, 0, 0]);
    let (top, left) = ((th - nh) / 2, (tw - nw) / 2);
    for y in 0..nh {
        let src = &resized.pixels[y * nw * 3..(y + 1) * nw * 3];
        let start = ((y + top) * tw + left) * 3;
        padded.pixels[start..start + nw * 3].copy_from_slice(src);
    }
    let (bh, bw) = settings.base_size;
    let mut out = vec![resize(image, bw, bh, settings.filter)];
    let p = settings.patch_size.max(1);
    for y0 in (0..th).step_by(p) {
        for x0 in (0..tw).step_by(p) {
            out.push(crop(&padded, x0, y0, p.min(tw - x0), p.min(th - y0)));
        }
    }
    Ok(out)
}

/// transformers' `get_patch_output_size`: the image fitted into `th × tw`.
fn patch_output_size(height: usize, width: usize, th: usize, tw: usize) -> (usize, usize) {
    let scale_w = tw as f64 / width as f64;
    let scale_h = th as f64 / height as f64;
    if scale_w < scale_h {
        (((height as f64 * scale_w).ceil() as usize).min(th), tw)
    } else {
        (th, ((width as f64 * scale_h).ceil() as usize).min(tw))
    }
}

fn crop(image: &RgbImage, x0: usize, y0: usize, width: usize, height: usize) -> RgbImage {
    let mut out = RgbImage::filled(width, height, [0, 0, 0]);
    for y in 0..height {
        let src = ((y0 + y) * image.width + x0) * 3;
        out.pixels[y * width * 3..(y + 1) * width * 3].copy_from_slice(&image.pixels[src..src + width * 3]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn next() -> AnyResGeometry {
        AnyResGeometry {
            pinpoints: vec![(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)],
            tile: 336,
            grid: 24,
            base_positions: 576,
            max_num_patches: None,
        }
    }

    #[test]
    fn best_resolutions_and_counts_match_the_processor() {
        let g = next();
        // llava-v1.6's processor: a 640x480 (w x h) image -> 672x672, 2x2 tiles.
        assert_eq!(g.best_resolution(480, 640), (672, 672));
        assert_eq!(g.tile_grid(480, 640), (2, 2));
        // 48 x 48 grid, landscape 4:3: rows 36 of 48.
        assert_eq!(g.unpadded(480, 640), (6, 0, 36, 48));
        assert_eq!(g.slots(480, 640), 576 + 36 * 49);
        assert_eq!(g.best_resolution(1000, 200), (1008, 336));
    }

    /// Counts from transformers' `_get_number_of_features` (less one for
    /// `default`) at the real checkpoints' geometry, for (h, w) images.
    #[test]
    fn counts_match_the_real_processors() {
        let sizes = [(480, 640), (1000, 200), (200, 1000), (336, 336), (5, 4000), (4000, 5), (1080, 1920), (768, 1024)];
        let next = next();
        let want = [2340, 1656, 1598, 1176, 576, 648, 1948, 2340];
        for (&(h, w), want) in sizes.iter().zip(want) {
            assert_eq!(next.slots(h, w), want, "llava-v1.6 {h}x{w}");
        }
        let ov = AnyResGeometry {
            pinpoints: (1..=6).flat_map(|i| (1..=6).map(move |j| (384 * i, 384 * j))).collect(),
            tile: 384,
            grid: 27,
            base_positions: 729,
            max_num_patches: Some(9),
        };
        let want = [2929, 2187, 2123, 1485, 892, 1053, 7269, 4725];
        for (&(h, w), want) in sizes.iter().zip(want) {
            assert_eq!(ov.slots(h, w), want, "onevision {h}x{w}");
        }
    }

    #[test]
    fn onevision_pools_large_grids() {
        assert_eq!(pooled_size(8, 8, 4, Some(2)), (5, 5));
        assert_eq!(pooled_size(4, 8, 4, Some(2)), (4, 8));
        assert_eq!(pooled_size(8, 8, 4, None), (8, 8));
        // anyres_max_9 at 27x27 per tile: a 3x3 tile grid is left alone.
        assert_eq!(pooled_size(81, 81, 27, Some(9)), (81, 81));
    }

    #[test]
    fn tiles_cover_the_padded_image() {
        let g = AnyResGeometry { pinpoints: vec![(28, 56)], tile: 28, grid: 4, base_positions: 16, max_num_patches: None };
        let image = RgbImage::filled(40, 30, [200, 10, 10]);
        let settings = TileSettings { base_size: (28, 28), patch_size: 28, filter: ResampleFilter::Bicubic };
        let tiles = anyres_tiles(&image, &g, &settings).unwrap();
        assert_eq!(tiles.len(), 3);
        assert!(tiles.iter().all(|t| t.width == 28 && t.height == 28));
        // 40x30 fits 56x28 as 38x28 (ceil), centred with 9 black columns on the left.
        assert_eq!(tiles[1].pixel(8, 5), [0, 0, 0]);
        assert_eq!(tiles[1].pixel(9, 5), [200, 10, 10]);
    }
}
