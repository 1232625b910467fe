import io
import json
import pickle
from pathlib import Path

import pytest

from lmforge.data.curate_report import (
    SIGNAL_NAMES,
    SIGNALS,
    SignalHistograms,
    document_signals,
    human_bytes,
    human_percent,
    plot_histograms,
    print_summary,
    summary_table,
)

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
C4_DEMO = SHARED_DATA / "web" / "cc_text" / "llamafactory_c4_demo.jsonl"

# Three lines, two of them the same and ending in a full stop; 33 characters, 6 words, 28 of them not spaces,
# 26 letters.
ENGLISH = "Hello world.\nHello world.\nThe end"
# Words split at the no-break spaces too: naïve / café / — / ok!; 16 characters, 13 not spaces, 11 letters,
# 5 non-ASCII (ï é — and the two no-break spaces).
ACCENTED = "naïve café\u00a0—\u00a0ok!"


def _bins(text):
    """The bin each signal of `text` lands in, by signal name."""
    h = SignalHistograms()
    h.add(text)
    found = {}
    for name in SIGNAL_NAMES:
        counts = h.counts(name)
        assert sum(counts) == 1
        found[name] = counts.index(1)
    return found


def _texts(path, limit):
    texts = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                texts.append(json.loads(line)["text"])
            if len(texts) == limit:
                break
    return texts


# -- signals -------------------------------------------------------------------------------------------------------


def test_signal_values_of_hand_made_texts():
    assert document_signals(ENGLISH) == {
        "chars": 33,
        "words": 6,
        "mean_word_length": 28 / 6,
        "terminal_punct_frac": 2 / 3,
        "alpha_frac": 26 / 28,
        "dup_line_frac": 1 / 3,
        "non_ascii_frac": 0.0,
    }
    assert document_signals(ACCENTED) == {
        "chars": 16,
        "words": 4,
        "mean_word_length": 13 / 4,
        "terminal_punct_frac": 1.0,
        "alpha_frac": 11 / 13,
        "dup_line_frac": 0.0,
        "non_ascii_frac": 5 / 16,
    }
    assert document_signals("") == dict.fromkeys(SIGNAL_NAMES, 0)
    # Blank lines do not count as lines; a closing quote ends a sentence; a lone surrogate does not raise.
    assert document_signals("“Yes.”\n\n   \nno")["terminal_punct_frac"] == 0.5
    assert document_signals("\ud800 x")["words"] == 2


def test_signals_land_in_the_expected_bins():
    # chars 33: 10^(7/5) = 25.1 <= 33 < 10^(8/5) = 39.8 -> bin 8; words 6: 10^(3/5) = 3.98 <= 6 < 6.31 -> bin 4;
    # mean word length 4.67 in [4.5, 5) -> bin 8; fractions 2/3 in [.65, .70) -> 13, 26/28 = .93 -> 18, 1/3 -> 6.
    assert _bins(ENGLISH) == {
        "chars": 8,
        "words": 4,
        "mean_word_length": 8,
        "terminal_punct_frac": 13,
        "alpha_frac": 18,
        "dup_line_frac": 6,
        "non_ascii_frac": 0,
    }
    # chars 16 just above 10^(6/5) = 15.85 -> bin 7; words 4 just above 10^(3/5) -> bin 4; 3.25 in [3, 3.5) -> 5;
    # every line terminated: exactly 1 has a bin of its own (20); 11/13 = .846 -> 16; 5/16 = .3125 -> 6.
    assert _bins(ACCENTED) == {
        "chars": 7,
        "words": 4,
        "mean_word_length": 5,
        "terminal_punct_frac": 20,
        "alpha_frac": 16,
        "dup_line_frac": 0,
        "non_ascii_frac": 6,
    }
    # The empty document lands in the first bin of every signal (below 1 character, 1 word, length 1, 0.05).
    assert _bins("") == dict.fromkeys(SIGNAL_NAMES, 0)
    # Edges are inclusive below: exactly 100 characters, 10 words, a mean word length of exactly 9.
    assert _bins(" ".join(["abcdefghi"] * 10))["chars"] == 10  # 99 characters: below 10^2
    assert _bins(" ".join(["abcdefghi"] * 10) + "!")["chars"] == 11  # 100: the bin [10^2, 10^(11/5))
    assert _bins(" ".join(["abcdefghi"] * 10))["words"] == 6  # 10 = 10^(5/5)
    assert _bins(" ".join(["abcdefghi"] * 10))["mean_word_length"] == 17  # 9 is the 17th edge: 1, 1.5, ..., 9


def test_bins_are_fixed_and_described():
    chars = SIGNALS[0]
    assert chars.name == "chars" and chars.scale == "log"
    assert chars.edges[0] == 1 and chars.edges[-1] == 10**7 and len(chars.edges) == 36
    assert chars.bin_range(0) == (float("-inf"), 1)
    assert chars.bin_range(11) == (100, chars.edges[11])
    assert chars.bin_range(36) == (10**7, float("inf"))
    assert SIGNALS[1].edges[-1] == 10**6
    for spec in SIGNALS[3:]:
        assert spec.edges == tuple(k / 20 for k in range(1, 21))
    for text in (ENGLISH, ACCENTED, ""):
        for spec, (name, value) in zip(SIGNALS, document_signals(text).items()):
            low, high = spec.bin_range(_bins(text)[name])
            assert low <= value < high


def test_words_and_whitespace_follow_str_split():
    # Every non-ASCII character str.split() splits at is treated as a space.
    spaces = [chr(c) for c in range(128, 0x110000) if chr(c).isspace()]
    assert len(spaces) >= 17
    for space in spaces:
        s = document_signals(f"ab{space}c")
        assert (s["words"], s["mean_word_length"]) == (2, 1.5), hex(ord(space))
    for text in ("a\x1cb\x1fc", "  lead and trail  ", "\t\x0b\x0c", "日本語のテキスト。\n日本語のテキスト。", "😀 ok"):
        s = document_signals(text)
        words = text.split()
        assert s["words"] == len(words)
        assert s["mean_word_length"] == (len("".join(words)) / len(words) if words else 0.0)


# -- merge and serialisation ---------------------------------------------------------------------------------------


def test_merge_equals_adding_every_document_to_one_histogram():
    docs = [ENGLISH, ACCENTED, "", "x" * 5000, "one\ntwo\ntwo\ntwo.", "日本語のテキスト。"] * 3
    whole = SignalHistograms().add_many(docs)
    parts = [SignalHistograms().add_many(docs[i::3]) for i in range(3)]
    merged = SignalHistograms()
    for part in parts:
        # as a worker process would hand it over: pickled, or through JSON
        merged.merge(pickle.loads(pickle.dumps(part)))
    assert merged == whole
    assert merged.to_dict() == whole.to_dict()
    assert merged.total == len(docs) == 18
    assert merged.counts("chars") == whole.counts("chars")
    with pytest.raises(TypeError):
        merged.merge(whole.to_dict())


def test_to_dict_round_trip_and_stable_order():
    h = SignalHistograms().add_many([ENGLISH, ACCENTED, ""])
    d = h.to_dict()
    assert list(d) == ["version", "total", "signals"]
    assert list(d["signals"]) == list(SIGNAL_NAMES)
    assert list(d["signals"]["chars"]) == ["scale", "edges", "counts"]
    text = json.dumps(d)
    assert json.dumps(SignalHistograms.from_dict(json.loads(text)).to_dict()) == text
    back = SignalHistograms.from_dict(json.loads(text))
    assert back == h and back.total == 3
    assert back.merge(back).total == 6  # merging a histogram into itself doubles it

    bad_edges = json.loads(text)
    bad_edges["signals"]["words"]["edges"][3] = 2.0
    with pytest.raises(ValueError, match="different edges"):
        SignalHistograms.from_dict(bad_edges)
    bad_total = json.loads(text)
    bad_total["total"] = 4
    with pytest.raises(ValueError, match="counts"):
        SignalHistograms.from_dict(bad_total)
    with pytest.raises(ValueError, match="version"):
        SignalHistograms.from_dict({**json.loads(text), "version": 99})


def test_real_text_invariants():
    if not C4_DEMO.exists():
        pytest.skip(f"shared sample data not present: {C4_DEMO}")
    texts = _texts(C4_DEMO, 60)
    assert len(texts) == 60
    h = SignalHistograms()
    for text in texts:
        h.add(text)
    assert h.total == 60
    for name in SIGNAL_NAMES:
        assert sum(h.counts(name)) == 60
    d = h.to_dict()
    assert all(sum(s["counts"]) == d["total"] for s in d["signals"].values())
    assert SignalHistograms().add_many(texts[:25]).merge(SignalHistograms().add_many(texts[25:])) == h
    # The fast byte-level counts agree with the plain definitions on real web text.
    for text in texts:
        s = document_signals(text)
        words = text.split()
        non_space = [c for c in text if not c.isspace()]
        assert s["chars"] == len(text)
        assert s["words"] == len(words)
        assert s["mean_word_length"] == pytest.approx(len(non_space) / len(words))
        assert s["alpha_frac"] == pytest.approx(sum(c.isalpha() for c in non_space) / len(non_space))
        assert s["non_ascii_frac"] == pytest.approx(sum(not c.isascii() for c in text) / len(text))
        assert 0 <= s["terminal_punct_frac"] <= 1 and 0 <= s["dup_line_frac"] < 1


# -- plot ----------------------------------------------------------------------------------------------------------


def test_plot_histograms_writes_a_png(tmp_path):
    before = SignalHistograms().add_many([ENGLISH, ACCENTED, "", "x" * 5000, "a b c. " * 300] * 4)
    after = SignalHistograms().add_many([ENGLISH, "a b c. " * 300] * 4)
    out = tmp_path / "plots" / "signals.png"
    assert plot_histograms(before, after, out) == out
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 20_000
    # IHDR: a 4 x 2 grid of 4 x 3.2 inch panels at 110 dpi
    assert data[12:16] == b"IHDR"
    assert (int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")) == (1760, 704)
    assert sorted(p.name for p in out.parent.iterdir()) == ["signals.png"]  # no temporary file left behind


def test_plot_histograms_with_empty_histograms(tmp_path):
    out = tmp_path / "empty.png"
    plot_histograms(SignalHistograms(), SignalHistograms(), out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- summary table -------------------------------------------------------------------------------------------------

STATS = {
    "docs_in": 12345,
    "docs_kept": 10000,
    "bytes_in": 123_456_789,
    "bytes_kept": 100_000_000,
    "removed": {
        "too short": {"docs": 345, "bytes": 3_456_789, "examples": ["a:1"]},
        "exact duplicate": {"docs": 2000, "bytes": 20_000_000, "examples": ["b:2", "b:3"]},
    },
    "modified": {"pii: email": {"docs": 12, "bytes_removed": 240}, "boilerplate lines": {"docs": 1500,
                                                                                         "bytes_removed": 2_500_000}},
    "skipped_bad": {"total": 3, "by_reason": {"invalid json": 2, "missing text field": 1}, "messages": ["f:1: x"]},
    "splits": {"train": {"docs": 9900, "bytes": 99_000_000}, "val": {"docs": 100, "bytes": 1_000_000}},
    "split_adjustment": None,
}


def _rows(table):
    return [" ".join(line.split()) for line in table.splitlines()]


def test_summary_table_exact_rows():
    table = summary_table(STATS)
    rows = _rows(table)
    assert rows[0] == "curation documents % of input bytes % of input"
    for expected in (
        "read 12,345 100.0% 123.5 MB 100.0%",
        "removed",
        "exact duplicate 2,000 16.2% 20.0 MB 16.2%",
        "too short 345 2.8% 3.5 MB 2.8%",
        "all reasons 2,345 19.0% 23.5 MB 19.0%",
        "kept 10,000 81.0% 100.0 MB 81.0%",
        "modified (bytes: removed)",
        "boilerplate lines 1,500 12.2% 2.5 MB 2.0%",
        "pii: email 12 0.1% 240 B <0.1%",
        "splits",
        "train 9,900 80.2% 99.0 MB 80.2%",
        "val 100 0.8% 1.0 MB 0.8%",
        "bad records skipped 3",
        "invalid json 2",
        "missing text field 1",
    ):
        assert expected in rows, expected
    # most documents first within a section; train before val
    assert rows.index("exact duplicate 2,000 16.2% 20.0 MB 16.2%") < rows.index("too short 345 2.8% 3.5 MB 2.8%")
    assert rows.index("train 9,900 80.2% 99.0 MB 80.2%") < rows.index("val 100 0.8% 1.0 MB 0.8%")
    assert "note" not in table  # the counts add up
    # fixed width: the numbers columns line up (right-aligned)
    lines = table.splitlines()
    read, kept = next(x for x in lines if x.startswith("read")), next(x for x in lines if x.startswith("kept"))
    assert len(read) == len(kept) and read.index("12,345") == kept.index("10,000")


def test_summary_table_notes_and_missing_sections():
    table = summary_table({"docs_in": 10, "docs_kept": 5, "bytes_in": 100, "bytes_kept": 50,
                           "removed": {"short": {"docs": 3, "bytes": 30}},
                           "splits": {"train": {"docs": 4, "bytes": 40}, "val": {"docs": 0, "bytes": 0}},
                           "split_adjustment": "last train document moved to val"})  # fmt: skip
    assert "note: kept + removed = 8 documents, but 10 were read" in table
    assert "note: the splits hold 4 documents, but 5 were kept" in table
    assert "note: last train document moved to val" in table
    assert "bad records" not in table and "modified" not in table
    empty = _rows(summary_table({}))
    assert "read 0 — 0 B —" in empty and "kept 0 — 0 B —" in empty


def test_human_numbers():
    assert [human_bytes(n) for n in (0, 999, 1000, 999_949, 999_950, 12_345_678, 1_500_000_000_000)] == [
        "0 B", "999 B", "1.0 kB", "999.9 kB", "1.0 MB", "12.3 MB", "1.5 TB",
    ]  # fmt: skip
    assert human_percent(0, 10) == "0.0%"
    assert human_percent(1, 10_000) == "<0.1%"
    assert human_percent(9_999, 10_000) == ">99.9%"
    assert human_percent(10, 10) == "100.0%"
    assert human_percent(1, 3) == "33.3%"
    assert human_percent(1, 0) == "—"


def test_print_summary(capsys):
    print_summary(STATS)
    assert capsys.readouterr().out == summary_table(STATS) + "\n"

    from rich.console import Console

    buffer = io.StringIO()
    print_summary({**STATS, "removed": {"[bold]x": {"docs": 2345, "bytes": 23_456_789}}},
                  console=Console(file=buffer, width=200))  # fmt: skip
    assert "[bold]x" in buffer.getvalue()  # printed as is, not read as rich markup
    assert " 2,345 " in buffer.getvalue()
