//! Decoding audio files (wav, flac, mp3, ogg/vorbis) with symphonia, downmix to mono,
//! and the checks every input goes through (finite samples, length limit, non-empty).
//!
//! [`load_audio`] is the one entry point a modality uses: item -> mono f32 at 16 kHz.

use std::io::Cursor;

use multitoken_core::Item;
use symphonia::core::audio::SampleBuffer;
use symphonia::core::codecs::{DecoderOptions, CODEC_TYPE_NULL};
use symphonia::core::errors::Error as SymphoniaError;
use symphonia::core::formats::FormatOptions;
use symphonia::core::io::{MediaSourceStream, MediaSourceStreamOptions};
use symphonia::core::meta::MetadataOptions;
use symphonia::core::probe::Hint;

use crate::resample::resample_to;
use crate::{Error, Result, SAMPLE_RATE};

/// Limits applied while decoding.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DecodeConfig {
    /// Longest accepted audio in seconds; longer input is an error, never a silent cut.
    pub max_seconds: f64,
}

impl Default for DecodeConfig {
    /// One hour.
    fn default() -> Self {
        Self { max_seconds: 3600.0 }
    }
}

/// Interleaved samples as decoded, before downmix and resampling.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedAudio {
    /// Interleaved f32 samples in [-1, 1] for integer formats.
    pub samples: Vec<f32>,
    /// Sample rate in Hz.
    pub sample_rate: u32,
    /// Number of interleaved channels.
    pub channels: usize,
}

impl DecodedAudio {
    /// Number of frames (samples per channel).
    pub fn frames(&self) -> usize {
        self.samples.len() / self.channels.max(1)
    }

    /// The mean of the channels, frame by frame (what librosa's `mono=True` does).
    pub fn to_mono(&self) -> Vec<f32> {
        downmix(&self.samples, self.channels)
    }
}

/// A short description of an item for error messages: its path or its size.
pub fn describe_item(item: &Item) -> String {
    match item {
        Item::Path(path) => path.display().to_string(),
        Item::Bytes(bytes) => format!("audio of {} bytes", bytes.len()),
        Item::Text(text) => format!("text item of {} characters", text.chars().count()),
    }
}

/// Decodes an item (a path or file bytes), downmixes to mono and resamples to
/// 16 kHz: the samples Whisper's feature extractor expects.
pub fn load_audio(item: &Item, config: &DecodeConfig) -> Result<Vec<f32>> {
    let name = describe_item(item);
    // decode_item has checked the samples already.
    let decoded = decode_item(item, config)?;
    let mono = downmix(&decoded.samples, decoded.channels);
    resample_to(&name, &mono, decoded.sample_rate, SAMPLE_RATE)
}

/// Raw interleaved f32 samples at `sample_rate` with `channels` channels to mono
/// 16 kHz, with the same checks as a decoded file (finite, non-empty, length limit).
pub fn to_mono_16k(
    name: &str,
    interleaved: &[f32],
    sample_rate: u32,
    channels: usize,
    config: &DecodeConfig,
) -> Result<Vec<f32>> {
    check_samples(name, interleaved, sample_rate, channels, config)?;
    let mono = downmix(interleaved, channels);
    resample_to(name, &mono, sample_rate, SAMPLE_RATE)
}

/// Checks that raw samples can be used: a usable rate and channel count, whole
/// frames, no NaN/inf, not empty, not over the length limit.
pub fn check_samples(
    name: &str,
    interleaved: &[f32],
    sample_rate: u32,
    channels: usize,
    config: &DecodeConfig,
) -> Result<()> {
    check_layout(name, interleaved.len(), sample_rate, channels, config)?;
    check_finite(name, interleaved)
}

/// The checks of [`check_samples`] that need only the sample count.
fn check_layout(name: &str, samples: usize, sample_rate: u32, channels: usize, config: &DecodeConfig) -> Result<()> {
    let format = |reason: String| Error::Format {
        item: name.to_string(),
        reason,
    };
    if !(1000..=768_000).contains(&sample_rate) {
        return Err(format(format!(
            "sample rate {sample_rate} Hz is outside 1000..=768000 Hz"
        )));
    }
    if channels == 0 || channels > 64 {
        return Err(format(format!("{channels} channels (1..=64 supported)")));
    }
    if samples % channels != 0 {
        return Err(format(format!(
            "{samples} samples are not a whole number of {channels}-channel frames"
        )));
    }
    if samples == 0 {
        return Err(Error::Empty {
            item: name.to_string(),
        });
    }
    let seconds = (samples / channels) as f64 / f64::from(sample_rate);
    if seconds > config.max_seconds {
        return Err(Error::TooLong {
            item: name.to_string(),
            seconds,
            limit: config.max_seconds,
        });
    }
    Ok(())
}

/// No NaN or infinity among the samples.
fn check_finite(name: &str, interleaved: &[f32]) -> Result<()> {
    // A branch-free pass first (it vectorises; `find` does not), the position
    // only when there is something to report.
    let all_finite = interleaved.iter().fold(true, |ok, v| ok & v.is_finite());
    if let Some((index, value)) = (!all_finite)
        .then(|| interleaved.iter().enumerate().find(|(_, v)| !v.is_finite()))
        .flatten()
    {
        return Err(Error::NonFinite {
            item: name.to_string(),
            index,
            value: *value,
        });
    }
    Ok(())
}

/// Frame-wise mean of interleaved channels.
pub fn downmix(interleaved: &[f32], channels: usize) -> Vec<f32> {
    if channels <= 1 {
        return interleaved.to_vec();
    }
    let scale = 1.0 / channels as f32;
    if channels == 2 {
        return interleaved.chunks_exact(2).map(|f| (f[0] + f[1]) * scale).collect();
    }
    interleaved
        .chunks_exact(channels)
        .map(|frame| frame.iter().sum::<f32>() * scale)
        .collect()
}

/// Decodes an item to interleaved samples at its own rate.
pub fn decode_item(item: &Item, config: &DecodeConfig) -> Result<DecodedAudio> {
    let name = describe_item(item);
    match item {
        Item::Path(path) => {
            let bytes = std::fs::read(path).map_err(|source| Error::Io {
                item: name.clone(),
                source,
            })?;
            let hint = path.extension().and_then(|e| e.to_str());
            decode_bytes(&name, bytes, hint, config)
        }
        Item::Bytes(bytes) => decode_bytes(&name, bytes.clone(), None, config),
        Item::Text(_) => Err(Error::Unsupported {
            item: name,
            reason: "an audio item must be a path or file bytes, not inline text".to_string(),
        }),
    }
}

/// Decodes the bytes of an audio file; `extension` (without the dot) helps the probe.
pub fn decode_bytes(
    name: &str,
    bytes: Vec<u8>,
    extension: Option<&str>,
    config: &DecodeConfig,
) -> Result<DecodedAudio> {
    if bytes.is_empty() {
        return Err(Error::Empty {
            item: name.to_string(),
        });
    }
    if let Some(wav) = crate::wav::parse(&bytes) {
        // The length limit is checked before the samples are converted.
        let (rate, channels) = (wav.sample_rate, wav.channels);
        let count = wav.data.len() / wav.format.bytes_per_sample();
        check_layout(name, count, rate, channels, config)?;
        let samples = wav.samples();
        if wav.may_be_non_finite() {
            check_finite(name, &samples)?;
        }
        return Ok(DecodedAudio {
            samples,
            sample_rate: rate,
            channels,
        });
    }
    let corrupt = |reason: String| Error::Corrupt {
        item: name.to_string(),
        reason,
    };
    let mut hint = Hint::new();
    if let Some(ext) = extension {
        hint.with_extension(ext);
    }
    let stream = MediaSourceStream::new(
        Box::new(Cursor::new(bytes)),
        MediaSourceStreamOptions::default(),
    );
    let probed = symphonia::default::get_probe()
        .format(
            &hint,
            stream,
            // Gapless: trim mp3 encoder delay/padding as libsndfile and ffmpeg do.
            &FormatOptions {
                enable_gapless: true,
                ..FormatOptions::default()
            },
            &MetadataOptions::default(),
        )
        .map_err(|e| match e {
            SymphoniaError::Unsupported(what) => Error::Unsupported {
                item: name.to_string(),
                reason: format!(
                    "{what} (supported: wav, flac, mp3, ogg/vorbis)"
                ),
            },
            other => corrupt(other.to_string()),
        })?;
    let mut format = probed.format;
    let track = format
        .tracks()
        .iter()
        .find(|t| t.codec_params.codec != CODEC_TYPE_NULL)
        .ok_or_else(|| Error::Unsupported {
            item: name.to_string(),
            reason: "no audio track with a known codec".to_string(),
        })?;
    let track_id = track.id;
    let expected_frames = track.codec_params.n_frames;
    let header_rate = track.codec_params.sample_rate;
    let mut decoder = symphonia::default::get_codecs()
        .make(&track.codec_params, &DecoderOptions::default())
        .map_err(|e| Error::Unsupported {
            item: name.to_string(),
            reason: e.to_string(),
        })?;

    let mut samples: Vec<f32> = Vec::new();
    let mut spec_seen: Option<(u32, usize)> = None;
    let mut buffer: Option<SampleBuffer<f32>> = None;
    loop {
        let packet = match format.next_packet() {
            Ok(packet) => packet,
            Err(SymphoniaError::IoError(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                break
            }
            Err(SymphoniaError::ResetRequired) => break,
            Err(e) => return Err(corrupt(e.to_string())),
        };
        if packet.track_id() != track_id {
            continue;
        }
        let decoded = match decoder.decode(&packet) {
            Ok(decoded) => decoded,
            Err(SymphoniaError::IoError(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                break
            }
            Err(e) => return Err(corrupt(e.to_string())),
        };
        let spec = *decoded.spec();
        let channels = spec.channels.count();
        match spec_seen {
            None => spec_seen = Some((spec.rate, channels)),
            Some(seen) if seen != (spec.rate, channels) => {
                return Err(Error::Unsupported {
                    item: name.to_string(),
                    reason: format!(
                        "the stream changes from {} Hz x {} channels to {} Hz x {channels} channels",
                        seen.0, seen.1, spec.rate
                    ),
                })
            }
            Some(_) => {}
        }
        let needed = decoded.capacity() * channels;
        let buf = match &mut buffer {
            Some(buf) if buf.capacity() >= needed => buf,
            slot => slot.insert(SampleBuffer::<f32>::new(decoded.capacity() as u64, spec)),
        };
        buf.copy_interleaved_ref(decoded);
        samples.extend_from_slice(buf.samples());
        let seconds = (samples.len() / channels.max(1)) as f64 / f64::from(spec.rate.max(1));
        if seconds > config.max_seconds {
            return Err(Error::TooLong {
                item: name.to_string(),
                seconds,
                limit: config.max_seconds,
            });
        }
    }
    let Some((sample_rate, channels)) = spec_seen else {
        return match expected_frames {
            Some(n) if n > 0 => Err(Error::Truncated {
                item: name.to_string(),
                expected: n,
                got: 0,
            }),
            _ => Err(Error::Empty {
                item: name.to_string(),
            }),
        };
    };
    let got = (samples.len() / channels.max(1)) as u64;
    if let Some(expected) = expected_frames {
        if got < expected {
            return Err(Error::Truncated {
                item: name.to_string(),
                expected,
                got,
            });
        }
    }
    let sample_rate = if sample_rate == 0 {
        header_rate.unwrap_or(0)
    } else {
        sample_rate
    };
    check_samples(name, &samples, sample_rate, channels, config)?;
    Ok(DecodedAudio {
        samples,
        sample_rate,
        channels,
    })
}
