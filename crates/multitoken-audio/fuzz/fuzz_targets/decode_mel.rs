//! Fuzz target: arbitrary bytes through the whole audio front end must give
//! samples/log-mel or an error, never a panic, hang or huge allocation.
//!
//! Two paths per input: the bytes as a file (symphonia probe with each extension
//! hint, then downmix + resample + log-mel), and the bytes as raw interleaved f32
//! with a rate and channel count taken from the first bytes (resampler edge cases:
//! odd rates, 1..8 channels, NaN/inf, very short clips).

#![no_main]

use libfuzzer_sys::fuzz_target;
use multitoken_audio::{decode_bytes, to_mono_16k, DecodeConfig, LogMel};

fuzz_target!(|data: &[u8]| {
    // Short limit: keeps every run small whatever the header claims.
    let config = DecodeConfig::with_max_seconds(5.0);
    for ext in [None, Some("wav"), Some("flac"), Some("mp3"), Some("ogg")] {
        if let Ok(decoded) = decode_bytes("fuzz input", data.to_vec(), ext, &config) {
            if let Ok(mono) = to_mono_16k(
                "fuzz input",
                &decoded.samples,
                decoded.sample_rate,
                decoded.channels,
                &config,
            ) {
                if let Ok(mel) = LogMel::new(80) {
                    let windows = mel.compute(&mono);
                    assert!(windows
                        .windows
                        .iter()
                        .all(|w| w.iter().all(|v| v.is_finite())));
                }
            }
        }
    }
    if data.len() >= 5 {
        let rate = 1_000 + u32::from(u16::from_le_bytes([data[0], data[1]])) * 3;
        let channels = usize::from(data[2] % 8) + 1;
        let samples: Vec<f32> = data[4..]
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        if let Ok(mono) = to_mono_16k("raw fuzz input", &samples, rate, channels, &config) {
            if let Ok(mel) = LogMel::new(128) {
                let _ = mel.compute(&mono);
            }
        }
    }
});
