"""A labelling project's results page as plain data: how far the annotators agree (lmforge.label.agreement), the
models' ratings (lmforge.label.ratings), each annotator's statistics and each AI judge's agreement with the people
(docs/labelling.md, "Results").

Attention checks count only towards the annotators' pass rates; every other number is over the real comparisons.
A statistic that is undefined (0/0 chance agreement, no shared items, fewer than two models) is None, so the
result is valid JSON and a page shows "undefined" rather than a made-up value.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter, defaultdict
from typing import Any

from lmforge.label.agreement import category_counts, cohen_kappa, fleiss_kappa, krippendorff_alpha, \
    pairwise_cohen_kappa  # fmt: skip
from lmforge.label.export import top_vote
from lmforge.label.ratings import bradley_terry, elo
from lmforge.label.store import LabelStore, VoteRow


def _number(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def _rate(hits: int, of: int) -> dict[str, Any]:
    return {"hits": hits, "of": of, "rate": hits / of if of else None}


def project_results(store: LabelStore, project: str, *, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Everything the results page shows for `project`: counts, pairwise Cohen's kappa, Fleiss' kappa, Krippendorff's
    alpha, Bradley-Terry ratings (bootstrap 95% intervals from `n_boot` resamples with `seed`) and Elo, per-annotator
    statistics and per-judge agreement with the human majority."""
    info = store.project(project)
    every = store.votes(project)
    votes = [v for v in every if not v.is_attention]
    by_comparison: dict[int, list[VoteRow]] = defaultdict(list)
    for v in votes:
        by_comparison[v.comparison_id].append(v)
    labels = {c: [v.choice for v in vs] for c, vs in by_comparison.items()}
    return {
        "project": project, "k": info.k, "comparisons": info.comparisons, "voted": len(by_comparison),
        "complete": sum(len(v) >= info.k for v in labels.values()), "votes": len(votes),
        "attention_votes": len(every) - len(votes),
        "pairwise_kappa": _pairwise(votes), "fleiss_kappa": _fleiss(labels),
        "krippendorff_alpha": _krippendorff(labels), **_ratings(votes, n_boot, seed),
        "annotators": _annotators(every, by_comparison),
        "judges": _judges(store, project, labels),
    }  # fmt: skip


def _pairwise(votes: list[VoteRow]) -> list[dict[str, Any]]:
    per_annotator: dict[str, dict[int, str]] = defaultdict(dict)
    for v in sorted(votes, key=lambda v: v.annotator):
        per_annotator[v.annotator][v.comparison_id] = v.choice
    return [{"a": p.rater_a, "b": p.rater_b, "n": p.n_items, "kappa": _number(p.kappa)}
            for p in pairwise_cohen_kappa(per_annotator)]  # fmt: skip


def _fleiss(labels: dict[int, list[str]]) -> dict[str, Any] | None:
    """Fleiss' kappa over the comparisons with the commonest number of votes (>= 2; the larger on a draw): the
    statistic needs the same number of raters on every item."""
    sizes = Counter(len(v) for v in labels.values() if len(v) >= 2)
    if not sizes:
        return None
    raters = max(sizes, key=lambda n: (sizes[n], n))
    table, _ = category_counts([v for v in labels.values() if len(v) == raters])
    return {"value": _number(fleiss_kappa(table)), "raters": raters, "items": sizes[raters]}


def _krippendorff(labels: dict[int, list[str]]) -> dict[str, Any] | None:
    pairable = [v for v in labels.values() if len(v) >= 2]
    if not pairable:
        return None
    return {"value": _number(krippendorff_alpha(pairable)), "items": len(pairable)}


def _ratings(votes: list[VoteRow], n_boot: int, seed: int) -> dict[str, Any]:
    """Bradley-Terry (with intervals) and Elo over every human vote, each vote one comparison ("both bad" counts
    as a tie). A vote between two replies of one model says nothing about models: it is left out and counted.
    None when the votes involve fewer than two models."""
    comparisons = [(v.model_a, v.model_b, v.choice) for v in votes if v.model_a != v.model_b]
    same_model = len(votes) - len(comparisons)
    if len({m for a, b, _ in comparisons for m in (a, b)}) < 2:
        return {"bradley_terry": None, "elo": None}
    fit = bradley_terry(comparisons, n_boot=n_boot, seed=seed)
    order = sorted(fit.rating, key=lambda m: -fit.rating[m])
    return {"bradley_terry": {"rating": {m: fit.rating[m] for m in order}, "ci95": {m: fit.ci95[m] for m in order},
                              "n_comparisons": fit.n_comparisons, "n_same_model": same_model, "n_boot": fit.n_boot},
            "elo": elo(comparisons)}  # fmt: skip


def _annotators(every: list[VoteRow], by_comparison: dict[int, list[VoteRow]]) -> list[dict[str, Any]]:
    """Per annotator: votes, median seconds, the shares of tie and both-bad votes, attention checks passed, and how
    often they agree with the majority of the others who voted on the same comparison (comparisons where the others
    have no majority are left out)."""
    out = []
    for name in sorted({v.annotator for v in every}):
        mine = [v for v in every if v.annotator == name]
        real = [v for v in mine if not v.is_attention]
        checks = [v for v in mine if v.is_attention]
        seconds = [v.seconds for v in mine if v.seconds is not None]
        agreed = of = 0
        for v in real:
            others = top_vote([o.choice for o in by_comparison[v.comparison_id] if o.annotator != name])
            if others is not None:
                agreed, of = agreed + (v.choice == others), of + 1
        out.append({"name": name, "votes": len(real), "median_seconds": statistics.median(seconds) if seconds else None,
                    "tie_share": sum(v.choice == "tie" for v in real) / len(real) if real else None,
                    "both_bad_share": sum(v.choice == "both_bad" for v in real) / len(real) if real else None,
                    "attention": _rate(sum(v.choice == v.label for v in checks), len(checks)),
                    "agreement_with_majority": _rate(agreed, of)})  # fmt: skip
    return out


def _judges(store: LabelStore, project: str, labels: dict[int, list[str]]) -> list[dict[str, Any]]:
    """Per AI judge: accuracy and Cohen's kappa against the human majority, on the comparisons that have both a
    judge vote and a human majority."""
    majority = {c: top for c, v in labels.items() if (top := top_vote(v)) is not None}
    per_judge: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for j in store.judge_votes(project):
        if j.comparison_id in majority:
            per_judge[j.judge].append((j.choice, majority[j.comparison_id]))
    out = []
    for judge, pairs in sorted(per_judge.items()):
        theirs, people = zip(*pairs)
        out.append({"judge": judge, "n": len(pairs), "accuracy": sum(a == b for a, b in pairs) / len(pairs),
                    "kappa": _number(cohen_kappa(list(theirs), list(people)))})  # fmt: skip
    return out
