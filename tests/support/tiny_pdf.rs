//! A small PDF written byte by byte (catalog, page tree, one Helvetica text
//! line a page, an xref table), with its page objects' type spelled as asked:
//! shared by the document crate's and the server's hostile-input tests
//! (`#[path]`-included).

#![allow(dead_code, clippy::unwrap_used)]

/// A PDF of `pages` pages, page `i` showing `text(i)` in Helvetica; its content
/// streams deflated when `deflate`. `page_type` is how page objects spell their
/// type (`/Page`, or `/#50age`, the same name escaped).
pub fn pdf(pages: usize, page_type: &str, deflate: bool, text: impl Fn(usize) -> Vec<u8>) -> Vec<u8> {
    use std::io::Write;
    let mut objects: Vec<Vec<u8>> = Vec::new();
    let kids: Vec<String> = (0..pages).map(|i| format!("{} 0 R", 4 + 2 * i)).collect();
    objects.push(b"<< /Type /Catalog /Pages 2 0 R >>".to_vec());
    objects.push(format!("<< /Type /Pages /Kids [{}] /Count {pages} >>", kids.join(" ")).into_bytes());
    objects.push(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>".to_vec());
    for i in 0..pages {
        objects.push(
            format!(
                "<< /Type {page_type} /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> >> /Contents {} 0 R >>",
                5 + 2 * i
            )
            .into_bytes(),
        );
        let mut content = b"BT /F1 12 Tf 72 712 Td (".to_vec();
        content.extend_from_slice(&text(i));
        content.extend_from_slice(b") Tj ET");
        let (filter, body) = if deflate {
            let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
            z.write_all(&content).unwrap();
            (" /Filter /FlateDecode", z.finish().unwrap())
        } else {
            ("", content)
        };
        let mut stream = format!("<< /Length {}{filter} >>\nstream\n", body.len()).into_bytes();
        stream.extend_from_slice(&body);
        stream.extend_from_slice(b"\nendstream");
        objects.push(stream);
    }
    let bodies: Vec<&[u8]> = objects.iter().map(Vec::as_slice).collect();
    from_objects(&bodies)
}

/// A PDF of the given object bodies (object `i + 1` is `objects[i]`, 1 the
/// catalog) with its xref table and trailer: any structure a test needs, broken
/// ones included.
pub fn from_objects(objects: &[&[u8]]) -> Vec<u8> {
    let mut out = b"%PDF-1.4\n".to_vec();
    let mut offsets = Vec::new();
    for (i, object) in objects.iter().enumerate() {
        offsets.push(out.len());
        out.extend_from_slice(format!("{} 0 obj\n", i + 1).as_bytes());
        out.extend_from_slice(object);
        out.extend_from_slice(b"\nendobj\n");
    }
    let xref = out.len();
    out.extend_from_slice(format!("xref\n0 {}\n0000000000 65535 f \n", objects.len() + 1).as_bytes());
    for offset in offsets {
        out.extend_from_slice(format!("{offset:010} 00000 n \n").as_bytes());
    }
    out.extend_from_slice(format!("trailer\n<< /Size {} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n", objects.len() + 1).as_bytes());
    out
}
