"""The eval stage: held-out loss and bits per byte of a checkpoint, the xz reference, and sample generations."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import List, Optional

import torch
import typer

from lmforge import verbs
from lmforge.io import atomic_write_json, atomic_write_text
from lmforge.data.readers import read_documents
from lmforge.eval.perplexity import XzMeter, score_texts
from lmforge.infer.engine import cap_new_tokens, generate
from lmforge.eval.config import EvalConfig
from lmforge.train.host import keep_freed_memory
from lmforge.device import resolve_device
from lmforge.registry import ReportContext, Stage, StageContext, register
from lmforge.report.format import fmt

log = logging.getLogger(__name__)

TEXT_EXTENSIONS = (".txt", ".py", ".md", ".jsonl", ".parquet")


def evaluate_checkpoint(
    checkpoint_dir: Path,
    text_source: Path | None,
    cfg: EvalConfig,
    out_dir: Path,
    *,
    device: str = "auto",
    text_field: str = "text",
    training_data: Path | None = None,
    code_files: list[Path] | None = None,
) -> dict:
    """Score a checkpoint; write results.json (metrics, task results, samples) and results.md (the score card).

    An lmforge checkpoint or a transformers model directory. `text_source` (any file or directory the readers
    accept) gives val_loss (nats/token), val_bpb, xz_bpb (what `xz -9e` achieves on the same documents, each on its
    own, as the model scores them), xz_concat_bpb and bpb_vs_xz. `cfg.tasks` and `cfg.code` add benchmarks;
    `training_data` (a curate stage directory, or any text source) adds each benchmark's contamination;
    `code_files` restricts the stdlib code task to those source files (the recipe passes its held-out files).
    """
    from lmforge.eval.scorer import load_language_model
    from lmforge.eval.suite import markdown_table, run_suite

    keep_freed_memory()
    dev = resolve_device(device)
    lm = load_language_model(checkpoint_dir, str(dev))
    # In lmforge's backbone (its checkpoints, and imported models): held-out scoring beside xz, and samples.
    lmforge_dir = lm.module is not None
    if lmforge_dir:
        model, tokenizer, args = lm.module, lm.tokenizer, lm.module.args
    metrics: dict = {}
    if text_source is not None:
        xz = " (and compressing each document with xz -9e, the reference)" if cfg.xz_reference and lmforge_dir else ""
        log.info("held-out: scoring the text in %s%s...", text_source, xz)
        texts = (d.text for d in read_documents(text_source, text_field=text_field, extensions=TEXT_EXTENSIONS))
        metrics.update(_held_out(model, tokenizer, args, texts, cfg, dev) if lmforge_dir
                       else _held_out_rolling(lm, texts, cfg))  # fmt: skip
    tasks = run_suite(lm, cfg, _training_texts(training_data) if training_data is not None else None, code_files)
    for name, r in tasks.items():
        for key in ("acc", "acc_norm", "exact_match"):
            if key in r:
                metrics[f"{name}/{key}"] = r[key]["value"]
        metrics.update({f"{name}/{k}": v for k, v in r.items() if k.startswith("pass@") and not k.endswith("ci95")})
    if lmforge_dir and cfg.samples:
        log.info("sample generations: %d of up to %d tokens...", cfg.samples, cfg.sample_tokens)
    samples = sample_generations(model, tokenizer, cfg, dev) if lmforge_dir else []
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "results.json", {"metrics": metrics, "tasks": tasks, "samples": samples})
    atomic_write_text(out_dir / "samples.md", _samples_markdown(samples))
    atomic_write_text(out_dir / "results.md", _score_card(metrics, tasks, markdown_table))
    return metrics


def _held_out(model, tokenizer, args, texts, cfg: EvalConfig, dev: torch.device) -> dict:  # noqa: ANN001
    xz = XzMeter() if cfg.xz_reference else None
    t0 = time.perf_counter()
    score = score_texts(
        model, tokenizer, texts, seq_len=args.max_seq_len, batch_size=cfg.batch_size,
        max_tokens=cfg.max_tokens, device=dev, sink=xz, stride=cfg.stride,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    if score.tokens == 0:
        raise ValueError("no text to evaluate in the held-out source")
    metrics = {
        "val_loss": score.loss,
        "val_bpb": score.bpb,
        "val_tokens": score.tokens,
        "val_bytes": score.bytes,
        "val_docs": score.docs,
        "eval_tokens_per_s": score.tokens / seconds,
    }
    if xz is not None:
        metrics.update(xz_bpb=xz.bpb, xz_concat_bpb=xz.concat_bpb, bpb_vs_xz=score.bpb / xz.bpb)
    log.info(
        "held-out: loss %.4f nats/token, %.4f bits/byte%s over %d tokens (%d bytes)",
        score.loss, score.bpb, f" (xz -9e per file {xz.bpb:.4f}, concatenated {xz.concat_bpb:.4f})" if xz else "",
        score.tokens, score.bytes,
    )  # fmt: skip
    return metrics


def _held_out_rolling(lm, texts, cfg: EvalConfig) -> dict:  # noqa: ANN001
    """Bits per byte of a transformers model: each document from BOS, over sliding windows."""
    from lmforge.eval.scorer import loglikelihood_rolling

    docs = list(texts)
    if cfg.max_tokens is not None:
        log.info("eval.max_tokens is not applied to transformers models; scoring all %d documents", len(docs))
    logps = loglikelihood_rolling(lm, docs, stride=cfg.stride, batch_size=cfg.batch_size)
    nbytes = sum(len(d.encode("utf-8")) for d in docs)
    return {"val_bpb": -sum(logps) / math.log(2) / max(nbytes, 1), "val_bytes": nbytes, "val_docs": len(docs)}


def _training_texts(path: Path):  # noqa: ANN202
    """The training texts for the contamination scan: a curate stage's train split, or any text source."""
    path = Path(path)
    if (path / "train").is_dir():
        from lmforge.data.curated import iter_split_texts

        return iter_split_texts(path, "train")
    return (d.text for d in read_documents(path, extensions=TEXT_EXTENSIONS))


def _score_card(metrics: dict, tasks: dict, table) -> str:  # noqa: ANN001
    parts = ["# Evaluation\n"]
    if "val_bpb" in metrics:
        parts.append(f"Held-out: {metrics['val_bpb']:.4f} bits/byte" + (
            f" ({metrics['bpb_vs_xz']:.3f} x xz -9e per file)" if "bpb_vs_xz" in metrics else "") + "\n")  # fmt: skip
    if tasks:
        parts.append(table(tasks))
    return "\n".join(parts)


def sample_generations(model, tokenizer, cfg: EvalConfig, device: torch.device) -> list[dict]:
    """`cfg.samples` generations, cycling through the prompts, reproducible (seeded by index); each at most
    cfg.sample_tokens long, or what the longest prompt leaves of the model's context (logged once)."""
    prompts = [cfg.prompts[i % len(cfg.prompts)] if cfg.prompts else "" for i in range(cfg.samples)]
    encoded = [[tokenizer.doc_start_id] + tokenizer.encode(p) for p in prompts]
    if not encoded:
        return []
    n = cap_new_tokens(cfg.sample_tokens, model.args.max_seq_len, max(map(len, encoded)), setting="eval.sample_tokens")
    out = []
    for i, (prompt, ids) in enumerate(zip(prompts, encoded)):
        new = generate(model, [ids], n, temperature=cfg.temperature, top_k=cfg.top_k, eos_id=tokenizer.eos_id,
                       seed=i)[0]  # fmt: skip
        out.append({"prompt": prompt, "completion": tokenizer.decode(new)})
    return out


def _samples_markdown(samples: list[dict]) -> str:
    parts = ["# Sample generations\n"]
    for i, s in enumerate(samples, 1):
        parts.append(f"## Sample {i}: prompt `{s['prompt']!r}`\n\n```python\n{s['prompt']}{s['completion']}\n```\n")
    return "\n".join(parts)


def _eval_stage(ctx: StageContext) -> dict:
    """Scores the model on the held-out text (when given), with the training data for contamination (when
    given): in a run, the curated val split and the curated data; under `lmforge eval`, --text and
    --training-data."""
    heldout = ctx.inputs.get("heldout_text")
    if heldout is not None and ctx.settings.data.val_fraction == 0:
        log.info(_NO_VAL_SPLIT)
        heldout = None
    metrics = evaluate_checkpoint(ctx.input("base_model"), heldout, ctx.settings.eval, ctx.out,
                                  device=ctx.settings.train.device, training_data=ctx.inputs.get("curated"))  # fmt: skip
    return metrics | ({"val_split": False} if ctx.settings.data.val_fraction == 0 else {})


_NO_VAL_SPLIT = "no held-out bits per byte: the run has no val split (data.val_fraction=0)"


def _eval_headline(ctx: ReportContext) -> list[str]:
    ev = ctx.metrics
    if ev.get("val_split") is False:
        return [f"**{_NO_VAL_SPLIT[0].upper()}{_NO_VAL_SPLIT[1:]}.**", ""]
    bpb = ev.get("val_bpb", float("inf"))
    verdict = "beats" if bpb < ev.get("xz_bpb", 0) else "does not beat"
    concat = "also beats" if bpb < ev.get("xz_concat_bpb", 0) else "does not beat"
    return [
        f"**Held-out bits per byte: {fmt(ev.get('val_bpb'))}** vs `xz -9e` {fmt(ev.get('xz_bpb'))} on the same files "
        f"compressed one by one (ratio {fmt(ev.get('bpb_vs_xz'), '.3f')}): the model {verdict} xz. With all "
        f"held-out files in one stream xz reaches {fmt(ev.get('xz_concat_bpb'))}, which the model {concat}.",
        "",
    ]


def _eval_report(ctx: ReportContext) -> list[str]:
    ev = ctx.metrics
    lines = [
        "## Evaluation",
        "",
    ] + ([f"- {_NO_VAL_SPLIT}"] if ev.get("val_split") is False else [
        f"- held-out loss {fmt(ev.get('val_loss'))} nats/token over {fmt(ev.get('val_tokens'))} tokens "
        f"({fmt(ev.get('val_bytes'))} bytes)",
        f"- bits per byte {fmt(ev.get('val_bpb'))}; xz -9e {fmt(ev.get('xz_bpb'))} per file, "
        f"{fmt(ev.get('xz_concat_bpb'))} concatenated",
        f"- scored at {fmt(ev.get('eval_tokens_per_s'), '.4g')} tokens/s",
    ]) + [""]
    card = ctx.stage_dir / "results.md"
    if card.exists() and "| task |" in card.read_text(encoding="utf-8"):
        table = card.read_text(encoding="utf-8")
        lines += ["### Benchmarks", "", table[table.index("| task |"):], ""]
    samples_md = ctx.stage_dir / "samples.md"
    if samples_md.exists():
        body = samples_md.read_text(encoding="utf-8").split("\n", 1)[1]
        lines += ["## Samples", body.replace("## Sample", "### Sample")]
    return lines


def eval_verb(
    checkpoint: Path = typer.Argument(..., help="A model: an lmforge checkpoint, a Hugging Face model "
                                      "directory, or a hub id in the local cache."),
    text: Optional[Path] = typer.Option(None, "--text", help="Held-out text for perplexity and bits per byte: a file "
                                        "or directory the readers accept."),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="Comma-separated benchmarks: built-in names found "
                                        "under --task-dir (arc_easy, arc_challenge, hellaswag, piqa, copa, "
                                        "openbook_qa, winogrande, lambada, gsm8k, hhh, hhh_replies; the RAG tasks "
                                        "squad_retrieval, squad_answer, rgb_counterfactual, rgb_noise, rgb_negative) "
                                        "or NAME=FILE.jsonl."),
    task_dir: Optional[Path] = typer.Option(None, "--task-dir", help="Where the built-in tasks' files are."),
    code: Optional[str] = typer.Option(None, "--code", help="Code execution tasks: humaneval, stdlib (comma-separated)."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="At most N examples per benchmark and N "
                                        "problems per code task (eval.limit, eval.code_limit)."),
    training_data: Optional[Path] = typer.Option(None, "--training-data", help="The model's training data (a curate "
                                                 "directory or text files): adds each benchmark's contamination."),
    out: Path = typer.Option(Path("eval-out"), "--out", "-o", help="Where results.json, results.md and samples.md go."),
    overrides: Optional[List[str]] = typer.Argument(None, help="eval.key=value settings (eval.limit=200 ...)."),
) -> None:
    """Score a checkpoint: held-out bits per byte, benchmarks with intervals and contamination, pass@k."""
    from lmforge.model.io import require_checkpoint

    extra = list(overrides or [])
    if tasks:
        extra.append(f"eval.tasks=[{', '.join(repr(t.strip()) for t in tasks.split(',') if t.strip())}]")
    if task_dir:
        extra.append(f"eval.task_dir={task_dir}")
    if code:
        extra.append(f"eval.code=[{', '.join(c.strip() for c in code.split(',') if c.strip())}]")
    if limit is not None:
        extra += [f"eval.limit={limit}", f"eval.code_limit={limit}"]
    if text is None and not tasks and not code:
        verbs.fail("nothing to evaluate: give --text, --tasks and/or --code", 2)
    cfg = verbs.settings(extra, {"eval"})
    require_checkpoint(checkpoint)  # a wrong path fails before the output folder is made
    with verbs.claimed(out, "eval"):
        verbs.run_stage(EVAL_STAGE, cfg, out, base_model=checkpoint, heldout_text=text, curated=training_data)
    typer.echo((out / "results.md").read_text(encoding="utf-8"))
    log.info("results in %s", out / "results.json")


# Evaluation scores the base model (pre-trained, or imported: what the held-out bits per byte measure), whether
# or not the recipe fine-tunes it afterwards.
EVAL_STAGE = register(Stage(
    name="eval", order=60, run=_eval_stage, sections={"eval": EvalConfig}, needs=("base_model", "heldout_text", "curated"),
    produces={"results": "results.json"}, report=_eval_report, headline=_eval_headline, verb=eval_verb,
))  # fmt: skip
