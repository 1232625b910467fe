"""Curation filter throughput and agreement: lmforge against datatrove on the same documents, one core each.

    python benchmarks/curate_throughput.py [--verbose] [--per-source N] [--sources web,wiki] [--no-datatrove]
    python benchmarks/curate_throughput.py --smoke     # seconds: 30 documents per source

Both sides run the same pipeline, in this order: Gopher quality, Gopher repetition, C4, FineWeb, MinHash near-dedup
(word 5-grams, 14 bands x 8 rows). lmforge drives its `Filter`s in-process, one document at a time through the list
(the loop of `curate.apply_filters`); datatrove chains its filters' `run` generators in-process on one task (rank
0, world size 1), then runs its four MinHash stages: signatures (written to a temporary folder), the 14 bucket
tasks one after another, clustering, and the filter over the documents that reached it. The process is pinned to one
core and each side is timed by the wall clock from its first document object to its last decision, after a warm-up
on 200 documents. Reading and JSON parsing are excluded for both: the documents are built before the clock starts.
Each side's per-document decision (dropped at which stage, or kept) is compared: keep/drop agreement overall, and per
stage over the documents both pipelines passed to that stage. --verbose lists the disagreements with both reasons.

Input (read at run time, never copied): ../shared/data. Web pages (C4 and Dolma CC samples), the Wikipedia demo
cut into blocks of 4 paragraphs, TinyStories in blocks of 3 paragraphs, and the answers of Alpaca, Dolly and GSM8K,
at most --per-source documents each (default 1000: 5,876 documents, 4.1 MB). Every document is distinct text, so
MinHash sees only the near duplicates the sources really share.

Settings. Both use the published thresholds (each side's defaults unless noted):
- Gopher (Rae et al. 2021): 50..100,000 words, mean word length 3..10, "#" and ellipsis each <= 0.1 per word, >= 80%
  words with a letter, >= 2 of the 8 stop words, <= 90% bullet lines, <= 30% ellipsis lines; the repetition table
  (duplicate lines/paragraphs 0.30, their characters 0.20, top 2/3/4-gram 0.20/0.18/0.16, duplicate 5..10-grams
  0.15..0.10).
- C4 as released (TFDS `c4_utils`): lines of >= 5 words, pages of >= 3 sentences, pages with a curly bracket
  dropped. datatrove defaults to the paper's wording (3 words, 5 sentences) and is given 5 and 3; lmforge is
  given `drop_curly_bracket=True` (off by default because it also curates code).
- FineWeb (Penedo et al. 2024): >= 12% of lines end in punctuation, duplicate-line characters <= 0.1, <= 67% lines
  under 30 characters. datatrove is given the paper's 0.1 (its default is 0.01), lmforge's end punctuation set
  (its default has no quotes or ellipsis) and no newline-per-word limit (a later datatrove rule, not in the paper).
- MinHash: datatrove's `MinhashConfig()` (5-grams, 14 x 8, 64-bit xxhash); lmforge's `MinHashDedup()`.

datatrove's words. For English datatrove assigns its `SpaCyTokenizer`, i.e. `spacy.blank("en")`: a rule-based
tokenizer and sentencizer inside the spacy wheel, so nothing (no spaCy model, no NLTK punkt data) is downloaded.
Two datatrove rows are printed: "spacy words", datatrove as shipped, and "whitespace words", the same tokenizer
object with `word_tokenize` replaced by `str.split` (sentences still from spaCy), which is how lmforge and the
papers' word-level rules count words. The second row is the like-for-like comparison of the rules themselves.

Why the two still disagree on some documents (datatrove implementation details, not rule differences):
- spaCy words: Gopher's "80% of words contain a letter" is computed by datatrove over every token, punctuation
  included (its word count and mean length do skip punctuation tokens), so prose with a comma or period every few
  words fails it. This is nearly all of the "spacy words" disagreement and disappears with whitespace words.
- Repetition measures: datatrove divides by the whole text length (spaces, newlines and punctuation included);
  lmforge by the characters of the words, as Dolma and RedPajama-V2 compute these signals. datatrove counts
  duplicate n-grams greedily (after a repeat it jumps n words ahead and never records the n-grams it skipped), so
  it misses up to n-1 words at the end of each repeated passage; lmforge takes the union of all repeated n-gram
  windows ("not counting characters in overlapping n-grams twice"). lmforge therefore drops a few more pages at
  the 5..9-gram limits. datatrove also scores a top n-gram that occurs once (only short texts, which the word-count
  rule drops first).
- Lines: datatrove counts blank lines in Gopher's bullet and ellipsis fractions and knows only "•" and "-" as
  bullets; lmforge counts non-blank lines and a few more bullet glyphs (including "*", which markdown bold
  "**Name:**" lines also start with). FineWeb's short lines are <= 30 characters of the unstripped line in
  datatrove, "shorter than 30" characters of the stripped line in lmforge.
- Sentences and end marks (C4): datatrove counts spaCy's sentences, lmforge a regular expression (both stand in
  for C4's punkt); datatrove also accepts a line ending in "'", lmforge the curly "”" (C4's list has neither).
- Stop words: datatrove intersects the token set case-sensitively ("The" does not count; with whitespace words
  "the." does not either); lmforge matches whole words in any case.
- Word count: datatrove counts only tokens with a character outside its punctuation set ("-", "|", "*" do not
  count); lmforge counts every whitespace-separated token.
- MinHash: datatrove removes any band collision and clusters transitively; lmforge also requires an estimated
  Jaccard of at least 0.8 against a kept document and keeps the first occurrence. Hash functions, seeds and text
  normalisation differ (datatrove also maps digits to 0 and strips accents). On this input both find the same
  duplicates.

lmforge rules fixed after this comparison, where lmforge had left the published rule (datatrove agreed with the
paper or with C4's released code): Gopher's symbol limit applies to "#" and to ellipses separately, not to their
sum; "at least two of the stop words" means two different ones; a duplicate n-gram's first occurrence is the
original, as for duplicate lines; and C4 now follows `c4_utils` in dropping lines that end in "...", cutting
citation marks before the end check, dropping lines with a word over 1000 characters, and applying "lorem ipsum"
and the curly bracket only to lines that pass the end-mark and word-count checks. Its sentence count no longer
ends a sentence at an initial ("Ulysses S. Grant").

The last line sums up as key=value pairs. --smoke checks that the benchmark still runs, on 30 documents per source
(datatrove too when it is installed).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from lmforge.data.base_filter import Filter
from lmforge.data.minhash import MinHashDedup
from lmforge.data.quality import (
    FINEWEB_END_PUNCTUATION,
    C4Filter,
    FineWebFilter,
    GopherQuality,
    GopherRepetition,
)
from lmforge.data.base_reader import Document

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
STAGES = ("gopher_quality", "gopher_repetition", "c4", "fineweb", "minhash")
KEPT = "kept"
SHOW_EXAMPLES = 3
SMOKE_PER_SOURCE = 30
# The wiki demo file holds one article per line with its paragraphs run together ("...socialism.Humans lived"):
# a sentence end glued to a capitalised word is where a paragraph break was.
_GLUED_PARAGRAPH = re.compile(r"(?<=[a-z][.!?])(?=[A-Z][a-z])")


# --- input ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    id: str
    text: str
    source: str


def _blocks(paragraphs: list[str], size: int, joiner: str) -> list[str]:
    return [joiner.join(paragraphs[i : i + size]) for i in range(0, len(paragraphs), size)]


def _json_records(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        if path.suffix == ".json":
            return json.load(f)
        return [json.loads(line) for line in f if line.strip()]


def load_corpus(per_source: int) -> list[Record]:
    """Real text from ../shared/data, at most `per_source` documents from each source, in a fixed order.

    Every document is distinct text (no source is read twice), so near duplicates are only the ones the sources
    really share.
    """
    sources: dict[str, list[str]] = {}
    web = SHARED / "web" / "cc_text"
    for path in sorted(web.glob("*.jsonl")):
        sources[f"web:{path.stem}"] = [r["text"] for r in _json_records(path)]
    wiki = SHARED / "web" / "wiki" / "llamafactory_wiki_demo.txt"
    if wiki.is_file():
        paragraphs = [p for line in wiki.read_text(encoding="utf-8").splitlines() for p in _GLUED_PARAGRAPH.split(line)]
        sources["wiki"] = _blocks([p.strip() for p in paragraphs if p.strip()], 4, "\n")
    stories = SHARED / "tinystories" / "tinystories_val_first_stories.txt"
    if stories.is_file():
        paragraphs = [p.strip() for p in re.split(r"\n\s*\n", stories.read_text(encoding="utf-8")) if p.strip()]
        sources["tinystories"] = _blocks(paragraphs, 3, "\n\n")
    instruct = SHARED / "instruct"
    for name, key in [
        ("alpaca_data_sample2000.json", "output"),
        ("alpaca_data_first200.json", "output"),
        ("llamafactory_alpaca_en_demo.json", "output"),
        ("dolly_hhrlhf_train_small.jsonl", "response"),
        ("gsm8k_train.jsonl", "answer"),
    ]:
        if (instruct / name).is_file():
            sources[f"instruct:{name.split('.')[0]}"] = [r[key] for r in _json_records(instruct / name)]
    if not sources:
        sys.exit(f"no input found under {SHARED}")
    return [
        Record(f"{name}:{i}", text, name)
        for name, texts in sources.items()
        for i, text in enumerate(texts[:per_source])
        if text.strip()
    ]


# --- lmforge ----------------------------------------------------------------------------------------------------


def lmforge_filters() -> list[Filter]:
    return [
        GopherQuality(),
        GopherRepetition(),
        C4Filter(drop_curly_bracket=True),
        FineWebFilter(),
        MinHashDedup(),
    ]


def run_lmforge(records: list[Record]) -> tuple[list[tuple[str, str]], float]:
    """(stage, reason) per document, KEPT for both when it survives, and the seconds the filtering took."""
    docs = [Document(r.id, r.text, r.source) for r in records]
    filters = lmforge_filters()
    staged = list(zip(STAGES, filters))
    outcomes: list[tuple[str, str]] = []
    start = time.perf_counter()
    for doc in docs:
        for stage, flt in staged:
            result = flt.apply(doc)
            if isinstance(result, str):
                outcomes.append((stage, result))
                break
            doc = result
        else:
            outcomes.append((KEPT, KEPT))
    return outcomes, time.perf_counter() - start


# --- datatrove ---------------------------------------------------------------------------------------------------

DT_WORDS = ("spacy", "whitespace")


def datatrove_available() -> bool:
    try:
        import datatrove  # noqa: F401
        import spacy  # noqa: F401
        import xxhash  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _word_tokenizer(words: str):
    """datatrove's English tokenizer ("spacy": `spacy.blank("en")`, which ships inside the spacy wheel and needs no
    model download) or the same with words split on whitespace as lmforge splits them ("whitespace"). One instance
    per kind, so the warm-up loads spaCy for the timed run."""
    from datatrove.utils.word_tokenizers import SpaCyTokenizer, load_word_tokenizer

    if words == "spacy":
        return load_word_tokenizer("en")

    class WhitespaceWords(SpaCyTokenizer):
        """spaCy's sentences (C4 counts them), whitespace-separated words."""

        def word_tokenize(self, text: str) -> list[str]:
            return text.split()

    return WhitespaceWords("en")


class _Reasons:
    """Stands in for a datatrove exclusion writer: remembers each dropped document's reason instead of writing it."""

    def __init__(self, stage: str, into: dict[str, tuple[str, str]]) -> None:
        self.stage = stage
        self.into = into

    def __enter__(self) -> _Reasons:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def write(self, doc, rank: int = 0) -> None:
        self.into[doc.id] = (self.stage, doc.metadata.get("filter_reason", "dropped"))


def datatrove_filters(words: str, reasons: dict[str, tuple[str, str]]) -> list:
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
    )

    tok = _word_tokenizer(words)
    rec = {stage: _Reasons(stage, reasons) for stage in STAGES}
    return [
        GopherQualityFilter(exclusion_writer=rec["gopher_quality"], language=tok),
        GopherRepetitionFilter(exclusion_writer=rec["gopher_repetition"], language=tok),
        # C4 as released (TFDS c4_utils, the values lmforge defaults to): 5 words a line, 3 sentences a page.
        C4QualityFilter(exclusion_writer=rec["c4"], language=tok, min_num_sentences=3, min_words_per_line=5),
        # FineWeb's published 0.1 duplicate-line-character limit, lmforge's end punctuation, and no newline-to-word
        # limit (a later datatrove addition that is not in the FineWeb paper).
        FineWebQualityFilter(
            exclusion_writer=rec["fineweb"],
            language=tok,
            char_duplicates_ratio=0.1,
            stop_chars=FINEWEB_END_PUNCTUATION,
            new_line_ratio=float("inf"),
        ),
    ]


def run_datatrove(records: list[Record], workdir: Path, words: str) -> tuple[list[tuple[str, str]], float]:
    """(stage, reason) per document as datatrove decides, and the seconds its pipeline took on one task."""
    from datatrove.data import Document as DTDocument
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )

    reasons: dict[str, tuple[str, str]] = {}
    steps = datatrove_filters(words, reasons)
    config = MinhashConfig()  # 5-grams, 14 buckets x 8 hashes, 64-bit xxhash: the same banding as lmforge
    sigs, buckets, remove = (str(workdir / name) for name in ("sigs", "buckets", "remove"))
    docs = [DTDocument(text=r.text, id=r.id) for r in records]
    start = time.perf_counter()
    data = iter(docs)
    for step in steps:
        data = step(data, rank=0, world_size=1)
    survivors = list(data)
    tok = steps[0].language
    MinhashDedupSignature(output_folder=sigs, config=config, language=tok).run(iter(survivors), rank=0, world_size=1)
    for bucket in range(config.num_buckets):  # one task per bucket, as datatrove requires, run one after another
        MinhashDedupBuckets(input_folder=sigs, output_folder=buckets, config=config).run(
            None, rank=bucket, world_size=config.num_buckets
        )
    MinhashDedupCluster(input_folder=buckets, output_folder=remove, config=config).run(None)
    kept = {d.id for d in MinhashDedupFilter(input_folder=remove).run(iter(survivors), rank=0, world_size=1)}
    seconds = time.perf_counter() - start
    for d in survivors:
        if d.id not in kept:
            reasons[d.id] = ("minhash", "duplicate")
    return [reasons.get(r.id, (KEPT, KEPT)) for r in records], seconds


# --- report -----------------------------------------------------------------------------------------------------


def _pin_to_one_core() -> str:
    if hasattr(os, "sched_setaffinity"):
        core = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {core})
        return f"pinned to core {core}"
    return "not pinned (no sched_setaffinity)"


def _snippet(text: str, width: int = 100) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def stage_table(lm: list[tuple[str, str]], dt: list[tuple[str, str]]) -> list[tuple[str, int, int, int, int]]:
    """Per stage: (stage, documents both pipelines passed to it, lmforge drops, datatrove drops, same decisions)."""
    rows = []
    for k, stage in enumerate(STAGES):
        later = set(STAGES[k:]) | {KEPT}
        reached = [(a[0], b[0]) for a, b in zip(lm, dt) if a[0] in later and b[0] in later]
        lm_drop = [a == stage for a, _ in reached]
        dt_drop = [b == stage for _, b in reached]
        rows.append((stage, len(reached), sum(lm_drop), sum(dt_drop), sum(x == y for x, y in zip(lm_drop, dt_drop))))
    return rows


def disagreements(records: list[Record], lm: list[tuple[str, str]], dt: list[tuple[str, str]]) -> None:
    pairs: Counter[tuple[str, str]] = Counter()
    examples: dict[tuple[str, str], list[int]] = {}
    for i, (a, b) in enumerate(zip(lm, dt)):
        if (a[0] == KEPT) != (b[0] == KEPT):
            key = (KEPT if a[0] == KEPT else f"{a[0]}: {a[1]}", KEPT if b[0] == KEPT else f"{b[0]}: {b[1]}")
            pairs[key] += 1
            examples.setdefault(key, []).append(i)
    print("  lmforge / datatrove: documents")
    for key, count in pairs.most_common():
        print(f"  {key[0]} / {key[1]}: {count}")
        for i in examples[key][:SHOW_EXAMPLES]:
            print(f"      {records[i].id}: {_snippet(records[i].text)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-source", type=int, default=1000, help="documents at most per source (default 1000)")
    parser.add_argument(
        "--datatrove-words",
        choices=[*DT_WORDS, "both"],
        default="both",
        help="datatrove's word tokenizer: its English default (spacy), whitespace as lmforge, or both (default)",
    )
    parser.add_argument(
        "--sources", default="", help="comma-separated source name prefixes to keep, e.g. web,wiki (default: all)"
    )
    parser.add_argument("--no-datatrove", action="store_true", help="run the lmforge side only")
    parser.add_argument("-v", "--verbose", action="store_true", help="list disagreeing documents with both reasons")
    parser.add_argument("--smoke", action="store_true", help=f"{SMOKE_PER_SOURCE} documents per source: does it run?")
    opts = parser.parse_args()
    if opts.smoke:
        opts.per_source = SMOKE_PER_SOURCE

    pinned = _pin_to_one_core()
    records = load_corpus(opts.per_source)
    if opts.sources:
        records = [r for r in records if r.source.startswith(tuple(opts.sources.split(",")))]
    if not records:
        sys.exit(f"no documents from sources {opts.sources!r}")
    n = len(records)
    mb = sum(len(r.text.encode("utf-8")) for r in records) / 1e6
    by_source = Counter(r.source for r in records)
    print(f"{n} documents, {mb:.1f} MB from {len(by_source)} sources; one process {pinned}; reading and JSON parsing "
          "excluded for both sides")  # fmt: skip
    print("  " + ", ".join(f"{s} {c}" for s, c in by_source.items()))

    warmup = records[: min(200, n)]
    run_lmforge(warmup)  # imports, regex compilation, numpy's first calls
    lm, lm_seconds = run_lmforge(records)
    rows = [("lmforge", lm, lm_seconds)]

    # datatrove's MinHash clustering draws a progress bar; tqdm reads this when first imported.
    os.environ.setdefault("TQDM_DISABLE", "1")
    have_dt = not opts.no_datatrove and datatrove_available()
    if not opts.no_datatrove and not have_dt:
        print("\ndatatrove is not installed; to compare: .venv/bin/pip install datatrove spacy 'xxhash<4'")
    dt_version = ""
    if have_dt:
        from importlib.metadata import version

        from loguru import logger

        logger.disable("datatrove")  # it logs every step at INFO
        dt_version = version("datatrove")
        variants = DT_WORDS if opts.datatrove_words == "both" else (opts.datatrove_words,)
        with tempfile.TemporaryDirectory() as tmp:
            for words in variants:
                run_datatrove(warmup, Path(tmp) / f"warmup-{words}", words)
                dt, dt_seconds = run_datatrove(records, Path(tmp) / words, words)
                rows.append((f"datatrove {dt_version}, {words} words", dt, dt_seconds))

    print("\n| pipeline | kept | seconds | docs/s per core | MB/s per core | lmforge speed-up | keep/drop agreement |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for i, (name, outcomes, seconds) in enumerate(rows):
        kept = sum(o[0] == KEPT for o in outcomes)
        same = sum((a[0] == KEPT) == (b[0] == KEPT) for a, b in zip(lm, outcomes))
        vs = f"{seconds / lm_seconds:.1f}x | {same / n:.2%}" if i else "- | -"
        print(f"| {name} | {kept} | {seconds:.2f} | {n / seconds:.0f} | {mb / seconds:.2f} | {vs} |")

    for name, outcomes, _ in rows[1:]:
        print(f"\nper stage, lmforge vs {name} (documents both pipelines pass to the stage):\n")
        print("| stage | documents | lmforge drops | datatrove drops | agreement |")
        print("|---|---:|---:|---:|---:|")
        for stage, reached, lm_drops, dt_drops, same in stage_table(lm, outcomes):
            print(f"| {stage} | {reached} | {lm_drops} | {dt_drops} | {same / max(reached, 1):.2%} |")
        if opts.verbose:
            print(f"\ndisagreements with {name} (the stage and reason each side dropped at):")
            disagreements(records, lm, outcomes)

    summary = f"docs={n} lmforge_docs_per_s={n / lm_seconds:.0f}"
    for name, outcomes, seconds in rows[1:]:
        tag = name.split(", ")[1].split()[0]
        same = sum((a[0] == KEPT) == (b[0] == KEPT) for a, b in zip(lm, outcomes))
        summary += (f" datatrove_{tag}_docs_per_s={n / seconds:.0f} speedup_{tag}={seconds / lm_seconds:.2f}"
                    f" agreement_{tag}={same / n:.4f}")  # fmt: skip
    print("\n" + summary)


if __name__ == "__main__":
    main()
