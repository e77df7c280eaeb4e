//! PDF text with bounded cost: the page count from the parsed page tree, every
//! compressed stream inflated at most once under a byte budget, and the text
//! written page by page under a byte limit.
//!
//! `pdf_extract::extract_text_from_mem_by_pages` looked every page up in a fresh
//! page map (quadratic in the page count: 20,000 pages kept a core busy for ten
//! minutes), inflated content streams without a bound (a 128 KB file whose one page
//! inflates to 50 MB took 150 s and 4.5 GB) and was only bounded in pages by a byte
//! search for `/Type /Page`, which `/Type /#50age` defeats. Here lopdf parses the
//! file (names with `#xx` escapes decoded), the page tree is walked once, the
//! streams pdf-extract reads are inflated here under [`PdfLimits::max_stream_bytes`]
//! and stored back plain, and `pdf_extract::output_doc` renders all pages in one
//! pass into [`PageText`].
//!
//! Left to lopdf and unbounded: the inflation of cross-reference streams while it
//! loads the file (bounded by the input size times deflate's ratio).

use std::io::{Read, Write};

use pdf_extract::{Dictionary, Document, LoadOptions, MediaBox, Object, ObjectId, OutputDev, OutputError, Stream, Transform};

use crate::{Error, Result};

/// The bounds of one PDF's extraction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PdfLimits {
    /// Most pages, counted in the parsed page tree.
    pub max_pages: usize,
    /// Most bytes of all compressed streams together once inflated (images,
    /// which text extraction never inflates, are not counted).
    pub max_stream_bytes: u64,
    /// Most bytes of extracted text.
    pub max_text_bytes: u64,
}

/// Inflated size allowed for one object stream while lopdf loads the file: they
/// hold object dictionaries (kilobytes in real files), and lopdf inflates them
/// before anything else can look.
const MAX_OBJECT_STREAM_BYTES: u64 = 16 << 20;

/// The raw text of a PDF's pages (a page break is a paragraph break), before
/// normalisation. Errors name `name`; a panic is the caller's to catch.
pub(crate) fn pdf_text(bytes: &[u8], name: &str, limits: &PdfLimits) -> Result<String> {
    let pdf_error = |reason: String| Error::Pdf {
        item: name.to_string(),
        reason,
    };
    let limit = |reason: String| Error::Limit {
        item: name.to_string(),
        reason,
    };
    let mut doc = load_counted(bytes, name, limits.max_pages)?;
    inflate_streams(&mut doc, limits.max_stream_bytes).map_err(|OverBudget| {
        limit(format!(
            "the PDF's compressed streams inflate to more than the limit of {} bytes \
             (raise max_pdf_stream_bytes to allow it)",
            limits.max_stream_bytes
        ))
    })?;
    // After inflation: the check reads form contents, now plain.
    check_recursion(&doc).map_err(|reason| pdf_error(reason.to_string()))?;
    let mut output = PageText::new(limits.max_text_bytes);
    let outcome = pdf_extract::output_doc(&doc, &mut output);
    if output.over {
        return Err(limit(format!(
            "the PDF's text is longer than the limit of {} bytes (raise max_text_bytes to allow it)",
            limits.max_text_bytes
        )));
    }
    outcome.map_err(|e| pdf_error(format!("{e:?}")))?;
    Ok(output.pages.join("\n\n"))
}

/// Parses a PDF (object-stream bombs dropped, an empty password tried on an
/// encrypted file) and refuses it when its page tree has more than `max_pages` pages.
fn load_counted(bytes: &[u8], name: &str, max_pages: usize) -> Result<Document> {
    let mut doc = Document::load_mem_with_options(bytes, LoadOptions::with_filter(drop_object_stream_bombs)).map_err(|e| Error::Pdf {
        item: name.to_string(),
        reason: e.to_string(),
    })?;
    if doc.is_encrypted() {
        // An empty user password opens many "protected" files (what pdf-extract does).
        doc.decrypt("").map_err(|_| Error::EncryptedPdf {
            item: name.to_string(),
        })?;
    }
    let pages = doc.get_pages().len();
    if pages > max_pages {
        return Err(Error::Limit {
            item: name.to_string(),
            reason: format!("the PDF has {pages} pages, more than the limit of {max_pages} (raise max_pages to allow it)"),
        });
    }
    Ok(doc)
}

/// The page count of a PDF from its parsed page tree, checked against `max_pages`
/// (a server's cheap check before queueing: nothing is inflated but object streams).
pub(crate) fn check_pages(bytes: &[u8], name: &str, max_pages: usize) -> Result<usize> {
    Ok(load_counted(bytes, name, max_pages)?.get_pages().len())
}

/// lopdf's load filter: an object stream (`/Type /ObjStm`) that inflates past
/// [`MAX_OBJECT_STREAM_BYTES`] is dropped before lopdf inflates it whole.
///
/// The filter's value is used for objects found inside object streams (never
/// streams themselves) and ignored for top-level objects, which lopdf keeps in
/// place: so streams are answered with a placeholder and everything else with
/// a copy.
fn drop_object_stream_bombs(id: ObjectId, object: &mut Object) -> Option<(ObjectId, Object)> {
    match object {
        Object::Stream(stream) => {
            if stream.dict.has_type(b"ObjStm") && decoded_size(stream, MAX_OBJECT_STREAM_BYTES).is_err() {
                return None;
            }
            Some((id, Object::Null))
        }
        other => Some((id, other.clone())),
    }
}

/// Deepest chain of form XObjects accepted (a form drawing a form ...).
const MAX_FORM_DEPTH: usize = 32;

/// Refuses the structures pdf-extract follows by unbounded recursion, whose stack
/// overflow kills the process (no panic to catch; found by fuzzing): a page whose
/// `/Parent` chain loops or runs deeper than lopdf's page tree limit (pdf-extract
/// climbs it for an inherited `MediaBox` or `Resources`), and form XObjects that
/// draw themselves, directly or through others, or nest deeper than
/// [`MAX_FORM_DEPTH`].
fn check_recursion(doc: &Document) -> std::result::Result<(), &'static str> {
    for page in doc.get_pages().into_values() {
        let mut at = page;
        let mut seen = std::collections::HashSet::new();
        while let Ok(parent) = doc.get_dictionary(at).and_then(|d| d.get(b"Parent")).and_then(Object::as_reference) {
            if !seen.insert(parent) || seen.len() > 256 {
                return Err("the page tree loops (a page is its own ancestor through /Parent)");
            }
            at = parent;
        }
    }
    // Which forms each form draws: the names of its `Do` operators resolved in its
    // own resources, else in every XObject dictionary that lists it (the callers'
    // resources it inherits).
    let xobject_dicts: Vec<&Dictionary> = doc
        .objects
        .values()
        .filter_map(|object| match object {
            Object::Dictionary(dict) => Some(dict),
            Object::Stream(stream) => Some(&stream.dict),
            _ => None,
        })
        .filter_map(|dict| resources_xobjects(doc, dict))
        .collect();
    let is_form = |id: &ObjectId| {
        matches!(doc.objects.get(id), Some(Object::Stream(s)) if s.dict.get(b"Subtype").and_then(Object::as_name).ok() == Some(b"Form".as_slice()))
    };
    let mut draws: std::collections::HashMap<ObjectId, Vec<ObjectId>> = std::collections::HashMap::new();
    for (&id, object) in &doc.objects {
        let Object::Stream(stream) = object else { continue };
        if !is_form(&id) {
            continue;
        }
        let names: Vec<Vec<u8>> = pdf_extract::content::Content::decode(&stream.get_plain_content().unwrap_or_default())
            .map(|content| {
                content
                    .operations
                    .into_iter()
                    .filter(|op| op.operator == "Do")
                    .filter_map(|op| op.operands.first().and_then(|o| o.as_name().ok()).map(<[u8]>::to_vec))
                    .collect()
            })
            .unwrap_or_default();
        if names.is_empty() {
            continue;
        }
        let own = resources_xobjects(doc, &stream.dict);
        let lookups: Vec<&Dictionary> = match own {
            Some(dict) => vec![dict],
            None => xobject_dicts.iter().copied().filter(|d| d.iter().any(|(_, v)| v.as_reference().ok() == Some(id))).collect(),
        };
        let targets = names
            .iter()
            .flat_map(|name| lookups.iter().filter_map(move |d| d.get(name).and_then(Object::as_reference).ok()))
            .filter(is_form)
            .collect();
        draws.insert(id, targets);
    }
    // Depth-first, with the forms on the current path: one seen again is a cycle.
    fn depth(
        id: ObjectId,
        draws: &std::collections::HashMap<ObjectId, Vec<ObjectId>>,
        path: &mut Vec<ObjectId>,
        done: &mut std::collections::HashMap<ObjectId, usize>,
    ) -> std::result::Result<usize, &'static str> {
        if let Some(&d) = done.get(&id) {
            return Ok(d);
        }
        if path.contains(&id) {
            return Err("a form XObject draws itself (directly or through other forms)");
        }
        if path.len() > MAX_FORM_DEPTH {
            return Err("form XObjects are nested too deeply");
        }
        path.push(id);
        let mut deepest = 0;
        for &next in draws.get(&id).map(Vec::as_slice).unwrap_or_default() {
            deepest = deepest.max(depth(next, draws, path, done)?);
        }
        path.pop();
        done.insert(id, deepest + 1);
        Ok(deepest + 1)
    }
    let mut done = std::collections::HashMap::new();
    for &id in draws.keys() {
        if depth(id, &draws, &mut Vec::new(), &mut done)? > MAX_FORM_DEPTH {
            return Err("form XObjects are nested too deeply");
        }
    }
    Ok(())
}

/// The `/XObject` dictionary of a dictionary's `/Resources`, through references.
fn resources_xobjects<'a>(doc: &'a Document, dict: &'a Dictionary) -> Option<&'a Dictionary> {
    let deref = |object: &'a Object| match object {
        Object::Reference(id) => doc.get_object(*id).ok(),
        other => Some(other),
    };
    let resources = deref(dict.get(b"Resources").ok()?)?.as_dict().ok()?;
    deref(resources.get(b"XObject").ok()?)?.as_dict().ok()
}

/// Inflates, under one budget of `max_bytes`, every stream pdf-extract may read
/// (all but images) and stores it back plain, so that each is inflated once.
/// Images are emptied instead: text never needs their pixels, and pdf-extract's
/// `Do` would inflate one and parse it as content.
fn inflate_streams(doc: &mut Document, max_bytes: u64) -> std::result::Result<(), OverBudget> {
    let mut used: u64 = 0;
    for object in doc.objects.values_mut() {
        let Object::Stream(stream) = object else { continue };
        if is_image(&stream.dict) {
            stream.set_plain_content(Vec::new());
            continue;
        }
        let left = max_bytes.saturating_sub(used);
        match decoded_size(stream, left) {
            Ok(Decoded::Plain(size)) => used += size,
            Ok(Decoded::Inflated(content)) => {
                used += content.len() as u64;
                stream.set_plain_content(content);
            }
            Ok(Decoded::WithPredictor(size)) => {
                used += size;
                // The predictor only shrinks what was measured; a failure leaves
                // the stream to pdf-extract's raw-content fallback.
                let _ = stream.decompress();
            }
            Err(OverBudget) => return Err(OverBudget),
        }
    }
    Ok(())
}

/// An image XObject: text extraction never inflates it.
fn is_image(dict: &Dictionary) -> bool {
    dict.get(b"Subtype").and_then(Object::as_name).ok() == Some(b"Image".as_slice())
}

/// What a stream holds once its filters are applied.
enum Decoded {
    /// No filter, or one that lopdf does not decode (its raw bytes are used): the size.
    Plain(u64),
    /// Inflated by us, no predictor: the content to store back.
    Inflated(Vec<u8>),
    /// Inflated size measured, a predictor still to apply (lopdf does it).
    WithPredictor(u64),
}

/// More than the budget.
struct OverBudget;

/// Applies a stream's filter chain with at most `budget` bytes out of any step.
fn decoded_size(stream: &Stream, budget: u64) -> std::result::Result<Decoded, OverBudget> {
    let raw = stream.content.len() as u64;
    let Ok(filters) = stream.filters() else {
        return if raw > budget { Err(OverBudget) } else { Ok(Decoded::Plain(raw)) };
    };
    let params = stream.dict.get(b"DecodeParms").and_then(Object::as_dict).ok();
    let mut data: Option<Vec<u8>> = None;
    for filter in filters {
        let input = data.as_deref().unwrap_or(&stream.content);
        let output = match filter {
            b"FlateDecode" => inflate(input, budget)?,
            b"LZWDecode" => lzw(input, params, budget)?,
            b"ASCII85Decode" => {
                // At most 4 bytes out per byte in; lopdf's decoder is bounded.
                let mut single = Stream::new(Dictionary::new(), input.to_vec());
                single.dict.set("Filter", "ASCII85Decode");
                single.decompressed_content().unwrap_or_default()
            }
            // lopdf cannot decode it either: pdf-extract reads the raw bytes.
            _ => return if raw > budget { Err(OverBudget) } else { Ok(Decoded::Plain(raw)) },
        };
        if output.len() as u64 > budget {
            return Err(OverBudget);
        }
        data = Some(output);
    }
    let data = data.unwrap_or_default();
    let predictor = params
        .and_then(|p| p.get(b"Predictor").ok())
        .and_then(|p| p.as_i64().ok())
        .is_some_and(|p| p > 1);
    Ok(if predictor { Decoded::WithPredictor(data.len() as u64) } else { Decoded::Inflated(data) })
}

/// zlib (or, when that yields nothing, raw deflate after the 2-byte header, as
/// lopdf retries) with at most `budget` bytes out.
fn inflate(input: &[u8], budget: u64) -> std::result::Result<Vec<u8>, OverBudget> {
    let mut out = Vec::new();
    let zlib = flate2::read::ZlibDecoder::new(input).take(budget + 1).read_to_end(&mut out);
    if zlib.is_err() && out.is_empty() && input.len() > 2 {
        let _ = flate2::read::DeflateDecoder::new(&input[2..]).take(budget + 1).read_to_end(&mut out);
    }
    // A corrupt tail keeps what was inflated before it, as lopdf does.
    if out.len() as u64 > budget {
        return Err(OverBudget);
    }
    Ok(out)
}

/// LZW as lopdf decodes it (`EarlyChange` 1 unless the parameters say 0), with at
/// most `budget` bytes out.
fn lzw(input: &[u8], params: Option<&Dictionary>, budget: u64) -> std::result::Result<Vec<u8>, OverBudget> {
    use weezl::{decode::Decoder, BitOrder};
    let early_change = params
        .and_then(|p| p.get(b"EarlyChange").ok())
        .and_then(|p| p.as_i64().ok())
        .is_none_or(|v| v != 0);
    let mut decoder = if early_change {
        Decoder::with_tiff_size_switch(BitOrder::Msb, 8)
    } else {
        Decoder::new(BitOrder::Msb, 8)
    };
    let mut out = Capped { data: Vec::new(), budget };
    let _ = decoder.into_stream(&mut out).decode_all(input);
    if out.data.len() as u64 > budget {
        return Err(OverBudget);
    }
    Ok(out.data)
}

/// A writer that refuses to grow past its budget (plus one byte, to tell "at the
/// budget" from "over it").
struct Capped {
    data: Vec<u8>,
    budget: u64,
}

impl Write for Capped {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.data.len() as u64 > self.budget {
            return Err(std::io::Error::other("over the budget"));
        }
        let room = (self.budget + 1 - self.data.len() as u64).min(buf.len() as u64) as usize;
        self.data.extend_from_slice(&buf[..room]);
        Ok(room)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// pdf-extract's `PlainTextOutput` (same spacing and line-break rules, state
/// reset on every page as its per-page extraction did), writing each page to its
/// own string and stopping once the text passes `limit` bytes.
struct PageText {
    pages: Vec<String>,
    current: String,
    total: u64,
    limit: u64,
    over: bool,
    page_height: f64,
    last_end: f64,
    last_y: f64,
    first_char: bool,
}

impl PageText {
    fn new(limit: u64) -> Self {
        Self {
            pages: Vec::new(),
            current: String::new(),
            total: 0,
            limit,
            over: false,
            page_height: 0.0,
            last_end: 100_000.0,
            last_y: 0.0,
            first_char: false,
        }
    }

    fn push(&mut self, text: &str) -> std::result::Result<(), OutputError> {
        self.total += text.len() as u64;
        if self.total > self.limit {
            self.over = true;
            return Err(OutputError::FormatError(std::fmt::Error));
        }
        self.current.push_str(text);
        Ok(())
    }
}

impl OutputDev for PageText {
    fn begin_page(&mut self, _page: u32, media_box: &MediaBox, _art_box: Option<(f64, f64, f64, f64)>) -> std::result::Result<(), OutputError> {
        self.page_height = media_box.ury - media_box.lly;
        self.last_end = 100_000.0;
        self.last_y = 0.0;
        self.first_char = false;
        Ok(())
    }

    fn end_page(&mut self) -> std::result::Result<(), OutputError> {
        self.pages.push(std::mem::take(&mut self.current));
        Ok(())
    }

    fn output_character(&mut self, trm: &Transform, width: f64, _spacing: f64, font_size: f64, char: &str) -> std::result::Result<(), OutputError> {
        // The position after flipping y (PlainTextOutput's `flip_ctm`) and the
        // side of the square with the area of the transformed font-size vector.
        let (x, y) = (trm.m31, self.page_height - trm.m32);
        let (vx, vy) = (font_size * trm.m11 + font_size * trm.m21, font_size * trm.m12 + font_size * trm.m22);
        let size = (vx * vy).sqrt();
        if self.first_char {
            if (y - self.last_y).abs() > size * 1.5 {
                self.push("\n")?;
            }
            // Moved to the left and down.
            if x < self.last_end && (y - self.last_y).abs() > size * 0.5 {
                self.push("\n")?;
            }
            if x > self.last_end + size * 0.1 {
                self.push(" ")?;
            }
        }
        self.push(char)?;
        self.first_char = false;
        self.last_y = y;
        self.last_end = x + width * size;
        Ok(())
    }

    fn begin_word(&mut self) -> std::result::Result<(), OutputError> {
        self.first_char = true;
        Ok(())
    }

    fn end_word(&mut self) -> std::result::Result<(), OutputError> {
        Ok(())
    }

    fn end_line(&mut self) -> std::result::Result<(), OutputError> {
        Ok(())
    }
}
