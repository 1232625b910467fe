"""PII redaction accuracy and speed: `python benchmarks/pii_accuracy.py` (`--smoke`: a few seconds' check it runs).

Measures `lmforge.data.pii.find_pii` against labelled spans:
- Presidio's synthetic set (`presidio_synth_dataset_v2.json`: texts with `spans` of `entity_type`, start, end);
- Dolma's Common Crawl sample with its expected e-mail spans (`dolma_cc_email-spans_expected.json.gz`, spans under
  `attributes.pii.email` as `[start, end, score]` over the text of `dolma_cc_documents_000.json.gz`). Spans with a
  score below 0.5 are the annotator's own low-confidence guesses (a Twitter handle) and are not counted as gold.

Matching rule: a predicted span is a true positive when it overlaps (shares at least one character with) a gold
span of the same type; precision = matching predictions / predictions, recall = gold spans overlapped by a
prediction of the same type / gold spans. Gold types we do not detect (names, addresses, ...) are ignored, but a
prediction overlapping one counts as a false positive. Throughput is `redact` over every text of the data folder
(the enterprise PII classification set, the Dolma pages and the Presidio texts).

Named entities (`lmforge.data.pii_ner`, `--no-ner` skips them): Presidio's PERSON is our PERSON, ORGANIZATION is
ORG, STREET_ADDRESS (street, town, postcode and country lines of one address) is ADDRESS. Its GPE (a town or
country named alone) is not counted: place names alone are not redacted. The context rules of pii_ner were tuned
on the even-numbered texts only; the tables show both halves and the whole set. Speed is documents per second on
one core (this process), `redact` with and without NER, on the real web pages of `shared/data/web/cc_text`.

The data is read at run time from `../shared/data/pii` next to the repository; the script exits with a message
when it is absent. It prints a table and ends with one `key=value` line. `--smoke` scores the first 150 Presidio
texts and times `redact` over the first 150 texts of each file.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

from lmforge.data.pii import Span, find_pii, redact
from lmforge.data.pii_ner import NER_KINDS

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "pii"
WEB = DATA.parent / "web" / "cc_text"
PRESIDIO_LABELS = {
    "EMAIL_ADDRESS": "EMAIL",
    "PHONE_NUMBER": "PHONE",
    "CREDIT_CARD": "CREDIT_CARD",
    "IP_ADDRESS": "IP_ADDRESS",
    "US_SSN": "US_SSN",
    "IBAN_CODE": "IBAN",
}
NER_LABELS = {"PERSON": "PERSON", "ORGANIZATION": "ORG", "STREET_ADDRESS": "ADDRESS"}
TARGETS = ("EMAIL", "PHONE", "CREDIT_CARD", "IP_ADDRESS", "US_SSN")
MIN_GOLD_SCORE = 0.5
SHOW_ERRORS = 4
SMOKE_TEXTS = 150


class Tally:
    """True/false positives and misses per kind, keeping a few examples of each error for the report."""

    def __init__(self) -> None:
        self.tp_pred: dict[str, int] = defaultdict(int)
        self.pred: dict[str, int] = defaultdict(int)
        self.tp_gold: dict[str, int] = defaultdict(int)
        self.gold: dict[str, int] = defaultdict(int)
        self.false_pos: dict[str, list[str]] = defaultdict(list)
        self.misses: dict[str, list[str]] = defaultdict(list)

    def add(self, text: str, gold: list[Span], pred: Iterable[Span], kinds: Iterable[str]) -> None:
        kinds = set(kinds)
        pred = [p for p in pred if p.kind in kinds]

        def hit(a: Span, others: list[Span]) -> bool:
            return any(o.kind == a.kind and o.start < a.end and a.start < o.end for o in others)

        for p in pred:
            self.pred[p.kind] += 1
            if hit(p, gold):
                self.tp_pred[p.kind] += 1
            else:
                self.false_pos[p.kind].append(_context(text, p))
        for g in gold:
            self.gold[g.kind] += 1
            if hit(g, pred):
                self.tp_gold[g.kind] += 1
            else:
                self.misses[g.kind].append(_context(text, g))

    def scores(self, kind: str) -> tuple[float, float]:
        precision = self.tp_pred[kind] / self.pred[kind] if self.pred[kind] else float("nan")
        recall = self.tp_gold[kind] / self.gold[kind] if self.gold[kind] else float("nan")
        return precision, recall


def _context(text: str, span: Span) -> str:
    before = text[max(0, span.start - 25) : span.start]
    return repr(f"{before}[{text[span.start : span.end]}]{text[span.end : span.end + 10]}")


def _presidio(limit: int | None, ner: tuple[str, ...]) -> tuple[dict[str, Tally], list[str]]:
    """Tallies over the whole set ("all") and its halves ("tune": even-numbered texts, "held-out": odd)."""
    records = json.loads((DATA / "presidio_synth_dataset_v2.json").read_text(encoding="utf-8"))[:limit]
    labels = {**PRESIDIO_LABELS, **(NER_LABELS if ner else {})}
    tallies = {"all": Tally(), "tune": Tally(), "held-out": Tally()}
    texts = []
    for i, rec in enumerate(records):
        text = rec["full_text"]
        texts.append(text)
        gold = [
            Span(s["start_position"], s["end_position"], labels[s["entity_type"]])
            for s in rec["spans"]
            if s["entity_type"] in labels
        ]
        pred = find_pii(text, ner)
        for name in ("all", "held-out" if i % 2 else "tune"):
            tallies[name].add(text, gold, pred, labels.values())
    return tallies, texts


def _read_jsonl_gz(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _dolma(limit: int | None) -> tuple[Tally, list[str]]:
    docs = _read_jsonl_gz(DATA / "dolma_cc_documents_000.json.gz")[:limit]
    expected = {r["id"]: r for r in _read_jsonl_gz(DATA / "dolma_cc_email-spans_expected.json.gz")}
    tally = Tally()
    texts = []
    for doc in docs:
        text = doc["text"]
        texts.append(text)
        raw = expected[doc["id"]]["attributes"].get("pii", {}).get("email", [])
        gold = [Span(s, e, "EMAIL") for s, e, score in raw if score >= MIN_GOLD_SCORE]
        tally.add(text, gold, find_pii(text), ["EMAIL"])
    return tally, texts


def _enterprise_texts(limit: int | None) -> list[str]:
    path = DATA / "enterprise_pii_classification.jsonl"
    with path.open(encoding="utf-8") as f:
        return [json.loads(line)["query"] for line in f if line.strip()][:limit]


def _web_texts(limit: int | None) -> list[str]:
    texts = []
    for path in sorted(WEB.glob("*.jsonl")):
        with path.open(encoding="utf-8") as f:
            texts += [json.loads(line)["text"] for line in f if line.strip()][:limit]
    return texts


def _docs_per_s(texts: list[str], ner: tuple[str, ...]) -> float:
    redact(texts[0], ner)  # loads the model outside the timing, as a curate worker does once
    start = time.process_time()  # CPU time of this process: a per-core rate, whatever else shares the machine
    for t in texts:
        redact(t, ner)
    return len(texts) / (time.process_time() - start)


def _throughput(texts: list[str]) -> tuple[float, float]:
    size_mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    start = time.perf_counter()
    for t in texts:
        redact(t)
    return size_mb, size_mb / (time.perf_counter() - start)


def _report(title: str, tally: Tally, kinds: Iterable[str]) -> None:
    print(f"\n{title}")
    print(f"| {'type':<12} | {'gold':>5} | {'predicted':>9} | {'precision':>9} | {'recall':>6} |")
    print(f"|{'-' * 14}|{'-' * 7}:|{'-' * 10}:|{'-' * 10}:|{'-' * 7}:|")
    for kind in kinds:
        p, r = tally.scores(kind)
        print(f"| {kind:<12} | {tally.gold[kind]:>5} | {tally.pred[kind]:>9} | {p:>9.3f} | {r:>6.3f} |")
    for kind in kinds:
        for label, examples in (("false positive", tally.false_pos[kind]), ("missed", tally.misses[kind])):
            for ex in examples[:SHOW_ERRORS]:
                print(f"  {kind} {label}: {ex}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help=f"{SMOKE_TEXTS} texts per file: does it still run?")
    parser.add_argument("--no-ner", action="store_true", help="patterns only (no spaCy needed)")
    args = parser.parse_args()
    limit = SMOKE_TEXTS if args.smoke else None
    ner = () if args.no_ner else NER_KINDS
    if not DATA.is_dir():
        print(f"skipped: PII data not found at {DATA}")
        return 0
    tallies, presidio_texts = _presidio(limit, ner)
    presidio = tallies["all"]
    dolma, dolma_texts = _dolma(limit)
    _report("Presidio synthetic v2 (span overlap, same type)", presidio, PRESIDIO_LABELS.values())
    if ner:
        for name, tally in tallies.items():
            _report(f"Presidio synthetic v2, named entities: {name} texts", tally, NER_LABELS.values())
    _report("Dolma CC e-mail spans (gold score >= 0.5)", dolma, ["EMAIL"])
    size_mb, mb_s = _throughput(_enterprise_texts(limit) + dolma_texts + presidio_texts)
    print(f"\nthroughput: redact over {size_mb:.2f} MB of real text: {mb_s:.2f} MB/s")
    web = _web_texts(limit)
    per_core = {"off": _docs_per_s(web, ())} | ({"on": _docs_per_s(web, ner)} if ner else {})
    for name, rate in per_core.items():
        print(f"speed, NER {name}: {rate:.1f} documents/s on one core ({len(web)} web pages)")
    summary = {}
    for kind in PRESIDIO_LABELS.values():
        p, r = presidio.scores(kind)
        summary[f"{kind.lower()}_p"] = f"{p:.3f}"
        summary[f"{kind.lower()}_r"] = f"{r:.3f}"
    for kind in NER_LABELS.values() if ner else ():
        p, r = presidio.scores(kind)
        summary[f"{kind.lower()}_p"] = f"{p:.3f}"
        summary[f"{kind.lower()}_r"] = f"{r:.3f}"
    if ner:
        p, r = tallies["held-out"].scores("PERSON")
        summary["person_heldout_p"] = f"{p:.3f}"
        summary["person_heldout_r"] = f"{r:.3f}"
    p, r = dolma.scores("EMAIL")
    summary["dolma_email_p"] = f"{p:.3f}"
    summary["dolma_email_r"] = f"{r:.3f}"
    summary["mb_per_s"] = f"{mb_s:.2f}"
    summary |= {f"docs_per_s_core_ner_{k}": f"{v:.1f}" for k, v in per_core.items()}
    print(" ".join(f"{k}={v}" for k, v in summary.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
