"""A labelling project's results (lmforge.label.results) on a hand-built vote set whose statistics are worked out
by hand in the comments: pairwise and Fleiss' kappa, Krippendorff's alpha, ratings, per-annotator and judge
figures."""

from __future__ import annotations

import json

import pytest
from label_fixtures import checks, click, items, store_with
from sklearn.metrics import cohen_kappa_score

from lmforge.align.preferences import preference_record
from lmforge.finetune.data import Message
from lmforge.label.ratings import bradley_terry
from lmforge.label.results import project_results

# what ann0, ann1, ann2 vote on items p0..p5 (a / b in item order, t = tie); per item (a, b, tie) counts:
# p0 3,0,0  p1 2,1,0  p2 1,2,0  p3 0,3,0  p4 1,2,0  p5 1,0,2
VOTES = {"ann0": "aaabbt", "ann1": "aabbbt", "ann2": "abbbaa"}
LETTER = {"a": "a", "b": "b", "t": "tie"}
CHECKS = {"ann0": "ab", "ann1": "aa", "ann2": "ba"}  # the checks' answers are a, b: 2, 1 and 0 passed


def _judge(store, name, choose):
    """A judge's records on items p0..p5: choose(i) is its choice ("a" / "b" / "tie") on item i."""
    records = []
    for i in range(6):
        choice = LETTER[choose(i)]
        chosen, rejected = ("m2", "m1") if choice == "b" else ("m1", "m2")
        records.append(preference_record([Message("user", "q")], "x", "y", choice, {
            "source": f"judge:{name}", "item_id": f"p{i}", "models": {"chosen": chosen, "rejected": rejected}}))
    assert store.add_judge_votes("demo", name, records) == 6


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    store, users = store_with(tmp_path_factory.mktemp("results") / "l.db", list(VOTES))
    store.create_project("demo", items(6) + items(1, prefix="unvoted"), k=3, attention=checks(["a", "b"]))
    for name, user in users.items():
        for _ in range(8):
            a = store.next_assignment("demo", user)
            check = a.item_id.startswith("check")
            want = CHECKS[name][int(a.item_id[-1])] if check else LETTER[VOTES[name][int(a.item_id[1:])]]
            store.vote(a.id, user, click(a, want), seconds={"ann0": 1.0, "ann1": 2.0, "ann2": 4.0}[name])
    # judge "first" always says a; "people" says the human majority: a a b b b tie
    _judge(store, "first", lambda i: "a")
    _judge(store, "people", lambda i: "aabbbt"[i])
    return project_results(store, "demo", n_boot=50)


def test_counts(results):
    assert {k: results[k] for k in ("k", "comparisons", "voted", "complete", "votes", "attention_votes")} == \
        {"k": 3, "comparisons": 7, "voted": 6, "complete": 6, "votes": 18, "attention_votes": 6}  # fmt: skip
    json.dumps(results, allow_nan=False)  # plain JSON for the results page


def test_pairwise_kappa_matches_scikit_learn(results):
    pairs = {(p["a"], p["b"]): (p["n"], p["kappa"]) for p in results["pairwise_kappa"]}
    # ann0 vs ann1: observed 5/6, chance (3*2 + 2*3 + 1*1) / 36 = 13/36, kappa = (30 - 13) / (36 - 13) = 17/23
    assert pairs[("ann0", "ann1")] == (6, pytest.approx(17 / 23))
    for (a, b), (n, kappa) in pairs.items():
        assert kappa == pytest.approx(cohen_kappa_score(list(VOTES[a]), list(VOTES[b])))


def test_fleiss_and_krippendorff_by_hand(results):
    # Fleiss: P_i = 1, 1/3, 1/3, 1, 1/3, 1/3 -> mean 5/9; shares 8/18, 8/18, 2/18 -> P_e = 132/324 = 11/27;
    # kappa = (5/9 - 11/27) / (1 - 11/27) = 4/16
    assert results["fleiss_kappa"] == {"value": pytest.approx(0.25), "raters": 3, "items": 6}
    # Krippendorff: agreeing pairs 3 + 1 + 1 + 3 + 1 + 1 = 10 of n = 18; alpha = 1 - 17 * 8 / (324 - 132) = 7/24
    assert results["krippendorff_alpha"] == {"value": pytest.approx(7 / 24), "items": 6}


def test_ratings_are_level_when_the_models_win_equally(results):
    # 8 votes for m1 (a), 8 for m2 (b), 2 ties: equal strengths, both at the scale's mean 1000
    bt = results["bradley_terry"]
    assert bt["rating"] == {"m1": pytest.approx(1000.0), "m2": pytest.approx(1000.0)}
    assert (bt["n_comparisons"], bt["n_same_model"], bt["n_boot"]) == (18, 0, 50)
    for lo, hi in bt["ci95"].values():
        assert lo < 1000.0 < hi
    assert set(results["elo"]) == {"m1", "m2"}


def test_per_annotator_statistics(results):
    stats = {a["name"]: a for a in results["annotators"]}
    assert [stats[n]["votes"] for n in VOTES] == [6, 6, 6]
    assert [stats[n]["median_seconds"] for n in VOTES] == [1.0, 2.0, 4.0]
    assert [stats[n]["tie_share"] for n in VOTES] == [pytest.approx(1 / 6), pytest.approx(1 / 6), 0.0]
    assert [stats[n]["attention"] for n in VOTES] == [{"hits": 2, "of": 2, "rate": 1.0},
                                                        {"hits": 1, "of": 2, "rate": 0.5},
                                                        {"hits": 0, "of": 2, "rate": 0.0}]  # fmt: skip
    # with the others' majority where they have one: ann0 on p0 (a), p2 (b), p3 (b): 2 of 3; ann1 on p0, p3: 2 of 2;
    # ann2 on p0 (a), p1 (a), p3 (b), p4 (b), p5 (tie): 2 of 5
    assert [(stats[n]["agreement_with_majority"]["hits"], stats[n]["agreement_with_majority"]["of"])
            for n in VOTES] == [(2, 3), (2, 2), (2, 5)]  # fmt: skip


def test_judges_against_the_human_majority(results):
    judges = {j["judge"]: j for j in results["judges"]}
    # the majority is a a b b b tie; "first" (always a) is right on 2 of 6, and its kappa is 0: it never varies
    assert judges["first"] == {"judge": "first", "n": 6, "accuracy": pytest.approx(1 / 3), "kappa": 0.0}
    assert judges["people"] == {"judge": "people", "n": 6, "accuracy": 1.0, "kappa": 1.0}


def test_ratings_order_the_models_by_their_wins_and_match_bradley_terry(tmp_path):
    store, users = store_with(tmp_path / "l.db", ["ann0", "ann1"])
    store.create_project("demo", items(4, ("mid", "weak", "strong")), k=2)  # the winner is a on one pair of 3
    rank = {"weak": 0, "mid": 1, "strong": 2}
    for user in users.values():
        while (a := store.next_assignment("demo", user)) is not None:
            left_model, right_model = (a.left.split()[0], a.right.split()[0])  # replies are "<model> answers <i>"
            store.vote(a.id, user, "left" if rank[left_model] > rank[right_model] else "right")
    results = project_results(store, "demo", n_boot=20, seed=3)
    assert list(results["bradley_terry"]["rating"]) == ["strong", "mid", "weak"]
    peer = bradley_terry([(v.model_a, v.model_b, v.choice) for v in store.votes("demo")], n_boot=20, seed=3)
    assert results["bradley_terry"]["rating"] == pytest.approx(peer.rating)
    assert results["fleiss_kappa"]["value"] == 1.0 and results["krippendorff_alpha"]["value"] == 1.0
    assert results["elo"]["strong"] > results["elo"]["mid"] > results["elo"]["weak"]


def test_votes_between_replies_of_one_model_are_left_out_of_the_ratings_and_counted(tmp_path):
    store, users = store_with(tmp_path / "l.db", ["ann"])
    store.create_project("demo", items(2) + items(1, ("m1", "m1"), prefix="same"), k=1)
    while (a := store.next_assignment("demo", users["ann"])) is not None:
        store.vote(a.id, users["ann"], click(a, "a"))
    bt = project_results(store, "demo", n_boot=10)["bradley_terry"]
    assert (bt["n_comparisons"], bt["n_same_model"]) == (2, 1)
    assert bt["rating"]["m1"] > bt["rating"]["m2"]
