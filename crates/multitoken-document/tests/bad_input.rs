//! Broken and hostile documents: every one is a clear error naming the item, never
//! a panic. The PDFs are the small files in `testdata/` (`testdata/make_pdfs.py`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use multitoken_core::Item;
use multitoken_document::{extract_item, DocumentFormat, ExtractConfig};

#[path = "../../../tests/support/tiny_pdf.rs"]
mod tiny_pdf;
use tiny_pdf::pdf;

fn testdata(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata").join(name)
}

/// Extracts testdata file `name` with `max_bytes` and renders the outcome with
/// the testdata directory written as `T`.
fn check(name: &str, max_bytes: u64, expect: &str) {
    let path = testdata(name);
    let got = match extract_item(&Item::Path(path), &ExtractConfig::with_max_bytes(max_bytes)) {
        Ok(text) => text,
        Err(error) => format!("error: {error}"),
    };
    let dir = testdata("").display().to_string();
    assert_eq!(got.replace(&dir, "T/"), expect, "{name}");
}

const LIMIT: u64 = 1 << 20;

#[test]
fn pdfs_good_and_bad() {
    check(
        "hello.pdf",
        LIMIT,
        "Hello from a small PDF. It has two lines on its first page.\n\nThe second page talks about cats and mats.",
    );
    check("no_text.pdf", LIMIT, "error: T/no_text.pdf: no extractable text (the PDF has no text layer, e.g. a scanned document; OCR it first)");
    check("encrypted.pdf", LIMIT, "error: T/encrypted.pdf: encrypted PDF (password-protected); decrypt it first");
    check("hello.pdf", 100, "error: T/hello.pdf: 989 bytes is over the 100-byte document size limit (raise max_bytes to allow it)");
}

#[test]
fn corrupt_and_truncated_pdfs_name_the_file() {
    for name in ["corrupt.pdf", "truncated.pdf"] {
        let got = extract_item(&Item::Path(testdata(name)), &ExtractConfig::with_max_bytes(LIMIT));
        let message = got.expect_err(name).to_string();
        assert!(message.contains(name) && message.contains("cannot read PDF"), "{message}");
    }
}

/// Writes `bytes` to a temporary file called `name` and extracts it.
fn check_bytes(name: &str, bytes: &[u8], expect: &str) {
    let dir = std::env::temp_dir().join(format!("multitoken-document-bad-input-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    let got = match extract_item(&Item::Path(path.clone()), &ExtractConfig::with_max_bytes(LIMIT)) {
        Ok(text) => text,
        Err(error) => format!("error: {error}"),
    };
    std::fs::remove_file(&path).unwrap();
    assert_eq!(got.replace(&dir.display().to_string(), "D"), expect, "{name}");
}

#[test]
fn text_documents_good_and_bad() {
    check_bytes("empty.txt", b"", "error: D/empty.txt: empty document (no text after extraction)");
    check_bytes("blank.md", b"  \n\n<!-- only a comment -->\n", "error: D/blank.md: empty document (no text after extraction)");
    check_bytes("empty.pdf", b"", "error: D/empty.pdf: cannot read PDF: couldn't parse input: invalid file header");
    check_bytes("image.txt", b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x10", "error: D/image.txt: looks like binary data, not text (it contains NUL bytes)");
    check_bytes("latin1.txt", b"Caf\xe9 cr\xe8me br\xfbl\xe9e, d\xe9j\xe0 vu.\n\nNext paragraph.", "Café crème brûlée, déjà vu.\n\nNext paragraph.");
    check_bytes("notes.md", b"# Notes\n\n* first *point*\n* second", "Notes\n\nfirst point second");
}

/// Every truncation and many single-byte corruptions of a valid PDF: extraction
/// returns (text or an error naming the item); nothing panics or hangs.
#[test]
fn mutated_pdfs_never_panic() {
    let good = std::fs::read(testdata("hello.pdf")).unwrap();
    let config = ExtractConfig::with_max_bytes(LIMIT);
    let name = "mutated.pdf";
    let mut outcomes = [0usize; 2];
    let mut run = |bytes: &[u8]| {
        match multitoken_document::extract_bytes(bytes, DocumentFormat::Pdf, name, &config) {
            Ok(_) => outcomes[0] += 1,
            Err(error) => {
                assert!(error.to_string().starts_with(name), "{error}");
                outcomes[1] += 1;
            }
        }
    };
    for len in (0..good.len()).step_by(7) {
        run(&good[..len]);
    }
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    for _ in 0..300 {
        let mut bytes = good.clone();
        for _ in 0..3 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let at = (state % bytes.len() as u64) as usize;
            bytes[at] = (state >> 32) as u8;
        }
        run(&bytes);
    }
    assert!(outcomes[0] > 0 && outcomes[1] > 0, "{outcomes:?}");
}

/// Extracts PDF bytes with `config` and renders the outcome.
fn extract_pdf(bytes: &[u8], config: &ExtractConfig) -> String {
    match multitoken_document::extract_bytes(bytes, DocumentFormat::Pdf, "bomb.pdf", config) {
        Ok(text) => text,
        Err(error) => format!("error: {error}"),
    }
}

/// Issue 23, item 2: pages are counted in the parsed page tree (an escaped
/// `/#50age` is still a page), compressed streams inflate under a budget, and the
/// extracted text has a limit.
#[test]
fn pdf_bombs_hit_their_limits() {
    let page_text = |i: usize| format!("Page {i}").into_bytes();
    let config = ExtractConfig { max_pages: 5, ..ExtractConfig::with_max_bytes(LIMIT) };
    for page_type in ["/Page", "/#50age"] {
        let many = pdf(40, page_type, false, page_text);
        assert_eq!(
            extract_pdf(&many, &config),
            "error: bomb.pdf: the PDF has 40 pages, more than the limit of 5 (raise max_pages to allow it)",
            "{page_type}"
        );
        assert_eq!(extract_pdf(&pdf(3, page_type, true, page_text), &config), "Page 0\n\nPage 1\n\nPage 2");
    }
    // The server's cheap check counts the same way, without extracting.
    let many = Item::Bytes(pdf(40, "/#50age", false, page_text));
    let err = multitoken_document::check_document(&many, &config).unwrap_err().to_string();
    assert!(err.contains("the PDF has 40 pages, more than the limit of 5"), "{err}");
    multitoken_document::check_document(&Item::Bytes(pdf(3, "/#50age", true, page_text)), &config).unwrap();
    // One page whose content inflates from a few KB to 8 MiB of spaces.
    let bomb = pdf(1, "/Page", true, |_| vec![b' '; 8 << 20]);
    assert!(bomb.len() < 64 << 10, "{}", bomb.len());
    let streams = ExtractConfig { max_pdf_stream_bytes: 1 << 20, ..ExtractConfig::with_max_bytes(LIMIT) };
    let got = extract_pdf(&bomb, &streams);
    assert!(got.starts_with("error: bomb.pdf: the PDF's compressed streams inflate to more than the limit of 1048576 bytes"), "{got}");
    // Text past the limit stops extraction.
    let wordy = pdf(4, "/Page", true, |_| b"words ".repeat(100));
    let text = ExtractConfig { max_text_bytes: 1000, ..ExtractConfig::with_max_bytes(LIMIT) };
    assert_eq!(
        extract_pdf(&wordy, &text),
        "error: bomb.pdf: the PDF's text is longer than the limit of 1000 bytes (raise max_text_bytes to allow it)"
    );
    assert_eq!(extract_pdf(&wordy, &ExtractConfig::with_max_bytes(LIMIT)).len(), 4 * 599 + 3 * 2);
}

/// Issue 23: `embed FIFO` blocked forever in `open`; a FIFO or a directory is
/// named as such before anything is opened.
#[test]
fn fifos_and_directories_are_not_documents() {
    let dir = std::env::temp_dir().join(format!("multitoken-document-fifo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fifo = dir.join("notes.txt");
    let _ = std::fs::remove_file(&fifo);
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let config = ExtractConfig::with_max_bytes(LIMIT);
    for (path, expect) in [(&fifo, "is not a regular file (a FIFO, socket or device)"), (&dir, "is a directory, not a file")] {
        let err = extract_item(&Item::Path(path.clone()), &config).unwrap_err().to_string();
        assert_eq!(err, format!("{}: cannot read: {expect}", path.display()));
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A PDF of the given object bodies (object `i + 1` is `objects[i]`, 1 the catalog).
fn raw_pdf(objects: &[&str]) -> Vec<u8> {
    let bodies: Vec<&[u8]> = objects.iter().map(|o| o.as_bytes()).collect();
    tiny_pdf::from_objects(&bodies)
}

/// Found by the `pdf` fuzz target: pdf-extract climbs `/Parent` for an inherited
/// MediaBox and follows `Do` into forms by plain recursion, so a page that is its
/// own parent, or a form that draws itself, overflowed the stack and killed the
/// process (no panic to catch). Both are refused before extraction.
#[test]
fn recursive_pdf_structures_are_refused() {
    let config = ExtractConfig::with_max_bytes(LIMIT);
    let font = "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>";
    let own_parent = raw_pdf(&[
        "<< /Type /Catalog /Pages 2 0 R >>",
        "<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        "<< /Type /Page /Parent 3 0 R /Resources << /Font << /F1 4 0 R >> >> /Contents 5 0 R >>",
        font,
        "<< /Length 32 >>\nstream\nBT /F1 12 Tf 72 712 Td (Hi) Tj ET\nendstream",
    ]);
    assert_eq!(
        extract_pdf(&own_parent, &config),
        "error: bomb.pdf: cannot read PDF: the page tree loops (a page is its own ancestor through /Parent)"
    );
    let self_drawing = raw_pdf(&[
        "<< /Type /Catalog /Pages 2 0 R >>",
        "<< /Type /Pages /Kids [3 0 R] /Count 1 /MediaBox [0 0 612 792] >>",
        "<< /Type /Page /Parent 2 0 R /Resources << /XObject << /X 4 0 R >> >> /Contents 5 0 R >>",
        "<< /Type /XObject /Subtype /Form /BBox [0 0 10 10] /Resources << /XObject << /X 4 0 R >> >> /Length 5 >>\nstream\n/X Do\nendstream",
        "<< /Length 5 >>\nstream\n/X Do\nendstream",
    ]);
    assert_eq!(
        extract_pdf(&self_drawing, &config),
        "error: bomb.pdf: cannot read PDF: a form XObject draws itself (directly or through other forms)"
    );
}
