//! Broken and hostile documents: every one is a clear error naming the item, never
//! a panic. The PDFs are the small files in `testdata/` (`testdata/make_pdfs.py`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use multitoken_core::Item;
use multitoken_document::{extract_item, DocumentFormat, ExtractConfig};

fn testdata(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata").join(name)
}

/// Extracts testdata file `name` with `max_bytes` and renders the outcome with
/// the testdata directory written as `T`.
fn check(name: &str, max_bytes: u64, expect: &str) {
    let path = testdata(name);
    let got = match extract_item(&Item::Path(path), &ExtractConfig { max_bytes }) {
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
        let got = extract_item(&Item::Path(testdata(name)), &ExtractConfig { max_bytes: LIMIT });
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
    let got = match extract_item(&Item::Path(path.clone()), &ExtractConfig { max_bytes: LIMIT }) {
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
    check_bytes("empty.pdf", b"", "error: D/empty.pdf: cannot read PDF: PDF error: couldn't parse input: invalid file header");
    check_bytes("image.txt", b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x10", "error: D/image.txt: looks like binary data, not text (it contains NUL bytes)");
    check_bytes("latin1.txt", b"Caf\xe9 cr\xe8me br\xfbl\xe9e, d\xe9j\xe0 vu.\n\nNext paragraph.", "Café crème brûlée, déjà vu.\n\nNext paragraph.");
    check_bytes("notes.md", b"# Notes\n\n* first *point*\n* second", "Notes\n\nfirst point second");
}

/// Every truncation and many single-byte corruptions of a valid PDF: extraction
/// returns (text or an error naming the item); nothing panics or hangs.
#[test]
fn mutated_pdfs_never_panic() {
    let good = std::fs::read(testdata("hello.pdf")).unwrap();
    let config = ExtractConfig { max_bytes: LIMIT };
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
