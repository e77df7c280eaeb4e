//! Audio clips of one to four beeps, all high or all low, as 16 kHz WAV.

use crate::Rng;

/// Sample rate of every clip.
pub const SAMPLE_RATE: u32 = 16_000;

/// The pitch class of a clip's beeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Pitch {
    /// 250–400 Hz.
    Low,
    /// 1200–1800 Hz.
    High,
}

impl Pitch {
    /// Both pitches, in class order.
    pub const ALL: [Pitch; 2] = [Pitch::Low, Pitch::High];

    /// The English name (`low`).
    pub fn name(self) -> &'static str {
        match self {
            Pitch::Low => "low",
            Pitch::High => "high",
        }
    }
}

/// English number words for beep counts 1–4.
pub const COUNT_WORDS: [&str; 4] = ["one", "two", "three", "four"];

/// The English word for `count` (1–4), capitalised when `capital`.
pub fn count_word(count: usize, capital: bool) -> String {
    let word = COUNT_WORDS
        .get(count.saturating_sub(1))
        .copied()
        .unwrap_or("many");
    if capital {
        let mut chars = word.chars();
        chars
            .next()
            .map(|c| c.to_ascii_uppercase().to_string() + chars.as_str())
            .unwrap_or_default()
    } else {
        word.to_string()
    }
}

/// What one clip holds.
#[derive(Debug, Clone, PartialEq)]
pub struct BeepSpec {
    /// Number of beeps (1–4).
    pub count: usize,
    /// Their pitch class.
    pub pitch: Pitch,
    /// Tone frequency in Hz.
    pub frequency: f64,
    /// Silence before the first beep, seconds.
    pub lead: f64,
    /// Length of each beep, seconds.
    pub beep: f64,
    /// Silence between beeps, seconds.
    pub gap: f64,
    /// Peak amplitude (0–1).
    pub amplitude: f64,
}

impl BeepSpec {
    /// A random clip of `count` beeps at `pitch`: beeps 0.2–0.3 s, gaps
    /// 1.0–1.6 s (so beeps stay apart in one-second time pooling), 0.1–0.4 s lead.
    pub fn random(count: usize, pitch: Pitch, rng: &mut Rng) -> Self {
        let frequency = match pitch {
            Pitch::Low => rng.range_f(250.0, 400.0),
            Pitch::High => rng.range_f(1200.0, 1800.0),
        };
        Self {
            count,
            pitch,
            frequency,
            lead: rng.range_f(0.1, 0.4),
            beep: rng.range_f(0.2, 0.3),
            gap: rng.range_f(1.0, 1.6),
            amplitude: rng.range_f(0.3, 0.8),
        }
    }

    /// Clip length in seconds (0.3 s of silence after the last beep).
    pub fn duration(&self) -> f64 {
        self.lead
            + self.count as f64 * self.beep
            + self.count.saturating_sub(1) as f64 * self.gap
            + 0.3
    }
}

/// The clip's samples in `[-1, 1]`: sine beeps with 10 ms raised-cosine ramps.
pub fn render(spec: &BeepSpec) -> Vec<f32> {
    let rate = f64::from(SAMPLE_RATE);
    let total = (spec.duration() * rate).round() as usize;
    let mut samples = vec![0f32; total];
    let beep_len = (spec.beep * rate).round() as usize;
    let ramp = (0.01 * rate) as usize;
    for k in 0..spec.count {
        let start = ((spec.lead + k as f64 * (spec.beep + spec.gap)) * rate).round() as usize;
        for i in 0..beep_len {
            let Some(slot) = samples.get_mut(start + i) else {
                break;
            };
            let edge = i.min(beep_len - 1 - i);
            let envelope = if edge < ramp {
                0.5 - 0.5 * (std::f64::consts::PI * edge as f64 / ramp as f64).cos()
            } else {
                1.0
            };
            let t = i as f64 / rate;
            *slot = (spec.amplitude
                * envelope
                * (2.0 * std::f64::consts::PI * spec.frequency * t).sin())
                as f32;
        }
    }
    samples
}

/// A 16-bit PCM mono WAV file of `samples` at `rate` Hz.
pub fn wav_bytes(samples: &[f32], rate: u32) -> Vec<u8> {
    let data_len = (samples.len() * 2) as u32;
    let mut out = Vec::with_capacity(44 + samples.len() * 2);
    out.extend_from_slice(b"RIFF");
    out.extend_from_slice(&(36 + data_len).to_le_bytes());
    out.extend_from_slice(b"WAVEfmt ");
    out.extend_from_slice(&16u32.to_le_bytes());
    out.extend_from_slice(&1u16.to_le_bytes()); // PCM
    out.extend_from_slice(&1u16.to_le_bytes()); // mono
    out.extend_from_slice(&rate.to_le_bytes());
    out.extend_from_slice(&(rate * 2).to_le_bytes());
    out.extend_from_slice(&2u16.to_le_bytes());
    out.extend_from_slice(&16u16.to_le_bytes());
    out.extend_from_slice(b"data");
    out.extend_from_slice(&data_len.to_le_bytes());
    for &s in samples {
        let v = (f64::from(s).clamp(-1.0, 1.0) * 32767.0).round() as i16;
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}
