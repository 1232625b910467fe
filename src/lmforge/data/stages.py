"""The data-preparation stages: `curate` (raw files -> curated train/val records), `tokenizer` (curated text ->
a BPE tokenizer, lmforge.tokenizer) and `shards` (curated text -> token shards). Their settings are `data`,
`tokenizer` and `shards` (lmforge.data.config, lmforge.tokenizer)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, List, Optional

import typer

from lmforge import verbs

from lmforge.data.config import DataConfig, ShardsConfig
from lmforge.tokenizer import TokenizerConfig, run_tokenizer
from lmforge.registry import ReportContext, Stage, StageContext, register
from lmforge.report.format import fmt
from lmforge.runs import files_fingerprint

log = logging.getLogger(__name__)


def source_fingerprint(settings: Any) -> dict[str, str]:
    """Fingerprint of the raw corpus (names, sizes and mtimes of its files): a changed file re-runs curate."""
    from lmforge.data.readers import stdlib_root, stdlib_source_files

    cfg: DataConfig = settings.data
    if cfg.source == "stdlib":
        return {"source": files_fingerprint(stdlib_source_files(cfg.include_tests), stdlib_root())}
    src = Path(cfg.source)
    if not src.exists():
        raise FileNotFoundError(f"data.source {src} does not exist; give a file or directory of text, or 'stdlib'")
    files = [src] if src.is_file() else [p for p in src.rglob("*") if p.is_file()]
    return {"source": files_fingerprint(files, None if src.is_file() else src)}


def _curate(ctx: StageContext) -> dict[str, Any]:
    from lmforge.data.curate import run_curate

    return run_curate(ctx.settings.data, ctx.out)


def _removed_table(cur: dict) -> list[str]:
    """The curate stage's removals by reason (its `removed_<reason>` metrics), largest first."""
    removed = sorted(((k[len("removed_"):], v) for k, v in cur.items() if k.startswith("removed_") and v),
                     key=lambda kv: (-kv[1], kv[0]))  # fmt: skip
    if not removed:
        return ["No document was removed.", ""]
    read = cur.get("docs_in") or 0
    lines = ["| reason | documents removed | share of documents read |", "|---|---:|---:|"]
    for reason, n in removed:
        lines.append(f"| {reason.replace('_', ' ')} | {n:,} | {fmt(n / read if read else None, '.1%')} |")
    return [*lines, ""]


def _curate_report(ctx: ReportContext) -> list[str]:
    cur = ctx.metrics
    return [
        "## Data",
        "",
        f"- documents read: {fmt(cur.get('docs_in'))}, kept: {fmt(cur.get('docs_kept'))} "
        f"(train {fmt(cur.get('docs_train'))}, validation {fmt(cur.get('docs_val'))}); bad records skipped: "
        f"{fmt(cur.get('docs_skipped_bad', 0))}",
        f"- bytes: train {fmt(cur.get('bytes_train'))}, validation {fmt(cur.get('bytes_val'))}",
        "",
        *_removed_table(cur),
    ]


def _adopt_tokenizer(model_dir: Path, curate_dir: Path, out: Path) -> dict[str, Any]:
    """The imported model's tokenizer, copied into the stage's folder, and how well it compresses the data."""
    from lmforge.data.curated import iter_split_texts
    from lmforge.tokenizer import Tokenizer, bytes_per_token

    tok = Tokenizer.from_dir(model_dir)
    tok.save_dir(out)
    has_val = next(iter_split_texts(curate_dir, "val"), None) is not None
    bpt = bytes_per_token(tok, iter_split_texts(curate_dir, "val" if has_val else "train"))
    return {"vocab_size": tok.vocab_size, "adopted_from": str(model_dir), "bytes_per_token": round(bpt, 4)}


def _tokenizer_stage(ctx: StageContext) -> dict[str, Any]:
    if ctx.settings.model.init_from:  # continued pre-training keeps the imported model's tokenizer
        from lmforge.hub import resolve_model_dir

        return _adopt_tokenizer(resolve_model_dir(ctx.settings.model.init_from), ctx.input("curated"), ctx.out)
    return run_tokenizer(ctx.input("curated"), ctx.settings.tokenizer, ctx.out)


def _tokenizer_report(ctx: ReportContext) -> list[str]:
    tok = ctx.metrics
    on = "held-out text" if tok.get("bytes_per_token_split", "val") == "val" else "the training text (no val split)"
    return ["## Tokenizer", "", f"- vocabulary: {fmt(tok.get('vocab_size'))} tokens; "
            f"{fmt(tok.get('bytes_per_token'), '.3f')} bytes per token on {on}", ""]  # fmt: skip


def tokenizer_verb(
    curated: Path = typer.Argument(..., help="A curate output directory (train/, val/)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory for tokenizer.json."),
    overrides: Optional[List[str]] = typer.Argument(None, help="tokenizer.key=value settings."),
) -> None:
    """Train a byte-level BPE tokenizer on curated text."""
    cfg = verbs.settings(list(overrides or []), {"tokenizer"})
    with verbs.claimed(out, "tokenizer"):
        metrics = verbs.run_stage(TOKENIZER, cfg, out, curated=curated)
    log.info("vocabulary %s, %.3f bytes/token -> %s", metrics["vocab_size"], metrics["bytes_per_token"], out)


def _shards(ctx: StageContext) -> dict[str, Any]:
    from lmforge.data.shards import run_shards

    return run_shards(ctx.input("curated"), ctx.input("tokenizer"), ctx.settings.shards, ctx.out)


def _shards_report(ctx: ReportContext) -> list[str]:
    sh = ctx.metrics
    return ["## Token shards", "", f"- train tokens: {fmt(sh.get('train_tokens'))}, validation tokens: "
            f"{fmt(sh.get('val_tokens'))}; tokenized at {fmt(sh.get('tokens_per_s'), '.3g')} tokens/s", ""]  # fmt: skip


def curate_verb(
    source: str = typer.Argument(..., help="'stdlib', or a file or directory of text, code, JSONL, CSV, "
                                 "Parquet, WARC/WET or HTML, or a dataset saved with HF datasets."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (train/, val/, stats.json, histograms.png)."),
    overrides: Optional[List[str]] = typer.Argument(None, help="data.key=value settings."),
    workers: Optional[int] = typer.Option(None, "--workers", "-w", help="Parallel workers (default: all cores)."),
    executor: Optional[str] = typer.Option(None, "--executor", help="'local' (process pool) or 'ray'."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Ray cluster address; default: local Ray."),
    recipe: Optional[str] = typer.Option(None, "--recipe", "-r", help="Take the data settings of this recipe "
                                         "(e.g. 'web'), then apply the overrides."),
) -> None:
    """Read, normalise, filter, deduplicate and split a corpus into curated shards."""
    flags = [f"data.{k}={v}" for k, v in
             (("workers", workers), ("executor", executor), ("ray_address", ray_address)) if v is not None]  # fmt: skip
    settings = list(overrides or []) + flags + [f"data.source={source}"]
    if recipe is None:
        cfg = verbs.settings(settings, {"data"})
    else:
        for item in settings:
            if not item.startswith("data."):
                verbs.fail(f"override '{item}': this command takes settings under ['data']", 2)
        cfg = verbs.recipe_settings(recipe, settings)
    with verbs.claimed(out, "curate"):
        metrics = verbs.run_stage(CURATE, cfg, out)
    log.info("kept %s of %s documents -> %s", metrics["docs_kept"], metrics["docs_in"], out)


def shards_verb(
    curated: Path = typer.Argument(..., help="A curate output directory."),
    tokenizer_path: Path = typer.Option(..., "--tokenizer", "-t", help="tokenizer.json"),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory for token shards."),
    overrides: Optional[List[str]] = typer.Argument(None, help="shards.key=value settings."),
) -> None:
    """Tokenize curated text into memory-mapped token shards."""
    cfg = verbs.settings(list(overrides or []), {"shards"})
    with verbs.claimed(out, "shards"):
        metrics = verbs.run_stage(SHARDS, cfg, out, curated=curated, tokenizer=tokenizer_path)
    log.info("%s train / %s validation tokens -> %s", metrics["train_tokens"], metrics["val_tokens"], out)


def _trains_own_model(settings) -> bool:
    """A recipe that imports a pre-trained model (model.init_from) needs no tokenizer or shards by default: the
    model brings its tokenizer, and only continued pre-training (pretrain added to the stages) reads shards."""
    return not settings.model.init_from


def _tokenizer_config(settings: Any) -> dict[str, Any]:
    """A tokenizer trained with these settings, or the imported model's (model.init_from), which it then copies."""
    if settings.model.init_from:
        return {"adopted_from": settings.model.init_from}
    return settings.tokenizer.semantic()


def _tokenizer_sources(settings: Any) -> dict[str, str]:
    """The imported model's files, as the import stage and pretrain fingerprint them: a replaced model re-runs."""
    if not settings.model.init_from:
        return {}
    from lmforge.hub import resolve_model_dir
    from lmforge.outdir import inputs_fingerprint

    return {"model": inputs_fingerprint(resolve_model_dir(settings.model.init_from))}


CURATE = register(Stage(
    name="curate", order=10, run=_curate, sections={"data": DataConfig}, sources=source_fingerprint,
    produces={"curated": ".", "heldout_text": "val"}, report=_curate_report, verb=curate_verb,
))  # fmt: skip
TOKENIZER = register(Stage(
    name="tokenizer", order=20, run=_tokenizer_stage, sections={"tokenizer": TokenizerConfig}, needs=("curated",),
    produces={"tokenizer": "tokenizer.json"}, report=_tokenizer_report, verb=tokenizer_verb,
    default=_trains_own_model, config=_tokenizer_config, sources=_tokenizer_sources,
))  # fmt: skip
SHARDS = register(Stage(
    name="shards", order=30, run=_shards, sections={"shards": ShardsConfig}, needs=("curated", "tokenizer"),
    produces={"shards": "."}, report=_shards_report, verb=shards_verb, default=_trains_own_model,
))  # fmt: skip
