"""Writes the small test PDFs in this directory (hand-built, no PDF library).

Run from anywhere: python3 crates/multitoken-document/testdata/make_pdfs.py
"""
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def pdf(pages, extra_trailer=b"", extra_objects=()):
    """A PDF with one Helvetica page per entry of `pages` (lines of text; an empty
    list draws a rectangle and no text). `extra_objects` are appended as objects
    and may be referenced from `extra_trailer`."""
    objects = []
    n_pages = len(pages)
    font_id = 3
    first_page = 4
    kids = " ".join(f"{first_page + 2 * i} 0 R" for i in range(n_pages))
    objects.append(b"<< /Type /Catalog /Pages 2 0 R >>")
    objects.append(f"<< /Type /Pages /Kids [{kids}] /Count {n_pages} >>".encode())
    objects.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>")
    for i, lines in enumerate(pages):
        content_id = first_page + 2 * i + 1
        objects.append(
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
            f"/Resources << /Font << /F1 {font_id} 0 R >> >> /Contents {content_id} 0 R >>".encode()
        )
        if lines:
            ops = ["BT", "/F1 12 Tf", "14 TL", "72 720 Td"]
            for line in lines:
                escaped = line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
                ops.append(f"({escaped}) Tj T*")
            ops.append("ET")
        else:
            ops = ["0 0 1 rg", "100 100 200 200 re f"]
        stream = "\n".join(ops).encode("latin-1")
        objects.append(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
    objects.extend(extra_objects)
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    for offset in offsets:
        out += b"%010d 00000 n \n" % offset
    out += b"trailer\n<< /Size %d /Root 1 0 R " % (len(objects) + 1) + extra_trailer + b">>\n"
    out += b"startxref\n%d\n%%%%EOF\n" % xref
    return bytes(out)


def write(name, data):
    with open(os.path.join(HERE, name), "wb") as f:
        f.write(data)


HELLO = [["Hello from a small PDF.", "It has two lines on its first page."],
         ["The second page talks about cats and mats."]]

hello = pdf(HELLO)
write("hello.pdf", hello)
write("no_text.pdf", pdf([[]]))
# A Standard security handler whose /U entry no password produces: opening it with
# the empty user password fails, as for any password-protected file.
encrypt = b"<< /Filter /Standard /V 1 /R 2 /Length 40 /P -44 /O <" + b"ab" * 32 + b"> /U <" + b"cd" * 32 + b"> >>"
n_objects = 3 + 2 * len(HELLO) + 1
write("encrypted.pdf", pdf(HELLO, extra_trailer=b"/Encrypt %d 0 R /ID [<00112233445566778899aabbccddeeff> <00112233445566778899aabbccddeeff>] " % n_objects, extra_objects=[encrypt]))
write("truncated.pdf", hello[: len(hello) // 2])
write("corrupt.pdf", b"%PDF-1.4\n" + bytes((i * 37 + 11) % 256 for i in range(600)))
