"""A score card: the benchmarks a recipe or `lmforge eval --tasks` names, each with its interval, the number of
examples and its overlap with the training data, as JSON and as a Markdown table."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lmforge.eval import tasks as T
from lmforge.eval.scorer import LanguageModel
from lmforge.eval.config import EvalConfig

log = logging.getLogger(__name__)


def parse_task(spec: str, task_dir: str | None) -> tuple[str, Path]:
    """'arc_easy' (found under task_dir) or 'name=path/to/file.jsonl'."""
    if "=" in spec:
        name, path = spec.split("=", 1)
        return name.strip(), Path(path)
    if task_dir is None:
        raise T.TaskError(f"task {spec!r} is a built-in name: set eval.task_dir (or --task-dir) to the directory "
                          "holding its file, or give NAME=FILE.jsonl")  # fmt: skip
    return spec, T.find_task_file(spec, Path(task_dir))


def task_kind(name: str, path: Path) -> str:
    """mc, rag, lambada, gsm8k or generation: from the built-in name, else from the first record's keys."""
    if name in T.MC_TASKS:
        return "mc"
    if name in T.RAG_TASKS:
        return "rag"
    if name in T.OTHER_TASKS:
        return name
    for _, rec in T.records(path, T.Skipped()):
        keys = set(rec)
        if {"query", "choices"} <= keys or {"context_options", "continuation"} <= keys:
            return "mc"
        if {"context", "continuation"} <= keys:
            return "lambada"
        if {"question", "answer"} <= keys:
            return "gsm8k"
        if {"prompt", "corrects", "incorrects"} <= keys:
            return "hhh"
        if {"prompt", "reference"} <= keys:
            return "generation"
        raise T.TaskError(f"{path}: cannot tell the task format from keys {sorted(keys)}; expected query/choices/gold, "
                          "context_options/continuation/gold, context/continuation, question/answer, "
                          "prompt/corrects/incorrects or prompt/reference")
    raise T.TaskError(f"{path} has no JSON records")


def run_task(lm: LanguageModel, name: str, path: Path, cfg: EvalConfig) -> tuple[dict[str, Any], list[list[str]]]:
    """One task's result and, per example, the texts the contamination check looks for."""
    kind = task_kind(name, path)
    t0 = time.perf_counter()
    opts = {"batch_size": cfg.batch_size}
    if kind == "rag":
        from lmforge.eval.rag_tasks import run_rag_task

        result, texts, skipped = run_rag_task(lm, name, path, cfg)
    elif kind == "mc":
        delimiter = T.MC_TASKS.get(name, ("", " "))[1]
        examples, skipped = T.load_mc(path, delimiter, cfg.limit)
        result = T.score_mc(lm, examples, label=name, **opts)
        texts = [ex.texts for ex in examples]
    elif kind in T.HHH_TASKS:
        examples, skipped = T.load_hhh(path, cfg.limit, replies=kind == "hhh_replies")
        result = T.score_mc(lm, examples, label=name, **opts)
        texts = [ex.texts for ex in examples]
    elif kind == "lambada":
        pairs, skipped = T.load_lambada(path, cfg.limit)
        result = T.score_lambada(lm, pairs, **opts)
        texts = [[c + x] for c, x in pairs]
    elif kind == "gsm8k":
        items, skipped = T.load_gsm8k(path, cfg.limit)
        result = T.score_gsm8k(lm, items, chat=cfg.chat_template, **opts)
        texts = [[q] for q, _ in items]
    else:
        gen, skipped = T.load_generation(path, cfg.limit)
        result = T.score_generation(lm, gen, chat=cfg.chat_template, **opts)
        texts = [[p, *refs] for p, refs in gen]
    seconds = time.perf_counter() - t0
    if cfg.chat_template and kind in ("gsm8k", "generation"):
        result["chat_template"] = True  # prompted as chat messages: not comparable with plain-prompt numbers
    result.update(kind=kind, file=str(path), skipped=skipped.count, skipped_examples=skipped.examples,
                  seconds=seconds, examples_per_s=result["n"] / seconds if seconds else None)  # fmt: skip
    if skipped.count:
        log.warning("%s: %d bad records skipped (first: %s)", name, skipped.count, skipped.examples[0])
    return result, texts


def run_suite(lm: LanguageModel, cfg: EvalConfig, training_texts: Iterable[str] | None = None,
              code_files: list[Path] | None = None) -> dict[str, Any]:  # fmt: skip
    """Every task of `cfg.tasks` (and `cfg.code`), then the contamination scan when training texts are given.
    `code_files` limits the stdlib code task to those files (a run's held-out files)."""
    results: dict[str, Any] = {}
    contamination_texts: dict[str, list[list[str]]] = {}
    for spec in cfg.tasks:
        name, path = parse_task(spec, cfg.task_dir)
        log.info("%s: scoring %s...", name, path)
        results[name], contamination_texts[name] = run_task(lm, name, path, cfg)
        log.info("%s: %s", name, headline(results[name]))
    for code_task in cfg.code:
        from lmforge.eval.code_tasks import run_code_task

        log.info("%s: generating %d completion(s) per problem and running them in the sandbox...", code_task,
                 cfg.code_samples)  # fmt: skip
        results[code_task], contamination_texts[code_task] = run_code_task(lm, code_task, cfg, code_files)
        log.info("%s: %s", code_task, headline(results[code_task]))
    if cfg.contamination and training_texts is not None and contamination_texts:
        from lmforge.eval.contamination import ContaminationIndex

        log.info("contamination: scanning the training data for the examples of %s...", ", ".join(contamination_texts))
        report = ContaminationIndex.build(contamination_texts).scan(training_texts)
        for name, c in report.items():
            results[name]["contamination"] = c
            log.info("contamination: %s: %d of %d examples seen in training", name, c["contaminated"], c["examples"])
    return results


MAIN_METRIC = ("acc_norm", "acc", "exact_match", "pass@1")


def headline(result: dict[str, Any]) -> str:
    parts = []
    for key in ("acc", "acc_norm", "exact_match", "normalized_match"):
        if key in result:
            m = result[key]
            parts.append(f"{key} {m['value']:.4f} [{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}]")
    for key in sorted(k for k in result if k.startswith("pass@") and not k.endswith("_ci95")):
        ci = result.get(f"{key}_ci95")
        parts.append(f"{key} {result[key]:.4f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""))
    for key, m in result.get("metrics", {}).items():  # the RAG tasks' named rates
        parts.append(f"{key} {m['value']:.4f} [{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}]")
    if "perplexity" in result:
        parts.append(f"perplexity {result['perplexity']:.4g}")
    return f"{', '.join(parts)} (n={result['n']})"


def markdown_table(results: dict[str, Any]) -> str:
    """One row per task and metric: value, 95% interval, examples, chance, contamination."""
    lines = ["| task | metric | value | 95% interval | n | chance | contaminated |", "|---|---|---:|---|---:|---:|---:|"]
    for name, r in results.items():
        c = r.get("contamination")
        dirty = f"{c['contaminated']}/{c['examples']} ({c['fraction']:.1%})" if c else "n/a"
        chance = f"{r['chance']:.3f}" if "chance" in r else ""
        named = [(key, r[key]) for key in ("acc", "acc_norm", "exact_match", "normalized_match") if key in r]
        for key, m in named + list(r.get("metrics", {}).items()):
            lines.append(f"| {name} | {key} | {m['value']:.4f} | [{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}] | "
                         f"{m['n']} | {chance} | {dirty} |")  # fmt: skip
        for key in sorted(k for k in r if k.startswith("pass@") and not k.endswith("_ci95")):
            ci = r.get(f"{key}_ci95")
            interval = f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
            lines.append(f"| {name} | {key} | {r[key]:.4f} | {interval} | {r['n']} |  | {dirty} |")
        if "perplexity" in r:
            lines.append(f"| {name} | perplexity | {r['perplexity']:.4g} |  | {r['n']} |  | {dirty} |")
    return "\n".join(lines) + "\n"


def dump(results: dict[str, Any]) -> str:
    return json.dumps(results, indent=2, default=float)
