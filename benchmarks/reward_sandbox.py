"""Throughput of the rewards that run generated code: batched sandbox calls against one interpreter per sample.

    python benchmarks/reward_sandbox.py
    python benchmarks/reward_sandbox.py --smoke    # seconds: 16 samples of each kind

Two kinds of samples, scored with `lmforge.align.rewards.build_reward` as GRPO scores a rollout:
- mbpp_tests: the reference solutions of the first MBPP items (../shared/data/code/mbpp.jsonl), each run with its
  three asserts (all pass, apart from items too slow for the time limit);
- doctests: standard-library functions with >>> examples that need only builtins (lmforge.eval.code's doctest
  tasks whose prompt has no import header; there are few, so they repeat): the prompt is the signature and
  docstring, the reply the real body.
Each set is scored with the default batching (32 samples per interpreter, one thread per CPU) and with
batch_size=1, today's one-interpreter-per-sample way of lmforge.eval.code. The last line sums up as key=value pairs.
"""

from __future__ import annotations

import argparse
import time
from itertools import cycle, islice
from pathlib import Path

from lmforge.align.prompts import PromptItem, read_prompts
from lmforge.align.rewards import Sample, build_reward
from lmforge.eval.code import stdlib_doctest_problems, stdlib_files
from lmforge.finetune.data import Message

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
# The standard-library modules (Python 3.11) that hold doctest functions needing only builtins.
DOCTEST_FILES = ("_pydecimal.py", "difflib.py", "pickle.py")


def mbpp_samples(n: int) -> list[Sample]:
    items, _ = read_prompts(SHARED / "code/mbpp.jsonl", limit=n)
    return [Sample(item, item.meta["reference"], True, 0) for item in items]


def doctest_samples(n: int) -> list[Sample]:
    """Standard-library functions that need nothing but builtins (lmforge.eval.code's doctest tasks without an
    import header: a handful), prompted with their signature and docstring, answered with their own body, repeated
    to `n` samples."""
    files = [p for p in stdlib_files() if p.name in DOCTEST_FILES]  # reading the whole library takes 10 s
    out = []
    for problem in stdlib_doctest_problems(files, verify=False):
        if problem.prompt.startswith("def "):
            code_prompt = problem.prompt.rstrip("\n")
            item = PromptItem([Message("user", code_prompt)], {"code_prompt": code_prompt, "source": problem.task_id})
            out.append(Sample(item, problem.solution, True, 0))
    if not out:
        raise SystemExit(f"no builtins-only doctest functions in {DOCTEST_FILES} of this Python's library")
    return list(islice(cycle(out), n))


def measure(name: str, samples: list[Sample], batch_size: int) -> tuple[float, float]:
    reward = build_reward({name: 1.0}, batch_size=batch_size)
    start = time.perf_counter()
    totals, _ = reward(samples)
    seconds = time.perf_counter() - start
    return len(samples) / seconds, sum(totals) / len(totals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="16 samples of each kind")
    parser.add_argument("--samples", type=int, default=256)
    args = parser.parse_args()
    n = 16 if args.smoke else args.samples
    summary: dict[str, str] = {}
    print(f"| reward | samples | batch_size | samples/s | mean reward |\n|---|---|---|---|---|")
    for name, samples in (("mbpp_tests", mbpp_samples(n)), ("doctests", doctest_samples(n))):
        rates = {}
        for batch_size in (32, 1):
            rate, mean = measure(name, samples, batch_size)
            rates[batch_size] = rate
            print(f"| {name} | {len(samples)} | {batch_size} | {rate:.1f} | {mean:.3f} |")
        summary |= {f"{name}_batched_per_s": f"{rates[32]:.1f}", f"{name}_unbatched_per_s": f"{rates[1]:.1f}",
                    f"{name}_speedup": f"{rates[32] / rates[1]:.2f}"}  # fmt: skip
    print(" ".join(f"{k}={v}" for k, v in {"samples": str(n), **summary}.items()))


if __name__ == "__main__":
    main()
