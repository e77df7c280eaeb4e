//! Fuzz target: any bytes as an audio file (WAV and FLAC headers above all: the
//! seeds are a plain WAV, a WAV symphonia reads, and constant-subframe FLACs)
//! decode to samples or a clear error within the limits, never a panic, an abort
//! or more memory than `max_seconds × max_sample_rate` samples.

#![no_main]

use libfuzzer_sys::fuzz_target;
use multitoken_audio::{decode_bytes, load_audio, DecodeConfig};
use multitoken_core::Item;

fuzz_target!(init: keep_caught_panics(), |data: &[u8]| {
    // A crash libFuzzer cannot record (a stack overflow kills it outright): with
    // MULTITOKEN_FUZZ_LAST set, every input is written there first.
    if let Some(last) = std::env::var_os("MULTITOKEN_FUZZ_LAST") {
        let _ = std::fs::write(last, data);
    }
    let config = DecodeConfig { max_seconds: 2.0, max_sample_rate: 48_000, max_channels: 8 };
    if let Ok(samples) = load_audio(&Item::Bytes(data.to_vec()), &config) {
        // 2 s at 16 kHz, rounded up by the resampler.
        assert!(samples.len() <= 32_001, "{} samples", samples.len());
    }
    if let Ok(decoded) = decode_bytes("fuzz", data.to_vec(), Some("flac"), &config) {
        assert!(decoded.channels <= 8 && decoded.sample_rate <= 48_000);
    }
});

/// libfuzzer-sys aborts on every panic, even one our code catches by design (a
/// third-party parser's, turned into an error naming the item): this hook only
/// reports it. A panic that escapes the target still aborts (libfuzzer-sys
/// checks after each input), so those remain crashes.
fn keep_caught_panics() {
    std::panic::set_hook(Box::new(|info| eprintln!("panic: {info}")));
}
