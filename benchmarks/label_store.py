"""Throughput and latency of the labelling store (`lmforge.label.store.LabelStore`) under concurrent annotators.

    python benchmarks/label_store.py
    python benchmarks/label_store.py --smoke    # seconds: 10 items

For each number of annotators (1, 8, 32), a fresh store gets one project of 100 two-reply items to be labelled by
k = 3 annotators each, and as many threads, each its own user with its own LabelStore (own SQLite connections),
ask for an assignment and vote until none is left, as the web app's request threads would. One vote is two
fsynced write transactions (the reservation and the vote). The table shows votes per second over the whole run,
the median and 95th-percentile time of one next_assignment + vote, and the checks: every comparison has exactly
k votes, and no annotator voted twice on one. The last line sums up as key=value pairs.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from lmforge.finetune.data import Message
from lmforge.label.candidates import Candidate, Response
from lmforge.label.store import LabelStore

K = 3
ITEMS, SMOKE_ITEMS = 100, 10
ANNOTATORS = (1, 8, 32)


def run(directory: Path, n_annotators: int, n_items: int) -> dict[str, float]:
    """Label a fresh project with `n_annotators` threads; returns the rates, latencies and invariant checks."""
    store = LabelStore(directory / "label.db", create=True)
    users = [store.user_by_token(store.add_user(f"ann{i:02d}")) for i in range(n_annotators)]
    items = [Candidate(f"q{i}", [Message("user", f"question {i}")],
                       [Response("m1", f"first reply {i}"), Response("m2", f"second reply {i}")])
             for i in range(n_items)]  # fmt: skip
    store.create_project("bench", items, k=K)
    latencies: list[float] = []
    errors: list[BaseException] = []

    def annotate(user) -> None:
        own = LabelStore(directory / "label.db")
        try:
            while True:
                t = time.perf_counter()
                assignment = own.next_assignment("bench", user)
                if assignment is None:
                    return
                own.vote(assignment.id, user, "left" if assignment.comparison_id % 2 else "right")
                latencies.append(time.perf_counter() - t)
        except BaseException as e:  # reported below: a benchmark that loses votes must not print a rate
            errors.append(e)

    threads = [threading.Thread(target=annotate, args=(u,)) for u in users]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} annotator thread(s) failed, the first with {errors[0]!r}")
    votes = store.votes("bench")
    per_comparison = Counter(v.comparison_id for v in votes)
    expected = min(K, n_annotators)
    ms = sorted(x * 1000 for x in latencies)
    return {"votes": len(votes), "votes_per_s": len(votes) / wall, "p50_ms": statistics.median(ms),
            "p95_ms": ms[int(0.95 * (len(ms) - 1))],
            "exact_k": int(len(per_comparison) == n_items and set(per_comparison.values()) == {expected}),
            "duplicates": len(votes) - len({(v.comparison_id, v.annotator) for v in votes})}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help=f"{SMOKE_ITEMS} items: does it run?")
    opts = parser.parse_args()
    n_items = SMOKE_ITEMS if opts.smoke else ITEMS
    rows = {}
    for n in ANNOTATORS:
        with tempfile.TemporaryDirectory() as tmp:
            rows[n] = run(Path(tmp), n, n_items)
    print(f"{n_items} items x k={K} (1 annotator: 1 vote each), 2 fsynced transactions per vote\n")
    print("| annotators | votes | votes/s | p50 ms | p95 ms | exactly k | duplicates |")
    print("|---|---|---|---|---|---|---|")
    for n, r in rows.items():
        print(f"| {n} | {r['votes']} | {r['votes_per_s']:.0f} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | "
              f"{'yes' if r['exact_k'] else 'NO'} | {r['duplicates']} |")
    last = rows[ANNOTATORS[-1]]
    print(f"\nvotes_per_s_1={rows[1]['votes_per_s']:.1f} votes_per_s_32={last['votes_per_s']:.1f} "
          f"p95_ms_32={last['p95_ms']:.1f} exact_k={int(all(r['exact_k'] for r in rows.values()))} "
          f"duplicates={sum(r['duplicates'] for r in rows.values())}")


if __name__ == "__main__":
    main()
