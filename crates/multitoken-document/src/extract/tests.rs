//! Tests of text extraction that need no files: decoding, Markdown, whitespace.

use super::*;

/// Decodes `bytes` as a text document and renders the outcome.
fn check_decode(bytes: &[u8], expect: &str) {
    let got = match decode_text(bytes, "doc.txt") {
        Ok(text) => text,
        Err(error) => format!("error: {error}"),
    };
    assert_eq!(got, expect);
}

#[test]
fn decodes_text_in_any_encoding() {
    check_decode(b"plain ascii", "plain ascii");
    check_decode("caf\u{e9} na\u{ef}ve".as_bytes(), "caf\u{e9} na\u{ef}ve");
    check_decode(b"\xef\xbb\xbfwith a BOM", "with a BOM");
    // Latin-1 / windows-1252: invalid as UTF-8.
    check_decode(b"Le caf\xe9 est tr\xe8s bon, na\xefve \xe9l\xe8ve.", "Le caf\u{e9} est tr\u{e8}s bon, na\u{ef}ve \u{e9}l\u{e8}ve.");
    // UTF-16 with a BOM has NULs but is text.
    check_decode(b"\xff\xfeh\0i\0", "hi");
    check_decode(b"\xfe\xff\0h\0i", "hi");
    // Shift_JIS.
    check_decode(b"\x93\xfa\x96\x7b\x8c\xea\x82\xcc\x95\xb6\x8f\x91\x82\xc5\x82\xb7\x81\x42", "日本語の文書です。");
    check_decode(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR", "error: doc.txt: looks like binary data, not text (it contains NUL bytes)");
    check_decode(
        &[0x1b, 0x02, 0x03, 0x04, 0x05, 0x06, 0x41, 0x42],
        "error: doc.txt: looks like binary data, not text (6 of 8 characters are control or undecodable characters)",
    );
}

fn check_markdown(markdown: &str, expect: &str) {
    assert_eq!(normalize_whitespace(&strip_markdown(markdown)), expect);
}

#[test]
fn strips_markdown_to_text() {
    check_markdown("# Title\n\nSome *emphasis* and **bold**\nsoft-wrapped.", "Title\n\nSome emphasis and bold soft-wrapped.");
    check_markdown("- one\n- two [link](http://x.y)\n\n```rust\nfn f() {}\n```", "one two link\n\nfn f() {}");
    check_markdown("| a | b |\n|---|---|\n| 1 | 2 |\n\n![alt text](img.png) <b>html</b>", "a b 1 2\n\nalt text html");
    check_markdown("> quoted `code`\n\n---\n\nafter", "quoted code\n\nafter");
}

fn check_whitespace(text: &str, expect: &str) {
    assert_eq!(normalize_whitespace(text), expect);
}

#[test]
fn normalises_whitespace_and_keeps_paragraphs() {
    check_whitespace("", "");
    check_whitespace(" \n\t \r\n ", "");
    check_whitespace("a  b\tc\nd", "a b c d");
    check_whitespace("para one\nstill one\n\n\n  para two  \r\n\r\nthree", "para one still one\n\npara two\n\nthree");
    check_whitespace("page one\x0cpage two", "page one\n\npage two");
    check_whitespace("bell\x07 char", "bell char");
}

fn check_format(name: &str, bytes: &[u8], expect: DocumentFormat) {
    assert_eq!(detect_format(Some(Path::new(name)), bytes), expect, "{name}");
}

#[test]
fn detects_formats() {
    check_format("a.txt", b"%PDF-1.7\n...", DocumentFormat::Pdf);
    check_format("a.pdf", b"junk", DocumentFormat::Pdf);
    check_format("README.MD", b"# hi", DocumentFormat::Markdown);
    check_format("notes", b"hi", DocumentFormat::Text);
}

fn check_item(item: Item, max_bytes: u64, expect: &str) {
    let got = match extract_item(&item, &ExtractConfig::with_max_bytes(max_bytes)) {
        Ok(text) => text,
        Err(error) => format!("error: {error}"),
    };
    assert_eq!(got, expect);
}

#[test]
fn extracts_items_and_names_them_in_errors() {
    check_item(Item::Text("  inline\n\n text ".into()), 100, "inline\n\ntext");
    check_item(Item::Text("   ".into()), 100, "error: inline text (3 characters): empty document (no text after extraction)");
    check_item(
        Item::Text("x".repeat(11)),
        10,
        "error: inline text (11 characters): 11 bytes is over the 10-byte document size limit (raise max_bytes to allow it)",
    );
    check_item(Item::Bytes(b"some bytes".to_vec()), 100, "some bytes");
    check_item(Item::Bytes(vec![0, 1, 2]), 100, "error: document data (3 bytes): looks like binary data, not text (it contains NUL bytes)");
    check_item(Item::Bytes(b"%PDF-1.4 nothing else".to_vec()), 100, "error: document data (21 bytes): cannot read PDF: couldn't parse input: invalid file header");
    let missing = Path::new("/nonexistent/doc.txt");
    check_item(Item::Path(missing.into()), 100, "error: /nonexistent/doc.txt: cannot read: No such file or directory (os error 2)");
}
