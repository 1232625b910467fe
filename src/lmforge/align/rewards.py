"""Rewards for reinforcement learning: plain functions from sampled replies to numbers.

A reward is a `RewardFn`: a list of `Sample`s (the prompt item, the decoded reply, whether it ended its turn and
its length in tokens) -> one float each. `REWARDS` holds a factory per name; `build_reward({name: weight, ...},
**options)` builds each named reward (every factory takes the options it names; an option none of them takes is an
error) and returns a `WeightedReward`, whose call gives the weighted sums and each reward's own values, for logging.

Rewards that run the reply's code ("doctests", "mbpp_tests") run it only in the sandbox
(lmforge.eval.sandbox_batch: many samples per sandboxed interpreter, a time limit per sample); the others only parse
or read it. A reward that cannot score an item (no tests, no answer) raises ValueError naming the reward and the
item's source on the first call that sees it, rather than scoring it 0.
"""

from __future__ import annotations

import ast
import inspect
import re
import textwrap
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from lmforge.align.prompts import PromptItem
from lmforge.eval.code import doctest_check
from lmforge.eval.sandbox_batch import CheckJob, run_checks
from lmforge.finetune import code_pairs

RewardFn = Callable[[Sequence["Sample"]], list[float]]

# A fenced block: its body up to the closing fence, or to the end of a reply cut off inside it.
_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)
# A number as a reply writes it: an optional minus (not one joining two numbers, as in "3-4"), an optional "$",
# digits with optional thousands commas and decimals.
_NUMBER = re.compile(r"(?:(?<![\w)])-)?\$?\d(?:[\d,]*\d)?(?:\.\d+)?")
_ANSWER_MARKS = re.compile(r"####|the answer is", re.IGNORECASE)


@dataclass(frozen=True)
class Sample:
    prompt: PromptItem
    completion: str  # the decoded reply, without the stop token
    ended: bool  # the reply ended its turn (a stop token) within the token limit
    tokens: int  # reply length in tokens


def _check_items(name: str, samples: Sequence[Sample], problem: Callable[[PromptItem], str | None]) -> None:
    """Raise when `problem` finds an item the reward cannot score: a reward that cannot apply must not score 0."""
    for s in samples:
        reason = problem(s.prompt)
        if reason is not None:
            raise ValueError(f"reward {name!r} cannot score the prompt at {s.prompt.meta.get('source', '?')}: {reason}")


def _lacks(key: str, who: str) -> Callable[[PromptItem], str | None]:
    return lambda item: None if item.meta.get(key) else f"it has no meta {key!r} ({who} carry it)"


def reply_code(reply: str) -> str:
    """The code of a reply: its first fenced block if it has one, else the whole reply."""
    fenced = _FENCE.search(reply)
    return fenced.group(1) if fenced else reply


def parses(code: str) -> bool:
    """Whether `code` parses as Python once dedented (never run)."""
    try:
        ast.parse(textwrap.dedent(code))  # a function body alone is indented
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return False
    return True


def final_number(reply: str) -> str | None:
    """The number a reply answers with: the first number after its last "####" or "The answer is" when it has one,
    else its last number; normalised ("$1,234." -> "1234", "3.50" -> "3.5"); None when there is none."""
    marks = list(_ANSWER_MARKS.finditer(reply))
    if marks:
        found = _NUMBER.search(reply, marks[-1].end())
        return normalise_number(found.group()) if found else None
    numbers = _NUMBER.findall(reply)
    return normalise_number(numbers[-1]) if numbers else None


def normalise_number(text: str) -> str | None:
    """A number's canonical spelling: no "$" or commas, no trailing zeros after the point, no "-0"."""
    try:
        value = Decimal(text.replace("$", "").replace(",", ""))
    except InvalidOperation:
        return None
    value = value.normalize() + 0  # + 0: -0 becomes 0
    return format(value, "f")


def ends_turn() -> RewardFn:
    """1 when the reply ended its turn within the token limit, else 0."""
    return lambda samples: [float(s.ended) for s in samples]


def completes_function() -> RewardFn:
    """1 when the reply ended its turn and meta code_prompt + the reply parse as one function with a body (the sft
    stage's generation check, lmforge.finetune.code_pairs.completes_function), else 0."""

    def reward(samples: Sequence[Sample]) -> list[float]:
        _check_items("completes_function", samples, _lacks("code_prompt", "docstring prompts"))
        return [float(s.ended and code_pairs.completes_function(s.prompt.meta["code_prompt"], s.completion))
                for s in samples]  # fmt: skip

    return reward


def chrf(hypothesis: str, reference: str, order: int = 6, beta: float = 2.0) -> float:
    """chrF (Popović, 2015): the F-beta score of character n-gram precision and recall, each the mean over
    n = 1..order, whitespace ignored (indentation and spacing do not count). Orders longer than the reference are
    left out; an order the hypothesis is too short for counts precision and recall 0. Repeated n-grams match at
    most as often as the other side has them. 0 when either side has no characters."""
    hyp, ref = "".join(hypothesis.split()), "".join(reference.split())
    orders = range(1, min(order, len(ref)) + 1)
    if not hyp or not orders:
        return 0.0
    precision = recall = 0.0
    for n in orders:
        h = Counter(hyp[i : i + n] for i in range(len(hyp) - n + 1))
        r = Counter(ref[i : i + n] for i in range(len(ref) - n + 1))
        matches = sum((h & r).values())
        precision += matches / max(1, sum(h.values())) / len(orders)
        recall += matches / sum(r.values()) / len(orders)
    if precision + recall == 0:
        return 0.0
    return (1 + beta**2) * precision * recall / (beta**2 * precision + recall)


def reference_similarity(*, chrf_beta: float = 2.0) -> RewardFn:
    """chrF (`chrf`, n-grams up to 6, recall weighted by `chrf_beta`) of the reply against meta reference (the
    pair's own body, which the prompt never shows): partial credit for a body close to the real one, where
    `completes_function` pays as much for `return self`."""

    def reward(samples: Sequence[Sample]) -> list[float]:
        _check_items("reference_similarity", samples, _lacks("reference", "docstring prompts"))
        return [chrf(s.completion, s.prompt.meta["reference"], beta=chrf_beta) for s in samples]

    return reward


def code_parses() -> RewardFn:
    """1 when the reply's code (its first fenced block, else the reply; dedented) parses as Python, else 0."""
    return lambda samples: [float(parses(reply_code(s.completion))) for s in samples]


def gsm8k_answer() -> RewardFn:
    """1 when the reply's final number (`final_number`) equals meta answer as a number, else 0."""

    def reward(samples: Sequence[Sample]) -> list[float]:
        _check_items("gsm8k_answer", samples, _lacks("answer", "GSM8K prompts"))
        out = []
        for s in samples:
            got = final_number(s.completion)
            out.append(float(got is not None and got == normalise_number(str(s.prompt.meta["answer"]))))
        return out

    return reward


def length(*, length_target: int | None = None, length_mode: str = "target",
           length_penalty: float = 0.01) -> RewardFn:  # fmt: skip
    """Shaping by the reply's token count n, towards T = `length_target`:
    mode "target": max(0, 1 - |n - T| / T) (1 at T, 0 at none or 2T and beyond);
    mode "penalty": -length_penalty * max(0, n - T) (0 up to T, then a penalty per extra token)."""
    if length_target is None or length_target < 1:
        raise ValueError(f"reward 'length' needs length_target >= 1 (tokens), got {length_target!r}")
    if length_mode == "target":
        return lambda samples: [max(0.0, 1.0 - abs(s.tokens - length_target) / length_target) for s in samples]
    if length_mode == "penalty":
        return lambda samples: [-length_penalty * max(0, s.tokens - length_target) for s in samples]
    raise ValueError(f"length_mode must be 'target' or 'penalty', got {length_mode!r}")


class SandboxReward:
    """A reward that runs code in the sandbox: per sample, the fraction of its job's tests that passed (0 when the
    code itself raised or the sample timed out). `statuses` counts the outcomes of every sample scored so far
    (passed, failed, timeout, blocked, memory, error, and not_run for replies not worth running), so timeouts and
    refusals show in the log."""

    def __init__(self, name: str, problem: Callable[[PromptItem], str | None],
                 job: Callable[[Sample], CheckJob | None], limits: dict[str, Any]) -> None:  # fmt: skip
        self.name, self.problem, self.job, self.limits = name, problem, job, limits
        self.statuses: Counter[str] = Counter()

    def __call__(self, samples: Sequence[Sample]) -> list[float]:
        _check_items(self.name, samples, self.problem)
        jobs = [self.job(s) for s in samples]
        results = iter(run_checks([j for j in jobs if j is not None], **self.limits))
        out = []
        for job in jobs:
            if job is None:
                self.statuses["not_run"] += 1
                out.append(0.0)
                continue
            result = next(results)
            self.statuses[result.status] += 1
            out.append(result.passed / len(job.tests))
        return out


def _examples(code: str) -> tuple[str, str] | None:
    """(name, raw docstring) of the function `code` starts with, when its docstring has >>> examples."""
    try:
        function = ast.parse(code).body[0]
    except (SyntaxError, ValueError, IndexError):
        return None
    if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return None
    doc = ast.get_docstring(function, clean=False)
    return (function.name, doc) if doc and ">>>" in doc else None


def _doctest_problem(item: PromptItem) -> str | None:
    if not item.meta.get("code_prompt"):
        return "it has no meta 'code_prompt' (docstring prompts carry it)"
    if _examples(item.meta["code_prompt"]) is None:
        return "its code_prompt is not a function whose docstring has >>> examples"
    return None


def _doctest_job(s: Sample) -> CheckJob | None:
    if not code_pairs.completes_function(s.prompt.meta["code_prompt"], s.completion):
        return None  # nothing to run: scores 0 without a sandbox call
    code = s.prompt.meta["code_prompt"] + "\n" + s.completion
    name, doc = _examples(code)  # type: ignore[misc]  # the prompt's docstring has examples: _doctest_problem
    return CheckJob(code, (doctest_check(name, doc, []) + f"check({name})\n",))


def doctests(*, timeout_s: float = 2.0, memory_mb: int = 512, batch_size: int = 32) -> RewardFn:
    """1 when meta code_prompt + the reply complete a function (`completes_function`) that passes its docstring's
    examples under doctest in the sandbox, else 0 (a reply that completes no function is not run)."""
    limits = {"timeout_s": timeout_s, "memory_mb": memory_mb, "batch_size": batch_size}
    return SandboxReward("doctests", _doctest_problem, _doctest_job, limits)


def _mbpp_job(s: Sample) -> CheckJob:
    return CheckJob(reply_code(s.completion) + "\n" + s.prompt.meta.get("test_setup", ""),
                    tuple(s.prompt.meta["tests"]))  # fmt: skip


def mbpp_tests(*, timeout_s: float = 2.0, memory_mb: int = 512, batch_size: int = 32) -> RewardFn:
    """The fraction of the item's MBPP asserts that pass, each run after the reply's code (`reply_code`) and the
    item's test_setup, in the sandbox; 0 when the code itself raises or the sample times out."""
    limits = {"timeout_s": timeout_s, "memory_mb": memory_mb, "batch_size": batch_size}
    return SandboxReward("mbpp_tests", _lacks("tests", "MBPP prompts"), _mbpp_job, limits)


REWARDS: dict[str, Callable[..., RewardFn]] = {
    "ends_turn": ends_turn,
    "completes_function": completes_function,
    "code_parses": code_parses,
    "doctests": doctests,
    "mbpp_tests": mbpp_tests,
    "gsm8k_answer": gsm8k_answer,
    "length": length,
    "reference_similarity": reference_similarity,
}


class WeightedReward:
    """The weighted sum of named rewards. Calling it gives (totals, parts): totals[i] = sum over names of
    weight * parts[name][i]."""

    def __init__(self, weights: Mapping[str, float], rewards: Mapping[str, RewardFn]) -> None:
        self.weights, self.rewards = dict(weights), dict(rewards)

    def __call__(self, samples: Sequence[Sample]) -> tuple[list[float], dict[str, list[float]]]:
        parts = {name: [float(v) for v in fn(samples)] for name, fn in self.rewards.items()}
        totals = [sum(self.weights[name] * parts[name][i] for name in parts) for i in range(len(samples))]
        return totals, parts

    def status_counts(self) -> dict[str, int]:
        """The sandbox outcomes so far of the rewards that run code, as {"<reward>/<status>": count}."""
        return {f"{name}/{status}": n for name, fn in self.rewards.items()
                for status, n in sorted(getattr(fn, "statuses", {}).items())}  # fmt: skip


def build_reward(weights: Mapping[str, float], **options: Any) -> WeightedReward:
    """The weighted sum of the rewards `weights` names; each reward gets the `options` its factory takes (e.g.
    length_target=64, timeout_s=1.0 for every reward that runs code)."""
    if not weights:
        raise ValueError(f"no rewards given; name at least one of {sorted(REWARDS)}")
    unknown = sorted(set(weights) - set(REWARDS))
    if unknown:
        raise ValueError(f"unknown reward {unknown[0]!r}; expected one of {sorted(REWARDS)}")
    accepted = {name: set(inspect.signature(REWARDS[name]).parameters) for name in weights}
    unused = sorted(set(options) - set().union(*accepted.values()))
    if unused:
        raise ValueError(f"option {unused[0]!r} is taken by none of the rewards {sorted(weights)}; they take "
                         f"{sorted(set().union(*accepted.values())) or 'no options'}")  # fmt: skip
    rewards = {name: REWARDS[name](**{k: v for k, v in options.items() if k in accepted[name]}) for name in weights}
    return WeightedReward({name: float(w) for name, w in weights.items()}, rewards)
