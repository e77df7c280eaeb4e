//! Broken and hostile input: every case is a clear error naming the item, never a panic.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

use multitoken_audio::{decode_bytes, load_audio, to_mono_16k, DecodeConfig};
use multitoken_core::Item;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/audio").join(name)
}

/// A RIFF/WAVE file: `format` 1 (PCM) or 3 (IEEE float), `bits` per sample.
fn wav(format: u16, channels: u16, rate: u32, bits: u16, data: &[u8]) -> Vec<u8> {
    let block = channels * bits / 8;
    let mut out = Vec::new();
    out.extend_from_slice(b"RIFF");
    out.extend_from_slice(&(36 + data.len() as u32).to_le_bytes());
    out.extend_from_slice(b"WAVEfmt ");
    out.extend_from_slice(&16u32.to_le_bytes());
    out.extend_from_slice(&format.to_le_bytes());
    out.extend_from_slice(&channels.to_le_bytes());
    out.extend_from_slice(&rate.to_le_bytes());
    out.extend_from_slice(&(rate * u32::from(block)).to_le_bytes());
    out.extend_from_slice(&block.to_le_bytes());
    out.extend_from_slice(&bits.to_le_bytes());
    out.extend_from_slice(b"data");
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out.extend_from_slice(data);
    out
}

fn float_wav(samples: &[f32]) -> Vec<u8> {
    let data: Vec<u8> = samples.iter().flat_map(|s| s.to_le_bytes()).collect();
    wav(3, 1, 16_000, 32, &data)
}

/// Loads `bytes` as an item and renders the outcome.
fn check(bytes: Vec<u8>, max_seconds: f64, expect: &str) {
    let config = DecodeConfig::with_max_seconds(max_seconds);
    let got = match load_audio(&Item::Bytes(bytes), &config) {
        Ok(samples) => format!("ok {} samples", samples.len()),
        Err(e) => e.to_string(),
    };
    assert!(got.contains(expect), "expected `{expect}` in `{got}`");
}

#[test]
fn broken_files_are_clear_errors() {
    let good = std::fs::read(fixture("speech16k.wav")).unwrap();
    let flac = std::fs::read(fixture("stereo44k.flac")).unwrap();
    let ogg = std::fs::read(fixture("mono22k.ogg")).unwrap();
    let mp3 = std::fs::read(fixture("mono48k.mp3")).unwrap();
    let n = good.len();
    check(good.clone(), 3600.0, "ok 40000 samples");
    check(Vec::new(), 3600.0, "audio of 0 bytes: zero-length audio");
    check(b"this is not audio at all, just text".to_vec(), 3600.0, "unsupported audio format");
    check(vec![0u8; 4096], 3600.0, "unsupported audio format");
    check(good[..n / 2].to_vec(), 3600.0, "truncated audio: the header announces 40000 frames");
    check(good[..44].to_vec(), 3600.0, "truncated audio");
    check(good[..20].to_vec(), 3600.0, "audio of 20 bytes");
    check(wav(1, 1, 16_000, 16, &[]), 3600.0, "zero-length audio");
    check(good.clone(), 1.0, "over the limit of 1.0 s");
    check(float_wav(&[0.1, f32::NAN, 0.2]), 3600.0, "sample 1 is not a finite number (NaN)");
    check(float_wav(&[0.1, 0.2, f32::INFINITY]), 3600.0, "sample 2 is not a finite number (inf)");
    // WMA in a WAV container: a codec we do not decode.
    check(wav(0x161, 1, 16_000, 16, &[0u8; 256]), 3600.0, "audio of 300 bytes: unsupported audio format");
    check(flac[..flac.len() / 3].to_vec(), 3600.0, "truncated audio");
    for (name, bytes) in [("flac", &flac), ("ogg", &ogg), ("mp3", &mp3)] {
        // symphonia keeps vorbis end padding (254 samples here) that libsndfile trims.
        check(bytes.clone(), 3600.0, if name == "ogg" { "ok 16254 samples" } else { "ok 16000 samples" });
        let cut = bytes[..bytes.len() / 2].to_vec();
        // Streams without a frame count in the header may end early; either way no panic.
        let outcome = load_audio(&Item::Bytes(cut), &DecodeConfig::default());
        if let Err(e) = outcome {
            assert!(e.to_string().contains("bytes"), "{name}: {e}");
        }
    }
}

#[test]
fn corrupted_bytes_never_panic() {
    let sources = ["speech16k.wav", "stereo44k.flac", "mono22k.ogg", "mono48k.mp3"];
    let mut state = 0x2545_f491_4f6c_dd1du64;
    for source in sources {
        let good = std::fs::read(fixture(source)).unwrap();
        for round in 0..24 {
            let mut bytes = good.clone();
            for _ in 0..(1 + round % 8) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let at = (state % bytes.len() as u64) as usize;
                bytes[at] ^= (state >> 32) as u8 | 1;
            }
            let _ = decode_bytes(source, bytes, None, &DecodeConfig::default());
        }
    }
}

#[test]
fn paths_and_items_name_themselves() {
    let missing = fixture("no-such-file.wav");
    let e = load_audio(&Item::Path(missing.clone()), &DecodeConfig::default()).unwrap_err();
    assert!(e.to_string().starts_with(&format!("{}: cannot read", missing.display())), "{e}");
    let e = load_audio(&Item::Text("hello".into()), &DecodeConfig::default()).unwrap_err();
    assert!(e.to_string().contains("must be a path or file bytes"), "{e}");
}

#[test]
fn raw_samples_are_checked() {
    let cases: &[(&[f32], u32, usize, &str)] = &[
        (&[0.0; 32], 16_000, 1, "ok 32"),
        (&[0.0; 32], 16_000, 2, "ok 16"),
        (&[], 16_000, 1, "clip: zero-length audio"),
        (&[0.0, f32::NEG_INFINITY], 16_000, 1, "clip: sample 1 is not a finite number (-inf)"),
        (&[0.0; 3], 16_000, 2, "not a whole number of 2-channel frames"),
        (&[0.0; 4], 0, 1, "sample rate 0 Hz is outside"),
        (&[0.0; 4], 16_000, 0, "0 channels"),
        (&[0.0; 20_000], 16_000, 1, "over the limit of 1.0 s"),
    ];
    for (samples, rate, channels, expect) in cases {
        let got = match to_mono_16k("clip", samples, *rate, *channels, &DecodeConfig::with_max_seconds(1.0)) {
            Ok(out) => format!("ok {}", out.len()),
            Err(e) => e.to_string(),
        };
        assert!(got.contains(expect), "expected `{expect}` in `{got}`");
    }
}

/// A transcript modality whose `multitoken.json` settings are wrong fails to
/// build with a message naming the setting or the missing model.
#[test]
fn transcript_modality_configs_that_cannot_work_are_refused() {
    multitoken_audio::link();
    let context = multitoken_core::ModalityContext::cpu_f32(std::env::temp_dir());
    let build = |config: serde_json::Value| {
        multitoken_core::build_text_modality("audio_whisper_transcript", &config, &context)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    let missing = build(serde_json::json!({"model_path": "no-such-whisper-dir"}));
    assert!(missing.contains("no-such-whisper-dir"), "{missing}");
    let typo = build(serde_json::json!({"model_pth": "x"}));
    assert!(typo.contains("model_pth"), "{typo}");
    let negative = build(serde_json::json!({"model_path": "x", "max_seconds": -1.0}));
    assert!(negative.contains("max_seconds"), "{negative}");
}

/// CRC-8 (poly 0x07) of a FLAC frame header.
fn crc8(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |mut crc, &b| {
        crc ^= b;
        for _ in 0..8 {
            crc = if crc & 0x80 != 0 {
                (crc << 1) ^ 0x07
            } else {
                crc << 1
            };
        }
        crc
    })
}

/// CRC-16 (poly 0x8005) of a whole FLAC frame.
fn crc16(bytes: &[u8]) -> u16 {
    bytes.iter().fold(0u16, |mut crc, &b| {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x8005
            } else {
                crc << 1
            };
        }
        crc
    })
}

/// A FLAC file of `frames` frames of `block` samples per channel, every subframe
/// CONSTANT (3 bytes a channel a frame, whatever the block size): a few KB that
/// decode to as many samples as the header says. `total` is STREAMINFO's sample
/// count (0: unknown).
fn constant_flac(rate: u32, channels: u8, block: u16, frames: u32, total: u64) -> Vec<u8> {
    let mut out = b"fLaC".to_vec();
    // Last metadata block, STREAMINFO, 34 bytes.
    out.extend_from_slice(&[0x80, 0, 0, 34]);
    out.extend_from_slice(&block.to_be_bytes());
    out.extend_from_slice(&block.to_be_bytes());
    out.extend_from_slice(&[0; 6]);
    // 20 bits rate, 3 bits channels - 1, 5 bits bits-per-sample - 1, 36 bits total.
    let packed: u64 = (u64::from(rate) << 44)
        | (u64::from(channels - 1) << 41)
        | (15 << 36)
        | (total & ((1 << 36) - 1));
    out.extend_from_slice(&packed.to_be_bytes());
    out.extend_from_slice(&[0; 16]);
    for number in 0..frames {
        let start = out.len();
        // Sync, fixed blocking; block size from the 16 bits after the number, rate
        // from STREAMINFO; independent channels, 16 bits per sample.
        out.extend_from_slice(&[0xFF, 0xF8, 0x70, ((channels - 1) << 4) | 0x08]);
        match number {
            0..=0x7F => out.push(number as u8),
            0x80..=0x7FF => {
                out.extend_from_slice(&[0xC0 | (number >> 6) as u8, 0x80 | (number & 0x3F) as u8])
            }
            _ => out.extend_from_slice(&[
                0xE0 | (number >> 12) as u8,
                0x80 | ((number >> 6) & 0x3F) as u8,
                0x80 | (number & 0x3F) as u8,
            ]),
        }
        out.extend_from_slice(&(block - 1).to_be_bytes());
        out.push(crc8(&out[start..]));
        for channel in 0..channels {
            // CONSTANT subframe, no wasted bits, then the 16-bit value.
            out.push(0);
            out.extend_from_slice(&(1000i16 * i16::from(channel)).to_be_bytes());
        }
        out.extend_from_slice(&crc16(&out[start..]).to_be_bytes());
    }
    out
}

/// Issue 23, item 1: a header announcing a huge rate or many channels is refused
/// before a single packet is decoded, and the duration limit counts samples as
/// they are decoded when the header gives no count.
#[test]
fn audio_bombs_are_refused_from_the_header() {
    let check = |bytes: Vec<u8>, config: DecodeConfig, expect: &str| {
        let got = match load_audio(&Item::Bytes(bytes), &config) {
            Ok(samples) => format!("ok {} samples", samples.len()),
            Err(e) => e.to_string(),
        };
        assert!(got.contains(expect), "expected `{expect}` in `{got}`");
    };
    let server = DecodeConfig::with_max_seconds(30.0);
    // The file: 655,350 Hz x 8 channels, 29.9 s in ~11 KB.
    let bomb = constant_flac(655_350, 8, 65_535, 299, 299 * 65_535);
    assert!(bomb.len() < 12_000, "{}", bomb.len());
    check(
        bomb,
        server,
        "sample rate 655350 Hz is outside 1000..=192000 Hz",
    );
    // An allowed rate with too many channels, and both within limits.
    check(
        constant_flac(48_000, 8, 4_800, 2, 9_600),
        DecodeConfig {
            max_channels: 4,
            ..server
        },
        "8 channels (1..=4 supported)",
    );
    check(
        constant_flac(48_000, 8, 4_800, 10, 48_000),
        server,
        "ok 16000 samples",
    );
    // The header's count over the limit is refused before decoding.
    check(
        constant_flac(192_000, 8, 65_535, 3, 192_000 * 60),
        server,
        "audio is 60.0 s long, over the limit of 30.0 s",
    );
    // No count in the header: 88 frames of 65,535 samples (30.04 s) stop at the
    // limit, one packet past it.
    check(
        constant_flac(192_000, 8, 65_535, 88, 0),
        server,
        "over the limit of 30.0 s",
    );
    // A WAV at 0 Hz used to reach symphonia's `TimeBase` assertion (a panic).
    for (rate, channels, expect) in [
        (0, 1, "sample rate 0 Hz is outside"),
        (8_000, 0, "0 channels"),
    ] {
        let mut bytes = wav(1, 1, rate, 24, &[0u8; 30]);
        bytes[22..24].copy_from_slice(&u16::to_le_bytes(channels));
        check(bytes, DecodeConfig::default(), expect);
    }
    // A limit that is not a positive number refuses instead of turning off.
    check(
        wav(1, 1, 16_000, 16, &[0u8; 64]),
        DecodeConfig::with_max_seconds(f64::NAN),
        "must be a positive number",
    );
}
