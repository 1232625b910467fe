"""Start from a pre-trained model: `lmforge import` and the recipe's `import` stage.

Every command that takes a checkpoint also reads a Hugging Face model directory (config.json + safetensors) or a
hub id already in the local Hugging Face cache: lmforge.model.io loads it into lmforge's backbone on the fly,
memory-mapped (lmforge.model.hf_import), with its own tokenizer and chat template. `lmforge import DIR -o CKPT`
converts it once into an lmforge checkpoint (weights in the stored dtype unless --dtype says otherwise, the
tokenizer files, and `source.json` naming where it came from), so that later runs need neither the original
folder nor the conversion.

In a recipe, `model.init_from: DIR` makes the import stage part of the default stages, in place of the tokenizer,
shards and pretrain stages: the recipe evaluates, fine-tunes and exports the imported model. Listing pretrain
instead (with tokenizer and shards) continues pre-training it on the recipe's data; the import stage then has
nothing to do and is refused, so that a recipe says one thing.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
import typer

from lmforge import verbs
from lmforge.hub import resolve_model_dir
from lmforge.io import staged_dir
from lmforge.model.io import TOKENIZER, load_checkpoint_tokenizer, load_model, write_model_files
from lmforge.outdir import inputs_fingerprint, write_marker
from lmforge.registry import ReportContext, Stage, StageContext, register
from lmforge.report.format import fmt

log = logging.getLogger(__name__)

DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SOURCE = "source.json"  # where an imported checkpoint came from


def import_model(source: str | Path, out_dir: Path, dtype: str = "auto") -> dict[str, Any]:
    """Convert the model `source` names (a model directory or a cached hub id) into the lmforge checkpoint
    `out_dir`, written atomically. dtype "auto" keeps the stored one. Returns what the manifest keeps."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; choose one of {', '.join(DTYPES)}")
    start = time.perf_counter()
    model_dir = resolve_model_dir(str(source))
    model, args = load_model(model_dir, dtype=DTYPES[dtype])
    tokenizer = load_checkpoint_tokenizer(model_dir)
    stored = str(next(model.parameters()).dtype).removeprefix("torch.")
    hf_config = model_dir / "config.json"  # absent when the source is an lmforge checkpoint
    config = json.loads(hf_config.read_text(encoding="utf-8")) if hf_config.is_file() else {}
    provenance = {"source": str(source), "path": str(model_dir.resolve()), "model_type": config.get("model_type"),
                  "architectures": config.get("architectures"), "dtype": stored}  # fmt: skip
    with staged_dir(Path(out_dir)) as tmp:  # the whole checkpoint appears at once, replacing an earlier import
        write_model_files(model, args, tmp, model_dir / TOKENIZER)  # its other tokenizer files go along
        (tmp / SOURCE).write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
        write_marker(tmp, "import")
    metrics = {
        **provenance,
        "params": model.num_params(),
        "vocab_size": args.vocab_size,
        "max_seq_len": args.max_seq_len,
        "chat_template": tokenizer.has_chat_template,
        "seconds": round(time.perf_counter() - start, 3),
    }
    log.info("imported %s (%s, %.1fM parameters, %s) into %s in %.1f s", source, config.get("model_type", "lmforge"),
             metrics["params"] / 1e6, stored, out_dir, metrics["seconds"])  # fmt: skip
    return metrics


def _import_stage(ctx: StageContext) -> dict[str, Any]:
    return import_model(ctx.settings.model.init_from, ctx.out / "final")


def _check(settings: Any) -> None:
    if not settings.model.init_from:
        raise ValueError("the import stage imports model.init_from, which is unset: set it to a Hugging Face model "
                         "directory, a hub id in the local cache, or an lmforge checkpoint")  # fmt: skip


def _config(settings: Any) -> dict[str, Any]:
    return {"init_from": settings.model.init_from}


def _sources(settings: Any) -> dict[str, str]:
    """The imported folder's files (names, sizes, times): a model replaced on disk is imported again."""
    return {"model": inputs_fingerprint(resolve_model_dir(settings.model.init_from))}


def _report(ctx: ReportContext) -> list[str]:
    m = ctx.metrics
    return ["## Imported model", "",
            f"- from `{m.get('source')}` ({m.get('model_type') or 'lmforge checkpoint'}, stored as {m.get('dtype')})",
            f"- parameters: {fmt(m.get('params'))}; vocabulary {fmt(m.get('vocab_size'))}; context "
            f"{fmt(m.get('max_seq_len'))} tokens; chat template: {'yes' if m.get('chat_template') else 'none'}",
            f"- converted in {fmt(m.get('seconds'), '.1f')} s", ""]  # fmt: skip


def import_verb(
    source: str = typer.Argument(..., help="A Hugging Face model directory (config.json + safetensors), a hub id "
                                 "already in the local Hugging Face cache, or an lmforge checkpoint."),
    out: Path = typer.Option(..., "--out", "-o", help="Output checkpoint directory (new, empty, or an earlier "
                             "import, which it replaces)."),
    dtype: str = typer.Option("auto", help="auto (keep the stored dtype) | float32 | bfloat16 | float16"),
) -> None:
    """Convert a pre-trained model into an lmforge checkpoint, with its tokenizer and chat template. Llama
    (Llama 3 rope scaling included), Qwen2/2.5, Qwen3, Mistral and GPT-2 load; anything else is refused naming
    the config field. Never downloads: a hub id must already be on disk."""
    if dtype not in DTYPES:
        verbs.fail(f"--dtype {dtype!r}; choose one of {', '.join(DTYPES)}", 2)
    try:
        resolve_model_dir(source)  # a missing model fails before the output folder is made
    except FileNotFoundError as e:
        verbs.fail(str(e), 2)
    with verbs.claimed(out, "import"):
        metrics = import_model(source, out, dtype)
    typer.echo(f"imported {source} -> {out} ({metrics['params'] / 1e6:.1f}M parameters, {metrics['dtype']})")


IMPORT_STAGE = register(Stage(
    name="import", order=45, run=_import_stage, produces={"model": "final", "base_model": "final"},
    default=lambda settings: bool(settings.model.init_from), check=_check, config=_config, sources=_sources,
    report=_report, verb=import_verb,
))  # fmt: skip
