import json
import sys
import sysconfig
from pathlib import Path

import pytest

from lmforge.data.base_reader import Document, ErrorLog
from lmforge.data.readers import (
    read_documents,
    read_stdlib,
    stdlib_root,
    stdlib_source_files,
)


def _write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_malformed_line_is_skipped_and_counted_with_file_and_line(tmp_path):
    path = _write_jsonl(
        tmp_path / "data.jsonl",
        [json.dumps({"text": "first", "lang": "en"}), '{"text": "broken', "", json.dumps({"text": "third"})],
    )
    errors = ErrorLog()
    docs = list(read_documents(path, errors=errors))
    assert [(d.id, d.text) for d in docs] == [("data.jsonl:1", "first"), ("data.jsonl:4", "third")]
    assert docs[0].meta == {"lang": "en"}
    assert docs[0].source == str(path)
    assert errors.count("malformed json") == 1
    assert errors.total == 1  # the blank line 3 is not a record
    assert errors.messages == [f"{path}:2: malformed json"]


def test_jsonl_missing_text_field_names_field_line_and_existing_keys(tmp_path):
    path = _write_jsonl(
        tmp_path / "data.jsonl",
        [json.dumps({"content": "a", "id": 1}), json.dumps({"body": "b", "id": 2})],
    )
    docs = read_documents(path, text_field="content")
    assert next(docs).text == "a"
    with pytest.raises(ValueError) as info:
        next(docs)
    message = str(info.value)
    assert f"{path}:2:" in message
    assert "'content'" in message
    assert "['body', 'id']" in message
    assert "data.text_field" in message


def test_jsonl_bad_values_are_counted_by_reason(tmp_path):
    path = _write_jsonl(
        tmp_path / "data.jsonl",
        [
            json.dumps([1, 2]),
            json.dumps({"text": 5}),
            json.dumps({"text": "   "}),
            '{"text": "lone \\ud800 surrogate"}',
            json.dumps({"text": "ok ✓"}),
        ],
    )
    errors = ErrorLog()
    docs = list(read_documents(path, errors=errors))
    assert [d.text for d in docs] == ["ok ✓"]
    assert errors.reasons == {"empty": 1, "invalid unicode": 1, "not a json object": 1, "text not a string": 1}


def test_binary_non_utf8_and_empty_files_are_skipped(tmp_path):
    (tmp_path / "a_good.py").write_text("x = 'é'\n", encoding="utf-8")
    (tmp_path / "b_binary.py").write_bytes(b"x = 1\ny = 2\0\n")
    (tmp_path / "c_latin1.py").write_bytes("# ok\ns = 'caf\xe9'\n".encode("latin-1"))
    (tmp_path / "d_empty.py").write_bytes(b"")
    (tmp_path / "e_blank.py").write_text("  \n\t\n")
    errors = ErrorLog()
    docs = list(read_documents(tmp_path, errors=errors))
    assert [d.id for d in docs] == ["a_good.py"]
    assert docs[0].text == "x = 'é'\n"
    assert errors.reasons == {"binary": 1, "empty": 2, "not utf-8": 1}
    assert errors.messages == [
        f"{tmp_path / 'b_binary.py'}:2: binary",
        f"{tmp_path / 'c_latin1.py'}:2: not utf-8",
        f"{tmp_path / 'd_empty.py'}: empty",
        f"{tmp_path / 'e_blank.py'}: empty",
    ]


def test_directory_walk_is_recursive_sorted_and_filtered(tmp_path):
    for rel in ["z.py", "b/y.py", "a/x.py", "a/notes.md", "a/data.bin", ".hidden/h.py", "__pycache__/c.py"]:
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"# {rel}\n")
    skipped = ErrorLog()
    ids = [d.id for d in read_documents(tmp_path, extensions=[".py"], skipped=skipped)]
    assert ids == ["a/x.py", "b/y.py", "z.py"]
    assert skipped.reasons == {"directory not entered (hidden or cache)": 2, "extension .bin not in data.extensions": 1,
                               "extension .md not in data.extensions": 1}  # fmt: skip
    assert skipped.messages[:2] == [f"{tmp_path / '.hidden'}: directory not entered (hidden or cache)",
                                    f"{tmp_path / '__pycache__'}: directory not entered (hidden or cache)"]  # fmt: skip
    assert [d.id for d in read_documents(tmp_path, extensions=[".MD"])] == ["a/notes.md"]
    # By default, every format the readers know: the .md and .py files, not the .bin one.
    assert [d.id for d in read_documents(tmp_path)] == ["a/notes.md", "a/x.py", "b/y.py", "z.py"]


def test_directory_mixes_text_and_jsonl(tmp_path):
    (tmp_path / "doc.txt").write_text("plain text\n")
    _write_jsonl(tmp_path / "recs.jsonl", [json.dumps({"body": "rec one"})])
    docs = list(read_documents(tmp_path, text_field="body", extensions=(".txt", ".jsonl")))
    assert [(d.id, d.text) for d in docs] == [("doc.txt", "plain text\n"), ("recs.jsonl:1", "rec one")]


def test_missing_source_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list(read_documents(tmp_path / "nope"))


def test_parquet_without_pyarrow_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    path = tmp_path / "data.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(ImportError, match="pip install pyarrow"):
        list(read_documents(path))


def test_error_log_keeps_first_messages_and_counts_all():
    errors = ErrorLog(max_messages=2)
    for line in range(1, 6):
        errors.add("malformed json", "f.jsonl", line)
    errors.add("empty", "g.txt")
    assert errors.total == 6
    assert errors.count("malformed json") == 5
    assert errors.count("never seen") == 0
    assert errors.to_dict() == {
        "total": 6,
        "by_reason": {"empty": 1, "malformed json": 5},
        "messages": ["f.jsonl:1: malformed json", "f.jsonl:2: malformed json"],
    }


def test_document_meta_defaults_are_independent():
    a, b = Document("a", "x", "s"), Document("b", "y", "s")
    a.meta["k"] = 1
    assert b.meta == {}


def test_stdlib_source_files_finds_json_decoder_and_no_site_packages():
    root = stdlib_root()
    files = stdlib_source_files()
    rels = [p.relative_to(root).as_posix() for p in files]
    assert "json/decoder.py" in rels
    assert "os.py" in rels
    assert files == sorted(files)
    assert all(p.suffix == ".py" for p in files)
    assert not any({"site-packages", "dist-packages", "__pycache__"} & set(p.parts) for p in files)


def test_stdlib_without_tests_drops_test_directories():
    root = stdlib_root()
    everything = stdlib_source_files(include_tests=True)
    no_tests = stdlib_source_files(include_tests=False)
    assert set(no_tests) <= set(everything)
    for p in no_tests:
        assert not {"test", "tests"} & set(p.relative_to(root).parts[:-1])
    dropped = set(everything) - set(no_tests)
    assert all({"test", "tests"} & set(p.relative_to(root).parts[:-1]) for p in dropped)


def test_read_stdlib_ids_are_relative_and_texts_exact():
    root = stdlib_root()
    errors = ErrorLog()
    docs = {d.id: d for d in read_stdlib(include_tests=False, errors=errors)}
    decoder = docs["json/decoder.py"]
    assert decoder.text == (root / "json" / "decoder.py").read_text(encoding="utf-8")
    assert decoder.source == str(root / "json" / "decoder.py")
    n_files = len(stdlib_source_files(include_tests=False))
    assert len(docs) + errors.total == n_files


def test_parquet_rows_become_documents_with_bad_rows_counted(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="pyarrow reads parquet (installed by the dev extra)")
    import pyarrow.parquet as pq

    real = (Path(sysconfig.get_paths()["stdlib"]) / "json" / "tool.py").read_text(encoding="utf-8")
    table = pa.table({"content": [real, None, "", "x = 1\n"], "lang": ["py", "py", "py", "py"]})
    path = tmp_path / "code.parquet"
    pq.write_table(table, path, row_group_size=2)  # several row groups: ids must keep counting across them
    errors = ErrorLog()
    docs = list(read_documents(tmp_path, text_field="content", extensions=(".parquet",), errors=errors))
    assert [(d.id, d.text) for d in docs] == [("code.parquet:1", real), ("code.parquet:4", "x = 1\n")]
    assert errors.total == 2 and len(errors.messages) == 2
    assert all(str(path) in m for m in errors.messages)

    with pytest.raises(ValueError, match=r"no column 'text' \(data.text_field\); columns present: \['content', 'lang'\]"):
        list(read_documents(path))


# -- compressed files and paragraph splitting ----------------------------------------------------------------------


def _jsonl_bytes(n):
    return b"".join(json.dumps({"text": f"document {i}", "n": i}).encode() + b"\n" for i in range(n))


def _compress(kind, data):
    if kind == "gz":
        import gzip

        return gzip.compress(data)
    import zstandard

    return zstandard.ZstdCompressor().compress(data)


@pytest.mark.parametrize("kind", ["gz", "zst"])
def test_compressed_jsonl_and_text_round_trip(tmp_path, kind):
    (tmp_path / f"a.jsonl.{kind}").write_bytes(_compress(kind, _jsonl_bytes(3)))
    real = (stdlib_root() / "json" / "tool.py").read_bytes()
    (tmp_path / f"tool.py.{kind}").write_bytes(_compress(kind, real))
    errors = ErrorLog()
    docs = list(read_documents(tmp_path, extensions=(".jsonl", ".py"), errors=errors))
    assert [(d.id, d.text) for d in docs] == [
        (f"a.jsonl.{kind}:1", "document 0"),
        (f"a.jsonl.{kind}:2", "document 1"),
        (f"a.jsonl.{kind}:3", "document 2"),
        (f"tool.py.{kind}", real.decode("utf-8")),
    ]
    assert docs[1].meta == {"n": 1}
    assert errors.total == 0


def test_concatenated_zstd_frames_are_all_read(tmp_path):
    path = tmp_path / "multi.jsonl.zst"
    data = _jsonl_bytes(4)
    path.write_bytes(_compress("zst", data[:40]) + _compress("zst", data[40:]))
    assert [d.text for d in read_documents(path)] == [f"document {i}" for i in range(4)]


@pytest.mark.parametrize("kind", ["gz", "zst"])
def test_truncated_compressed_file_keeps_earlier_documents_and_counts_once(tmp_path, kind):
    # Incompressible padding spreads the records over many compressed blocks, so a cut keeps some whole ones.
    import random

    rng = random.Random(0)
    lines = [json.dumps({"text": f"doc {i} " + rng.randbytes(3000).hex()}) for i in range(200)]
    full = _compress(kind, ("\n".join(lines) + "\n").encode())
    path = tmp_path / f"cut.jsonl.{kind}"
    path.write_bytes(full[: len(full) // 2])
    (tmp_path / "z.jsonl").write_text('{"text": "after"}\n', encoding="utf-8")
    errors = ErrorLog()
    docs = list(read_documents(tmp_path, extensions=(".jsonl",), errors=errors))
    kept = [d for d in docs if d.source == str(path)]
    assert 0 < len(kept) < 200
    assert [d.text for d in kept] == [json.loads(line)["text"] for line in lines[: len(kept)]]
    assert docs[-1].text == "after"  # reading goes on with the next file
    assert errors.reasons == {"corrupt compressed file": 1}
    assert errors.messages == [f"{path}: corrupt compressed file"]


@pytest.mark.parametrize("kind", ["gz", "zst"])
def test_garbage_compressed_file_is_one_error(tmp_path, kind):
    path = tmp_path / f"bad.txt.{kind}"
    path.write_bytes(b"this is not compressed at all" * 10)
    errors = ErrorLog()
    assert list(read_documents(path, errors=errors)) == []
    assert errors.reasons == {"corrupt compressed file": 1}


def test_text_split_paragraph_one_document_per_block(tmp_path):
    path = tmp_path / "prose.txt"
    path.write_bytes(b"First para\nline two\n\n  \n\nSecond\r\n\r\nbad \xff byte\n\nlast without newline")
    errors = ErrorLog()
    docs = list(read_documents(path, text_split="paragraph", errors=errors))
    assert [(d.id, d.text) for d in docs] == [
        ("prose.txt:1", "First para\nline two"),
        ("prose.txt:6", "Second"),
        ("prose.txt:10", "last without newline"),
    ]
    assert errors.messages == [f"{path}:8: not utf-8"]
    gz = tmp_path / "prose.txt.gz"
    gz.write_bytes(_compress("gz", path.read_bytes()))
    assert [d.text for d in read_documents(gz, text_split="paragraph")] == [d.text for d in docs]


def test_text_split_must_be_known(tmp_path):
    with pytest.raises(ValueError, match="text_split"):
        list(read_documents(tmp_path, text_split="line"))


# -- csv -----------------------------------------------------------------------------------------------------------


def test_csv_rows_become_documents_with_bad_rows_counted(tmp_path):
    path = tmp_path / "t.csv"
    path.write_bytes(b'\xef\xbb\xbfid,text,lang\r\n1,"hello, world",en\r\n2,"two\nlines ""quoted""",fr\r\n\r\n3\r\n'
                     b'4,,en\r\n5,caf\xe9\r\n6,ok\r\n')  # fmt: skip
    errors = ErrorLog()
    docs = list(read_documents(path, errors=errors))
    assert [(d.id, d.text, d.meta) for d in docs] == [
        ("t.csv:2", "hello, world", {"id": "1", "lang": "en"}),
        ("t.csv:3", 'two\nlines "quoted"', {"id": "2", "lang": "fr"}),
        ("t.csv:9", "ok", {"id": "6"}),
    ]
    assert errors.reasons == {"empty": 1, "malformed csv": 1, "not utf-8": 1}  # the undecodable row counts once
    assert errors.messages == [f"{path}:6: malformed csv", f"{path}:7: empty", f"{path}:8: not utf-8"]


def test_csv_without_the_text_column_names_the_columns_and_the_setting(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("id,body\n1,hello\n")
    with pytest.raises(ValueError) as info:
        list(read_documents(path))
    assert str(info.value) == (f"{path}:1: CSV header has no column 'text' (data.text_field); columns present: "
                               f"['id', 'body']. Set data.text_field to the column that holds the text.")  # fmt: skip
    assert [d.text for d in read_documents(path, text_field="body")] == ["hello"]
