"""Executors: run one function over many independent tasks, in this process, a local process pool, or Ray.

A task is a picklable argument; the function does the work for it, writes its files atomically, and returns a small
JSON-serialisable result. Results come back to the caller as tasks finish (`on_result(index, result)`), in whatever
order they finish; callers that need an order sort by index. Outputs must depend only on the task, never on which
worker ran it or when, so every executor produces the same files.

- `local`: a pool of `workers` processes (0 = all cores). Processes are started with `spawn`: a forked copy of a
  parent that already holds torch's or BLAS's thread pools can deadlock. With one worker, or one task, the work runs
  in this process and nothing is started.
- `ray`: one Ray task per item, on the cluster at `address` (`ray.init(address=...)`), or on a local Ray started for
  this run when `address` is None. Workers must see the same filesystem paths (a shared filesystem on a cluster).
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
from collections.abc import Callable, Sequence
from typing import Any, Literal

ExecutorKind = Literal["local", "ray"]
EXECUTORS = ("local", "ray")


def resolve_workers(workers: int) -> int:
    """`workers`, with 0 meaning every core this process may use."""
    if workers < 0:
        raise ValueError(f"workers={workers} must be 0 (all cores) or a positive count")
    if workers:
        return workers
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def run_tasks(
    fn: Callable[[Any], Any],
    tasks: Sequence[Any],
    *,
    workers: int = 0,
    executor: ExecutorKind = "local",
    address: str | None = None,
    on_result: Callable[[int, Any], None] | None = None,
) -> list[Any]:
    """Run `fn(task)` for every task; returns the results in task order. The first failure is raised."""
    if executor not in EXECUTORS:
        raise ValueError(f"executor={executor!r}: allowed values are {list(EXECUTORS)}")
    results: list[Any] = [None] * len(tasks)

    def done(i: int, result: Any) -> None:
        results[i] = result
        if on_result is not None:
            on_result(i, result)

    if not tasks:
        return results
    if executor == "ray":
        _run_ray(fn, tasks, workers, address, done)
        return results
    n = min(resolve_workers(workers), len(tasks))
    if n == 1:
        for i, task in enumerate(tasks):
            done(i, fn(task))
        return results
    with cf.ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(fn, task): i for i, task in enumerate(tasks)}
        try:
            for future in cf.as_completed(futures):
                done(futures[future], future.result())
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    return results


def _run_ray(fn: Callable[[Any], Any], tasks: Sequence[Any], workers: int, address: str | None,
             done: Callable[[int, Any], None]) -> None:  # fmt: skip
    try:
        import ray
    except ImportError as e:
        raise ImportError("executor 'ray' needs Ray, which is not installed: pip install 'lmforge[ray]'") from e
    started_here = not ray.is_initialized()
    if started_here:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            # A private local cluster sized like the local executor; no dashboard, nothing listening outside.
            ray.init(num_cpus=resolve_workers(workers), include_dashboard=False, log_to_driver=False)
    try:
        remote = ray.remote(num_cpus=1, max_retries=0)(fn)
        pending = {remote.remote(task): i for i, task in enumerate(tasks)}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                done(pending.pop(ref), ray.get(ref))
    finally:
        if started_here:
            ray.shutdown()
