//! Whisper's log-mel spectrogram, computed exactly as transformers'
//! `WhisperFeatureExtractor` does it.
//!
//! Per 30 s window (480,000 samples at 16 kHz, zero-padded at the end):
//! reflect-pad by `n_fft / 2` on both sides (STFT `center=True`), frames of 400
//! samples every 160 under a periodic Hann window, power spectrum `|rfft|²` (201
//! bins), Slaney-normalised Slaney-scale mel filters from 0 to 8 kHz, the last frame
//! dropped (3000 frames remain), `log10(max(mel, 1e-10))`, clamped to
//! `max - 8`, and scaled as `(x + 4) / 4`.
//!
//! Audio longer than 30 s is cut into consecutive 30 s windows, each computed as the
//! extractor computes one clip (its own max for the clamp); nothing is dropped.

use std::sync::Arc;

use rayon::prelude::*;
use realfft::{RealFftPlanner, RealToComplex};

use crate::{Error, Result, SAMPLE_RATE};

/// STFT window and FFT length in samples (25 ms at 16 kHz).
pub const N_FFT: usize = 400;
/// Hop between frames in samples (10 ms).
pub const HOP_LENGTH: usize = 160;
/// Seconds of audio in one Whisper window.
pub const CHUNK_SECONDS: usize = 30;
/// Samples in one window.
pub const N_SAMPLES: usize = CHUNK_SECONDS * SAMPLE_RATE as usize;
/// Frames in one window's log-mel.
pub const N_FRAMES: usize = N_SAMPLES / HOP_LENGTH;
/// Frequency bins of the one-sided spectrum.
pub const N_FREQS: usize = N_FFT / 2 + 1;

/// A log-mel extractor for one number of mel bins (80 for Whisper up to v2, 128 for v3).
#[derive(Clone)]
pub struct LogMel {
    n_mels: usize,
    filters: Vec<MelFilter>,
    window: Vec<f32>,
    fft: Arc<dyn RealToComplex<f32>>,
}

impl std::fmt::Debug for LogMel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogMel").field("n_mels", &self.n_mels).finish()
    }
}

/// One triangular filter stored sparsely: the first bin it covers and its weights.
#[derive(Debug, Clone)]
struct MelFilter {
    start: usize,
    weights: Vec<f32>,
}

/// The log-mel windows of one clip: `windows` arrays of `[n_mels, 3000]`, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct MelWindows {
    /// Mel bins per frame.
    pub n_mels: usize,
    /// One `n_mels * 3000` row-major array per 30 s window.
    pub windows: Vec<Vec<f32>>,
}

impl LogMel {
    /// An extractor with `n_mels` bins; any positive count works, Whisper uses 80 or 128.
    pub fn new(n_mels: usize) -> Result<Self> {
        if n_mels == 0 || n_mels > 512 {
            return Err(Error::Config(format!(
                "n_mels must be in 1..=512 (Whisper uses 80 or 128), got {n_mels}"
            )));
        }
        let filters = mel_filters(n_mels, N_FFT, SAMPLE_RATE)
            .into_iter()
            .map(|row| {
                let start = row.iter().position(|w| *w != 0.0).unwrap_or(0);
                let end = row.iter().rposition(|w| *w != 0.0).map_or(start, |e| e + 1);
                MelFilter {
                    start,
                    weights: row[start..end].iter().map(|w| *w as f32).collect(),
                }
            })
            .collect();
        let window = (0..N_FFT)
            .map(|n| {
                let phase = 2.0 * std::f64::consts::PI * n as f64 / N_FFT as f64;
                (0.5 - 0.5 * phase.cos()) as f32
            })
            .collect();
        let fft = RealFftPlanner::<f32>::new().plan_fft_forward(N_FFT);
        Ok(Self {
            n_mels,
            filters,
            window,
            fft,
        })
    }

    /// Number of mel bins.
    pub fn n_mels(&self) -> usize {
        self.n_mels
    }

    /// The log-mel of 16 kHz mono `samples`: one window per started 30 s (at least one).
    pub fn compute(&self, samples: &[f32]) -> MelWindows {
        let chunks: Vec<&[f32]> = if samples.is_empty() {
            vec![samples]
        } else {
            samples.chunks(N_SAMPLES).collect()
        };
        let windows = chunks.par_iter().map(|chunk| self.window(chunk)).collect();
        MelWindows {
            n_mels: self.n_mels,
            windows,
        }
    }

    /// The log-mel of one window: `samples` (at most 30 s; longer input is cut to its
    /// first 30 s, as the extractor's `truncation=True` does) zero-padded to 30 s.
    /// Returns `[n_mels, 3000]` row-major.
    pub fn window(&self, samples: &[f32]) -> Vec<f32> {
        let samples = &samples[..samples.len().min(N_SAMPLES)];
        let frames_per_block = 250;
        let blocks: Vec<Vec<f32>> = (0..N_FRAMES.div_ceil(frames_per_block))
            .into_par_iter()
            .map(|block| {
                let first = block * frames_per_block;
                let last = (first + frames_per_block).min(N_FRAMES);
                self.frames(samples, first..last)
            })
            .collect();
        // Frame-major blocks -> [n_mels, frames], then log10 clamp and scaling.
        let mut out = vec![0.0f32; self.n_mels * N_FRAMES];
        let mut max = f32::NEG_INFINITY;
        for (block_index, block) in blocks.iter().enumerate() {
            let first = block_index * frames_per_block;
            for (i, frame) in block.chunks_exact(self.n_mels).enumerate() {
                for (m, v) in frame.iter().enumerate() {
                    out[m * N_FRAMES + first + i] = *v;
                    max = max.max(*v);
                }
            }
        }
        let floor = max - 8.0;
        for v in &mut out {
            *v = (v.max(floor) + 4.0) / 4.0;
        }
        out
    }

    /// `log10(max(mel, 1e-10))` of frames `range`, frame-major.
    fn frames(&self, samples: &[f32], range: std::ops::Range<usize>) -> Vec<f32> {
        let mut input = self.fft.make_input_vec();
        let mut spectrum = self.fft.make_output_vec();
        let mut scratch = self.fft.make_scratch_vec();
        let mut power = vec![0.0f32; N_FREQS];
        let mut out = Vec::with_capacity(range.len() * self.n_mels);
        for frame in range {
            // Frame `frame` starts at `frame * hop - n_fft/2` in the unpadded signal.
            let start = (frame * HOP_LENGTH) as isize - (N_FFT / 2) as isize;
            for (k, slot) in input.iter_mut().enumerate() {
                *slot = padded_sample(samples, start + k as isize) * self.window[k];
            }
            // A fixed-size plan with matching buffers cannot fail.
            if self
                .fft
                .process_with_scratch(&mut input, &mut spectrum, &mut scratch)
                .is_err()
            {
                spectrum.iter_mut().for_each(|c| *c = Default::default());
            }
            for (p, c) in power.iter_mut().zip(&spectrum) {
                *p = c.re * c.re + c.im * c.im;
            }
            for filter in &self.filters {
                let bins = &power[filter.start..filter.start + filter.weights.len()];
                let mel: f32 = bins.iter().zip(&filter.weights).map(|(p, w)| p * w).sum();
                out.push(mel.max(1e-10).log10());
            }
        }
        out
    }
}

/// Sample `index` of the window zero-padded to [`N_SAMPLES`] and then reflect-padded
/// by `N_FFT / 2` on both sides (numpy/torch `reflect`: the edge is not repeated).
fn padded_sample(samples: &[f32], index: isize) -> f32 {
    let n = N_SAMPLES as isize;
    let index = if index < 0 {
        -index
    } else if index >= n {
        2 * (n - 1) - index
    } else {
        index
    };
    usize::try_from(index)
        .ok()
        .and_then(|i| samples.get(i))
        .copied()
        .unwrap_or(0.0)
}

/// Slaney-style mel scale (linear below 1 kHz, logarithmic above), as librosa and
/// transformers' `hertz_to_mel(mel_scale="slaney")`.
fn hertz_to_mel(freq: f64) -> f64 {
    let min_log_hertz = 1000.0;
    let min_log_mel = 15.0;
    let logstep = 27.0 / 6.4f64.ln();
    if freq >= min_log_hertz {
        min_log_mel + (freq / min_log_hertz).ln() * logstep
    } else {
        3.0 * freq / 200.0
    }
}

/// Inverse of [`hertz_to_mel`].
fn mel_to_hertz(mel: f64) -> f64 {
    let min_log_hertz = 1000.0;
    let min_log_mel = 15.0;
    let logstep = 6.4f64.ln() / 27.0;
    if mel >= min_log_mel {
        min_log_hertz * (logstep * (mel - min_log_mel)).exp()
    } else {
        200.0 * mel / 3.0
    }
}

/// Slaney-normalised triangular mel filters from 0 Hz to `sample_rate / 2`:
/// `n_mels` rows of `n_fft / 2 + 1` weights (transformers' `mel_filter_bank`
/// with `norm="slaney", mel_scale="slaney"`, transposed).
pub fn mel_filters(n_mels: usize, n_fft: usize, sample_rate: u32) -> Vec<Vec<f64>> {
    let n_freqs = n_fft / 2 + 1;
    let nyquist = f64::from(sample_rate / 2);
    let mel_min = hertz_to_mel(0.0);
    let mel_max = hertz_to_mel(nyquist);
    let filter_freqs: Vec<f64> = (0..n_mels + 2)
        .map(|i| mel_to_hertz(mel_min + (mel_max - mel_min) * i as f64 / (n_mels + 1) as f64))
        .collect();
    let fft_freqs: Vec<f64> = (0..n_freqs)
        .map(|i| nyquist * i as f64 / (n_freqs - 1).max(1) as f64)
        .collect();
    (0..n_mels)
        .map(|m| {
            let (lower, center, upper) = (filter_freqs[m], filter_freqs[m + 1], filter_freqs[m + 2]);
            let enorm = 2.0 / (upper - lower);
            fft_freqs
                .iter()
                .map(|&f| {
                    let down = (f - lower) / (center - lower);
                    let up = (upper - f) / (upper - center);
                    down.min(up).max(0.0) * enorm
                })
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_are_slaney_normalised_triangles() {
        for n_mels in [80, 128] {
            let filters = mel_filters(n_mels, N_FFT, SAMPLE_RATE);
            assert_eq!(filters.len(), n_mels);
            for row in &filters {
                assert_eq!(row.len(), N_FREQS);
                assert!(row.iter().all(|w| *w >= 0.0));
                assert!(row.iter().any(|w| *w > 0.0));
            }
        }
    }

    #[test]
    fn silence_is_flat_and_shapes_hold() {
        for (n_mels, seconds, windows) in [(80, 0.0, 1), (128, 1.0, 1), (80, 30.0, 1), (80, 30.5, 2)] {
            let mel = LogMel::new(n_mels).unwrap();
            let samples = vec![0.0f32; (seconds * 16_000.0) as usize];
            let out = mel.compute(&samples);
            assert_eq!(out.windows.len(), windows);
            for w in &out.windows {
                assert_eq!(w.len(), n_mels * N_FRAMES);
                // log10(1e-10) = -10, max - 8 clamps nothing, (-10 + 4) / 4 = -1.5
                assert!(w.iter().all(|v| (*v + 1.5).abs() < 1e-6));
            }
        }
    }

    #[test]
    fn rejects_bad_bin_counts() {
        for n in [0, 513] {
            assert!(LogMel::new(n).is_err());
        }
    }
}
