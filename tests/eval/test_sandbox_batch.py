"""Batched sandbox checks: per-job results in order, tests counted, and a job that hangs, crashes, floods its
output or is refused something charged alone while the rest of its batch still runs, in few sandbox calls."""

import pytest

import lmforge.eval.sandbox_batch as sandbox_batch
from lmforge.eval.sandbox_batch import CheckJob, CheckResult, run_checks

GOOD = CheckJob("def f(x):\n    return x + 1\n", ("assert f(1) == 2", "assert f(2) == 4", "assert f(3) == 4"))


def test_results_in_order_with_tests_counted():
    jobs = [GOOD, CheckJob("x = 1", ("assert x == 1",)), CheckJob("def (", ("assert True",)),
            CheckJob("raise SystemExit(0)", ("assert True",)), CheckJob("print('noise' * 1000)")]  # fmt: skip
    assert run_checks(jobs, timeout_s=2) == [CheckResult("failed", 2), CheckResult("passed", 1),
                                             CheckResult("failed", 0), CheckResult("failed", 0),
                                             CheckResult("passed", 0)]  # fmt: skip


def test_jobs_do_not_share_globals():
    jobs = [CheckJob("secret = 1"), CheckJob("pass", ("assert 'secret' not in globals()",))]
    assert run_checks(jobs, batch_size=2) == [CheckResult("passed", 0), CheckResult("passed", 1)]


def test_bad_jobs_are_charged_alone_and_the_rest_still_run(monkeypatch, tmp_path):
    calls = []
    real = sandbox_batch.run_python
    monkeypatch.setattr(sandbox_batch, "run_python", lambda *a, **k: calls.append(1) or real(*a, **k))
    target = tmp_path / "escaped"
    jobs = [
        CheckJob(f"import os\nos.system('touch {target}')"),  # refused by the audit hook, caught by the harness
        CheckJob("while True:\n    try:\n        pass\n    except BaseException:\n        pass"),  # catches anything
        CheckJob("sum(range(10 ** 12))"),  # a C loop: no Python-level handler could stop it
        CheckJob("import os\nos._exit(0)"),  # the interpreter ends without reporting
        CheckJob("x = bytearray(1 << 40)"),
        CheckJob("import os\nos.write(1, b'x' * (2 << 20))"),  # floods the result pipe
        GOOD,
    ]
    results = run_checks(jobs, timeout_s=0.5, batch_size=len(jobs))
    assert [r.status for r in results] == ["blocked", "timeout", "timeout", "error", "memory", "error", "failed"]
    assert results[-1].passed == 2 and not target.exists()
    assert len(calls) == 5  # one batch, then a fresh one after each of the four jobs that ended the interpreter


def test_batches_and_validation(monkeypatch):
    calls = []
    real = sandbox_batch.run_python
    monkeypatch.setattr(sandbox_batch, "run_python", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert run_checks([GOOD] * 10, batch_size=4, workers=1) == [CheckResult("failed", 2)] * 10
    assert len(calls) == 3
    assert run_checks([]) == []
    with pytest.raises(ValueError, match="batch_size >= 1"):
        run_checks([GOOD], batch_size=0)
