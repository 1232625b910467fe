"""Accuracy, throughput and memory of near-duplicate detection (`lmforge.data.minhash.MinHashDedup`).

    python benchmarks/dedup_accuracy.py
    python benchmarks/dedup_accuracy.py --smoke    # seconds: 20 documents per source

Real documents (C4 and Wikipedia text from ../shared/data/web when that folder exists, plus Python standard
library files) are first made mutually dissimilar (a MinHash pass at threshold 0.5 removes any that resemble an
earlier one). Each then gets one edited copy, made with a seeded RNG: k% of words replaced, deleted or inserted
(k uniform in 0..8), paragraphs swapped, or boilerplate appended (up to half the document's length). The exact
word-5-gram Jaccard of every (original, copy) pair is computed from the full shingle sets; a copy is a true
duplicate when it is at least 0.8. The stream (all originals, then the copies in shuffled order) runs through a
fresh `MinHashDedup()` with default settings, and its decisions on the copies are scored against that truth.
Throughput is over the whole stream; memory per kept document is the filter's state as traced by tracemalloc.
The last line sums up as key=value pairs. --smoke checks that the benchmark still runs, on at most 20 documents
from each source.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import time
import tracemalloc
from pathlib import Path

import numpy as np

from lmforge.data.minhash import MinHashDedup, exact_jaccard, shingles
from lmforge.data.base_reader import Document
from lmforge.data.readers import read_stdlib

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SEED = 0
STDLIB_DOCS = 250
MIN_WORDS = 100
TRUE_THRESHOLD = 0.8
# Made-up footer vocabulary: appended at random it adds shingles that occur in no source document.
BOILERPLATE = (
    "share this page subscribe to our newsletter for weekly updates read our privacy notice and cookie settings "
    "all rights reserved contact the editors follow us terms of service sponsored links related posts"
).split()
EDITS = ("replace", "delete", "insert", "swap paragraphs", "boilerplate")
SMOKE_PER_SOURCE = 20


def source_documents(per_source: int | None = None) -> list[Document]:
    """The C4, Wikipedia and standard-library documents, at most `per_source` from each (None: all C4 and
    Wikipedia documents and STDLIB_DOCS standard-library files)."""
    docs: list[Document] = []
    web = SHARED / "web"
    if web.is_dir():
        with open(web / "cc_text" / "llamafactory_c4_demo.jsonl", encoding="utf-8") as f:
            docs += [Document(f"c4:{i}", json.loads(line)["text"], "c4") for i, line in enumerate(f)][:per_source]
        wiki = (web / "wiki" / "llamafactory_wiki_demo.txt").read_text(encoding="utf-8").splitlines()
        docs += [Document(f"wiki:{i}", line, "wiki") for i, line in enumerate(wiki) if line.strip()][:per_source]
    else:
        print(f"{SHARED / 'web'} not found: using standard library files only")
    stdlib = [d for d in read_stdlib(include_tests=False) if len(d.text.split()) >= MIN_WORDS]
    docs += random.Random(SEED).sample(stdlib, min(STDLIB_DOCS, per_source or STDLIB_DOCS))
    return [d for d in docs if len(d.text.split()) >= MIN_WORDS]


def mutually_dissimilar(docs: list[Document]) -> list[Document]:
    screen = MinHashDedup(threshold=0.5)
    return [d for d in docs if not isinstance(screen.apply(d), str)]


def edited(text: str, edit: str, rng: random.Random, vocab: list[str]) -> str:
    if edit == "swap paragraphs":
        paras = [p for p in text.split("\n") if p.strip()]
        if len(paras) < 2:  # one-paragraph text: swap its two halves instead
            words = text.split()
            return " ".join(words[len(words) // 2 :] + words[: len(words) // 2])
        i, j = rng.sample(range(len(paras)), 2)
        paras[i], paras[j] = paras[j], paras[i]
        return "\n".join(paras)
    words = text.split()
    if edit == "boilerplate":
        extra = int(len(words) * rng.uniform(0.0, 0.5))
        return " ".join(words + [rng.choice(BOILERPLATE) for _ in range(extra)])
    k = max(1, int(len(words) * rng.uniform(0.0, 0.08)))
    positions = sorted(rng.sample(range(len(words)), min(k, len(words))), reverse=True)
    for pos in positions:  # from the end, so earlier positions stay valid after deletes and inserts
        if edit == "replace":
            words[pos] = rng.choice(vocab)
        elif edit == "delete":
            del words[pos]
        else:
            words.insert(pos, rng.choice(vocab))
    return " ".join(words)


def make_pairs(originals: list[Document]) -> tuple[list[Document], list[str], np.ndarray]:
    rng = random.Random(SEED)
    vocab = sorted({w for d in originals for w in d.text.split()})
    copies, kinds, truth = [], [], []
    for d in originals:
        kind = EDITS[len(copies) % len(EDITS)]
        text = edited(d.text, kind, rng, vocab)
        copies.append(Document(f"{d.id}~copy", text, d.source))
        kinds.append(kind)
        truth.append(exact_jaccard(shingles(d.text), shingles(text)))
    order = list(range(len(copies)))
    rng.shuffle(order)
    return [copies[i] for i in order], [kinds[i] for i in order], np.array(truth)[order]


def run_stream(docs: list[Document]) -> tuple[list[bool], float, int]:
    dedup = MinHashDedup()
    start = time.perf_counter()
    dropped = [isinstance(dedup.apply(d), str) for d in docs]
    return dropped, time.perf_counter() - start, dedup.kept


def state_bytes_per_doc(docs: list[Document]) -> float:
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    dedup = MinHashDedup()
    for d in docs:
        dedup.apply(d)
    gc.collect()
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return used / dedup.kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help=f"{SMOKE_PER_SOURCE} documents per source: does it run?")
    opts = parser.parse_args()
    originals = mutually_dissimilar(source_documents(SMOKE_PER_SOURCE if opts.smoke else None))
    copies, kinds, truth = make_pairs(originals)
    stream = originals + copies
    dropped, seconds, kept = run_stream(stream)
    originals_dropped = sum(dropped[: len(originals)])
    pred = np.array(dropped[len(originals) :])
    dup = truth >= TRUE_THRESHOLD
    tp = int(np.sum(pred & dup))
    fp = int(np.sum(pred & ~dup))
    fn = int(np.sum(~pred & dup))
    precision = tp / max(tp + fp, 1)
    recall = tp / max(tp + fn, 1)
    f1 = 2 * precision * recall / max(precision + recall, 1e-12)
    mb = sum(len(d.text.encode("utf-8")) for d in stream) / 1e6
    per_doc = state_bytes_per_doc(stream)

    print(f"{len(originals)} originals ({originals_dropped} dropped), {len(copies)} edited copies, {mb:.1f} MB\n")
    print("| true Jaccard | copies | dropped | drop rate |")
    print("|---|---:|---:|---:|")
    for lo, hi in [(0.0, 0.6), (0.6, 0.7), (0.7, 0.75), (0.75, 0.8), (0.8, 0.85), (0.85, 0.9), (0.9, 1.01)]:
        band = (truth >= lo) & (truth < hi)
        n = int(band.sum())
        rate = f"{pred[band].mean():.2f}" if n else "-"
        print(f"| {lo:.2f}–{min(hi, 1.0):.2f} | {n} | {int(pred[band].sum())} | {rate} |")
    print("\n| edit | copies | true dup | dropped | errors |")
    print("|---|---:|---:|---:|---:|")
    kinds_arr = np.array(kinds)
    for kind in EDITS:
        sel = kinds_arr == kind
        errors = int(np.sum(pred[sel] != dup[sel]))
        print(f"| {kind} | {int(sel.sum())} | {int(dup[sel].sum())} | {int(pred[sel].sum())} | {errors} |")
    print(
        f"\nprecision {precision:.3f}  recall {recall:.3f}  F1 {f1:.3f}  (tp {tp}, fp {fp}, fn {fn})\n"
        f"throughput {len(stream) / seconds:.0f} docs/s, {mb / seconds:.2f} MB/s; "
        f"state {per_doc:.0f} bytes per kept document ({kept} kept)"
    )
    print(
        f"precision={precision:.3f} recall={recall:.3f} f1={f1:.3f} pairs={len(copies)} "
        f"docs_per_s={len(stream) / seconds:.0f} mb_per_s={mb / seconds:.2f} bytes_per_doc={per_doc:.0f}"
    )


if __name__ == "__main__":
    main()
