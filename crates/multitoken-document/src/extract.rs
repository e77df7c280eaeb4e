//! Text extraction: PDF (`pdf-extract`), plain text in any encoding, Markdown, and
//! inline text, all normalised the same way (whitespace collapsed, paragraph breaks
//! kept).
//!
//! Every failure names the item. The PDF parser is third-party code that can panic
//! on malformed files; its panics are caught here and reported as a corrupt PDF, so
//! that one bad document never takes down a batch.
//!
//! Cost is bounded by the limits in [`ExtractConfig`]: input bytes, PDF pages
//! (counted in the parsed page tree), inflated PDF streams and extracted text; PDF
//! extraction is one pass over the pages ([`pdf`]).

use std::io::Read;
use std::path::Path;

use multitoken_core::Item;
use pulldown_cmark::{Event, Options, Parser, TagEnd};

use crate::{Error, Result};

/// Default document size limit: 16 MiB. Extraction and chunking take about ten
/// bytes of memory per byte of text (the text, its normalised copy, token ids and
/// windows), so the default keeps one document well under 200 MB; a book is 1–4 MB.
pub const DEFAULT_MAX_BYTES: u64 = 16 << 20;
/// Default most pages of a PDF.
pub const DEFAULT_MAX_PAGES: usize = 2000;
/// Default most bytes a PDF's compressed streams (images aside) inflate to: 16 MiB,
/// a few thousand pages of text; pdf-extract processes content at roughly 3 s per MB.
pub const DEFAULT_MAX_PDF_STREAM_BYTES: u64 = 16 << 20;
/// Default most bytes of text extracted from a PDF.
pub const DEFAULT_MAX_TEXT_BYTES: u64 = 16 << 20;

/// What kind of document a file or byte string holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DocumentFormat {
    /// A PDF (`%PDF-` magic or a `.pdf` name).
    Pdf,
    /// Markdown (`.md`, `.markdown`, `.mdown`, `.mkd`): markup is stripped.
    Markdown,
    /// Plain text in any encoding.
    Text,
}

/// Settings of text extraction: the bounds every document is held to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtractConfig {
    /// Documents larger than this many bytes are rejected.
    pub max_bytes: u64,
    /// PDFs with more pages (counted in the parsed page tree) are rejected.
    pub max_pages: usize,
    /// PDFs whose compressed streams (images aside) inflate to more bytes are rejected.
    pub max_pdf_stream_bytes: u64,
    /// PDFs whose text is longer than this many bytes are rejected.
    pub max_text_bytes: u64,
}

impl Default for ExtractConfig {
    fn default() -> Self {
        Self {
            max_bytes: DEFAULT_MAX_BYTES,
            max_pages: DEFAULT_MAX_PAGES,
            max_pdf_stream_bytes: DEFAULT_MAX_PDF_STREAM_BYTES,
            max_text_bytes: DEFAULT_MAX_TEXT_BYTES,
        }
    }
}

impl ExtractConfig {
    /// The default bounds with a size limit of `max_bytes`.
    pub fn with_max_bytes(max_bytes: u64) -> Self {
        Self {
            max_bytes,
            ..Self::default()
        }
    }
}

/// A short human name of an item for error messages: its path, or what it is.
pub fn describe_item(item: &Item) -> String {
    match item {
        Item::Path(path) => path.display().to_string(),
        Item::Bytes(bytes) => format!("document data ({} bytes)", bytes.len()),
        Item::Text(text) => format!("inline text ({} characters)", text.chars().count()),
    }
}

/// Extracts the normalised text of one item: a path (format from its magic bytes,
/// else its extension), raw bytes (PDF or text, sniffed), or inline text (used as
/// is; it is never read as a path).
pub fn extract_item(item: &Item, config: &ExtractConfig) -> Result<String> {
    let name = describe_item(item);
    match item {
        Item::Path(path) => {
            let bytes = read_limited(path, &name, config.max_bytes)?;
            let format = detect_format(Some(path), &bytes);
            extract_bytes(&bytes, format, &name, config)
        }
        Item::Bytes(bytes) => {
            let format = detect_format(None, bytes);
            extract_bytes(bytes, format, &name, config)
        }
        Item::Text(text) => {
            check_size(text.len() as u64, &name, config.max_bytes)?;
            non_empty(normalize_whitespace(text), &name)
        }
    }
}

/// The cheap checks of a document item before it is queued (a server's
/// [`check_item`](multitoken_core::Modality::check_item)): its size, and for a PDF
/// its page count from the parsed page tree. Text is not extracted.
pub fn check_document(item: &Item, config: &ExtractConfig) -> Result<()> {
    let name = describe_item(item);
    let bytes = match item {
        Item::Text(text) => return check_size(text.len() as u64, &name, config.max_bytes),
        Item::Bytes(bytes) => std::borrow::Cow::Borrowed(bytes.as_slice()),
        Item::Path(path) => std::borrow::Cow::Owned(read_limited(path, &name, config.max_bytes)?),
    };
    check_size(bytes.len() as u64, &name, config.max_bytes)?;
    let path = match item {
        Item::Path(path) => Some(path.as_path()),
        _ => None,
    };
    if detect_format(path, &bytes) == DocumentFormat::Pdf {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| pdf::check_pages(&bytes, &name, config.max_pages)));
        match outcome {
            Ok(result) => {
                result?;
            }
            Err(_) => {
                return Err(Error::Pdf {
                    item: name,
                    reason: "malformed PDF (the parser failed)".to_string(),
                })
            }
        }
    }
    Ok(())
}

/// The format of a document: `%PDF-` in the first KiB wins, then the extension
/// of `path`, then plain text.
pub fn detect_format(path: Option<&Path>, bytes: &[u8]) -> DocumentFormat {
    let head = &bytes[..bytes.len().min(1024)];
    if head.windows(5).any(|w| w == b"%PDF-") {
        return DocumentFormat::Pdf;
    }
    let extension = path
        .and_then(Path::extension)
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    match extension.as_str() {
        "pdf" => DocumentFormat::Pdf,
        "md" | "markdown" | "mdown" | "mkd" => DocumentFormat::Markdown,
        _ => DocumentFormat::Text,
    }
}

/// Extracts the normalised text of `bytes` in `format`; `name` is used in errors.
pub fn extract_bytes(
    bytes: &[u8],
    format: DocumentFormat,
    name: &str,
    config: &ExtractConfig,
) -> Result<String> {
    check_size(bytes.len() as u64, name, config.max_bytes)?;
    match format {
        DocumentFormat::Pdf => {
            let text = normalize_whitespace(&pdf_text(bytes, name, config)?);
            if text.is_empty() {
                return Err(Error::NoExtractableText {
                    item: name.to_string(),
                });
            }
            Ok(text)
        }
        DocumentFormat::Markdown => {
            let text = decode_text(bytes, name)?;
            non_empty(normalize_whitespace(&strip_markdown(&text)), name)
        }
        DocumentFormat::Text => {
            let text = decode_text(bytes, name)?;
            non_empty(normalize_whitespace(&text), name)
        }
    }
}

/// The raw text layer of a PDF, unnormalised.
fn pdf_text(bytes: &[u8], name: &str, config: &ExtractConfig) -> Result<String> {
    let pdf_error = |reason: String| {
        if looks_encrypted(bytes) {
            Error::EncryptedPdf {
                item: name.to_string(),
            }
        } else {
            Error::Pdf {
                item: name.to_string(),
                reason,
            }
        }
    };
    let limits = pdf::PdfLimits {
        max_pages: config.max_pages,
        max_stream_bytes: config.max_pdf_stream_bytes,
        max_text_bytes: config.max_text_bytes,
    };
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| pdf::pdf_text(bytes, name, &limits)));
    match outcome {
        Ok(Ok(text)) => Ok(text),
        Ok(Err(Error::Pdf { reason, .. })) => Err(pdf_error(reason)),
        Ok(Err(error)) => Err(error),
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown failure".to_string());
            Err(pdf_error(format!(
                "malformed or unsupported PDF content (parser failed: {message})"
            )))
        }
    }
}

/// A PDF whose trailer names an `/Encrypt` dictionary.
fn looks_encrypted(bytes: &[u8]) -> bool {
    bytes.windows(8).any(|w| w == b"/Encrypt")
}

/// Decodes text in any encoding: a BOM wins, then strict UTF-8, then the encoding
/// `chardetng` guesses (invalid sequences become U+FFFD). Bytes with NULs and no
/// UTF-16 BOM, or text that decodes to many control characters, are binary.
pub fn decode_text(bytes: &[u8], name: &str) -> Result<String> {
    let binary = |reason: String| Error::Binary {
        item: name.to_string(),
        reason,
    };
    let text = if let Some((encoding, bom_len)) = encoding_rs::Encoding::for_bom(bytes) {
        let (text, _) = encoding.decode_without_bom_handling(&bytes[bom_len..]);
        text.into_owned()
    } else if bytes.contains(&0) {
        return Err(binary("it contains NUL bytes".to_string()));
    } else if let Ok(text) = std::str::from_utf8(bytes) {
        text.to_string()
    } else {
        let mut detector = chardetng::EncodingDetector::new(chardetng::Iso2022JpDetection::Deny);
        detector.feed(bytes, true);
        let encoding = detector.guess(None, chardetng::Utf8Detection::Allow);
        let (text, _, _) = encoding.decode(bytes);
        text.into_owned()
    };
    let total = text.chars().count().max(1);
    let suspicious = text
        .chars()
        .filter(|&c| (c.is_control() && !matches!(c, '\n' | '\r' | '\t' | '\x0c')) || c == '\u{fffd}')
        .count();
    // Real text in a legacy encoding has next to no control characters; a few
    // stray ones (a form feed, an escape in a log) are allowed.
    if suspicious * 20 > total {
        return Err(binary(format!(
            "{suspicious} of {total} characters are control or undecodable characters"
        )));
    }
    Ok(text)
}

/// Markdown to plain text: markup dropped, text of headings, paragraphs, lists,
/// code, tables, link and image text kept; HTML dropped; blocks separated by
/// blank lines.
pub fn strip_markdown(markdown: &str) -> String {
    let options = Options::ENABLE_TABLES
        | Options::ENABLE_STRIKETHROUGH
        | Options::ENABLE_TASKLISTS
        | Options::ENABLE_FOOTNOTES;
    let mut out = String::with_capacity(markdown.len());
    for event in Parser::new_ext(markdown, options) {
        match event {
            Event::Text(text) | Event::Code(text) => out.push_str(&text),
            Event::SoftBreak => out.push(' '),
            Event::HardBreak => out.push('\n'),
            Event::End(end) => match end {
                TagEnd::Paragraph
                | TagEnd::Heading(_)
                | TagEnd::CodeBlock
                | TagEnd::BlockQuote(_)
                | TagEnd::Table
                | TagEnd::List(_)
                | TagEnd::FootnoteDefinition => out.push_str("\n\n"),
                TagEnd::Item | TagEnd::TableRow | TagEnd::TableHead => out.push('\n'),
                TagEnd::TableCell => out.push(' '),
                _ => {}
            },
            Event::Rule => out.push_str("\n\n"),
            _ => {}
        }
    }
    out
}

/// Collapses every run of whitespace inside a paragraph to one space and separates
/// paragraphs (text parted by a blank line or a form feed) by exactly one blank
/// line; control characters become spaces. The result has no leading or trailing
/// whitespace.
pub fn normalize_whitespace(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut paragraph = String::new();
    let flush = |paragraph: &mut String, out: &mut String| {
        let words = paragraph.split_whitespace();
        let mut first = true;
        for word in words {
            if first {
                if !out.is_empty() {
                    out.push_str("\n\n");
                }
                first = false;
            } else {
                out.push(' ');
            }
            out.push_str(word);
        }
        paragraph.clear();
    };
    for page in text.split('\x0c') {
        for line in page.lines() {
            if line.trim().is_empty() {
                flush(&mut paragraph, &mut out);
                continue;
            }
            paragraph.extend(line.chars().map(|c| if c.is_control() { ' ' } else { c }));
            paragraph.push(' ');
        }
        flush(&mut paragraph, &mut out);
    }
    out
}

fn non_empty(text: String, name: &str) -> Result<String> {
    if text.is_empty() {
        Err(Error::Empty {
            item: name.to_string(),
        })
    } else {
        Ok(text)
    }
}

fn check_size(size: u64, name: &str, limit: u64) -> Result<()> {
    if size > limit {
        return Err(Error::TooLarge {
            item: name.to_string(),
            size,
            limit,
        });
    }
    Ok(())
}

/// Reads a file, refusing it before reading when it is over `limit` bytes.
fn read_limited(path: &Path, name: &str, limit: u64) -> Result<Vec<u8>> {
    let io = |source| Error::Io {
        item: name.to_string(),
        source,
    };
    // Before opening: opening a FIFO would block until a writer comes.
    multitoken_core::check_regular_file(path).map_err(io)?;
    let file = std::fs::File::open(path).map_err(io)?;
    let size = file.metadata().map_err(io)?.len();
    check_size(size, name, limit)?;
    let mut bytes = Vec::with_capacity(size as usize);
    // The size may change under us; never read more than the limit plus one byte.
    file.take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(io)?;
    check_size(bytes.len() as u64, name, limit)?;
    Ok(bytes)
}

mod pdf;
#[cfg(test)]
mod tests;
