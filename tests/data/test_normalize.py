import re

import pytest

from lmforge.data.filters import LicenseHeaderStripper, Normalize
from lmforge.data.base_reader import Document
from lmforge.data.readers import read_stdlib, stdlib_root


def _doc(text, id="d.py", meta=None):
    return Document(id=id, text=text, source="test", meta=meta or {})


@pytest.fixture(scope="module")
def stdlib_docs():
    return list(read_stdlib(include_tests=False))


# -- Normalize -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("broken", "fixed"),
    [
        ("caf\u00c3\u00a9 cr\u00c3\u00a8me", "caf\u00e9 cr\u00e8me"),  # UTF-8 read as Latin-1
        ("\u00e2\u0153\u201c done", "\u2713 done"),  # UTF-8 read as cp1252
        ("x = 1  # na\u00c3\u00afve\ny = 2\n", "x = 1  # na\u00efve\ny = 2\n"),  # only the bad line is touched
    ],
)
def test_mojibake_is_repaired(broken, fixed):
    assert Normalize("NFC").apply(_doc(broken)).text == fixed


def test_mojibake_repair_can_be_switched_off():
    broken = _doc("caf\u00c3\u00a9")
    assert Normalize("NFC", fix_mojibake=False).apply(broken) is broken


def test_characters_code_needs_verbatim_are_kept():
    # Curly quotes, dashes, ligatures, full-width forms, HTML entities and trailing spaces all mean something to
    # some program or text, so the mojibake fixer must not "tidy" them.
    text = "s = \u201cq\u201d \u2014 '\ufb01' \uff21 '&amp;' \ttab  \nnext\u00a0line  \n"
    doc = _doc(text)
    assert Normalize("NFC").apply(doc) is doc


def test_control_characters_are_removed_but_tab_and_newline_kept():
    out = Normalize("NFC").apply(_doc("a\x00b\x07c\x1b[0m\x7fd\x0ce\tf\ng"))
    assert out.text == "abc[0mde\tf\ng"
    # A lone C1 control is cp1252 mojibake; ftfy maps it back (NEL -> ellipsis) rather than losing it.
    assert Normalize("NFC").apply(_doc("wait\x85")).text == "wait\u2026"
    assert Normalize("NFC", fix_mojibake=False).apply(_doc("wait\x85")).text == "wait"


def test_line_endings():
    assert Normalize("NFC").apply(_doc("a\r\nb\r\n")).text == "a\nb\n"
    # A file with only CRs is a classic Mac file: its CRs are line breaks.
    assert Normalize("NFC").apply(_doc("a\rb\rc\r")).text == "a\nb\nc\n"
    # A CR among LFs is kept: it is usually deliberate (a progress line, a test fixture).
    assert Normalize("NFC").apply(_doc("a\r\nprogress\r50%\n")).text == "a\nprogress\r50%\n"


def test_clean_stdlib_files_are_unchanged_byte_for_byte(stdlib_docs):
    # Non-ASCII files are the ones the mojibake fixer looks at; a few ASCII ones check the fast path.
    clean = [
        d
        for d in stdlib_docs
        if not re.search("[\x00-\x08\x0b-\x1f\x7f-\x9f]", d.text) and d.text == _nfc(d.text)
    ]
    non_ascii = [d for d in clean if not d.text.isascii()]
    assert len(non_ascii) >= 10
    for doc in non_ascii + [d for d in clean if d.id in {"json/decoder.py", "textwrap.py", "ast.py"}]:
        out = Normalize("NFC").apply(doc)
        assert out is doc, doc.id


def _nfc(text):
    import unicodedata

    return unicodedata.normalize("NFC", text)


# -- LicenseHeaderStripper -----------------------------------------------------------------------------------------

_MIT = "# Copyright (c) 2021 Someone\n#\n# Permission is hereby granted, free of charge, to any person\n"


def test_hash_header_removed_with_shebang_and_encoding_kept():
    body = '"""Module docstring. Copyright mentioned here stays."""\n\nimport os\n'
    text = "#!/usr/bin/env python3\n# -*- coding: utf-8 -*-\n" + _MIT + "\n# SPDX-License-Identifier: MIT\n\n" + body
    out = LicenseHeaderStripper().apply(_doc(text))
    assert out.text == "#!/usr/bin/env python3\n# -*- coding: utf-8 -*-\n" + body
    assert out.meta["license_header_chars"] == len(text) - len(out.text)


def test_non_licence_comment_after_header_is_kept():
    text = _MIT + "\n# Helpers for parsing the config file.\n# (see README)\nimport os\n"
    out = LicenseHeaderStripper().apply(_doc(text))
    assert out.text == "# Helpers for parsing the config file.\n# (see README)\nimport os\n"


def test_c_family_headers():
    block = "/*\n * Licensed under the Apache License, Version 2.0\n */\n"
    slashes = "// SPDX-License-Identifier: GPL-2.0\n// Copyright 2020 Someone\n"
    code = "#include <stdio.h>\nint main(void) { return 0; }\n"
    stripper = LicenseHeaderStripper()
    assert stripper.apply(_doc(block + slashes + "\n" + code, id="main.c")).text == code
    assert stripper.apply(_doc(slashes + code, id="lib.rs")).text == code
    # Code after `*/` on the closing line belongs to the program: the block is not removed.
    inline = "/* Copyright 2020 */ int x;\n"
    doc = _doc(inline, id="x.c")
    assert stripper.apply(doc) is doc


def test_language_comes_from_meta_path_or_record_id():
    stripper = LicenseHeaderStripper()
    text = "// Copyright 2020 Someone\nint x;\n"
    assert stripper.apply(_doc(text, id="data.jsonl:7", meta={"path": "src/x.cpp"})).text == "int x;\n"
    assert stripper.apply(_doc(text, id="code.jsonl:7")).text == text  # unknown language: untouched
    markdown = _doc("# License\n\nMIT, see below.\n", id="README.md")
    assert stripper.apply(markdown) is markdown  # a Markdown heading is not a comment


def test_documents_without_a_licence_header_are_untouched():
    stripper = LicenseHeaderStripper()
    for text in ['"""Copyright 2001 docstring, not a comment."""\n# Copyright\n', "# just a note\nx = 1\n", ""]:
        doc = _doc(text)
        assert stripper.apply(doc) is doc


def test_stdlib_licence_headers_removed_and_rest_byte_identical(stdlib_docs):
    stripper = LicenseHeaderStripper()
    headed = [d for d in stdlib_docs if d.text.startswith("# Copyright")]
    assert len(headed) >= 5
    for doc in headed:
        out = stripper.apply(doc)
        removed = doc.text[: len(doc.text) - len(out.text)]
        assert doc.text.endswith(out.text), doc.id
        assert out.meta["license_header_chars"] == len(removed)
        assert all(not line.strip() or line.startswith("#") for line in removed.splitlines()), doc.id
        # What follows is code, a docstring or a non-licence comment (author credits in _pydecimal.py).
        assert out.text.strip() and not out.text.startswith("\n"), doc.id
        assert stripper.apply(out) is out, doc.id


def test_stdlib_docstrings_mentioning_copyright_are_kept(stdlib_docs):
    stripper = LicenseHeaderStripper()
    docstring_first = [d for d in stdlib_docs if d.text.startswith('"""') and "copyright" in d.text[:3000].lower()]
    assert docstring_first, f"no such file under {stdlib_root()}"
    for doc in docstring_first:
        assert stripper.apply(doc) is doc, doc.id
