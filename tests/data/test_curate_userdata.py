"""A user's own folder of data: default formats, skipped files, pipes, links, prose rules and big text files."""

import contextlib
import json
import logging
import os
import signal
import socket
from pathlib import Path

import pytest

from lmforge.data.curate import run_curate
from lmforge.data.curated import iter_split_records
from lmforge.data.base_reader import ErrorLog
from lmforge.data.readers import read_documents
from lmforge.data.config import DataConfig

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
PROSE = ("The river ran past the old mill, and the children followed it down to the sea every summer morning. " * 12)
CODE = "def add(a, b):\n    \"\"\"Return the sum of a and b.\"\"\"\n    return a + b\n"
OPT = "if that is not intended, change"


class Hung(Exception):
    """Not an OSError, so that no reader counts it as an unreadable file."""


@contextlib.contextmanager
def _deadline(seconds: int):
    """Fail instead of hanging: a read that blocks forever (a named pipe) raises `Hung`."""

    def expire(*_):
        raise Hung(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _curate(src: Path, out: Path, **kw) -> dict:
    kw = {"workers": 1, "plots": False, "min_chars": 0, **kw}
    with _deadline(30):
        run_curate(DataConfig(source=str(src), **kw), out)
    return json.loads((out / "stats.json").read_text(encoding="utf-8"))


def _ids(out: Path) -> list[str]:
    return sorted(r["id"] for split in ("train", "val") for r in iter_split_records(out, split))


# -- item 8: the formats read by default, and the files skipped for their extension -------------------------------


def _user_folder(root: Path) -> Path:
    root.mkdir()
    (root / "notes.txt").write_text(PROSE, encoding="utf-8")
    (root / "readme.md").write_text("# Title\n\n" + PROSE, encoding="utf-8")
    (root / "recs.jsonl").write_text(json.dumps({"text": PROSE + "one"}) + "\n" + json.dumps({"text": PROSE + "two"})
                                     + "\n", encoding="utf-8")  # fmt: skip
    (root / "table.csv").write_text(f'id,text\n1,"{PROSE}three"\n2,"{PROSE}four"\n', encoding="utf-8")
    (root / "data.bin").write_bytes(b"\x00\x01")
    (root / "Makefile").write_text("all:\n\techo hi\n")
    return root


def test_default_extensions_read_every_known_format_and_report_the_rest(tmp_path):
    stats = _curate(_user_folder(tmp_path / "src"), tmp_path / "out")
    assert _ids(tmp_path / "out") == ["notes.txt", "readme.md", "recs.jsonl:1", "recs.jsonl:2", "table.csv:2",
                                      "table.csv:3"]  # fmt: skip
    assert stats["docs_in"] == stats["docs_kept"] == 6
    assert stats["skipped_files"] == {
        "total": 2,
        "by_reason": {"extension (none) not in data.extensions": 1, "extension .bin not in data.extensions": 1},
        "messages": [f"{tmp_path / 'src' / 'Makefile'}: extension (none) not in data.extensions",
                     f"{tmp_path / 'src' / 'data.bin'}: extension .bin not in data.extensions"],
    }  # fmt: skip
    default = [".txt", ".md", ".rst", ".py", ".jsonl", ".csv", ".parquet", ".warc", ".wet", ".html", ".htm",
               ".pdf"]
    assert stats["warnings"] == [f"2 files skipped for their extension ((none) 1, .bin 1): data.extensions is "
                                 f"{default}; add an extension there to read those files"]  # fmt: skip


def test_nothing_read_says_which_extensions_were_skipped_and_the_setting(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("a.txt", "b.txt", "c.md"):
        (src / name).write_text(PROSE, encoding="utf-8")
    with pytest.raises(ValueError) as info:
        _curate(src, tmp_path / "out", extensions=[".py"])
    assert str(info.value) == (
        f"no document of '{src}' survived curation: 0 documents read; removed: none; files skipped: "
        f"extension .txt not in data.extensions 2, extension .md not in data.extensions 1. 3 files skipped for "
        f"their extension (.txt 2, .md 1): data.extensions is ['.py']; add an extension there to read those files. "
        f"See {tmp_path / 'out' / 'stats.json'}"
    )


def test_no_survivor_message_lists_counts_not_raw_dicts(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("tiny\n")
    (src / "b.txt").write_bytes(b"")
    with pytest.raises(ValueError) as info:
        _curate(src, tmp_path / "out", min_chars=64)
    message = str(info.value)
    assert "{" not in message and "}" not in message
    assert message.startswith(f"no document of '{src}' survived curation: 1 documents read; removed: too short 1; "
                              f"bad records skipped: empty 1. The rule 'too short' removed 1 of 1 documents "
                              f"(100.0%) and 100.0% of the bytes; {OPT} data.min_chars. See ")  # fmt: skip


# -- item 9: pipes, sockets and devices ----------------------------------------------------------------------------


def test_named_pipe_and_socket_are_skipped_and_counted_not_read(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text(PROSE)
    os.mkfifo(src / "pipe.txt")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(src / "s.txt"))
        stats = _curate(src, tmp_path / "out", extensions=[".txt"])
        skipped = ErrorLog()
        with _deadline(10):
            assert [d.id for d in read_documents(src, extensions=[".txt"], skipped=skipped)] == ["a.txt"]
    assert skipped.reasons == {"not a regular file": 2}
    assert stats["docs_in"] == 1
    assert stats["skipped_files"]["by_reason"] == {"not a regular file": 2}
    assert stats["skipped_files"]["messages"] == [f"{src / 'pipe.txt'}: not a regular file",
                                                  f"{src / 's.txt'}: not a regular file"]  # fmt: skip


def test_a_pipe_is_counted_as_what_it_is_whatever_its_name(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text(PROSE)
    os.mkfifo(src / "pipe")  # no extension: still reported as a pipe, not as an unselected extension
    (src / "link.txt").symlink_to(src / "pipe")
    skipped = ErrorLog()
    with _deadline(10):
        assert [d.id for d in read_documents(src, extensions=[".txt"], skipped=skipped)] == ["a.txt"]
    assert skipped.reasons == {"not a regular file": 2}


def test_a_named_pipe_as_the_source_is_a_clear_error(tmp_path):
    os.mkfifo(tmp_path / "pipe.txt")
    with pytest.raises(ValueError, match="is not a regular file or a directory"):
        _curate(tmp_path / "pipe.txt", tmp_path / "out")


# -- item 10: symbolic links ---------------------------------------------------------------------------------------


def _linked_folder(tmp_path: Path) -> Path:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("SECRET " + PROSE)
    (outside / "more.txt").write_text("MORE " + PROSE)
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "real.txt").write_text(PROSE)
    (src / "sub" / "code.py").write_text(CODE)
    (src / "sub" / "note.md").write_text("NOTE " + PROSE)
    (src / "inside.txt").symlink_to(src / "sub" / "note.md")  # inside the source: read
    (src / "shadow.txt").symlink_to(outside / "secret.txt")
    (src / "outdir").symlink_to(outside, target_is_directory=True)
    (src / "loop1.txt").symlink_to(src / "loop2.txt")
    (src / "loop2.txt").symlink_to(src / "loop1.txt")
    (src / "sub" / "up").symlink_to(src, target_is_directory=True)  # a directory link back to an ancestor
    return src


def test_links_out_of_the_source_are_not_read_and_loops_are_counted(tmp_path):
    src = _linked_folder(tmp_path)
    stats = _curate(src, tmp_path / "out")
    assert _ids(tmp_path / "out") == ["inside.txt", "real.txt", "sub/code.py"]
    assert stats["removed"]["duplicate"]["examples"][0]["id"] == "sub/note.md"  # the same file as inside.txt
    assert stats["skipped_files"]["by_reason"] == {"symlink loop": 3, "symlink outside source": 2}
    assert stats["skipped_files"]["messages"] == [
        f"{src / 'loop1.txt'}: symlink loop", f"{src / 'loop2.txt'}: symlink loop",
        f"{src / 'outdir'}: symlink outside source", f"{src / 'shadow.txt'}: symlink outside source",
        f"{src / 'sub' / 'up'}: symlink loop",
    ]  # fmt: skip
    assert stats["warnings"] == [f"the rule 'duplicate' removed 1 of 4 documents (25.0%) and 32.8% of the bytes; "
                                 f"{OPT} data.dedup", "2 symbolic links point outside the source and were not "
                                 "read; data.follow_symlinks: true reads them"]  # fmt: skip


def test_follow_symlinks_reads_links_out_of_the_source(tmp_path):
    src = _linked_folder(tmp_path)
    stats = _curate(src, tmp_path / "out", follow_symlinks=True)
    assert _ids(tmp_path / "out") == ["inside.txt", "outdir/more.txt", "outdir/secret.txt", "real.txt",
                                      "sub/code.py"]  # fmt: skip
    assert stats["skipped_files"]["by_reason"] == {"symlink loop": 3}
    # shadow.txt is outdir/secret.txt by another path, as sub/note.md is inside.txt
    assert [e["id"] for e in stats["removed"]["duplicate"]["examples"]] == ["shadow.txt", "sub/note.md"]


def test_skip_counts_and_messages_do_not_depend_on_the_worker_count(tmp_path):
    src = _user_folder(tmp_path / "src")
    (tmp_path / "other").mkdir()
    (src / "shadow.txt").symlink_to(_linked_folder(tmp_path / "other") / "real.txt")
    os.mkfifo(src / "pipe.md")
    (src / "sub").mkdir()
    for i in range(6):
        (src / "sub" / f"n{i}.txt").write_text(f"{i} {PROSE}" + "x" * 30 * i)
    one = _curate(src, tmp_path / "one", shard_bytes=1500, workers=1)
    two = _curate(src, tmp_path / "two", shard_bytes=1500, workers=2)
    assert one["skipped_files"]["total"] == 4
    assert one == two


# -- item 11: the code rules judge code ----------------------------------------------------------------------------


def _prose_and_minified_code(src: Path) -> Path:
    src.mkdir()
    # One paragraph per line, as WikiText keeps them: every line far over max_line_chars.
    (src / "wiki.txt").write_text("\n\n".join([PROSE * 2] * 3), encoding="utf-8")
    (src / "min.py").write_text("x = [" + ", ".join(map(str, range(600))) + "]\n" + CODE)
    return src


@pytest.mark.parametrize("code_rules,kept,removed", [
    ("code_files", ["wiki.txt"], {"long line": 1}),
    ("all", [], {"long line": 2}),
    ("none", ["min.py", "wiki.txt"], {}),
])  # fmt: skip
def test_code_rules_judge_code_files_unless_told_otherwise(tmp_path, code_rules, kept, removed):
    src = _prose_and_minified_code(tmp_path / "src")
    try:
        stats = _curate(src, tmp_path / "out", code_rules=code_rules)
    except ValueError as e:  # "all": nothing survives
        assert kept == [] and "survived curation" in str(e)
        stats = json.loads((tmp_path / "out" / "stats.json").read_text(encoding="utf-8"))
    else:
        assert _ids(tmp_path / "out") == kept
    assert {r: e["docs"] for r, e in stats["removed"].items()} == removed


def test_a_rule_removing_a_large_share_is_a_warning_naming_its_setting(tmp_path, caplog):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        (src / f"{i}.py").write_text(f"# file {i}\n" + CODE)
    (src / "min.py").write_text("x = [" + ", ".join(map(str, range(600))) + "]\n" + CODE)
    with caplog.at_level(logging.WARNING, logger="lmforge.data.curate"):
        stats = _curate(src, tmp_path / "out")
    expected = (f"the rule 'long line' removed 1 of 5 documents (20.0%) and 90.5% of the bytes; {OPT} "
                f"data.max_line_chars, or data.code_rules (code_files: only code files are judged)")  # fmt: skip
    assert stats["warnings"] == [expected]
    assert [r.getMessage() for r in caplog.records] == [f"curate: {expected}"]


def test_small_removals_give_no_warning(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(5):
        (src / f"{i}.py").write_text(f"# file {i}\n" + CODE)
    (src / "tiny.py").write_text("x = 1\n")
    stats = _curate(src, tmp_path / "out", min_chars=10)
    assert stats["removed"]["too short"]["docs"] == 1 and stats["warnings"] == []


# -- item 12: one big text file ------------------------------------------------------------------------------------


def test_a_text_file_over_max_chars_is_split_into_paragraphs_code_is_not(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    paragraphs = [f"Paragraph {i}. {PROSE}" for i in range(5)]
    (src / "book.txt").write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    (src / "big.py").write_text(CODE * 100)
    max_chars = 3 * len(paragraphs[0])
    stats = _curate(src, tmp_path / "out", max_chars=max_chars)
    assert _ids(tmp_path / "out") == [f"book.txt:{1 + 2 * i}" for i in range(5)]
    assert stats["removed"]["too long"]["examples"][0]["id"] == "big.py"
    with pytest.raises(ValueError) as info:  # text_split: file keeps the book whole, and says what to change
        _curate(src, tmp_path / "file", max_chars=max_chars, text_split="file")
    assert (f"The rule 'too long' removed 2 of 2 documents (100.0%) and 100.0% of the bytes; {OPT} data.max_chars "
            f"(or data.text_split: paragraph for text kept as one big file).") in str(info.value)  # fmt: skip


def test_a_paragraph_over_max_chars_is_split_into_lines(tmp_path):
    path = tmp_path / "wiki.txt"
    lines = [f"Article {i}. {PROSE}" for i in range(4)]
    path.write_text("\n".join(lines) + "\n\nA short last paragraph.\n", encoding="utf-8")
    max_chars = 2 * len(lines[0])
    docs = list(read_documents(path, text_split="auto", max_chars=max_chars))
    assert [(d.id, d.text) for d in docs] == [*((f"wiki.txt:{i + 1}", t) for i, t in enumerate(lines)),
                                              ("wiki.txt:6", "A short last paragraph.")]  # fmt: skip
    whole = list(read_documents(path, text_split="auto", max_chars=len(path.read_text())))
    assert [d.id for d in whole] == ["wiki.txt"]


@pytest.mark.skipif(not (SHARED / "web" / "wiki").exists(), reason=f"real Wikipedia text not found under {SHARED}")
def test_real_wikipedia_file_one_article_per_line_is_kept(tmp_path):
    """1 MB of Wikipedia, one article per line and no blank line: every article is a document, none is removed."""
    stats = _curate(SHARED / "web" / "wiki" / "llamafactory_wiki_demo.txt", tmp_path / "out")
    assert stats["docs_in"] == stats["docs_kept"] == 30
    assert stats["removed"] == {} and stats["warnings"] == []


def test_summary_table_lists_skipped_files_by_reason():
    from lmforge.data.curate_report import summary_table

    table = summary_table({"docs_in": 1, "docs_kept": 1, "bytes_in": 9, "bytes_kept": 9,
                           "skipped_files": {"total": 3, "by_reason": {"not a regular file": 1, "symlink loop": 2}}})
    assert table.splitlines()[-3:] == ["files skipped                 3", "  symlink loop                2",
                                       "  not a regular file          1"]  # fmt: skip
