"""Contamination report: which benchmark examples share word n-grams with the model's training data.

The grams are the curation stage's decontamination grams (lmforge.data.decontam): normalised words, every
13-gram of a text with at least 13 words, and the whole word sequence of a text with 8 to 12 words. Each
example's texts (its question and choices, or its prompt) give a set of grams. The training texts are then
streamed once, and every benchmark gram found in them is marked. An example is contaminated when any of its grams
was marked.

The index holds the benchmark's grams, not the training corpus's, so memory is small whatever the corpus size.
The cost is one pass over the training text with the same hashing curation uses.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from lmforge.data.decontam import eval_text_grams
from lmforge.data.minhash import ngram_hashes, normalized_words, word_hashes

log = logging.getLogger(__name__)

N = 13
MIN_SHORT_WORDS = 8


@dataclass
class ContaminationIndex:
    """Benchmark grams: for each task, each example's gram set."""

    examples: dict[str, list[np.ndarray]]  # task -> per-example distinct grams
    short_lengths: set[int]  # lengths of the short texts that became one gram each

    @classmethod
    def build(cls, tasks: dict[str, Sequence[Sequence[str]]]) -> ContaminationIndex:
        """`tasks`: name -> per example, the texts of that example."""
        short: set[int] = set()

        def grams(texts: Sequence[str]) -> np.ndarray:
            parts = [np.empty(0, dtype=np.uint64)]
            for t in texts:
                g, length = eval_text_grams(t, N, MIN_SHORT_WORDS)
                if length is not None:
                    short.add(length)
                parts.append(g)
            return np.unique(np.concatenate(parts))

        examples = {name: [grams(texts) for texts in items] for name, items in tasks.items()}
        return cls(examples, short)

    def lengths(self) -> list[int]:
        """Gram lengths a training text must be cut into: 13, and every short-text length some example used."""
        return [N, *sorted(self.short_lengths)]

    def scan(self, training_texts: Iterable[str]) -> dict[str, dict]:
        """Stream the training texts once; per task, the contaminated examples' count, fraction and indices."""
        parts = [g for items in self.examples.values() for g in items if len(g)]
        wanted = np.unique(np.concatenate(parts)) if parts else np.empty(0, dtype=np.uint64)
        found: set[int] = set()
        docs = 0
        cache: dict[str, int] = {}  # word -> hash, shared across documents: hashing is the slow part
        if len(wanted):
            for text in training_texts:
                docs += 1
                words = normalized_words(text)
                fresh = [w for w in set(words) if w not in cache]
                if fresh:
                    cache.update(zip(fresh, word_hashes(fresh).tolist()))
                ids = np.fromiter((cache[w] for w in words), dtype=np.uint64, count=len(words))
                for n in self.lengths():
                    if len(ids) < n:
                        continue
                    grams = ngram_hashes(ids, n)
                    pos = np.minimum(np.searchsorted(wanted, grams), len(wanted) - 1)
                    hit = grams[wanted[pos] == grams]
                    if len(hit):
                        found.update(int(h) for h in hit)
        hits = np.fromiter(found, dtype=np.uint64, count=len(found))
        report = {}
        for name, items in self.examples.items():
            dirty = [i for i, g in enumerate(items) if len(g) and np.isin(g, hits).any()]
            report[name] = {"contaminated": len(dirty), "examples": len(items),
                            "fraction": len(dirty) / max(len(items), 1), "indices": dirty[:20],
                            "n": N, "training_docs": docs}  # fmt: skip
        log.info("contamination: scanned %d training documents for %d benchmark grams", docs, len(wanted))
        return report
