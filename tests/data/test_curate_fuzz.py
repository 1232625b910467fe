"""Bad input never crashes curation: damaged, mistyped, binary, empty and huge inputs are skipped and counted.

Each case is checked at two levels: `read_documents` (exact documents and `ErrorLog` reasons, as documented in
lmforge.data.readers) and, where it matters, a whole `run_curate` run (only `stats.json`'s documented keys are
read, never the output file layout). The last tests fuzz valid JSONL / gzip / zstd bytes with a seeded mutator.
"""

import gzip
import io
import json
import os
import random
import re
import tracemalloc
from pathlib import Path

import pytest
import zstandard

from lmforge.data.curate import run_curate
from lmforge.data.base_reader import ErrorLog
from lmforge.data.readers import read_documents
from lmforge.data.config import DataConfig

# In-process and without plots: faster, and tracemalloc then sees the whole run. Only settings the recipe has.
_FAST = {k: v for k, v in {"workers": 1, "plots": False}.items() if k in DataConfig.model_fields}
_MAX_PEAK_BYTES = 1_500_000_000
_HUGE_BYTES = 100_000_000


def _prose(i: int) -> str:
    """A distinct document that passes the default filters (length, line length, alnum fraction, dedup)."""
    return f"Document number {i} talks about rivers, mountains and the weather in spring. " * 2


def _rec(text, **meta) -> bytes:
    return json.dumps({"text": text, **meta}).encode() + b"\n"


def _read(source, **kw):
    errors = ErrorLog(max_messages=10**6)
    docs = list(read_documents(source, errors=errors, **kw))
    return docs, errors


def _curate(src: Path, out: Path, extensions=(".txt", ".jsonl"), **kw) -> dict:
    """Run the whole stage and return stats.json, checked for the accounting every run must satisfy."""
    run_curate(DataConfig(source=str(src), extensions=list(extensions), **{**_FAST, **kw}), out)
    return _stats(out)


def _stats(out: Path) -> dict:
    stats = json.loads((out / "stats.json").read_text(encoding="utf-8"))
    assert stats["docs_in"] == stats["docs_kept"] + sum(e["docs"] for e in stats["removed"].values())
    bad = stats["skipped_bad"]
    assert bad["total"] == sum(bad["by_reason"].values())
    assert len(bad["messages"]) == min(bad["total"], 20)
    return stats


def _src(tmp_path: Path, files: dict[str, bytes], good: int = 1) -> Path:
    """A source directory holding `files` and `good` ordinary documents, so that curation has survivors."""
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    for name, data in files.items():
        (src / name).write_bytes(data)
    for i in range(good):
        (src / f"zz_good_{i}.txt").write_text(_prose(10_000 + i), encoding="utf-8")
    return src


def _compress(kind: str, data: bytes) -> bytes:
    return gzip.compress(data) if kind == "gz" else zstandard.ZstdCompressor().compress(data)


def _padded_records(n: int, seed: int = 0) -> list[bytes]:
    """Records of ~6 kB of incompressible hex (in short lines), so a compressed file spans many blocks."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        pad = rng.randbytes(3000).hex()
        text = f"Record {i} is about rivers and mountains.\n" + "\n".join(pad[j : j + 80] for j in range(0, 6000, 80))
        out.append(_rec(text, n=i))
    return out


# -- damaged compressed files --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gz", "zst"])
def test_truncated_compressed_jsonl_keeps_records_before_damage(tmp_path, kind):
    records = _padded_records(120)
    full = _compress(kind, b"".join(records))
    texts = [json.loads(r)["text"] for r in records]
    for cut in (5, len(full) // 10, len(full) // 2, len(full) * 9 // 10, len(full) - 4, len(full) - 1):
        path = tmp_path / f"cut{cut}.jsonl.{kind}"
        path.write_bytes(full[:cut])
        docs, errors = _read(path)
        # Whole records before the damage stand, in order; the record the cut went through is lost with the rest.
        assert [d.text for d in docs] == texts[: len(docs)], cut
        assert len(docs) < len(records) or cut >= len(full) - 4, cut
        if cut == 5:
            assert docs == []
        assert errors.reasons == {"corrupt compressed file": 1}, cut
        assert errors.messages == [f"{path}: corrupt compressed file"]
        path.unlink()

    src = _src(tmp_path, {f"cut.jsonl.{kind}": full[: len(full) // 2]})
    kept, _ = _read(src / f"cut.jsonl.{kind}")
    assert 0 < len(kept) < len(records)
    stats = _curate(src, tmp_path / "out")
    assert stats["docs_in"] == len(kept) + 1  # the damaged file's surviving records and the good file
    assert stats["docs_kept"] == len(kept) + 1
    assert stats["skipped_bad"]["by_reason"] == {"corrupt compressed file": 1}
    assert stats["skipped_bad"]["messages"] == [f"{src / f'cut.jsonl.{kind}'}: corrupt compressed file"]


@pytest.mark.parametrize("kind", ["gz", "zst"])
def test_compressed_file_with_garbage_appended_keeps_every_record(tmp_path, kind):
    records = [_rec(_prose(i)) for i in range(20)]
    path = tmp_path / f"tail.jsonl.{kind}"
    path.write_bytes(_compress(kind, b"".join(records)) + b"this is trailing garbage, not a compressed frame")
    docs, errors = _read(path)
    assert [d.text for d in docs] == [_prose(i) for i in range(20)]
    assert errors.reasons == {"corrupt compressed file": 1}

    stats = _curate(_src(tmp_path, {path.name: path.read_bytes()}), tmp_path / "out")
    assert stats["docs_in"] == stats["docs_kept"] == 21
    assert stats["skipped_bad"]["by_reason"] == {"corrupt compressed file": 1}


def test_gzip_members_and_zero_padding_are_not_damage(tmp_path):
    # Concatenated members (cat a.gz b.gz) are one valid stream, and gzip tolerates zero padding after the last one.
    a, b = _rec(_prose(1)) + _rec(_prose(2)), _rec(_prose(3))
    path = tmp_path / "members.jsonl.gz"
    path.write_bytes(gzip.compress(a) + gzip.compress(b) + b"\0" * 64)
    docs, errors = _read(path)
    assert [d.text for d in docs] == [_prose(1), _prose(2), _prose(3)]
    assert errors.total == 0


@pytest.mark.parametrize("name", ["plain.jsonl.gz", "plain.jsonl.zst", "plain.txt.gz"])
def test_file_that_is_not_compressed_but_named_so_is_one_error(tmp_path, name):
    data = b"".join(_rec(_prose(i)) for i in range(5))
    docs, errors = _read(_src(tmp_path, {name: data}, good=0) / name)
    assert docs == []
    assert errors.reasons == {"corrupt compressed file": 1}

    stats = _curate(_src(tmp_path, {}), tmp_path / "out")
    assert stats["docs_in"] == 1
    assert stats["skipped_bad"]["by_reason"] == {"corrupt compressed file": 1}
    assert stats["skipped_bad"]["messages"] == [f"{tmp_path / 'src' / name}: corrupt compressed file"]


def _parquet_bytes(texts: list, tmp_path: Path) -> bytes:
    pa = pytest.importorskip("pyarrow", reason="pyarrow reads parquet (installed by the dev extra)")
    import pyarrow.parquet as pq

    path = tmp_path / "made.parquet"
    pq.write_table(pa.table({"text": texts}), path, row_group_size=50)
    data = path.read_bytes()
    path.unlink()
    return data


def test_truncated_or_garbage_parquet_is_one_error(tmp_path):
    data = _parquet_bytes([_prose(i) for i in range(300)], tmp_path)
    files = {"a_cut.parquet": data[: len(data) // 2], "b_garbage.parquet": b"PAR1" + b"not parquet" * 20 + b"PAR1"}
    src = _src(tmp_path, files)
    docs, errors = _read(src, extensions=[".parquet", ".txt"])
    assert [d.id for d in docs] == ["zz_good_0.txt"]
    assert errors.messages == [f"{src / n}: corrupt parquet file" for n in files]
    stats = _curate(src, tmp_path / "out", extensions=[".parquet", ".txt"])
    assert stats["docs_in"] == 1
    assert stats["skipped_bad"]["by_reason"] == {"corrupt parquet file": 2}


def test_fuzzed_parquet_never_crashes(tmp_path):
    rng = random.Random(5)
    data = _parquet_bytes([f"row {i} " + "é" * (i % 7) for i in range(400)], tmp_path)
    reasons = set()
    for case in range(150):
        path = tmp_path / f"case{case}.parquet"
        path.write_bytes(_mutate(rng, data))
        try:
            docs, errors = _read(path)
        except ValueError as e:  # a mangled column name: the documented setting error, and the only raise allowed
            assert re.match(re.escape(str(path)) + r": parquet file has no column 'text' \(data.text_field\)", str(e))
            continue
        assert errors.count("corrupt parquet file") <= 1
        rows = [int(d.id.rsplit(":", 1)[1]) for d in docs]
        assert rows == sorted(set(rows)), case
        reasons.update(errors.reasons)
        path.unlink()
    assert "corrupt parquet file" in reasons


# -- encodings -----------------------------------------------------------------------------------------------------


def test_invalid_utf8_in_text_files_is_counted_with_its_line(tmp_path):
    files = {
        "a_latin1.txt": "first line\nsecond caf\xe9 line\n".encode("latin-1"),
        "b_cesu_surrogate.txt": b"one\ntwo\nthree \xed\xa0\x80 four\n",  # an encoded surrogate is not UTF-8
        "c_overlong.txt": b"\xc0\xaf slash",
        "d_cut_sequence.txt": b"ends inside a character caf\xc3",
    }
    src = _src(tmp_path, files)
    docs, errors = _read(src, extensions=[".txt"])
    assert [d.id for d in docs] == ["zz_good_0.txt"]
    assert errors.reasons == {"not utf-8": 4}
    assert errors.messages == [
        f"{src / 'a_latin1.txt'}:2: not utf-8",
        f"{src / 'b_cesu_surrogate.txt'}:3: not utf-8",
        f"{src / 'c_overlong.txt'}:1: not utf-8",
        f"{src / 'd_cut_sequence.txt'}:1: not utf-8",
    ]
    stats = _curate(src, tmp_path / "out")
    assert stats["docs_in"] == 1
    assert stats["skipped_bad"]["by_reason"] == {"not utf-8": 4}


def test_invalid_utf8_inside_jsonl_lines_skips_only_those_records(tmp_path):
    lines = [
        _rec(_prose(1)),
        b'{"text": "caf\xe9 ' + _prose(2).encode() + b'"}\n',
        b'{"text": "\xed\xa0\x80 ' + _prose(3).encode() + b'"}\n',
        b'{"text": "' + _prose(4).encode() + b'", "note": "\xc0\xaf"}\n',  # bad bytes outside the text count too
        _rec(_prose(5)),
    ]
    src = _src(tmp_path, {"mixed.jsonl": b"".join(lines)}, good=0)
    docs, errors = _read(src / "mixed.jsonl")
    assert [(d.id, d.text) for d in docs] == [("mixed.jsonl:1", _prose(1)), ("mixed.jsonl:5", _prose(5))]
    assert errors.reasons == {"not utf-8": 3}
    assert errors.messages == [f"{src / 'mixed.jsonl'}:{n}: not utf-8" for n in (2, 3, 4)]
    stats = _curate(src, tmp_path / "out")
    assert stats["docs_in"] == stats["docs_kept"] == 2
    assert stats["skipped_bad"]["by_reason"] == {"not utf-8": 3}


def test_lone_surrogates_from_json_escapes(tmp_path):
    good = _prose(6)
    lines = [
        b'{"text": "a \\ud800 b ' + _prose(1).encode() + b'"}\n',
        b'{"text": "\\udfff"}\n',
        b'{"text": "\\ude00\\ud83d reversed pair ' + _prose(3).encode() + b'"}\n',
        b'{"text": "ends with a high surrogate \\ud83d"}\n',
        b'{"text": "a real pair \\ud83d\\ude00 ' + _prose(5).encode() + b'"}\n',
        # Surrogates in other fields are not the text: the record is kept, and curation must not choke on them.
        b'{"text": "' + good.encode() + b'", "title": "\\ud800", "\\udfff": 1}\n',
    ]
    src = _src(tmp_path, {"sur.jsonl": b"".join(lines)}, good=0)
    docs, errors = _read(src / "sur.jsonl")
    assert [d.text for d in docs] == ["a real pair \U0001f600 " + _prose(5), good]
    assert docs[1].meta == {"title": "\ud800", "\udfff": 1}
    assert errors.reasons == {"invalid unicode": 4}
    assert errors.messages == [f"{src / 'sur.jsonl'}:{n}: invalid unicode" for n in (1, 2, 3, 4)]
    stats = _curate(src, tmp_path / "out")
    assert stats["docs_in"] == stats["docs_kept"] == 2
    assert stats["skipped_bad"]["by_reason"] == {"invalid unicode": 4}


def test_byte_order_mark_on_first_jsonl_line_is_tolerated(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + _rec(_prose(1)) + b"\xef\xbb\xbf" + _rec(_prose(2)))
    docs, errors = _read(path)
    assert [(d.id, d.text) for d in docs] == [("bom.jsonl:1", _prose(1))]
    assert errors.messages == [f"{path}:2: malformed json"]  # a BOM inside the file is not a byte-order mark


# -- binary garbage ------------------------------------------------------------------------------------------------


def _garbage(seed: int, n: int = 16384) -> bytes:
    data = random.Random(seed).randbytes(n)
    return data[: n // 2] + b"\0" + data[n // 2 :]  # certainly a NUL


def _nonblank_lines(data: bytes) -> list[int]:
    return [i for i, line in enumerate(data.split(b"\n"), start=1) if line.strip()]


def test_binary_garbage_text_file_is_one_binary_error(tmp_path):
    data = _garbage(1)
    src = _src(tmp_path, {"noise.txt": data})
    docs, errors = _read(src / "noise.txt")
    assert docs == []
    nul_line = data[: data.index(b"\0")].count(b"\n") + 1
    assert errors.messages == [f"{src / 'noise.txt'}:{nul_line}: binary"]

    docs, errors = _read(src / "noise.txt", text_split="paragraph")
    assert docs == []  # every block of random bytes is binary or not UTF-8
    nonblank = _nonblank_lines(data)
    blocks = sum(1 for i, n in enumerate(nonblank) if i == 0 or n != nonblank[i - 1] + 1)  # runs of non-blank lines
    assert errors.total == blocks and set(errors.reasons) <= {"binary", "not utf-8"}

    stats = _curate(src, tmp_path / "out")
    assert stats["docs_in"] == 1
    assert stats["skipped_bad"]["by_reason"] == {"binary": 1}


@pytest.mark.parametrize("name", ["noise.jsonl", "noise.jsonl.gz"])
def test_binary_garbage_jsonl_counts_every_line(tmp_path, name):
    data = _garbage(2)
    src = _src(tmp_path, {name: gzip.compress(data) if name.endswith(".gz") else data})
    docs, errors = _read(src / name)
    assert docs == []
    assert errors.total == len(_nonblank_lines(data))
    assert set(errors.reasons) <= {"not utf-8", "malformed json", "not a json object"}
    stats = _curate(src, tmp_path / "out")
    assert stats["docs_in"] == 1
    assert stats["skipped_bad"]["by_reason"] == errors.reasons


# -- wrong JSON shapes ---------------------------------------------------------------------------------------------


def test_text_field_of_the_wrong_type(tmp_path):
    values = [5, 1.5, ["a", "list"], None, {"an": "object"}, True]
    lines = [_rec(v) for v in values] + [_rec(_prose(1))]
    src = _src(tmp_path, {"types.jsonl": b"".join(lines)}, good=0)
    docs, errors = _read(src / "types.jsonl")
    assert [d.id for d in docs] == ["types.jsonl:7"]
    assert errors.reasons == {"text not a string": 6}
    stats = _curate(src, tmp_path / "out")
    assert stats["docs_in"] == 1
    assert stats["skipped_bad"]["by_reason"] == {"text not a string": 6}


def test_records_that_are_not_objects(tmp_path):
    lines = [b'[1, 2, {"text": "in a list"}]\n', b'"a string"\n', b"42\n", b"null\n", b"true\n", _rec(_prose(1))]
    src = _src(tmp_path, {"shapes.jsonl": b"".join(lines)}, good=0)
    docs, errors = _read(src / "shapes.jsonl")
    assert [d.id for d in docs] == ["shapes.jsonl:6"]
    assert errors.reasons == {"not a json object": 5}
    assert errors.messages == [f"{src / 'shapes.jsonl'}:{n}: not a json object" for n in range(1, 6)]
    stats = _curate(src, tmp_path / "out")
    assert stats["skipped_bad"]["by_reason"] == {"not a json object": 5}


def test_deeply_nested_json_is_a_malformed_record_not_a_crash(tmp_path):
    depth = 100_000
    lines = [
        _rec(_prose(1)),
        b"[" * depth + b"\n",
        b'{"text": ' + b"[" * depth + b"]" * depth + b"}\n",
        b'{"text": "' + _prose(4).encode() + b'", "meta": ' + b'{"a": ' * depth + b"1" + b"}" * depth + b"}\n",
        # Nesting Python's parser can hold is an ordinary record.
        b'{"text": "' + _prose(5).encode() + b'", "meta": ' + b"[" * 100 + b"]" * 100 + b"}\n",
        _rec(_prose(6)),
    ]
    src = _src(tmp_path, {"deep.jsonl": b"".join(lines)}, good=0)
    docs, errors = _read(src / "deep.jsonl")
    assert [d.id for d in docs] == ["deep.jsonl:1", "deep.jsonl:5", "deep.jsonl:6"]
    assert errors.reasons == {"malformed json": 3}
    assert errors.messages == [f"{src / 'deep.jsonl'}:{n}: malformed json" for n in (2, 3, 4)]
    stats = _curate(src, tmp_path / "out")
    assert stats["docs_in"] == stats["docs_kept"] == 3
    assert stats["skipped_bad"]["by_reason"] == {"malformed json": 3}


def test_huge_integer_literal_is_malformed_json_not_a_setting_error(tmp_path):
    # Python refuses to parse an int of more than 4300 digits with a plain ValueError: it must not escape as if it
    # were the missing-text-field error.
    digits = b"7" * 5000
    lines = [
        b'{"text": "' + _prose(1).encode() + b'", "n": ' + digits + b"}\n",
        digits + b"\n",
        b'{"text": "' + _prose(3).encode() + b'", "x": 1.' + digits + b", \"y\": 1e999999}\n",  # floats are fine
    ]
    path = tmp_path / "ints.jsonl"
    path.write_bytes(b"".join(lines))
    docs, errors = _read(path)
    assert [d.id for d in docs] == ["ints.jsonl:3"]
    assert docs[0].meta["y"] == float("inf")
    assert errors.messages == [f"{path}:1: malformed json", f"{path}:2: malformed json"]


def test_duplicate_keys_last_one_wins(tmp_path):
    lines = [
        b'{"text": 5, "text": "' + _prose(1).encode() + b'"}\n',
        b'{"text": "' + _prose(2).encode() + b'", "text": null}\n',
        b'{"text": "' + _prose(3).encode() + b'", "lang": "en", "lang": "fr"}\n',
    ]
    src = _src(tmp_path, {"dup.jsonl": b"".join(lines)}, good=0)
    docs, errors = _read(src / "dup.jsonl")
    assert [(d.text, d.meta) for d in docs] == [(_prose(1), {}), (_prose(3), {"lang": "fr"})]
    assert errors.messages == [f"{src / 'dup.jsonl'}:2: text not a string"]
    stats = _curate(src, tmp_path / "out")
    assert stats["docs_in"] == 2
    assert stats["skipped_bad"]["by_reason"] == {"text not a string": 1}


# -- empty inputs --------------------------------------------------------------------------------------------------


_EMPTY_FILES = {
    "a_empty.txt": b"",
    "b_blank.txt": b" \n\t\r\n  \x0b\x0c\n",
    "c_empty.jsonl": b"",
    "d_blank_lines.jsonl": b"\n\n   \n\r\n\t\n",
    "e_blank.jsonl.gz": gzip.compress(b"\n \n\n"),
    "f_empty.txt.gz": gzip.compress(b""),
}


def test_empty_and_whitespace_only_files(tmp_path):
    src = _src(tmp_path, _EMPTY_FILES)
    docs, errors = _read(src, extensions=[".txt", ".jsonl"])
    assert [d.id for d in docs] == ["zz_good_0.txt"]
    # A text file with nothing in it is an empty document; a jsonl file with no record holds no document at all.
    assert errors.messages == [f"{src / n}: empty" for n in ("a_empty.txt", "b_blank.txt", "f_empty.txt.gz")]
    docs, errors = _read(src, extensions=[".txt", ".jsonl"], text_split="paragraph")
    assert [d.id for d in docs] == ["zz_good_0.txt:1"] and errors.total == 0  # no block, nothing to skip

    stats = _curate(src, tmp_path / "out")
    assert stats["docs_in"] == stats["docs_kept"] == 1
    assert stats["skipped_bad"]["by_reason"] == {"empty": 3}


def test_only_empty_files_fails_loudly_after_writing_stats(tmp_path):
    src = _src(tmp_path, _EMPTY_FILES, good=0)
    with pytest.raises(ValueError, match="survived"):
        run_curate(DataConfig(source=str(src), extensions=[".txt", ".jsonl"], **_FAST), tmp_path / "out")
    stats = _stats(tmp_path / "out")
    assert stats["docs_in"] == 0
    assert stats["skipped_bad"]["by_reason"] == {"empty": 3}


# -- file system oddities ------------------------------------------------------------------------------------------


def _bad_name(src: Path, raw: bytes) -> Path:
    try:
        path = src / os.fsdecode(raw)
        path.write_bytes(b"")
    except (OSError, UnicodeError):
        pytest.skip("this file system does not take file names that are not UTF-8")
    return path


def test_file_names_that_are_not_utf8_get_printable_ids(tmp_path):
    src = _src(tmp_path, {})
    _bad_name(src, b"bad-\xff.txt").write_text(_prose(1), encoding="utf-8")
    _bad_name(src, b"bin-\xfe.txt").write_bytes(b"\0")
    docs, errors = _read(src, extensions=[".txt"])
    assert [d.id for d in docs] == ["bad-\\udcff.txt", "zz_good_0.txt"]
    assert docs[0].text == _prose(1)
    assert docs[0].source == str(src / "bad-\\udcff.txt")
    assert errors.messages == [f"{src}/bin-\\udcfe.txt:1: binary"]
    json.dumps([d.id for d in docs] + [d.source for d in docs] + errors.messages, ensure_ascii=False).encode()


def test_curate_survives_file_names_that_are_not_utf8(tmp_path):
    src = _src(tmp_path, {})
    _bad_name(src, b"bad-\xff.txt").write_text(_prose(1), encoding="utf-8")
    stats = _curate(src, tmp_path / "out")
    assert stats["docs_in"] == stats["docs_kept"] == 2


def test_dangling_symlink_is_an_unreadable_file(tmp_path):
    src = _src(tmp_path, {})
    names = ["gone.jsonl.gz", "gone.jsonl.zst", "gone.txt"]
    for name in names:
        (src / name).symlink_to(tmp_path / "does-not-exist")
    docs, errors = _read(src, extensions=[".txt", ".jsonl"])
    assert [d.id for d in docs] == ["zz_good_0.txt"]
    assert errors.messages == [f"{src / name}: unreadable file" for name in names]


def test_curate_survives_a_dangling_symlink(tmp_path):
    src = _src(tmp_path, {})
    (src / "gone.txt").symlink_to(tmp_path / "does-not-exist")
    stats = _curate(src, tmp_path / "out")
    assert stats["skipped_bad"]["by_reason"] == {"unreadable file": 1}


# -- one huge line -------------------------------------------------------------------------------------------------


def _curate_measured(src: Path, out: Path, extensions) -> tuple[dict, int]:
    tracemalloc.start()
    try:
        _curate(src, out, extensions=extensions)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return _stats(out), peak


def _write_huge(path: Path, head: bytes, tail: bytes) -> None:
    piece = b"abcdefghi " * 100_000  # 1 MB
    with open(path, "wb") as f:
        f.write(head)
        for _ in range(_HUGE_BYTES // len(piece)):
            f.write(piece)
        f.write(tail)


def test_huge_jsonl_record_is_dropped_as_too_long_with_bounded_memory(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    path = src / "huge.jsonl"
    _write_huge(path, _rec(_prose(1)) + b'{"text": "', b'"}\n' + _rec(_prose(3)))
    try:
        stats, peak = _curate_measured(src, tmp_path / "out", [".jsonl"])
    finally:
        path.unlink()
    assert stats["docs_in"] == 3 and stats["docs_kept"] == 2
    assert stats["removed"]["too long"]["docs"] == 1
    assert stats["removed"]["too long"]["bytes"] == _HUGE_BYTES
    assert stats["skipped_bad"]["total"] == 0
    assert peak < _MAX_PEAK_BYTES, f"peak Python memory {peak / 1e6:.0f} MB"


def test_huge_single_line_text_file_is_dropped_as_too_long_with_bounded_memory(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text(_prose(1), encoding="utf-8")
    path = src / "huge.txt"
    _write_huge(path, b"", b"")
    try:
        stats, peak = _curate_measured(src, tmp_path / "out", [".txt"])
    finally:
        path.unlink()
    assert stats["docs_in"] == 2 and stats["docs_kept"] == 1
    assert stats["removed"]["too long"]["docs"] == 1
    assert stats["removed"]["too long"]["bytes"] == _HUGE_BYTES
    assert peak < _MAX_PEAK_BYTES, f"peak Python memory {peak / 1e6:.0f} MB"


# -- randomized fuzzing --------------------------------------------------------------------------------------------


_INSERTS = [b"\n", b"\0", b'"', b"\\", b"\\u", b"\\ud800", b"\xff", b"\xc3", b"{", b"}", b"[" * 3000, b"9" * 5000,
            b'"text"', b":", b",", b"\r\n", b"\xef\xbb\xbf"]  # fmt: skip
# Whole records that are hostile to a JSON reader, swapped in for a line.
_HOSTILE_LINES = [b"[" * 5000, b'{"text": ' + b"[" * 5000, b'{"text": "x", "n": ' + b"1" * 5000 + b"}",
                  b'{"text": ' + b"9" * 5000 + b"}", b'"a string"', b"[]", b"null", b"-0.0e-999", b'{"text": ["a"]}',
                  b'{"text": {"a": 1}}', b'{"text": "\\ud800 lone"}', b'{"text": "  "}', b'{"text": "ok", "text": 1}',
                  b'{"text": "caf\xe9"}', b"\0" * 10, b'{"text": "a\0b"}']  # fmt: skip


def _base_jsonl(rng: random.Random) -> bytes:
    lines = []
    for i in range(rng.randint(5, 25)):
        choice = rng.randrange(5)
        if choice == 0:
            lines.append(_rec(f"plain record {i}", n=i))
        elif choice == 1:
            lines.append(json.dumps({"text": f"unicodé ✓ {i} 😀", "tags": ["ä", "b"]}, ensure_ascii=False).encode())
            lines[-1] += b"\r\n"
        elif choice == 2:
            lines.append(_rec(f"nested {i}", meta={"a": [1, {"b": None, "c": 1.5}], "s": "\\ \" \t"}))
        elif choice == 3:
            lines.append(b"\n" * rng.randint(1, 3))  # blank lines are not records
        else:
            lines.append(_rec(_prose(i) * rng.randint(1, 4), id=f"doc-{i}"))
    return b"".join(lines)


def _mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        if not buf:
            break
        i = rng.randrange(len(buf))
        op = rng.randrange(7)
        if op == 0:
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1:
            del buf[i:]
        elif op == 2:
            buf[i:i] = rng.randbytes(rng.randint(1, 16))
        elif op == 3:
            buf[i:i] = rng.choice(_INSERTS)
        elif op == 4:
            del buf[i : i + rng.randint(1, 32)]
        elif op == 5:
            buf[i:i] = buf[i : i + rng.randint(1, 64)]
        else:
            start = buf.rfind(b"\n", 0, i) + 1
            end = buf.find(b"\n", i)
            buf[start : len(buf) if end < 0 else end] = rng.choice(_HOSTILE_LINES)
    return bytes(buf)


def _fuzz_case(rng: random.Random) -> tuple[str, bytes, bytes]:
    """(file name, the file's bytes, the payload they were made from), mutated before or after compressing."""
    kind = rng.choice(["jsonl", "jsonl.gz", "jsonl.zst"])
    payload = _base_jsonl(rng)
    if kind == "jsonl":
        return kind, _mutate(rng, payload), b""
    compress = gzip.compress if kind.endswith("gz") else zstandard.ZstdCompressor().compress
    if rng.random() < 0.3:  # damage inside the payload, compressed intact
        payload = _mutate(rng, payload)
        return kind, compress(payload), payload
    return kind, _mutate(rng, compress(payload)), b""


def _decompressed(kind: str, data: bytes) -> bytes:
    if kind.endswith(".gz"):
        return gzip.decompress(data)
    if kind.endswith(".zst"):
        return zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=True).read()
    return data


def _read_fuzzed(path: Path) -> tuple[list, ErrorLog, int | None]:
    """Documents, errors, and the line of the missing-text-field error if the reader raised it (the only raise)."""
    errors = ErrorLog(max_messages=10**6)
    docs = []
    try:
        for doc in read_documents(path, errors=errors):
            docs.append(doc)
    except ValueError as e:
        match = re.match(re.escape(str(path)) + r":(\d+): record has no field 'text' \(data.text_field\)", str(e))
        assert match, f"unexpected ValueError: {e}"
        return docs, errors, int(match.group(1))
    return docs, errors, None


def test_fuzzed_jsonl_never_crashes_and_counts_add_up(tmp_path):
    rng = random.Random(20240607)
    seen = set()
    for case in range(200):
        kind, data, _ = _fuzz_case(rng)
        path = tmp_path / f"case{case}.{kind}"
        path.write_bytes(data)
        docs, errors, raised_at = _read_fuzzed(path)
        where = f"case {case} ({path.name})"
        doc_lines = [int(d.id.rsplit(":", 1)[1]) for d in docs]
        line_errors = [m for m in errors.messages if not m.endswith("corrupt compressed file")]
        error_lines = [int(m[len(str(path)) + 1 :].split(":", 1)[0]) for m in line_errors]
        # Every record is one document or one error, never both, and in file order.
        assert doc_lines == sorted(doc_lines) and len(set(doc_lines)) == len(doc_lines), where
        assert not set(doc_lines) & set(error_lines), where
        assert len(error_lines) == len(set(error_lines)) == errors.total - errors.count("corrupt compressed file")
        assert errors.count("corrupt compressed file") <= 1, where
        if raised_at is not None:
            assert all(n < raised_at for n in doc_lines + error_lines), where
        if errors.count("corrupt compressed file") == 0 and (raised_at is None or kind == "jsonl"):
            # Read to the end (or, uncompressed, to the setting error, past which a compressed file's damage would
            # go unseen): exactly the non-blank lines, each document checked against json.loads of its line.
            text = _decompressed(kind, data)
            lines = text.split(b"\n")
            expected = [n for n in _nonblank_lines(text) if raised_at is None or n < raised_at]
            assert sorted(doc_lines + error_lines) == expected, where
            for doc, n in zip(docs, doc_lines):
                assert doc.text == json.loads(lines[n - 1].decode("utf-8-sig" if n == 1 else "utf-8"))["text"]
        seen.add((kind, errors.count("corrupt compressed file") > 0, raised_at is not None))
        seen.update(errors.reasons)
        path.unlink()
    # The mutator reaches the interesting outcomes, not only clean files.
    assert {"malformed json", "not utf-8", "not a json object", "text not a string", "invalid unicode", "empty",
            "corrupt compressed file"} <= seen
    assert ("jsonl.gz", True, False) in seen and ("jsonl.zst", True, False) in seen
    assert any(isinstance(s, tuple) and s[2] for s in seen)  # the missing-field error was met and was the only raise


def test_curate_on_fuzzed_files_matches_what_the_reader_counts(tmp_path):
    rng = random.Random(99)
    src = _src(tmp_path, {})
    made = 0
    while made < 15:
        kind, data, _ = _fuzz_case(rng)
        path = src / f"f{made:02d}.{kind}"
        path.write_bytes(data)
        if _read_fuzzed(path)[2] is not None:  # a mangled "text" key stops any run: a setting error, by design
            path.unlink()
            continue
        made += 1
    docs, errors = _read(src, extensions=[".txt", ".jsonl"])
    stats = _curate(src, tmp_path / "out")
    assert stats["docs_in"] == len(docs)
    assert stats["skipped_bad"]["total"] == errors.total
    assert stats["skipped_bad"]["by_reason"] == errors.reasons
