"""PDF reading: real PDF files, written byte by byte here, read through PDFium one document per page."""

import gzip
import json

from lmforge.data.base_reader import ErrorLog
from lmforge.data.config import DataConfig
from lmforge.data.curate import run_curate
from lmforge.data.curated import iter_split_records
from lmforge.data.readers import read_documents

# A 2x2 grey image: what a scanned page holds instead of text.
_IMAGE = (b"<< /Type /XObject /Subtype /Image /Width 2 /Height 2 /ColorSpace /DeviceGray /BitsPerComponent 8 "
          b"/Length 4 >>\nstream\n\x00\x80\x80\x00\nendstream")  # fmt: skip
_ENCRYPT = (b"/Encrypt << /Filter /Standard /V 1 /R 2 /O <" + b"ab" * 32 + b"> /U <" + b"cd" * 32 + b"> /P -4 >> "
            b"/ID [<00112233445566778899aabbccddeeff> <00112233445566778899aabbccddeeff>] ")  # fmt: skip


def _escaped(line: str) -> bytes:
    return line.encode("latin-1").replace(b"\\", b"\\\\").replace(b"(", b"\\(").replace(b")", b"\\)")


def _content(text: str | None) -> bytes:
    """A page's drawing: the lines of `text` in Helvetica, or (None) only the image, as a scan has."""
    if text is None:
        return b"q 200 0 0 200 100 400 cm /Im1 Do Q"
    return b"BT /F1 12 Tf 72 720 Td 14 TL " + b" ".join(b"(" + _escaped(t) + b") '" for t in text.split("\n")) + b" ET"


def make_pdf(pages: list[str | None], trailer_extra: bytes = b"") -> bytes:
    """A valid PDF 1.4 file (objects, cross-reference table, trailer) with one page per entry of `pages`."""
    objects: list[bytes] = [b"", b"", b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>", _IMAGE]
    kids = []
    for text in pages:
        content = _content(text)
        objects.append(b"<< /Length %d >>\nstream\n%s\nendstream" % (len(content), content))
        objects.append(b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents %d 0 R /Resources "
                       b"<< /Font << /F1 3 0 R >> /XObject << /Im1 4 0 R >> >> >>" % len(objects))  # fmt: skip
        kids.append(b"%d 0 R" % len(objects))
    objects[0] = b"<< /Type /Catalog /Pages 2 0 R >>"
    objects[1] = b"<< /Type /Pages /Kids [%s] /Count %d >>" % (b" ".join(kids), len(kids))
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< %s/Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (trailer_extra, len(objects) + 1, xref)
    return bytes(out)


PAGES = ["Chapter one begins here.\nIt has (two) lines.", "The second page speaks of tokenizers.",
         "Page three: the end."]  # fmt: skip


def _read(path):
    errors = ErrorLog()
    return list(read_documents(path, errors=errors)), errors


def test_three_page_pdf_is_three_documents_with_page_numbers_and_text(tmp_path):
    path = tmp_path / "book.pdf"
    path.write_bytes(make_pdf(PAGES))
    docs, errors = _read(path)
    assert [(d.id, d.text, d.meta) for d in docs] == [
        ("book.pdf:1", "Chapter one begins here.\nIt has (two) lines.", {"page": 1, "pages": 3}),
        ("book.pdf:2", "The second page speaks of tokenizers.", {"page": 2, "pages": 3}),
        ("book.pdf:3", "Page three: the end.", {"page": 3, "pages": 3}),
    ]
    assert docs[0].source == str(path)
    assert errors.total == 0


def test_scanned_pdf_without_text_layer_is_one_bad_record(tmp_path):
    path = tmp_path / "scan.pdf"
    path.write_bytes(make_pdf([None, None]))
    docs, errors = _read(path)
    assert docs == []
    assert errors.reasons == {"pdf without text layer": 1}
    assert errors.messages == [f"{path}: pdf without text layer"]


def test_blank_page_among_text_pages_is_counted_with_its_number(tmp_path):
    path = tmp_path / "mixed.pdf"
    path.write_bytes(make_pdf(["First page.", None, "Third page."]))
    docs, errors = _read(path)
    assert [d.id for d in docs] == ["mixed.pdf:1", "mixed.pdf:3"]
    assert errors.messages == [f"{path}:2: empty page"]


def test_corrupt_truncated_and_encrypted_pdfs_are_bad_records(tmp_path):
    (tmp_path / "garbage.pdf").write_bytes(b"%PDF-1.4\nnot a pdf at all")
    (tmp_path / "cut.pdf").write_bytes(make_pdf(PAGES)[:200])
    (tmp_path / "locked.pdf").write_bytes(make_pdf(PAGES, trailer_extra=_ENCRYPT))
    (tmp_path / "ok.pdf.gz").write_bytes(gzip.compress(make_pdf(["Compressed but fine."])))
    docs, errors = _read(tmp_path)
    assert [(d.id, d.text) for d in docs] == [("ok.pdf.gz:1", "Compressed but fine.")]
    assert errors.reasons == {"corrupt pdf": 2, "encrypted pdf": 1}
    assert sorted(errors.messages) == sorted([f"{tmp_path / 'cut.pdf'}: corrupt pdf",
                                              f"{tmp_path / 'garbage.pdf'}: corrupt pdf",
                                              f"{tmp_path / 'locked.pdf'}: encrypted pdf"])  # fmt: skip


def test_curate_over_a_folder_with_pdfs_counts_pages_and_bad_files(tmp_path):
    src = tmp_path / "papers"
    src.mkdir()
    (src / "a.pdf").write_bytes(make_pdf(PAGES))
    (src / "b_scan.pdf").write_bytes(make_pdf([None]))
    (src / "c_broken.pdf").write_bytes(b"%PDF-1.7 truncated")
    (src / "notes.txt").write_text("A plain note that sits beside the papers.", encoding="utf-8")
    out = tmp_path / "out"
    run_curate(DataConfig(source=str(src), workers=1, plots=False, min_chars=0, val_fraction=0.0), out)
    stats = json.loads((out / "stats.json").read_text(encoding="utf-8"))
    assert stats["docs_in"] == stats["docs_kept"] == 4  # three pages and the note
    assert stats["skipped_bad"]["by_reason"] == {"corrupt pdf": 1, "pdf without text layer": 1}
    records = list(iter_split_records(out, "train"))
    assert [r["id"] for r in records] == ["a.pdf:1", "a.pdf:2", "a.pdf:3", "notes.txt"]
    assert records[1]["text"] == PAGES[1]
