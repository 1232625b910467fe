"""Ratings from pairwise votes (lmforge.label.ratings): Bradley-Terry's exact strengths on small cases, its
bootstrap intervals, the prior that keeps an unbeaten model finite, and online Elo's hand-computed updates."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lmforge.label.ratings import bradley_terry, elo, encode, fit_log_strengths, win_matrix


def test_three_wins_in_four_is_a_strength_ratio_of_three() -> None:
    # the maximum-likelihood p_A / p_B solves 3 / 4 = p_A / (p_A + p_B): exactly 3, i.e. 400 log10(3) points
    votes = [("A", "B", "a")] * 3 + [("A", "B", "b")]
    r = bradley_terry(votes, prior_ties=0, n_boot=0)
    assert r.rating["A"] - r.rating["B"] == pytest.approx(400 * math.log10(3), abs=1e-9)
    assert (r.rating["A"] + r.rating["B"]) / 2 == pytest.approx(1000.0, abs=1e-9)  # mean log-strength 0
    logp = fit_log_strengths(win_matrix(encode(votes)), prior_ties=0)
    assert math.exp(logp[0] - logp[1]) == pytest.approx(3.0, abs=1e-9) and logp.sum() == pytest.approx(0, abs=1e-12)


def test_ties_are_half_a_win_and_both_bad_is_a_tie_or_left_out() -> None:
    # A: 2 wins + 2 ties = 3 points of 4, as in 3 wins of 4; B's side written first to check the orientation
    votes = [("B", "A", "b"), ("A", "B", "a"), ("A", "B", "tie"), ("B", "A", "both_bad")]
    r = bradley_terry(votes, prior_ties=0, n_boot=0)
    assert r.rating["A"] - r.rating["B"] == pytest.approx(400 * math.log10(3), abs=1e-9)
    # leaving "both bad" out: A has 2.5 of 3 points, a ratio of 5
    r = bradley_terry(votes + [("A", "B", "b")], both_bad="exclude", prior_ties=0, n_boot=0)
    assert r.n_excluded == 1 and r.n_comparisons == 4
    assert r.rating["A"] - r.rating["B"] == pytest.approx(400 * math.log10(2.5 / 1.5), abs=1e-9)


def test_a_transitive_triple_recovers_its_order() -> None:
    # true strengths 4 : 2 : 1; each pair plays 3:1 or 2:1-like records consistent with them
    votes = ([("A", "B", "a")] * 2 + [("A", "B", "b")] + [("B", "C", "a")] * 2 + [("B", "C", "b")]
             + [("A", "C", "a")] * 4 + [("A", "C", "b")])  # fmt: skip
    r = bradley_terry(votes, prior_ties=0, n_boot=0)
    assert r.rating["A"] > r.rating["B"] > r.rating["C"]
    assert sum(r.rating.values()) / 3 == pytest.approx(1000.0, abs=1e-9)
    # Elo, fed the same votes, agrees on the order
    e = elo(votes)
    assert e["A"] > e["B"] > e["C"]


def test_mm_solution_satisfies_the_likelihood_equations() -> None:
    # at the maximum, each model's expected wins equal its actual wins: sum_j n_ij p_i / (p_i + p_j) = W_i
    rng = np.random.default_rng(0)
    models = ["m0", "m1", "m2", "m3", "m4"]
    votes = [(models[i], models[j], ("a", "b", "tie")[rng.integers(0, 3)])
             for i, j in (rng.choice(5, 2, replace=False) for _ in range(300))]  # fmt: skip
    wins = win_matrix(encode(votes))
    p = np.exp(fit_log_strengths(wins, prior_ties=0))
    games = wins + wins.T
    expected = (games * p[:, None] / (p[:, None] + p[None, :])).sum(axis=1)
    np.testing.assert_allclose(expected, wins.sum(axis=1), atol=1e-7)


def test_bootstrap_intervals_contain_the_estimate_shrink_with_data_and_are_seeded() -> None:
    rng = np.random.default_rng(1)
    strength = {"A": 3.0, "B": 1.5, "C": 1.0}

    def votes(n: int) -> list[tuple[str, str, str]]:
        out = []
        for _ in range(n):
            a, b = rng.choice(list(strength), 2, replace=False)
            out.append((a, b, "a" if rng.random() < strength[a] / (strength[a] + strength[b]) else "b"))
        return out

    small, large = votes(60), votes(600)
    rs, rl = bradley_terry(small, n_boot=200, seed=3), bradley_terry(large, n_boot=200, seed=3)
    for r in (rs, rl):
        assert r.n_boot == 200
        for m in strength:
            lo, hi = r.ci95[m]
            assert lo <= r.rating[m] <= hi
    for m in strength:
        assert np.diff(rl.ci95[m])[0] < 0.6 * np.diff(rs.ci95[m])[0]  # about 1/sqrt(10) as wide
    assert rl.rating["A"] > rl.rating["B"] > rl.rating["C"]
    assert bradley_terry(small, n_boot=200, seed=3) == rs
    assert bradley_terry(small, n_boot=200, seed=4).ci95 != rs.ci95


def test_a_model_that_never_loses_or_never_wins_gets_finite_ratings_from_the_prior() -> None:
    # A never loses, D never wins
    votes = [("A", "B", "a")] * 5 + [("B", "C", "a")] * 2 + [("C", "B", "a")] + [("D", "C", "b")] * 2
    with pytest.raises(ValueError, match="never wins or never loses.*prior_ties > 0"):
        bradley_terry(votes, prior_ties=0, n_boot=0)
    r = bradley_terry(votes, n_boot=50)
    assert all(math.isfinite(v) for v in r.rating.values())
    assert all(math.isfinite(x) for ci in r.ci95.values() for x in ci)
    assert r.rating["A"] == max(r.rating.values()) and r.rating["D"] == min(r.rating.values())
    # 2 models, A won their one game, one virtual tie each against a reference at log-strength 0. Swapping A and
    # B and negating the log-strengths maps the problem to itself, so the optimum is (x, -x): mean 0 already, and
    # A's likelihood equation (expected points = points) reads sigmoid(2x) + sigmoid(x) = 1 + 1/2.
    x, y = fit_log_strengths(win_matrix(encode([("A", "B", "a")])), prior_ties=1.0)
    assert y == pytest.approx(-x, abs=1e-12) and 0 < x < 10
    sigmoid = lambda t: 1 / (1 + math.exp(-t))  # noqa: E731
    assert sigmoid(2 * x) + sigmoid(x) == pytest.approx(1.5, abs=1e-9)


def test_bad_votes_are_named() -> None:
    with pytest.raises(ValueError, match=r"comparison 1 \('A' vs 'B'\): outcome 'draw'"):
        bradley_terry([("A", "B", "a"), ("A", "B", "draw")])
    with pytest.raises(ValueError, match="comparison 0: model 'A' is compared with itself"):
        elo([("A", "A", "a")])
    with pytest.raises(ValueError, match="both_bad='skip'"):
        elo([("A", "B", "a")], both_bad="skip")
    with pytest.raises(ValueError, match="at least 2 models"):
        bradley_terry([("A", "B", "both_bad")], both_bad="exclude")


def test_elo_hand_computed_updates_and_order_dependence() -> None:
    # equal ratings: expected 1/2, so a win moves each side by K/2 = 16
    assert elo([("A", "B", "a")]) == {"A": 1016.0, "B": 984.0}
    assert elo([("A", "B", "tie")]) == {"A": 1000.0, "B": 1000.0}
    # second game, B wins at 984 vs 1016: E_B = 1 / (1 + 10 ** (32 / 400)); B gains 32 * (1 - E_B)
    e_b = 1 / (1 + 10 ** (32 / 400))
    r = elo([("A", "B", "a"), ("A", "B", "b")])
    assert r["B"] == pytest.approx(984 + 32 * (1 - e_b)) and r["A"] == pytest.approx(1016 - 32 * (1 - e_b))
    # the same votes in another order give other ratings (Bradley-Terry would not); the total is conserved
    votes = [("A", "B", "a"), ("B", "C", "a"), ("C", "A", "a"), ("A", "C", "a")]
    r1, r2 = elo(votes, k=24), elo(votes[::-1], k=24)
    assert r1 != r2
    assert sum(r1.values()) == pytest.approx(3000.0) and sum(r2.values()) == pytest.approx(3000.0)
    b1 = bradley_terry(votes, n_boot=0).rating
    assert bradley_terry(votes[::-1], n_boot=0).rating == pytest.approx(b1)
