"""Agreement statistics (lmforge.label.agreement): parity with scikit-learn's Cohen's kappa, hand-computed Fleiss'
kappa and Krippendorff's alpha, and the invariances every chance-corrected statistic must have."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score

from lmforge.label.agreement import (category_counts, cohen_kappa, fleiss_kappa, krippendorff_alpha,
                                     pairwise_cohen_kappa)  # fmt: skip


@pytest.mark.parametrize("seed", range(8))
def test_cohen_kappa_matches_sklearn_on_random_labels(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, k = int(rng.integers(5, 60)), int(rng.integers(2, 5))
    a = rng.integers(0, k, n)
    # b copies a on about half the items so kappa is spread over [-ish, 1], not just near 0
    b = np.where(rng.random(n) < 0.5, a, rng.integers(0, k, n))
    labels = np.array(["a", "b", "tie", "both_bad", "x"])
    assert cohen_kappa(list(labels[a]), list(labels[b])) == pytest.approx(cohen_kappa_score(labels[a], labels[b]),
                                                                          abs=1e-12)  # fmt: skip


@pytest.mark.parametrize(("a", "b"), [
    (["a", "b", "tie", "a"], ["a", "b", "tie", "a"]),  # perfect agreement: 1
    (["a", "b", "a", "b"], ["b", "a", "b", "a"]),  # perfect disagreement on balanced labels: -1
    (["a", "a", "a", "a"], ["a", "b", "a", "b"]),  # one rater has no variance: chance agreement 1/2, kappa 0
    (["a", "a", "b"], ["b", "b", "a"]),  # observed 0, chance 4/9: kappa -0.8
])  # fmt: skip
def test_cohen_kappa_edge_cases_match_sklearn(a: list[str], b: list[str]) -> None:
    assert cohen_kappa(a, b) == pytest.approx(cohen_kappa_score(a, b), abs=1e-12)


def test_cohen_kappa_exact_values_and_no_variance() -> None:
    assert cohen_kappa(["a", "b", "tie"], ["a", "b", "tie"]) == 1.0
    assert cohen_kappa(["a", "a", "b"], ["b", "b", "a"]) == pytest.approx(-0.8)  # (0 - 4/9) / (1 - 4/9)
    # both raters always said "a": chance agreement is 1, kappa is 0/0; NaN, as scikit-learn (which also warns)
    assert math.isnan(cohen_kappa(["a"] * 5, ["a"] * 5))
    with pytest.warns(UserWarning):
        assert math.isnan(cohen_kappa_score(["a"] * 5, ["a"] * 5))


def test_cohen_kappa_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match=r"different numbers of items \(2 and 1\)"):
        cohen_kappa(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no items"):
        cohen_kappa([], [])


def test_pairwise_cohen_kappa_uses_the_items_both_labelled() -> None:
    labels = {
        "ann": {1: "a", 2: "b", 3: "tie", 4: "a"},
        "bob": {2: "b", 3: "a", 4: "a", 5: "b"},
        "cat": {7: "a", 8: "b"},
    }
    pairs = pairwise_cohen_kappa(labels)
    assert [(p.rater_a, p.rater_b, p.n_items) for p in pairs] == [("ann", "bob", 3), ("ann", "cat", 0),
                                                                  ("bob", "cat", 0)]  # fmt: skip
    # ann vs bob on items 2, 3, 4: ann b, tie, a; bob b, a, a
    assert pairs[0].kappa == pytest.approx(cohen_kappa_score(["b", "tie", "a"], ["b", "a", "a"]))
    assert math.isnan(pairs[1].kappa) and math.isnan(pairs[2].kappa)


def test_fleiss_kappa_hand_computed() -> None:
    # 3 items, 3 raters each, categories (x, y): counts [3, 0], [0, 3], [2, 1].
    # P_i = sum_j n_ij (n_ij - 1) / (n (n - 1)): 6/6 = 1, 1, (2*1)/6 = 1/3; P_bar = (1 + 1 + 1/3) / 3 = 7/9.
    # p_j = column total / 9: x 5/9, y 4/9; P_e = 25/81 + 16/81 = 41/81.
    # kappa = (7/9 - 41/81) / (1 - 41/81) = (22/81) / (40/81) = 0.55.
    assert fleiss_kappa([[3, 0], [0, 3], [2, 1]]) == pytest.approx(0.55, abs=1e-12)
    table, categories = category_counts([["x", "x", "x"], ["y", "y", "y"], ["x", "y", "x"]])
    assert categories == ["x", "y"] and table.tolist() == [[3, 0], [0, 3], [2, 1]]
    assert fleiss_kappa(table) == pytest.approx(0.55, abs=1e-12)


def test_fleiss_kappa_equals_cohen_two_raters_pooled() -> None:
    # with 2 raters Fleiss' kappa is Scott's pi: chance from the pooled label shares. Items (a,a), (a,b), (b,b),
    # (b,b): observed 3/4; pooled shares a 3/8, b 5/8, chance 9/64 + 25/64 = 34/64; pi = (48/64-34/64)/(30/64) = 7/15
    assert fleiss_kappa([[2, 0], [1, 1], [0, 2], [0, 2]]) == pytest.approx(7 / 15, abs=1e-12)


def test_fleiss_kappa_perfect_and_errors() -> None:
    assert fleiss_kappa([[4, 0, 0], [0, 4, 0], [0, 0, 4]]) == 1.0
    assert math.isnan(fleiss_kappa([[3, 0], [3, 0]]))  # one category only: 0/0
    with pytest.raises(ValueError, match="item 0 has 3, item 2 has 2"):
        fleiss_kappa([[3, 0], [1, 2], [1, 1]])
    with pytest.raises(ValueError, match="at least 2 raters"):
        fleiss_kappa([[1, 0], [0, 1]])
    with pytest.raises(ValueError, match="item 1 has a negative count"):
        fleiss_kappa([[2, 0], [3, -1]])


def test_krippendorff_alpha_hand_computed_with_missing_labels() -> None:
    # items (None = missing): [a, a, -], [a, b, b], [b, -, -], [b, b]. Item 3 has one label: not pairable.
    # coincidences o_ck = sum over items of ordered pairs (c, k) / (m_u - 1):
    #   item 1 (m=2): o_aa += 2;  item 2 (m=3): o_bb += 2/2 = 1, o_ab += 2/2 = 1, o_ba += 1;  item 4: o_bb += 2.
    # n_a = 2 + 1 = 3, n_b = 3 + 1 = 4, n = 7; observed disagreements o_ab + o_ba = 2;
    # expected n^2 - sum n_c^2 = 49 - 9 - 16 = 24; alpha = 1 - (n - 1) * 2 / 24 = 1 - 12/24 = 0.5.
    items = [["a", "a", None], ["a", "b", "b"], ["b", None, None], ["b", "b"]]
    assert krippendorff_alpha(items) == pytest.approx(0.5, abs=1e-12)


def test_krippendorff_alpha_reliability_data_example() -> None:
    # Krippendorff's textbook reliability data: 4 observers, 12 units, nominal alpha 0.743 (to 3 decimals)
    observers = [
        [1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None],
        [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, 3],
        [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, None],
        [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None],
    ]
    items = [list(unit) for unit in zip(*observers)]
    assert round(krippendorff_alpha(items), 3) == 0.743


def test_krippendorff_alpha_perfect_undefined_and_errors() -> None:
    assert krippendorff_alpha([["a", "a"], ["b", "b", None], ["tie", "tie", "tie"]]) == 1.0
    assert math.isnan(krippendorff_alpha([["a", "a"], ["a", "a", "a"]]))
    with pytest.raises(ValueError, match="none of the 2 items has 2 or more labels"):
        krippendorff_alpha([["a", None], ["b"]])


def _random_items(seed: int, n_items: int = 30, raters: int = 4) -> list[list[str | None]]:
    rng = np.random.default_rng(seed)
    labels = ["a", "b", "tie", "both_bad"]
    items = []
    for _ in range(n_items):
        truth = labels[rng.integers(0, 4)]
        items.append([truth if rng.random() < 0.6 else labels[rng.integers(0, 4)] for _ in range(raters)])
    return items


@pytest.mark.parametrize("seed", range(4))
def test_invariant_to_permuting_raters_items_and_relabelling(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    items = _random_items(seed)
    with_missing = [[None if rng.random() < 0.25 else v for v in labels] for labels in items]
    rename = {"a": "B-wins", "b": 7, "tie": ("t",), "both_bad": "a"}  # a bijection, reusing a name on purpose
    shuffled_items = [items[i] for i in rng.permutation(len(items))]
    shuffled_raters = [list(rng.permutation(np.array(labels, dtype=object))) for labels in with_missing]
    relabelled = [[None if v is None else rename[v] for v in labels] for labels in with_missing]

    fleiss = fleiss_kappa(category_counts(items)[0])
    assert fleiss_kappa(category_counts(shuffled_items)[0]) == pytest.approx(fleiss, abs=1e-12)
    assert fleiss_kappa(category_counts([[rename[v] for v in labels] for labels in items])[0]) == pytest.approx(
        fleiss, abs=1e-12)  # fmt: skip
    alpha = krippendorff_alpha(with_missing)
    assert krippendorff_alpha(shuffled_raters) == pytest.approx(alpha, abs=1e-12)
    assert krippendorff_alpha(relabelled) == pytest.approx(alpha, abs=1e-12)
    assert krippendorff_alpha([with_missing[i] for i in rng.permutation(len(items))]) == pytest.approx(alpha, abs=1e-12)

    a, b = [labels[0] for labels in items], [labels[1] for labels in items]
    kappa = cohen_kappa(a, b)
    assert cohen_kappa(b, a) == pytest.approx(kappa, abs=1e-12)
    order = rng.permutation(len(a))
    assert cohen_kappa([a[i] for i in order], [b[i] for i in order]) == pytest.approx(kappa, abs=1e-12)
    assert cohen_kappa([rename[v] for v in a], [rename[v] for v in b]) == pytest.approx(kappa, abs=1e-12)
