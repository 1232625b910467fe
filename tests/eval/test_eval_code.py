"""Code evaluation: pass@k, the sandbox against hostile programs, HumanEval and stdlib doctest problems, sampling."""

from __future__ import annotations

import logging
import math
import os
import socket
import sysconfig
import time
import uuid
from pathlib import Path

import psutil
import pytest
import torch

from lmforge.eval.code import (
    CodeProblem,
    evaluate_code,
    generate_completions,
    humaneval_problems,
    pass_at_k,
    program_for,
    stdlib_doctest_problems,
    truncate_completion,
)
from lmforge.eval.sandbox import isolation_probe, run_python
from lmforge.eval.suite import headline, markdown_table
from lmforge.model.transformer import ModelArgs, Transformer
from lmforge.tokenizer import Tokenizer, train_tokenizer

# --- pass@k ---


@pytest.mark.parametrize(("n", "c", "k", "expected"), [
    (10, 0, 1, 0.0), (10, 10, 1, 1.0), (10, 10, 10, 1.0), (2, 1, 1, 0.5), (5, 2, 2, 0.7), (10, 3, 1, 0.3),
    (20, 3, 10, 1 - math.comb(17, 10) / math.comb(20, 10)), (5, 1, 5, 1.0), (200, 0, 100, 0.0),
])
def test_pass_at_k_hand_checked(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_product_form_equals_closed_form():
    for n in range(1, 26):
        for c in range(n + 1):
            for k in range(1, n + 1):
                closed = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(closed, abs=1e-9), (n, c, k)


@pytest.mark.parametrize(("n", "c", "k", "message"), [
    (5, 6, 1, "0 <= c <= n"), (5, -1, 1, "0 <= c <= n"), (5, 2, 0, "k >= 1"), (5, 2, 6, "at least 6 samples"),
])
def test_pass_at_k_rejects_bad_input(n, c, k, message):
    with pytest.raises(ValueError, match=message):
        pass_at_k(n, c, k)


# --- the sandbox ---


def _sandbox_processes(marker: str = "lmforge-sandbox-") -> set[int]:
    """Live processes whose command line holds `marker` (sandbox children carry their temp dir in argv)."""
    pids = set()
    for p in psutil.process_iter(["cmdline"]):
        if marker in " ".join(p.info["cmdline"] or []):
            pids.add(p.pid)
    return pids


def _assert_no_new_processes(before: set[int], marker: str = "lmforge-sandbox-") -> None:
    time.sleep(0.1)
    assert _sandbox_processes(marker) - before == set()


def test_correct_and_incorrect_solutions():
    test = "def check(candidate):\n    assert candidate(2, 3) == 5\n"
    problem = CodeProblem("t/add", "def add(a, b):\n", test, "add")
    assert run_python(program_for(problem, "    return a + b\n")).status == "passed"
    bad = run_python(program_for(problem, "    return a - b\n"))
    assert bad.status == "failed" and bad.returncode == 1 and "AssertionError" in bad.stderr


def test_infinite_loop_times_out_and_is_killed():
    before = _sandbox_processes()
    r = run_python("import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nwhile True: pass", timeout_s=1)
    assert r.status == "timeout" and r.returncode == -9
    assert 1.0 <= r.seconds < 3.0
    _assert_no_new_processes(before)


@pytest.mark.parametrize("program", [
    "import os\nwhile True: os.fork()",
    "import os, signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nif os.fork() == 0:\n    while True: pass",
    "import subprocess\nsubprocess.Popen(['sleep', '987.654'])",
    "import os\nos.system('sleep 987.654 &')",
    "import os\nos.posix_spawn('/bin/sleep', ['sleep', '987.654'], {})",
    "import os\nos.execv('/bin/sleep', ['sleep', '987.654'])",
    "import _posixsubprocess\n_posixsubprocess.fork_exec(*[None] * 22)",
])
def test_process_creation_is_blocked_and_nothing_survives(program):
    before, before_sleep = _sandbox_processes(), _sandbox_processes("987.654")
    r = run_python(program, timeout_s=3)
    assert r.status == "blocked", r.stderr
    assert "lmforge sandbox" in r.stderr and "PermissionError" in r.stderr
    _assert_no_new_processes(before)
    _assert_no_new_processes(before_sleep, "987.654")


def test_signals_to_other_processes_are_blocked():
    r = run_python(f"import os\nos.kill({os.getpid()}, 9)")
    assert (r.status, r.blocked_event) == ("blocked", "os.kill")


def test_writes_outside_the_sandbox_are_blocked(tmp_path):
    outside = Path("/tmp") / f"lmforge-test-{uuid.uuid4().hex}"
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "f.txt").write_text("x")
    programs = [
        f"open({str(outside)!r}, 'w').write('pwned')",
        f"import os\nos.close(os.open({str(outside)!r}, os.O_WRONLY | os.O_CREAT))",
        f"import os\nos.remove({str(victim)!r})",
        f"import os\nos.rename({str(victim)!r}, 'stolen.txt')",
        f"import shutil\nshutil.rmtree({str(tree)!r})",
        f"import pathlib\npathlib.Path({str(victim)!r}).write_text('changed')",
        f"import os\nos.symlink({str(victim)!r}, 'link')\nopen('link', 'w').write('changed')",
        f"import os\nos.chdir({str(tmp_path)!r})",
        f"import os\nos.chmod({str(victim)!r}, 0)",
    ]
    for program in programs:
        r = run_python(program)
        assert r.status == "blocked", (program, r.status, r.stderr)
    assert not outside.exists()
    assert victim.read_text() == "keep me" and (victim.stat().st_mode & 0o777) != 0
    assert (tree / "sub" / "f.txt").read_text() == "x"


def test_writes_inside_the_sandbox_work_and_the_directory_is_removed():
    program = (
        "import os, shutil, tempfile\n"
        "open('a.txt', 'w').write('hello')\n"
        "os.makedirs('d/e')\nshutil.copyfile('a.txt', 'd/e/b.txt')\nshutil.rmtree('d')\n"
        "with tempfile.NamedTemporaryFile() as f:\n    f.write(b'x')\n"
        "print(open('a.txt').read(), os.getcwd(), os.environ['HOME'] == os.getcwd() == tempfile.gettempdir())\n"
        "print(sorted(os.environ))\n"
    )
    r = run_python(program)
    assert r.status == "passed", r.stderr
    first, env = r.stdout.splitlines()
    text, cwd, same = first.split()
    assert (text, same) == ("hello", "True")
    assert not os.path.exists(cwd)
    assert set(eval(env)) <= {"PATH", "LANG", "HOME", "TMPDIR", "LC_CTYPE"}


@pytest.mark.parametrize("program", ["x = bytearray(10**10)", "x = []\nwhile True:\n    x.append(bytearray(10**6))"])
def test_huge_allocations_hit_the_memory_limit(program):
    r = run_python(program, memory_mb=256, timeout_s=10)
    assert r.status == "memory" or (r.status == "failed" and "MemoryError" in r.stderr), (r.status, r.stderr)
    assert psutil.Process().memory_info().rss < 4 << 30  # and we are still here


def test_network_is_blocked_and_the_listener_gets_nothing():
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        for program in [f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)",
                        f"import socket\ns = socket.socket()\ns.connect(('127.0.0.1', {port}))"]:
            r = run_python(program)
            assert r.status == "blocked", r.stderr
            assert r.blocked_event in ("socket.getaddrinfo", "socket.__new__")
        server.setblocking(False)
        with pytest.raises(BlockingIOError):
            server.accept()


@pytest.mark.parametrize("program", ["import ctypes", "import _ctypes", "import gc\ngc.get_objects()",
                                     "import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))"])
def test_escape_hatches_are_blocked(program):
    assert run_python(program).status == "blocked"


def test_output_is_truncated():
    program = "import sys\nsys.stdout.write('x' * 10_000_000)\nsys.stderr.write('e' * 5000)"
    r = run_python(program, max_output_bytes=1000)
    assert r.status == "passed" and r.truncated
    assert r.stdout == "x" * 1000 and r.stderr == "e" * 1000


def test_kernel_layers_when_the_machine_grants_them(tmp_path):
    probe = isolation_probe()
    assert probe["ran"]
    if not (probe["network_namespace"] and probe["readonly_fs"]):
        pytest.skip(f"namespaces not available here: {probe}")
    r = run_python("import socket\nprint([name for _, name in socket.if_nameindex()])")
    assert r.network_isolated and r.stdout.strip() == "['lo']"
    # mkfifo raises no audit event, so only the read-only mount stops it.
    fifo = tmp_path / "fifo"
    r = run_python(f"import os\nos.mkfifo({str(fifo)!r})")
    assert r.status == "failed" and "Read-only file system" in r.stderr
    assert not fifo.exists()


# --- problem sets ---


def test_humaneval_canonical_solutions_pass_and_empty_bodies_fail():
    problems = humaneval_problems()
    assert len(problems) == 164 and problems[0].task_id == "HumanEval/0"
    first = problems[:5]
    good = evaluate_code(first, [[p.solution] for p in first], ks=(1,))
    assert good["pass@1"] == 1.0 and good["status_counts"] == {"passed": 5}
    empty = evaluate_code(first, [["    pass\n"] for _ in first], ks=(1,))
    assert empty["pass@1"] == 0.0 and empty["status_counts"] == {"failed": 5}


def test_stdlib_doctest_problems_pass_with_their_own_bodies():
    problems = stdlib_doctest_problems(limit=3)
    assert len(problems) == 3
    stdlib = sysconfig.get_paths()["stdlib"]
    for p in problems:
        assert p.task_id.startswith("stdlib/") and f"def {p.entry_point}(" in p.prompt
        assert p.prompt.rstrip().endswith(('"""', "'''")) and ">>> " in p.prompt  # signature + docstring only
        assert (Path(stdlib) / p.task_id.removeprefix("stdlib/").split(":")[0]).exists()
    original = evaluate_code(problems, [[p.solution] for p in problems], ks=(1,))
    assert original["pass@1"] == 1.0
    wrong = evaluate_code(problems, [["    return None\n"] for _ in problems], ks=(1,))
    assert wrong["status_counts"].get("failed", 0) >= 1
    assert [p.task_id for p in stdlib_doctest_problems(limit=3, verify=False)] == [p.task_id for p in problems]


def test_truncate_completion():
    assert truncate_completion("    return x\n\ndef helper():\n    pass") == "    return x\n"
    assert truncate_completion("    return 1\nprint(f())") == "    return 1"
    assert truncate_completion("    return 1\n# tests\nassert f()") == "    return 1"
    assert truncate_completion("    return 1\nif __name__ == '__main__':\n    main()") == "    return 1"
    assert truncate_completion("    a = 1\nclass B:\n    pass\ndef c(): pass") == "    a = 1"
    assert truncate_completion("    x = 1  # fine\n    return x\n") == "    x = 1  # fine\n    return x\n"
    assert truncate_completion("") == ""


def test_evaluate_code_scores_and_interval():
    problem = CodeProblem("t/one", "def one():\n", "def check(candidate):\n    assert candidate() == 1\n", "one")
    right, wrong = "    return 1\n", "    return 0\n"
    r = evaluate_code([problem] * 4, [[right, right], [right, wrong], [wrong, wrong], [right, right]], ks=(1, 2, 10))
    assert r["pass@1"] == pytest.approx(0.625) and r["pass@2"] == pytest.approx(0.75) and "pass@10" not in r
    # Wilson at the estimated rate over 4 problems (worked by hand: centre 0.5638, half-width 0.3443).
    assert r["pass@1_ci95"] == pytest.approx([0.2194, 0.9081], abs=1e-4)
    assert r["pass@2_ci95"] == pytest.approx([0.3006, 0.9544], abs=1e-4) and "pass@10_ci95" not in r
    assert (r["n_problems"], r["n_samples"], r["status_counts"]) == (4, 8, {"passed": 5, "failed": 3})
    assert [x["passed"] for x in r["per_problem"]] == [2, 1, 0, 2]
    with pytest.raises(ValueError, match="completions for 1"):
        evaluate_code([problem] * 2, [[right]])


def test_pass_at_k_interval_is_wilson_even_when_nothing_passes():
    """0 of 19 problems passing is not certainty: the upper end is z^2 / (n + z^2), as for any other score."""
    problem = CodeProblem("t/one", "def one():\n", "def check(candidate):\n    assert candidate() == 1\n", "one")
    r = evaluate_code([problem] * 19, [["    return 0\n"]] * 19, ks=(1,))
    assert r["pass@1"] == 0.0
    assert r["pass@1_ci95"] == pytest.approx([0.0, 1.959964**2 / (19 + 1.959964**2)])  # [0, 0.168]
    assert "pass@1 0.0000 [0.000, 0.168]" in headline({**r, "n": 19})
    assert "| stdlib | pass@1 | 0.0000 | [0.000, 0.168] | 19 |" in markdown_table({"stdlib": {**r, "n": 19}})


# --- sampling ---


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:4]
    return train_tokenizer([f.read_text(encoding="utf-8") for f in files], vocab_size=300)


@pytest.fixture
def one_thread():
    """A tiny model gains nothing from threads; on a busy 2-core machine their spin-waits make it 100x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_generate_completions(tok, caplog, one_thread):
    torch.manual_seed(0)
    args = ModelArgs(vocab_size=tok.vocab_size, n_layers=1, d_model=32, n_heads=4, n_kv_heads=2, head_dim=8,
                     mlp_hidden=64, max_seq_len=64, init_std=0.2)
    model = Transformer(args).eval()
    prompts = ["def add(a, b):\n", "def f(x):\n    " + "x = x + 1\n    " * 100]  # the second exceeds the context
    with caplog.at_level(logging.WARNING):
        greedy = generate_completions(model, tok, prompts, n=3, temperature=0, max_new_tokens=16)
    assert "1 of 2 prompts" in caplog.text
    assert [len(c) for c in greedy] == [3, 3] and all(len(set(c)) == 1 for c in greedy)
    kw = dict(n=4, temperature=1.0, max_new_tokens=16, seed=7)
    sampled = generate_completions(model, tok, prompts, **kw)
    assert sampled == generate_completions(model, tok, prompts, **kw)
    assert len(set(sampled[0])) > 1  # a random model at temperature 1 does not repeat itself
    for text in [t for c in greedy + sampled for t in c]:
        assert truncate_completion(text) == text
    with pytest.raises(ValueError, match="no room for a prompt"):
        generate_completions(model, tok, prompts, n=1, temperature=0, max_new_tokens=64)
