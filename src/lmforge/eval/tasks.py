"""Benchmark tasks: multiple choice by log-likelihood, LAMBADA, GSM8K and prompt -> reference generation.

Every task reads JSON Lines. A bad record (not JSON, a missing or mistyped key, a gold index out of range) is
skipped and counted with its file and line; the rest of the file is scored.

Multiple choice (`{"query", "choices", "gold"}`, the format of ARC, HellaSwag, PIQA, COPA and OpenBookQA files)
scores each choice as a continuation of the query. A task's delimiter joins the two: ARC, for example, reads
"Question: ...\nAnswer:" + " " + choice. Winogrande's partial scoring (`{"context_options", "continuation",
"gold"}`) puts each option in the context and scores the shared continuation. Two accuracies are reported, as the
field reports them:

- `acc`: the choice with the highest total log-probability;
- `acc_norm`: log-probability divided by the choice's length in characters (lm-evaluation-harness's acc_norm).

Each score comes with its number of examples, its standard error and a 95% Wilson interval. A task's `chance`
is the mean of 1 / number of choices.
"""

from __future__ import annotations

import json
import logging
import math
import re
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from lmforge.eval.scorer import LanguageModel, generate_until, loglikelihood
from lmforge.stats import proportion

log = logging.getLogger(__name__)
T_ = TypeVar("T_")

# Built-in task names -> (file name, delimiter between query and choice). The names and the delimiters follow the
# harnesses' prompt formats for these files.
MC_TASKS: dict[str, tuple[str, str]] = {
    "arc_easy": ("arc_easy.jsonl", "\nAnswer: "),
    "arc_challenge": ("arc_challenge.jsonl", "\nAnswer: "),
    "hellaswag": ("hellaswag.jsonl", " "),
    "piqa": ("piqa.jsonl", "Answer: "),
    "copa": ("copa.jsonl", " "),
    "openbook_qa": ("openbook_qa.jsonl", " "),
    "winogrande": ("winogrande.jsonl", " "),
}
# The Constitutional AI paper's 438 HHH evaluations: `hhh` scores the record's own question (the dialogue, both
# replies as options, "The answer is:") with the two option letters as the choices; `hhh_replies` scores the two
# replies themselves as continuations of the dialogue (text_correct / text_incorrect), which a small model that
# cannot answer a lettered question can still be measured on.
HHH_TASKS = {"hhh": "438HHHEvaluations.jsonl", "hhh_replies": "438HHHEvaluations.jsonl"}
OTHER_TASKS = {"lambada": "lambada_openai.jsonl", "gsm8k": "gsm8k.jsonl", **HHH_TASKS}
# Retrieval-augmented generation (lmforge.eval.rag_tasks): SQuAD 2.0's JSON file (found as *squad2*.json) and RGB's
# en_fact records (JSON Lines despite the .json name).
SQUAD_TASKS = {"squad_retrieval": "squad2.json", "squad_answer": "squad2.json"}
RGB_TASKS = {name: "rgb_en_fact.json" for name in ("rgb_counterfactual", "rgb_noise", "rgb_negative")}
RAG_TASKS = {**SQUAD_TASKS, **RGB_TASKS}
TASK_NAMES = (*MC_TASKS, *OTHER_TASKS, *RAG_TASKS)
_NO_SPACE_BEFORE = tuple(",.;:!?)'\"")


class TaskError(ValueError):
    """A task file that cannot be scored at all (missing, or no valid record)."""


@dataclass
class Skipped:
    """Bad records: how many, and the first few locations with the reason."""

    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, where: str, why: str) -> None:
        self.count += 1
        if len(self.examples) < 5:
            self.examples.append(f"{where}: {why}")


def records(path: Path, skipped: Skipped) -> Iterator[tuple[str, dict]]:
    """(file:line, record) for every JSON object line; other lines are skipped and counted."""
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"task file {path} does not exist")
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            where = f"{path}:{n}"
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                skipped.add(where, f"not JSON ({e.msg})")
                continue
            if not isinstance(rec, dict):
                skipped.add(where, f"a JSON {type(rec).__name__}, not an object")
                continue
            yield where, rec


@dataclass
class MCExample:
    """One question: choice i is contexts[i] + continuations[i]; `lengths` are the choices' lengths for acc_norm."""

    contexts: list[str]
    continuations: list[str]
    lengths: list[int]
    gold: int
    texts: list[str]  # the strings a contamination check looks for


def _split(delimiter: str, choice: str) -> tuple[str, str]:
    """(what the delimiter adds to the context, the continuation scored): the delimiter's words belong to the
    context, so that acc_norm divides only the choice's own log-probability; its trailing space, if any, begins
    the continuation, except before punctuation (", the man ..." continues a sentence without a space)."""
    space = " " if delimiter.endswith(" ") and not choice.startswith(_NO_SPACE_BEFORE) else ""
    return delimiter.rstrip(" "), space + choice


def _str_list(value: Any, key: str) -> list[str]:
    if not isinstance(value, list) or len(value) < 2 or not all(isinstance(v, str) for v in value):
        raise ValueError(f"'{key}' must be a list of at least 2 strings")
    return value


def _gold(rec: dict, n: int) -> int:
    gold = rec.get("gold")
    if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < n:
        raise ValueError(f"'gold' must be an integer in [0, {n}), got {gold!r}")
    return gold


def mc_example(rec: dict, delimiter: str) -> MCExample:
    """A multiple-choice record in either layout; raises ValueError naming the bad key."""
    if "context_options" in rec:  # partial scoring: the options differ in the context
        options = _str_list(rec["context_options"], "context_options")
        cont = rec.get("continuation")
        if not isinstance(cont, str) or not cont:
            raise ValueError("'continuation' must be a non-empty string")
        added, scored = _split(delimiter, cont)
        return MCExample([o + added for o in options], [scored] * len(options), [len(cont)] * len(options),
                         _gold(rec, len(options)), [*options, cont])  # fmt: skip
    if "query" not in rec or "choices" not in rec:
        raise ValueError(f"needs 'query' and 'choices' (or 'context_options' and 'continuation'); keys: {sorted(rec)}")
    query = rec["query"]
    if not isinstance(query, str):
        raise ValueError("'query' must be a string")
    choices = _str_list(rec["choices"], "choices")
    parts = [_split(delimiter, c) for c in choices]
    return MCExample([query + added for added, _ in parts], [scored for _, scored in parts],
                     [len(c) for c in choices], _gold(rec, len(choices)), [query, *choices])  # fmt: skip


def load_records(path: Path, parse: Callable[[dict], T_], what: str,
                 limit: int | None = None) -> tuple[list[T_], Skipped]:  # fmt: skip
    """Every record `parse` accepts, up to `limit`; a ValueError from `parse` skips the record with its reason."""
    skipped = Skipped()
    items: list[T_] = []
    for where, rec in records(path, skipped):
        try:
            items.append(parse(rec))
        except ValueError as e:
            skipped.add(where, str(e))
            continue
        if limit is not None and len(items) >= limit:
            break
    if not items:
        raise TaskError(f"{path} has no valid {what} record ({skipped.count} skipped: {skipped.examples})")
    return items, skipped


_ASSISTANT = "\n\nAssistant:"


def _one(rec: dict, key: str) -> str:
    value = rec.get(key)
    if not isinstance(value, list) or len(value) != 1 or not isinstance(value[0], str) or not value[0]:
        raise ValueError(f"'{key}' must be a list of one non-empty string, got {value!r}")
    return value[0]


def _reply(rec: dict, key: str) -> tuple[str, str]:
    """(the dialogue up to and including the last "\n\nAssistant:", the reply after it) of a transcript."""
    text = rec.get(key)
    cut = text.rfind(_ASSISTANT) if isinstance(text, str) else -1
    if cut < 0 or not text[cut + len(_ASSISTANT) :].strip():
        raise ValueError(f"'{key}' must be a transcript ending with an Assistant turn")
    return text[: cut + len(_ASSISTANT)], text[cut + len(_ASSISTANT) :]


def hhh_example(rec: dict, replies: bool = False) -> MCExample:
    """One HHH record ({prompt, corrects, incorrects, text_correct?, text_incorrect?}) as a two-way choice. The
    choices keep the order of the options the prompt shows ((A) before (B)), so a model that always prefers one
    position scores what that position's share of correct answers is, not 100%. With `replies`, the choices are the
    two replies as continuations of the shared dialogue."""
    prompt, correct, incorrect = rec.get("prompt"), _one(rec, "corrects"), _one(rec, "incorrects")
    if not isinstance(prompt, str) or not prompt:
        raise ValueError("'prompt' must be a non-empty string")
    gold = int(correct.strip() > incorrect.strip())  # the options' letters: " (A)" sorts before " (B)"
    if replies:
        (context, right), (other, wrong) = _reply(rec, "text_correct"), _reply(rec, "text_incorrect")
        if context != other:
            raise ValueError("'text_correct' and 'text_incorrect' must share the dialogue before the last reply")
        contexts, pair = [context, context], [right, wrong]
    else:
        contexts, pair = [prompt, prompt], [correct, incorrect]
    continuations = pair if gold == 0 else pair[::-1]
    return MCExample(contexts, continuations, [len(c) for c in continuations], gold, [contexts[0], *continuations])


def load_hhh(path: Path, limit: int | None = None, replies: bool = False) -> tuple[list[MCExample], Skipped]:
    return load_records(path, lambda rec: hhh_example(rec, replies), "HHH", limit)


def load_mc(path: Path, delimiter: str = " ", limit: int | None = None) -> tuple[list[MCExample], Skipped]:
    return load_records(path, lambda rec: mc_example(rec, delimiter), "multiple-choice", limit)


def score_mc(lm: LanguageModel, examples: list[MCExample], *, batch_size: int = 32, label: str = "mc",
             progress: bool = True) -> dict[str, Any]:  # fmt: skip
    """acc and acc_norm (with intervals) and chance of a multiple-choice task."""
    requests = [(c, x) for ex in examples for c, x in zip(ex.contexts, ex.continuations)]
    scores = loglikelihood(lm, requests, batch_size=batch_size, label=label, progress=progress)
    correct = correct_norm = 0
    i = 0
    for ex in examples:
        logps = [s for s, _ in scores[i : i + len(ex.contexts)]]
        i += len(ex.contexts)
        # Ties go to the first choice, as argmax does; a tie with gold elsewhere is not counted correct.
        correct += max(range(len(logps)), key=lambda j: logps[j]) == ex.gold
        normed = [lp / max(n, 1) for lp, n in zip(logps, ex.lengths)]
        correct_norm += max(range(len(normed)), key=lambda j: normed[j]) == ex.gold
    n = len(examples)
    return {"acc": proportion(correct, n), "acc_norm": proportion(correct_norm, n),
            "chance": sum(1 / len(ex.contexts) for ex in examples) / n, "n": n}  # fmt: skip


def _lambada_pair(rec: dict) -> tuple[str, str]:
    ctx, word = rec.get("context"), rec.get("continuation")
    if not isinstance(ctx, str) or not isinstance(word, str) or not word.strip():
        raise ValueError(f"needs string 'context' and non-empty 'continuation'; keys: {sorted(rec)}")
    return ctx.rstrip(" "), " " + word.strip()


def load_lambada(path: Path, limit: int | None = None) -> tuple[list[tuple[str, str]], Skipped]:
    return load_records(path, _lambada_pair, "LAMBADA", limit)


def score_lambada(lm: LanguageModel, pairs: list[tuple[str, str]], *, batch_size: int = 32,
                  progress: bool = True) -> dict[str, Any]:  # fmt: skip
    """Last-word accuracy (the greedy continuation is the word) and perplexity, exp of the mean negative
    log-likelihood of the word, as lm-evaluation-harness reports them."""
    scores = loglikelihood(lm, pairs, batch_size=batch_size, label="lambada", progress=progress)
    correct = sum(greedy for _, greedy in scores)
    mean_nll = -sum(s for s, _ in scores) / len(scores)
    return {"acc": proportion(correct, len(scores)), "perplexity": math.exp(min(mean_nll, 700.0)),
            "n": len(scores)}  # fmt: skip


_NUMBER = re.compile(r"-?[\d,]*\.?\d+")


def extract_number(text: str) -> str | None:
    """The answer a GSM8K completion gives: the number after '####' if present, else its last number."""
    marked = re.search(r"####\s*(-?[\d,]*\.?\d+)", text)
    found = marked.group(1) if marked else (_NUMBER.findall(text) or [None])[-1]
    if found is None:
        return None
    value = found.replace(",", "").rstrip(".")
    if "." in value:
        value = value.rstrip("0").rstrip(".")
    return value


def _gsm8k_item(rec: dict) -> tuple[str, str]:
    q, a = rec.get("question"), rec.get("answer")
    answer = extract_number(a) if isinstance(a, str) and "####" in a else None
    if not isinstance(q, str) or answer is None:
        raise ValueError("needs a string 'question' and an 'answer' ending in '#### <number>'")
    return q, answer


def load_gsm8k(path: Path, limit: int | None = None) -> tuple[list[tuple[str, str]], Skipped]:
    """(question, numeric answer) from GSM8K records: {"question", "answer": "...#### 42"}."""
    return load_records(path, _gsm8k_item, "GSM8K", limit)


def score_gsm8k(lm: LanguageModel, items: list[tuple[str, str]], *, max_new_tokens: int = 256, batch_size: int = 16,
                progress: bool = True, chat: bool = False) -> dict[str, Any]:  # fmt: skip
    """Greedy decoding of "Question: ...\\nAnswer:" (with `chat`, as a user message of the chat template), the answer
    extracted and compared exactly."""
    prompts = [f"Question: {q}\nAnswer:" for q, _ in items]
    outs = generate_until(lm, prompts, until=["\n\nQuestion:", "Question:"], max_new_tokens=max_new_tokens,
                          batch_size=batch_size, label="gsm8k", progress=progress, chat=chat)  # fmt: skip
    correct = sum(extract_number(o) == gold for o, (_, gold) in zip(outs, items))
    return {"exact_match": proportion(correct, len(items)), "n": len(items),
            "samples": [{"question": q, "completion": o, "gold": g} for (q, g), o in list(zip(items, outs))[:3]]}  # fmt: skip


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation and the articles a/an/the, collapse whitespace (SQuAD's normalisation)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _generation_item(rec: dict) -> tuple[str, list[str]]:
    prompt, ref = rec.get("prompt"), rec.get("reference")
    refs = [ref] if isinstance(ref, str) else ref
    if not isinstance(prompt, str) or not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
        raise ValueError("needs a string 'prompt' and a 'reference' string or list of strings")
    return prompt, refs


def load_generation(path: Path, limit: int | None = None) -> tuple[list[tuple[str, list[str]]], Skipped]:
    """(prompt, references) from {"prompt", "reference": str | [str, ...]} records."""
    return load_records(path, _generation_item, "prompt/reference", limit)


def score_generation(lm: LanguageModel, items: list[tuple[str, list[str]]], *, until: tuple[str, ...] = ("\n",),
                     max_new_tokens: int = 64, batch_size: int = 16, progress: bool = True,
                     chat: bool = False) -> dict[str, Any]:  # fmt: skip
    """Exact match (after stripping surrounding whitespace) and normalized match against any reference. With
    `chat`, each prompt is a user message of the chat template."""
    outs = generate_until(lm, [p for p, _ in items], until=until, max_new_tokens=max_new_tokens,
                          batch_size=batch_size, label="generate", progress=progress, chat=chat)  # fmt: skip
    exact = sum(o.strip() in [r.strip() for r in refs] for o, (_, refs) in zip(outs, items))
    norm = sum(normalize_answer(o) in {normalize_answer(r) for r in refs} for o, (_, refs) in zip(outs, items))
    return {"exact_match": proportion(exact, len(items)), "normalized_match": proportion(norm, len(items)),
            "n": len(items)}  # fmt: skip


def find_task_file(name: str, task_dir: Path) -> Path:
    """A built-in task's file under `task_dir` (searched recursively), e.g. arc_easy -> .../mc/arc_easy.jsonl."""
    wanted = MC_TASKS[name][0] if name in MC_TASKS else {**OTHER_TASKS, **RAG_TASKS}.get(name)
    if wanted is None:
        raise TaskError(f"unknown task {name!r}; built-in tasks: {list(TASK_NAMES)}, or give NAME=FILE.jsonl")
    stem, suffix = Path(wanted).stem, Path(wanted).suffix
    hits = sorted(p for p in Path(task_dir).rglob(f"*{suffix}") if p.name == wanted or stem in p.stem)
    if not hits:
        raise TaskError(f"task {name!r}: no {wanted} (or *{stem}*{suffix}) under {task_dir}; give NAME=FILE.jsonl")
    return hits[0]
