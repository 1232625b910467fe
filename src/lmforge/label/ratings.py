"""Ratings of models from pairwise votes: Bradley-Terry with bootstrap intervals, and online Elo to compare
(docs/labelling.md, "Ratings").

A comparison is (model_a, model_b, outcome) with outcome "a" (A better), "b" (B better), "tie" or "both_bad".
A tie is half a win for each side; "both bad" is a tie or left out, as the caller chooses (`both_bad`), and the
number left out is reported. Ratings are on the Elo-like scale 400 * log10(strength) + 1000, with the strengths'
geometric mean fixed at 1 (mean rating 1000), so a 400-point gap means 10-to-1 odds.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

OUTCOMES = {"a": 1.0, "b": 0.0, "tie": 0.5, "both_bad": 0.5}  # A's share of the win
BOTH_BAD = ("tie", "exclude")
Comparison = tuple[Hashable, Hashable, str]


def to_rating(log_strength: np.ndarray) -> np.ndarray:
    """Natural-log strengths -> the Elo-like scale 400 * log10(p) + 1000."""
    return 400.0 * log_strength / np.log(10.0) + 1000.0


@dataclass(frozen=True)
class Encoded:
    """Comparisons as arrays: the models, each comparison's two model indices and A's share of the win."""

    models: list[Hashable]
    a: np.ndarray
    b: np.ndarray
    score: np.ndarray
    excluded: int  # "both bad" votes left out


def encode(comparisons: Sequence[Comparison], both_bad: str = "tie") -> Encoded:
    """Check and index the comparisons. Models are numbered in order of first appearance."""
    if both_bad not in BOTH_BAD:
        raise ValueError(f"both_bad={both_bad!r}: expected one of {BOTH_BAD}")
    models: dict[Hashable, int] = {}
    a, b, score, excluded = [], [], [], 0
    for i, (ma, mb, outcome) in enumerate(comparisons):
        if outcome not in OUTCOMES:
            raise ValueError(f"comparison {i} ({ma!r} vs {mb!r}): outcome {outcome!r} is not one of {list(OUTCOMES)}")
        if ma == mb:
            raise ValueError(f"comparison {i}: model {ma!r} is compared with itself")
        if outcome == "both_bad" and both_bad == "exclude":
            excluded += 1
            continue
        a.append(models.setdefault(ma, len(models)))
        b.append(models.setdefault(mb, len(models)))
        score.append(OUTCOMES[outcome])
    if len(models) < 2:
        raise ValueError(f"need comparisons between at least 2 models, got {len(models)} model(s) from "
                         f"{len(comparisons)} comparison(s) ({excluded} 'both_bad' excluded)")  # fmt: skip
    return Encoded(list(models), np.array(a, dtype=np.int64), np.array(b, dtype=np.int64),
                   np.array(score, dtype=np.float64), excluded)  # fmt: skip


def win_matrix(enc: Encoded, index: np.ndarray | None = None) -> np.ndarray:
    """wins[i, j]: model i's (fractional) wins over model j in the comparisons `index` (all by default)."""
    idx = np.arange(len(enc.a)) if index is None else index
    wins = np.zeros((len(enc.models), len(enc.models)))
    np.add.at(wins, (enc.a[idx], enc.b[idx]), enc.score[idx])
    np.add.at(wins, (enc.b[idx], enc.a[idx]), 1.0 - enc.score[idx])
    return wins


def _identifiable(wins: np.ndarray) -> bool:
    """Hunter's (2004) condition: in the graph 'i beat j at least partly', every model reaches every other, so no
    group of models wins (or loses) all its games against the rest and every strength is finite."""
    beats = wins > 0

    def reaches_all(graph: np.ndarray) -> bool:
        seen, frontier = {0}, [0]
        while frontier:
            new = {int(j) for i in frontier for j in np.flatnonzero(graph[i])} - seen
            seen |= new
            frontier = list(new)
        return len(seen) == len(graph)

    return reaches_all(beats) and reaches_all(beats.T)


def _log_likelihood(theta: np.ndarray, wins: np.ndarray, prior_ties: float) -> float:
    """Bradley-Terry log-likelihood of natural-log strengths, P(i beats j) = sigmoid(theta_i - theta_j), plus
    prior_ties / 2 wins and losses of every model against a reference at theta 0."""
    log_sigmoid = -np.logaddexp(0.0, -(theta[:, None] - theta[None, :]))
    prior = -(np.logaddexp(0.0, -theta) + np.logaddexp(0.0, theta)).sum()
    return float((wins * log_sigmoid).sum() + prior_ties / 2 * prior)


def fit_log_strengths(wins: np.ndarray, prior_ties: float = 1.0, tol: float = 1e-10,
                      max_iter: int = 100) -> np.ndarray:  # fmt: skip
    """Bradley-Terry natural-log strengths (mean 0) from a win matrix, by Newton's method on the log-likelihood
    (concave, so a step halved until the likelihood does not fall always converges; a few steps, where Hunter's
    MM algorithm takes hundreds). `prior_ties` virtual ties of every model against a fixed reference of strength 1
    keep a model that never wins or never loses finite, and pull every strength a little towards the reference;
    0 gives the plain maximum-likelihood fit, which needs Hunter's (2004) condition to hold."""
    if prior_ties < 0:
        raise ValueError(f"prior_ties={prior_ties}: must be >= 0")
    if prior_ties == 0 and not _identifiable(wins):
        raise ValueError("the Bradley-Terry fit is unbounded: some model (or group of models) never wins or never "
                         "loses against the rest; pass prior_ties > 0 (virtual ties against a reference)")
    games = wins + wins.T
    # without the reference only differences are defined: hold model 0 at 0 and centre afterwards
    free = slice(0, None) if prior_ties > 0 else slice(1, None)
    theta = np.zeros(len(wins))
    for _ in range(max_iter):
        beat = 1.0 / (1.0 + np.exp(theta[None, :] - theta[:, None]))  # beat[i, j] = P(i beats j)
        ref = 1.0 / (1.0 + np.exp(-theta))
        grad = wins.sum(axis=1) - (games * beat).sum(axis=1) + prior_ties * (0.5 - ref)
        curvature = games * beat * (1.0 - beat)
        neg_hessian = np.diag(curvature.sum(axis=1) + prior_ties * ref * (1.0 - ref)) - curvature
        step = np.zeros_like(theta)
        step[free] = np.linalg.solve(neg_hessian[free, free], grad[free])
        base, scale = _log_likelihood(theta, wins, prior_ties), 1.0
        while _log_likelihood(theta + scale * step, wins, prior_ties) < base - 1e-12 and scale > 1e-8:
            scale /= 2
        theta = theta + scale * step
        if np.max(np.abs(scale * step)) < tol:
            break
    else:
        log.warning("Bradley-Terry Newton did not converge to %g in %d steps", tol, max_iter)
    return theta - theta.mean()


@dataclass(frozen=True)
class Ratings:
    """Bradley-Terry ratings with bootstrap 95% percentile intervals (rating and interval per model)."""

    rating: dict[Hashable, float]
    ci95: dict[Hashable, tuple[float, float]]
    n_comparisons: int
    n_excluded: int  # "both bad" votes left out (both_bad="exclude")
    n_boot: int


def bradley_terry(comparisons: Sequence[Comparison], both_bad: str = "tie", prior_ties: float = 1.0,
                  n_boot: int = 1000, seed: int = 0) -> Ratings:  # fmt: skip
    """Bradley-Terry ratings of the models in `comparisons`, with 95% intervals from `n_boot` bootstrap resamples
    of the comparisons (numpy's default_rng(seed), so the same seed gives the same intervals). A model absent from
    a resample keeps only its prior there: with prior_ties 0, such a resample (or any other unbounded one) fails
    loudly rather than being skipped, since skipping would narrow the intervals."""
    enc = encode(comparisons, both_bad)
    rating = to_rating(fit_log_strengths(win_matrix(enc), prior_ties))
    rng = np.random.default_rng(seed)
    n = len(enc.a)
    boots = np.array([to_rating(fit_log_strengths(win_matrix(enc, rng.integers(0, n, n)), prior_ties))
                      for _ in range(n_boot)])  # fmt: skip
    lo, hi = np.percentile(boots, [2.5, 97.5], axis=0) if n_boot else (rating, rating)
    return Ratings({m: float(rating[i]) for i, m in enumerate(enc.models)},
                   {m: (float(lo[i]), float(hi[i])) for i, m in enumerate(enc.models)}, n, enc.excluded, n_boot)


def elo(comparisons: Sequence[Comparison], k: float = 32.0, initial: float = 1000.0,
        both_bad: str = "tie") -> dict[Hashable, float]:  # fmt: skip
    """Online Elo over the comparisons in the order given: after each, A moves by k * (score - expected), with
    expected = 1 / (1 + 10 ** ((R_b - R_a) / 400)), and B by the opposite. Unlike Bradley-Terry it depends on the
    order (recent votes weigh more), which is why the results page shows both."""
    enc = encode(comparisons, both_bad)
    r = np.full(len(enc.models), initial)
    for a, b, score in zip(enc.a, enc.b, enc.score):
        expected = 1.0 / (1.0 + 10.0 ** ((r[b] - r[a]) / 400.0))
        delta = k * (score - expected)
        r[a] += delta
        r[b] -= delta
    return {m: float(r[i]) for i, m in enumerate(enc.models)}
