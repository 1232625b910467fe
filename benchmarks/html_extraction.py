"""Main-content extraction quality and speed: `python benchmarks/html_extraction.py [--repeat N]`.

Runs each extractor over the 181 pages of the article-extraction benchmark (`html/*.html.gz` with the expected
article text under `articleBody` in `ground-truth.json`, keyed by file name) and scores its output against that text:
- `resiliparse (lmforge)`: `lmforge.data.web.extract_main_text`, what the WARC and HTML readers produce;
- `resiliparse, whole page`: the same parser without main-content selection, the baseline extraction has to beat;
- `trafilatura`, when installed, with comments left out (the ground truth has none) and its other defaults.

Every extractor gets the same decoded page (`lmforge.data.web.decode_html`), so only extraction differs. Scores are
token-level: tokens are `\\w+` runs (case kept); precision = tokens shared with the truth / output tokens, recall =
shared / truth tokens, counting repeated tokens as often as both sides have them; an empty output scores 0. The table
gives the mean over pages. Speed is pages per second of extraction (decoding excluded), best of `--repeat` passes.

The data is read from `../shared/data/web/html/article-extraction-benchmark` next to the repository; the script
exits with a message when it is absent. It prints a table and ends with one `key=value` line. `--smoke` checks that
it still runs: the first 10 pages, one pass (trafilatura too when it is installed).
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import re
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from lmforge.data.web import decode_html, extract_main_text

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "web" / "html" / "article-extraction-benchmark"
TOKEN = re.compile(r"\w+")
SMOKE_PAGES = 10


def _whole_page(html: str) -> str:
    from resiliparse.extract.html2text import extract_plain_text
    from resiliparse.parse.html import HTMLTree

    return extract_plain_text(HTMLTree.parse(html), preserve_formatting=True)


def extractors() -> dict[str, Callable[[str], str]]:
    found: dict[str, Callable[[str], str]] = {
        "resiliparse (lmforge)": extract_main_text,
        "resiliparse, whole page": _whole_page,
    }
    try:
        import trafilatura
    except ImportError as e:
        print(f"trafilatura left out ({e}): pip install trafilatura to compare with it\n")
    else:
        logging.getLogger("trafilatura").setLevel(logging.ERROR)  # it warns about every page it finds short
        found["trafilatura"] = lambda html: trafilatura.extract(html, include_comments=False) or ""
    return found


def load_pages(limit: int | None = None) -> list[tuple[str, str]]:
    """(page, expected article text) for every benchmark page (the first `limit`), in file-name order."""
    truth = json.loads((DATA / "ground-truth.json").read_text(encoding="utf-8"))
    pages = []
    for key in sorted(truth)[:limit]:
        html = decode_html(gzip.decompress((DATA / "html" / f"{key}.html.gz").read_bytes()))
        if html is None:
            raise ValueError(f"{key}: page not decodable")
        pages.append((html, truth[key]["articleBody"]))
    return pages


def token_scores(predicted: str, expected: str) -> tuple[float, float, float]:
    pred, gold = Counter(TOKEN.findall(predicted)), Counter(TOKEN.findall(expected))
    shared = sum((pred & gold).values())
    precision = shared / sum(pred.values()) if pred else 0.0
    recall = shared / sum(gold.values()) if gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def run(extract: Callable[[str], str], pages: list[tuple[str, str]], repeat: int) -> tuple[list[str], float]:
    """The outputs for `pages` and the best pages/s over `repeat` passes."""
    best = float("inf")
    outputs: list[str] = []
    for _ in range(repeat):
        start = time.perf_counter()
        outputs = [extract(html) for html, _ in pages]
        best = min(best, time.perf_counter() - start)
    return outputs, len(pages) / best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="timed passes per extractor; the best counts")
    parser.add_argument("--smoke", action="store_true", help=f"the first {SMOKE_PAGES} pages, one pass: does it run?")
    args = parser.parse_args()
    if not DATA.is_dir():
        print(f"skipped: article-extraction benchmark not found at {DATA}")
        return 0
    if args.smoke:
        args.repeat = 1
    pages = load_pages(SMOKE_PAGES if args.smoke else None)
    chosen = extractors()
    print(f"{len(pages)} pages, token-level scores against articleBody (mean over pages)\n")
    print(f"| {'extractor':<24} | {'precision':>9} | {'recall':>6} | {'F1':>5} | {'empty':>5} | {'pages/s':>7} |")
    print(f"|{'-' * 26}|{'-' * 10}:|{'-' * 7}:|{'-' * 6}:|{'-' * 6}:|{'-' * 8}:|")
    summary = {}
    for name, extract in chosen.items():
        outputs, pages_s = run(extract, pages, args.repeat)
        scores = [token_scores(out, truth) for out, (_, truth) in zip(outputs, pages)]
        p, r, f1 = (sum(s[i] for s in scores) / len(scores) for i in range(3))
        empty = sum(1 for out in outputs if not out.strip())
        print(f"| {name:<24} | {p:>9.3f} | {r:>6.3f} | {f1:>5.3f} | {empty:>5} | {pages_s:>7.1f} |")
        key = re.sub(r"\W+", "_", name.split(" (")[0]).strip("_")
        summary[f"{key}_f1"] = f"{f1:.3f}"
        summary[f"{key}_pages_s"] = f"{pages_s:.1f}"
    print(" ".join(f"{k}={v}" for k, v in summary.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
