"""Run many small checks of generated code in few sandbox calls.

`run_python` starts a fresh interpreter per program: about 30 ms, plus whatever the program imports (doctest alone
is about 70 ms more). Scoring thousands of RL samples that way would cost more than sampling them, so `run_checks`
packs up to `batch_size` jobs into one sandboxed program. Inside it each job runs in its own globals: first its
code, then each of its tests; a test passes when it raises nothing. Every job gets `timeout_s` of wall time,
counted by an interval timer whose SIGALRM ends the interpreter (a job may well catch an exception raised into it,
and a Python-level handler would wait for a C loop to finish).

A batch that dies before reporting every job (a timeout, a crash, `os._exit`, output that floods the pipe) is
charged to the first job without a result: jobs report in order, so that job was running when it died. The jobs
after it run again in a fresh batch, so one bad sample costs the others nothing but a restart.

What batching gives up: the jobs of one batch share an interpreter, so a job that changes shared state (a module's
attributes, builtins, the harness itself, the timer) can change what later jobs of its batch see and report; the
batch's own wall limit (`timeout_s` per job, plus a few seconds) still ends it. Everything runs inside the sandbox,
with all its layers; `batch_size=1` gives every job its own interpreter.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from lmforge.eval.sandbox import SandboxResult, run_python

BATCH_SLACK_S = 3.0  # a batch's wall limit beyond its jobs' own: interpreter start and imports
OUTPUT_BYTES = 1 << 20  # room for the result lines (the jobs' own prints are discarded)
STATUSES = ("passed", "failed", "timeout", "blocked", "memory", "error")


@dataclass(frozen=True)
class CheckJob:
    """`code` runs first (module level of a fresh namespace), then each of `tests` in the same namespace."""

    code: str
    tests: tuple[str, ...] = ()


@dataclass(frozen=True)
class CheckResult:
    """`status` is "passed" when the code and every test ran without an exception; "failed" when the code or a
    test raised; "timeout", "blocked" (the sandbox refused an operation), "memory" or "error" (the interpreter died
    during the job). `passed` counts the tests that passed (0 when the code itself did not run)."""

    status: str
    passed: int


# The program of one batch. Its names start with an underscore and it runs each job in a namespace of its own, so a
# job never sees them by accident. The jobs' prints go nowhere: the results leave through fd 1, marked with a nonce.
# SIGALRM keeps its default action, so the kernel ends the interpreter at a job's deadline even inside a C loop
# (a Python handler would wait for the loop, and a job could catch what it raised).
_HARNESS = r'''
import gc, json, os, signal, sys
_NONCE, _TIMEOUT, _JOBS = {nonce!r}, {timeout!r}, json.loads({jobs!r})

class _Sink:
    def write(self, s):
        return len(s)
    def flush(self):
        pass

def _status(e):
    if isinstance(e, MemoryError):
        return "memory"
    if isinstance(e, PermissionError) and str(e).startswith("lmforge sandbox:"):
        return "blocked"
    return "failed"

def _run(code, tests):
    namespace = {{"__name__": "__main__", "__builtins__": __builtins__}}
    try:
        exec(compile(code, "solution.py", "exec"), namespace)
    except BaseException as e:
        return _status(e), 0
    status, passed = "passed", 0
    for test in tests:
        try:
            exec(compile(test, "test.py", "exec"), namespace)
            passed += 1
        except BaseException as e:
            status = _status(e) if status == "passed" else status
    return status, passed

sys.stdout = sys.stderr = _Sink()
for _i, (_code, _tests) in enumerate(_JOBS):
    signal.setitimer(signal.ITIMER_REAL, _TIMEOUT)
    _result = _run(_code, _tests)
    signal.setitimer(signal.ITIMER_REAL, 0)
    os.write(1, ("%s %s\n" % (_NONCE, json.dumps([_i, *_result]))).encode())
    gc.collect()
'''


def _program(jobs: Sequence[CheckJob], timeout_s: float, nonce: str) -> str:
    payload = json.dumps([[job.code, list(job.tests)] for job in jobs])
    return _HARNESS.format(nonce=nonce, timeout=timeout_s, jobs=payload)


def _results(result: SandboxResult, nonce: str, n: int) -> dict[int, CheckResult]:
    """The jobs' reported results, by index; the first report of each index counts."""
    out: dict[int, CheckResult] = {}
    for line in result.stdout.splitlines():
        head, _, body = line.partition(" ")
        if head != nonce:
            continue
        try:
            i, status, passed = json.loads(body)
        except (ValueError, TypeError):
            continue  # a torn last line, cut where the batch died
        if isinstance(i, int) and 0 <= i < n and status in STATUSES and i not in out:
            out[i] = CheckResult(status, int(passed))
    return out


def _charged_status(result: SandboxResult) -> str:
    """What the job running when a batch died is charged with. (Not "blocked": an earlier job of the batch may have
    been refused something, caught the PermissionError and reported.)"""
    if result.returncode == -signal.SIGALRM or result.status == "timeout":
        return "timeout"
    return "memory" if result.status == "memory" else "error"


def _run_batch(jobs: Sequence[CheckJob], timeout_s: float, memory_mb: int) -> list[CheckResult]:
    done: list[CheckResult] = []
    while len(done) < len(jobs):
        pending = jobs[len(done) :]
        nonce = secrets.token_hex(8)
        result = run_python(_program(pending, timeout_s, nonce), timeout_s=timeout_s * len(pending) + BATCH_SLACK_S,
                            memory_mb=memory_mb, max_output_bytes=OUTPUT_BYTES)  # fmt: skip
        reported = _results(result, nonce, len(pending))
        for i in range(len(pending)):
            if i not in reported:
                done.append(CheckResult(_charged_status(result), 0))
                break
            done.append(reported[i])
    return done


def run_checks(jobs: Sequence[CheckJob], *, timeout_s: float = 2.0, memory_mb: int = 512, batch_size: int = 32,
               workers: int | None = None) -> list[CheckResult]:  # fmt: skip
    """One result per job, in order. Batches of `batch_size` jobs run in parallel on `workers` threads (default:
    one per CPU); each job gets `timeout_s` seconds; `memory_mb` bounds each batch's interpreter."""
    if timeout_s <= 0 or memory_mb <= 0 or batch_size < 1:
        raise ValueError(f"need timeout_s > 0, memory_mb > 0 and batch_size >= 1; got {timeout_s}, {memory_mb}, "
                         f"{batch_size}")  # fmt: skip
    batches = [jobs[i : i + batch_size] for i in range(0, len(jobs), batch_size)]
    with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
        per_batch = list(pool.map(lambda b: _run_batch(b, timeout_s, memory_mb), batches))
    return [r for batch in per_batch for r in batch]
