"""Readers and chunks: real files (the standard library's own source), written md / html / pdf files, exact spans,
links out of the folder refused, binary and non-UTF-8 files skipped and counted."""

import email.parser
import inspect
import os
from pathlib import Path

import pytest

from lmforge.data.base_reader import ErrorLog
from lmforge.rag.chunking import chunk_document
from lmforge.rag.documents import BINARY, NOT_UTF8, read_document, read_folder


def _read(path: Path, rel: str | None = None):
    errors = ErrorLog()
    return read_document(path, rel or path.name, errors), errors


def test_python_source_is_chunked_by_top_level_definitions_with_exact_spans():
    path = Path(email.parser.__file__)
    doc, errors = _read(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    chunks = chunk_document(doc, chunk_tokens=200, overlap=40)
    assert errors.total == 0
    for c in chunks:  # every chunk is exactly its lines of the file
        assert c.text == "\n".join(lines[c.start_line - 1 : c.end_line])
    headed = {c.heading: c for c in chunks if c.heading}
    start = inspect.getsourcelines(email.parser.HeaderParser)[1]
    hp = headed["class HeaderParser"]
    assert (hp.start_line, hp.text.splitlines()[0]) == (start, "class HeaderParser(Parser):")
    assert set(headed) >= {"class Parser", "class HeaderParser", "class BytesParser", "class BytesHeaderParser"}


def test_a_long_definition_is_cut_into_overlapping_windows_of_whole_lines(tmp_path):
    body = "".join(f"    x{i} = 'word word word word'\n" for i in range(60))  # 60 lines of 6 words
    (tmp_path / "long.py").write_text(f"def big():\n{body}", encoding="utf-8")
    doc, _ = _read(tmp_path / "long.py")
    chunks = chunk_document(doc, chunk_tokens=50, overlap=10)
    lines = (tmp_path / "long.py").read_text().splitlines()
    assert all(len(c.text.split()) <= 50 for c in chunks)
    assert chunks[0].start_line == 1 and chunks[-1].end_line == 61
    for a, b in zip(chunks, chunks[1:]):
        assert b.start_line == a.end_line  # overlap: the last 6-word line again (two would be 12 > 10 words)
    for c in chunks:
        assert c.text == "\n".join(lines[c.start_line - 1 : c.end_line]) and c.heading == "def big"


MD = """# Guide

Intro paragraph.

## Install

Run pip install lmforge.

```
# not a heading
pip install lmforge
```

## Use

Call lmforge run.
"""


def test_markdown_sections_follow_headings_and_keep_fences_whole(tmp_path):
    (tmp_path / "g.md").write_text(MD, encoding="utf-8")
    doc, _ = _read(tmp_path / "g.md")
    chunks = chunk_document(doc)
    spans = [(c.heading, c.start_line, c.end_line) for c in chunks]
    assert spans == [("Guide", 1, 3), ("Guide > Install", 5, 12), ("Guide > Use", 14, 16)]
    lines = MD.splitlines()
    assert all(c.text == "\n".join(lines[c.start_line - 1 : c.end_line]) for c in chunks)


def test_html_keeps_headings_and_source_lines_and_drops_scripts(tmp_path):
    html = ("<html><head><style>p {color: red}</style></head>\n<body>\n<h1>Install</h1>\n<p>Run the\n"
            "installer &amp; wait.</p>\n<script>var secret = 1;</script>\n<h2>Use</h2>\n<p>Call it.</p>\n"
            "</body></html>")
    (tmp_path / "p.html").write_text(html, encoding="utf-8")
    doc, _ = _read(tmp_path / "p.html")
    chunks = chunk_document(doc)
    assert [(c.heading, c.start_line, c.end_line, c.text) for c in chunks] == [
        ("Install", 3, 5, "Install\nRun the\ninstaller & wait."), ("Install > Use", 7, 8, "Use\nCall it.")]
    assert not any("secret" in c.text or "color" in c.text for c in chunks)


def _pdf(pages: list[str]) -> bytes:
    """A minimal PDF, one text line per page in Helvetica, with a correct cross-reference table."""
    n = len(pages)
    objects = ["<< /Type /Catalog /Pages 2 0 R >>",
               f"<< /Type /Pages /Kids [{' '.join(f'{4 + 2 * i} 0 R' for i in range(n))}] /Count {n} >>",
               "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    for i, text in enumerate(pages):
        stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET"
        objects.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> >> "
                       f"/Contents {5 + 2 * i} 0 R >>")
        objects.append(f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream")
    out, offsets = b"%PDF-1.4\n", []
    for i, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n{body}\nendobj\n".encode()
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += "".join(f"{o:010d} 00000 n \n" for o in offsets).encode()
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return out


def test_pdf_chunks_name_their_page(tmp_path):
    (tmp_path / "m.pdf").write_bytes(_pdf(["Torque the bolts to ten newtons.", "Oil the hinge monthly."]))
    doc, errors = _read(tmp_path / "m.pdf")
    chunks = chunk_document(doc)
    assert errors.total == 0
    assert [(c.page, c.start_line, c.text) for c in chunks] == [
        (1, 1, "Torque the bolts to ten newtons."), (2, 1, "Oil the hinge monthly.")]
    assert chunks[1].where == "m.pdf:p2:1"


def test_links_out_of_the_folder_binary_and_undecodable_files_are_skipped_and_counted(tmp_path):
    outside = tmp_path / "secret.txt"
    outside.write_text("top secret\n", encoding="utf-8")
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "ok.txt").write_text("fine\n", encoding="utf-8")
    (folder / "inside.txt").symlink_to(folder / "ok.txt")
    (folder / "escape.txt").symlink_to(outside)
    (folder / "up").symlink_to(tmp_path, target_is_directory=True)
    (folder / "blob.txt").write_bytes(b"abc\0def")
    (folder / "latin.txt").write_bytes("ok\ncaf\xe9\n".encode("latin-1"))
    errors = ErrorLog()
    docs = list(read_folder(folder, errors))
    assert sorted(d.file for d in docs) == ["inside.txt", "ok.txt"]
    assert not any("secret" in b.text for d in docs for b in d.blocks)
    assert errors.reasons == {"symlink outside source": 2, BINARY: 1, NOT_UTF8: 1}
    assert any(m.startswith("latin.txt:2:") for m in errors.messages)


def test_not_a_folder_is_a_clear_error(tmp_path):
    with pytest.raises(NotADirectoryError, match="not a folder"):
        list(read_folder(tmp_path / "missing", ErrorLog()))


def test_chunk_settings_are_checked():
    with pytest.raises(ValueError, match="overlap"):
        chunk_document(_read(Path(os.__file__))[0], chunk_tokens=10, overlap=10)
