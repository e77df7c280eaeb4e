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

/// The waveform of a beep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wave {
    /// A pure sine (every classic clip).
    Sine,
    /// A square wave (odd harmonics: a buzzer).
    Square,
    /// A triangle wave (weak odd harmonics).
    Triangle,
    /// A sine with its second and third harmonics (a chime-like tone).
    Rich,
}

impl Wave {
    /// Every waveform.
    pub const ALL: [Wave; 4] = [Wave::Sine, Wave::Square, Wave::Triangle, Wave::Rich];

    /// The wave's value `t` seconds into a beep at `frequency` Hz.
    fn at(self, frequency: f64, t: f64) -> f64 {
        let tau = std::f64::consts::TAU;
        let phase = frequency * t;
        let x = phase.fract();
        match self {
            // The classic clips' exact arithmetic (their bytes stay the same).
            Wave::Sine => (2.0 * std::f64::consts::PI * frequency * t).sin(),
            Wave::Square => {
                if x < 0.5 {
                    0.7
                } else {
                    -0.7
                }
            }
            Wave::Triangle => 1.0 - 4.0 * (x - 0.5).abs(),
            Wave::Rich => {
                ((tau * phase).sin()
                    + 0.5 * (2.0 * tau * phase).sin()
                    + 0.3 * (3.0 * tau * phase).sin())
                    / 1.5
            }
        }
    }
}

/// How a clip sounds beyond what it holds (the varied style draws it; classic
/// clips are [`Timbre::PLAIN`]): people's recordings have buzzers and chimes,
/// soft fades and background hiss, and the demo model, trained on clean sine
/// beeps only, miscounted them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timbre {
    /// The beeps' waveform.
    pub wave: Wave,
    /// Fade-in and fade-out, each this fraction of a beep (the classic
    /// 10 ms ramps when 0).
    pub fade: f64,
    /// Standard deviation of white noise added over the whole clip.
    pub hiss: f64,
    /// Amplitude of a 50 Hz mains hum added over the whole clip.
    pub hum: f64,
}

impl Timbre {
    /// Clean sine beeps with 10 ms ramps.
    pub const PLAIN: Timbre = Timbre {
        wave: Wave::Sine,
        fade: 0.0,
        hiss: 0.0,
        hum: 0.0,
    };
}

/// The clip's samples in `[-1, 1]`: sine beeps with 10 ms raised-cosine ramps.
pub fn render(spec: &BeepSpec) -> Vec<f32> {
    render_with(spec, &Timbre::PLAIN, &mut Rng::new(0))
}

/// The clip's samples in `[-1, 1]` with `timbre` (`rng` draws the hiss; it is
/// not drawn from when there is none, so [`render`] is unchanged).
pub fn render_with(spec: &BeepSpec, timbre: &Timbre, rng: &mut Rng) -> Vec<f32> {
    let rate = f64::from(SAMPLE_RATE);
    let total = (spec.duration() * rate).round() as usize;
    let mut samples = vec![0f32; total];
    let beep_len = (spec.beep * rate).round() as usize;
    let ramp = if timbre.fade > 0.0 {
        ((timbre.fade * spec.beep * rate) as usize).max(1)
    } else {
        (0.01 * rate) as usize
    };
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
            *slot = (spec.amplitude * envelope * timbre.wave.at(spec.frequency, t)) as f32;
        }
    }
    if timbre.hiss > 0.0 || timbre.hum > 0.0 {
        for (i, slot) in samples.iter_mut().enumerate() {
            let t = i as f64 / rate;
            // A sum of four uniforms: near enough Gaussian for hiss.
            let noise = if timbre.hiss > 0.0 {
                let sum: f64 = (0..4).map(|_| rng.range_f(-1.0, 1.0)).sum();
                timbre.hiss * sum * (3.0f64 / 4.0).sqrt()
            } else {
                0.0
            };
            let hum = timbre.hum * (std::f64::consts::TAU * 50.0 * t).sin();
            *slot = (f64::from(*slot) + noise + hum).clamp(-1.0, 1.0) as f32;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn rms(samples: &[f32], at: f64, width: f64) -> f64 {
        let rate = f64::from(SAMPLE_RATE);
        let (from, to) = (
            ((at - width) * rate) as usize,
            ((at + width) * rate) as usize,
        );
        let window = &samples[from..to];
        (window.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>() / window.len() as f64).sqrt()
    }

    /// Every waveform, faded and under hiss and hum, still puts its beeps where
    /// the spec says and nothing as loud between them.
    #[test]
    fn a_timbre_keeps_the_beeps_where_the_spec_puts_them() {
        let spec = BeepSpec {
            count: 3,
            pitch: Pitch::High,
            frequency: 1500.0,
            lead: 0.4,
            beep: 0.3,
            gap: 0.5,
            amplitude: 0.3,
        };
        for wave in Wave::ALL {
            let timbre = Timbre {
                wave,
                fade: 0.3,
                hiss: 0.03,
                hum: 0.02,
            };
            let samples = render_with(&spec, &timbre, &mut Rng::new(7));
            assert_eq!(samples.len(), (spec.duration() * 16_000.0).round() as usize);
            for k in 0..3 {
                let beep = rms(&samples, 0.4 + 0.15 + k as f64 * 0.8, 0.05);
                let quiet = rms(&samples, 0.4 + 0.3 + 0.25 + k as f64 * 0.8, 0.05);
                assert!(
                    beep > 3.0 * quiet,
                    "{wave:?} beep {k}: {beep} against {quiet}"
                );
            }
        }
    }

    /// Plain clips are what they always were: a sine with 10 ms ramps and
    /// silence between beeps.
    #[test]
    fn a_plain_clip_is_a_clean_sine() {
        let spec = BeepSpec::random(2, Pitch::Low, &mut Rng::new(3));
        let samples = render(&spec);
        assert_eq!(
            samples,
            render_with(&spec, &Timbre::PLAIN, &mut Rng::new(99))
        );
        let rate = f64::from(SAMPLE_RATE);
        let start = (spec.lead * rate).round() as usize;
        let mid = start + (spec.beep / 2.0 * rate) as usize;
        let t = (mid - start) as f64 / rate;
        let want = spec.amplitude * (2.0 * std::f64::consts::PI * spec.frequency * t).sin();
        assert!((f64::from(samples[mid]) - want).abs() < 1e-3);
        let between = ((spec.lead + spec.beep + spec.gap / 2.0) * rate) as usize;
        assert_eq!(samples[between], 0.0);
    }
}
