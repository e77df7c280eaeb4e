//! Decoding audio files (wav, flac, mp3, ogg/vorbis) with symphonia, downmix to mono,
//! and the checks every input goes through (finite samples, length limit, non-empty).
//!
//! [`load_audio`] is the one entry point a modality uses: item -> mono f32 at 16 kHz.
//!
//! Memory is bounded by the limits, not by what a file claims: the sample rate
//! and channel count are capped ([`DecodeConfig::max_sample_rate`],
//! [`DecodeConfig::max_channels`]) and checked from the header before anything is
//! decoded, together with the duration when the header gives a frame count;
//! [`load_audio`] downmixes each decoded packet as it comes, so a clip never holds
//! more than `max_seconds × max_sample_rate` mono samples, whatever its channel
//! count. symphonia asserts on some impossible headers (a WAV at 0 Hz): those are
//! refused before it sees them, and any panic left inside it becomes a
//! [`Error::Corrupt`] naming the item.

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
    /// Must be a positive number (NaN is refused, never read as "no limit").
    pub max_seconds: f64,
    /// Highest accepted sample rate in Hz (the header's, checked before decoding).
    pub max_sample_rate: u32,
    /// Most accepted channels (the header's, checked before decoding).
    pub max_channels: usize,
}

/// Lowest accepted sample rate in Hz.
pub const MIN_SAMPLE_RATE: u32 = 1000;
/// Default [`DecodeConfig::max_sample_rate`]: 192 kHz, the highest rate audio
/// interfaces commonly record at.
pub const DEFAULT_MAX_SAMPLE_RATE: u32 = 192_000;
/// Default [`DecodeConfig::max_channels`]: 16 (7.1.4 and ambisonics fit).
pub const DEFAULT_MAX_CHANNELS: usize = 16;

impl Default for DecodeConfig {
    /// One hour, 192 kHz, 16 channels.
    fn default() -> Self {
        Self {
            max_seconds: 3600.0,
            max_sample_rate: DEFAULT_MAX_SAMPLE_RATE,
            max_channels: DEFAULT_MAX_CHANNELS,
        }
    }
}

impl DecodeConfig {
    /// The default limits with `max_seconds` seconds.
    pub fn with_max_seconds(max_seconds: f64) -> Self {
        Self {
            max_seconds,
            ..Self::default()
        }
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
    // The samples are checked already and mono: each packet is downmixed as it is
    // decoded, so memory does not grow with the channel count.
    let decoded = read_item(item, config, Layout::Mono)?;
    resample_to(&name, &decoded.samples, decoded.sample_rate, SAMPLE_RATE)
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

/// The sample rate and channel count against the limits, and the limits themselves
/// (a `max_seconds` that is NaN or not positive would turn the length check off).
fn check_rate_channels(name: &str, sample_rate: u32, channels: usize, config: &DecodeConfig) -> Result<()> {
    let format = |reason: String| Error::Format {
        item: name.to_string(),
        reason,
    };
    if config.max_seconds.is_nan() || config.max_seconds <= 0.0 {
        return Err(format(format!(
            "the length limit max_seconds must be a positive number of seconds, got {}",
            config.max_seconds
        )));
    }
    let max_rate = config.max_sample_rate;
    if !(MIN_SAMPLE_RATE..=max_rate).contains(&sample_rate) {
        return Err(format(format!(
            "sample rate {sample_rate} Hz is outside {MIN_SAMPLE_RATE}..={max_rate} Hz"
        )));
    }
    if channels == 0 || channels > config.max_channels {
        return Err(format(format!("{channels} channels (1..={} supported)", config.max_channels)));
    }
    Ok(())
}

/// `frames` at `sample_rate` against `max_seconds`.
fn check_duration(name: &str, frames: u64, sample_rate: u32, config: &DecodeConfig) -> Result<()> {
    let seconds = frames as f64 / f64::from(sample_rate.max(1));
    // A NaN limit refuses instead of accepting.
    if config.max_seconds.is_nan() || seconds > config.max_seconds {
        return Err(Error::TooLong {
            item: name.to_string(),
            seconds,
            limit: config.max_seconds,
        });
    }
    Ok(())
}

/// The checks of [`check_samples`] that need only the sample count.
fn check_layout(name: &str, samples: usize, sample_rate: u32, channels: usize, config: &DecodeConfig) -> Result<()> {
    let format = |reason: String| Error::Format {
        item: name.to_string(),
        reason,
    };
    check_rate_channels(name, sample_rate, channels, config)?;
    if !samples.is_multiple_of(channels) {
        return Err(format(format!(
            "{samples} samples are not a whole number of {channels}-channel frames"
        )));
    }
    if samples == 0 {
        return Err(Error::Empty {
            item: name.to_string(),
        });
    }
    check_duration(name, (samples / channels) as u64, sample_rate, config)
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
    downmix_iter(interleaved, channels).collect()
}

/// [`downmix`] as an iterator, to append one packet's frames without a copy.
fn downmix_iter(interleaved: &[f32], channels: usize) -> impl Iterator<Item = f32> + '_ {
    let channels = channels.max(1);
    let scale = 1.0 / channels as f32;
    interleaved.chunks_exact(channels).map(move |frame| match frame {
        [only] => *only,
        [left, right] => (left + right) * scale,
        _ => frame.iter().sum::<f32>() * scale,
    })
}

/// What the decoder keeps of each packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// The interleaved samples as decoded.
    Interleaved,
    /// The mean of the channels, computed packet by packet.
    Mono,
}

/// Decodes an item to interleaved samples at its own rate.
pub fn decode_item(item: &Item, config: &DecodeConfig) -> Result<DecodedAudio> {
    read_item(item, config, Layout::Interleaved)
}

fn read_item(item: &Item, config: &DecodeConfig, layout: Layout) -> Result<DecodedAudio> {
    let name = describe_item(item);
    match item {
        Item::Path(path) => {
            let io = |source| Error::Io {
                item: name.clone(),
                source,
            };
            // Before opening: opening a FIFO would block until a writer comes.
            multitoken_core::check_regular_file(path).map_err(io)?;
            let bytes = std::fs::read(path).map_err(io)?;
            let hint = path.extension().and_then(|e| e.to_str());
            decode_with(&name, bytes, hint, config, layout)
        }
        Item::Bytes(bytes) => decode_with(&name, bytes.clone(), None, config, layout),
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
    decode_with(name, bytes, extension, config, Layout::Interleaved)
}

fn decode_with(
    name: &str,
    bytes: Vec<u8>,
    extension: Option<&str>,
    config: &DecodeConfig,
    layout: Layout,
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
        let (samples, channels) = match layout {
            Layout::Interleaved => (wav.samples(), channels),
            Layout::Mono => (wav.mono(), 1),
        };
        if wav.may_be_non_finite() {
            check_finite(name, &samples)?;
        }
        return Ok(DecodedAudio {
            samples,
            sample_rate: rate,
            channels,
        });
    }
    // symphonia asserts on a zero rate (its `TimeBase`): any RIFF/WAVE header is
    // checked here first.
    if let Some((channels, rate)) = crate::wav::fmt_header(&bytes) {
        check_rate_channels(name, rate, channels, config)?;
    }
    // Last resort: a panic inside symphonia is a corrupt file, not a crash.
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        decode_symphonia(name, bytes, extension, config, layout)
    }))
    .unwrap_or_else(|panic| {
        let message = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown failure".to_string());
        Err(Error::Corrupt {
            item: name.to_string(),
            reason: format!("the decoder failed on malformed data ({message})"),
        })
    })
}

fn decode_symphonia(
    name: &str,
    bytes: Vec<u8>,
    extension: Option<&str>,
    config: &DecodeConfig,
    layout: Layout,
) -> Result<DecodedAudio> {
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
                reason: format!("{what} (supported: wav, flac, mp3, ogg/vorbis)"),
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
    // What the header claims is checked before any packet is decoded: a 10 KB
    // FLAC may announce 655 kHz x 8 channels for half a minute.
    let header_channels = track.codec_params.channels.map(|c| c.count());
    if let Some(rate) = header_rate {
        check_rate_channels(name, rate, header_channels.unwrap_or(1), config)?;
        if let Some(frames) = expected_frames {
            check_duration(name, frames, rate, config)?;
        }
    }
    let mut decoder = symphonia::default::get_codecs()
        .make(&track.codec_params, &DecoderOptions::default())
        .map_err(|e| Error::Unsupported {
            item: name.to_string(),
            reason: e.to_string(),
        })?;

    let mut samples: Vec<f32> = Vec::new();
    let mut frames: u64 = 0;
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
            None => {
                // The first packet's layout is what the rest must keep; a rate
                // the header did not give is checked here, before any copy.
                let rate = if spec.rate == 0 {
                    header_rate.unwrap_or(0)
                } else {
                    spec.rate
                };
                check_rate_channels(name, rate, channels, config)?;
                spec_seen = Some((spec.rate, channels));
            }
            Some(seen) if seen != (spec.rate, channels) => return Err(Error::Unsupported {
                item: name.to_string(),
                reason: format!(
                    "the stream changes from {} Hz x {} channels to {} Hz x {channels} channels",
                    seen.0, seen.1, spec.rate
                ),
            }),
            Some(_) => {}
        }
        let rate = if spec.rate == 0 {
            header_rate.unwrap_or(0)
        } else {
            spec.rate
        };
        frames += decoded.frames() as u64;
        check_duration(name, frames, rate, config)?;
        let needed = decoded.capacity() * channels;
        let buf = match &mut buffer {
            Some(buf) if buf.capacity() >= needed => buf,
            slot => slot.insert(SampleBuffer::<f32>::new(decoded.capacity() as u64, spec)),
        };
        buf.copy_interleaved_ref(decoded);
        match layout {
            Layout::Interleaved => samples.extend_from_slice(buf.samples()),
            Layout::Mono => samples.extend(downmix_iter(buf.samples(), channels)),
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
    if let Some(expected) = expected_frames {
        if frames < expected {
            return Err(Error::Truncated {
                item: name.to_string(),
                expected,
                got: frames,
            });
        }
    }
    let sample_rate = if sample_rate == 0 {
        header_rate.unwrap_or(0)
    } else {
        sample_rate
    };
    let channels = match layout {
        Layout::Interleaved => channels,
        Layout::Mono => 1,
    };
    check_samples(name, &samples, sample_rate, channels, config)?;
    Ok(DecodedAudio {
        samples,
        sample_rate,
        channels,
    })
}
