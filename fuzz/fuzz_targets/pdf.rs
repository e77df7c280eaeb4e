//! Fuzz target: any bytes as a PDF give text or an error naming the item within
//! the page, stream and text limits, never a panic or a hang.

#![no_main]

use libfuzzer_sys::fuzz_target;
use multitoken_document::{extract_bytes, DocumentFormat, ExtractConfig};

fuzz_target!(init: keep_caught_panics(), |data: &[u8]| {
    // A crash libFuzzer cannot record (a stack overflow kills it outright): with
    // MULTITOKEN_FUZZ_LAST set, every input is written there first.
    if let Some(last) = std::env::var_os("MULTITOKEN_FUZZ_LAST") {
        let _ = std::fs::write(last, data);
    }
    let config = ExtractConfig {
        max_bytes: 1 << 20,
        max_pages: 50,
        max_pdf_stream_bytes: 1 << 20,
        max_text_bytes: 1 << 20,
    };
    match extract_bytes(data, DocumentFormat::Pdf, "fuzz.pdf", &config) {
        Ok(text) => assert!(text.len() <= 1 << 20),
        Err(error) => assert!(error.to_string().starts_with("fuzz.pdf")),
    }
});

/// libfuzzer-sys aborts on every panic, even one our code catches by design (a
/// third-party parser's, turned into an error naming the item): this hook only
/// reports it. A panic that escapes the target still aborts (libfuzzer-sys
/// checks after each input), so those remain crashes.
fn keep_caught_panics() {
    std::panic::set_hook(Box::new(|info| eprintln!("panic: {info}")));
}
