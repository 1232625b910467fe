"""Chance-corrected agreement between labellers on categorical labels (docs/labelling.md, "Agreement").

Every statistic here has the form (observed agreement - chance agreement) / (1 - chance agreement): 1 is perfect
agreement, 0 is what raters labelling at random with the same label frequencies would reach, below 0 is worse than
that. When chance agreement is already 1 (every label the same category) the ratio is 0/0: the statistics return
NaN, as scikit-learn's cohen_kappa_score does, rather than invent a value; callers show it as "undefined".

Labels are any hashable values (strings such as "a", "b", "tie", "both_bad"); the statistics never look inside
them, so relabelling the categories changes nothing.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np


def _chance_corrected(observed: float, chance: float) -> float:
    # chance == 1 means every label fell in one category: agreement is certain and kappa is 0/0
    return float("nan") if np.isclose(chance, 1.0) else (observed - chance) / (1.0 - chance)


def cohen_kappa(a: Sequence[Hashable], b: Sequence[Hashable]) -> float:
    """Cohen's kappa of two raters' labels of the same items, `a[i]` and `b[i]` being item i's. NaN when both
    raters gave every item the same single category (chance agreement 1)."""
    if len(a) != len(b):
        raise ValueError(f"cohen_kappa: the raters labelled different numbers of items ({len(a)} and {len(b)}); "
                         "pass the labels of the items both labelled, in the same order")  # fmt: skip
    if not a:
        raise ValueError("cohen_kappa: no items; kappa needs at least one item both raters labelled")
    n = len(a)
    observed = sum(x == y for x, y in zip(a, b)) / n
    count_a, count_b = Counter(a), Counter(b)
    chance = sum(count_a[c] * count_b[c] for c in count_a) / (n * n)
    return _chance_corrected(observed, chance)


@dataclass(frozen=True)
class PairKappa:
    """Cohen's kappa of two annotators over the `n_items` items both labelled (NaN when they share none)."""

    rater_a: Hashable
    rater_b: Hashable
    n_items: int
    kappa: float


def pairwise_cohen_kappa(labels: Mapping[Hashable, Mapping[Hashable, Hashable]]) -> list[PairKappa]:
    """Cohen's kappa for every pair of annotators, each over the items both labelled. `labels` maps an annotator
    to {item: label}. Pairs come in the order of `labels`' keys; a pair sharing no item has n_items 0 and kappa
    NaN (it is reported, not dropped, so a results page shows which pairs never overlapped)."""
    out = []
    for ra, rb in itertools.combinations(labels, 2):
        shared = [item for item in labels[ra] if item in labels[rb]]
        kappa = float("nan")
        if shared:
            kappa = cohen_kappa([labels[ra][i] for i in shared], [labels[rb][i] for i in shared])
        out.append(PairKappa(ra, rb, len(shared), kappa))
    return out


def category_counts(items: Sequence[Sequence[Hashable]]) -> tuple[np.ndarray, list[Hashable]]:
    """Per-item label lists -> (the items x categories count table fleiss_kappa reads, the categories in the
    order of their columns: first appearance)."""
    categories = list(dict.fromkeys(label for labels in items for label in labels))
    column = {c: j for j, c in enumerate(categories)}
    table = np.zeros((len(items), len(categories)), dtype=np.int64)
    for i, labels in enumerate(items):
        for label in labels:
            table[i, column[label]] += 1
    return table, categories


def fleiss_kappa(table: np.ndarray | Sequence[Sequence[int]]) -> float:
    """Fleiss' kappa of an items x categories table of counts (table[i, j]: how many raters put item i in
    category j). Every item must have the same number of raters, at least 2; the raters need not be the same
    people from item to item. NaN when every label is one category."""
    counts = np.asarray(table, dtype=np.float64)
    if counts.ndim != 2 or counts.shape[0] == 0:
        raise ValueError(f"fleiss_kappa: expected a non-empty items x categories table, got shape {counts.shape}")
    if (counts < 0).any():
        row = int(np.argwhere(counts < 0)[0][0])
        raise ValueError(f"fleiss_kappa: item {row} has a negative count {counts[row].tolist()}")
    per_item = counts.sum(axis=1)
    raters = per_item[0]
    if (per_item != raters).any():
        row = int(np.argmax(per_item != raters))
        raise ValueError(f"fleiss_kappa: every item needs the same number of raters; item 0 has {raters:g}, item "
                         f"{row} has {per_item[row]:g}. Use krippendorff_alpha for items with different numbers "
                         "of raters or missing labels")  # fmt: skip
    if raters < 2:
        raise ValueError(f"fleiss_kappa: each item needs at least 2 raters, got {raters:g}")
    # P_i: the share of item i's ordered rater pairs that agree; P_e: the chance two random labels agree
    observed = ((counts * (counts - 1)).sum(axis=1) / (raters * (raters - 1))).mean()
    shares = counts.sum(axis=0) / counts.sum()
    return _chance_corrected(float(observed), float((shares**2).sum()))


def krippendorff_alpha(items: Sequence[Sequence[Hashable | None]]) -> float:
    """Krippendorff's alpha for nominal labels. `items[i]` is item i's labels from however many raters labelled
    it; None is a missing label and is left out. Items with fewer than 2 labels carry no pairable value and are
    left out (that is the statistic's definition, not a dropped record). NaN when every pairable label is one
    category."""
    values = [[v for v in labels if v is not None] for labels in items]
    pairable = [v for v in values if len(v) >= 2]
    if not pairable:
        raise ValueError(f"krippendorff_alpha: none of the {len(items)} items has 2 or more labels; alpha needs "
                         "items labelled by at least two raters")  # fmt: skip
    table, _ = category_counts(pairable)
    counts = table.astype(np.float64)
    m = counts.sum(axis=1, keepdims=True)
    # the coincidence matrix's diagonal: each item's ordered pairs of equal labels, weighted 1 / (m_u - 1)
    agreeing = (counts * (counts - 1) / (m - 1)).sum()
    totals = counts.sum(axis=0)  # n_c: how often each category was used in pairable items
    n = totals.sum()
    expected_disagreeing = n * n - (totals**2).sum()
    if expected_disagreeing == 0:
        return float("nan")
    return float(1.0 - (n - 1) * (n - agreeing) / expected_disagreeing)
