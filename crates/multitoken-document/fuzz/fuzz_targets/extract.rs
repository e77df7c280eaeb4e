//! Fuzz target: text extraction of arbitrary bytes as PDF, Markdown, text and
//! sniffed bytes must return text or an error, never panic or hang.

#![no_main]

use libfuzzer_sys::fuzz_target;
use multitoken_core::Item;
use multitoken_document::{extract_bytes, extract_item, DocumentFormat, ExtractConfig};

fuzz_target!(|data: &[u8]| {
    let config = ExtractConfig::with_max_bytes(1 << 20);
    for format in [DocumentFormat::Pdf, DocumentFormat::Markdown, DocumentFormat::Text] {
        let _ = extract_bytes(data, format, "fuzz input", &config);
    }
    let _ = extract_item(&Item::Bytes(data.to_vec()), &config);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = extract_item(&Item::Text(text.to_string()), &config);
    }
});
