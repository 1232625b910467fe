"""The `lmforge` command: one verb per lifecycle stage, each a thin call into one function."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, List, Optional

import click
import typer
from typer.core import TyperGroup

from lmforge.recipe import RecipeError, load_recipe, validate_recipe

VERBOSE_FLAGS = ("-v", "--verbose")


class _Verbs(TyperGroup):
    """The verb group, taking -v/--verbose after the verb too (`lmforge run -v`): it is moved before the verb.
    `lmforge lm-eval` keeps its arguments as given: they are lm-eval's own (where -v is --verbosity)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        verb = next((i for i, a in enumerate(args) if not a.startswith("-")), None)
        if verb is not None and args[verb] != "lm-eval":
            rest = args[verb + 1 :]
            end = rest.index("--") if "--" in rest else len(rest)  # after `--` every word is an argument
            if any(a in VERBOSE_FLAGS for a in rest[:end]):
                kept = [a for a in rest[:end] if a not in VERBOSE_FLAGS]
                args = [*args[:verb], "--verbose", args[verb], *kept, *rest[end:]]
        return super().parse_args(ctx, args)


app = typer.Typer(
    cls=_Verbs,
    help="lmforge: curate data, train a tokenizer, pre-train, evaluate, generate, export and report - "
    "the whole language-model lifecycle on a laptop CPU.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
log = logging.getLogger("lmforge")

OVERRIDES_HELP = "Settings as section.key=value (e.g. train.max_steps=200 model.depth=3)."


def _setup_logging(verbose: bool) -> None:
    import os

    from rich.console import Console
    from rich.logging import RichHandler

    # Under torchrun only rank 0 reports progress; the other ranks speak up for warnings and errors, named.
    rank = int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    level = logging.DEBUG if verbose else logging.INFO
    if rank:
        level = max(level, logging.WARNING)
    fmt = "%(message)s" if rank is None else f"[rank {rank}] %(message)s"
    # Logs go to standard error, so standard output carries only what a verb produces (`generate > out.txt`).
    console = Console(stderr=True)
    if console.is_terminal:
        handler: logging.Handler = RichHandler(console=console, show_path=False, rich_tracebacks=False, markup=False)
    else:
        # A file or a pipe: rich would wrap at 80 columns, splitting numbers, and leave repeated times blank;
        # plain lines keep one record per line, each with its time, in rich's layout.
        handler = logging.StreamHandler(sys.stderr)
        fmt = "%(asctime)s %(levelname)-8s " + fmt
    logging.basicConfig(level=level, format=fmt, datefmt="[%X]", handlers=[handler], force=True)


def _print_version(value: bool) -> None:
    if value:
        import torch

        from lmforge import __version__

        typer.echo(f"lmforge {__version__} (torch {torch.__version__})")
        raise typer.Exit()


@app.callback()
def main(
    verbose: bool = typer.Option(False, *VERBOSE_FLAGS, help="Debug logging, and the traceback of an error "
                                 "(before or after the verb)."),
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print the lmforge and torch versions and exit."),
) -> None:
    _setup_logging(verbose)


def _fail(message: str, code: int = 1) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _resumable(command: Callable[..., None]) -> Callable[..., None]:
    """A verb whose work resumes (run, pretrain, sft): Ctrl-C ends with what was saved and the command that
    continues, which is the same command line. Exits 130, as a shell reports SIGINT."""
    import functools
    import shlex

    @functools.wraps(command)
    def resumable(*args: Any, **kwargs: Any) -> None:
        try:
            command(*args, **kwargs)
        except KeyboardInterrupt as e:  # the training loop's TrainingInterrupted names the checkpoint it saved
            typer.echo(f"{str(e) or 'interrupted'}\nto resume, run the same command again: {shlex.join(sys.argv)}",
                       err=True)  # fmt: skip
            raise typer.Exit(130) from None

    return resumable


@contextmanager
def _output_checked() -> Iterator[None]:
    """A refused output folder or file (lmforge.outdir: not empty and not lmforge's) is a usage error."""
    from lmforge.outdir import OutputDirError

    try:
        yield
    except OutputDirError as e:
        _fail(str(e), 2)


@contextmanager
def _claimed(out: Path, verb: str) -> Iterator[None]:
    """Check `out` before any work (lmforge writes only into a new, empty or earlier lmforge folder) and remove
    the folder again if the verb fails before writing into it."""
    from lmforge.outdir import claimed_output_dir

    with _output_checked(), claimed_output_dir(out, verb):
        yield


def _sections(overrides: list[str], allowed: set[str]):
    """Validate `section.key=value` overrides against the recipe schema, for verbs that run a single stage."""
    for item in overrides:
        section = item.split(".", 1)[0]
        if section not in allowed:
            _fail(f"override '{item}': this command takes settings under {sorted(allowed)}", 2)
    try:
        return validate_recipe({}, source="command line", overrides=overrides)
    except RecipeError as e:
        _fail(str(e), 2)


@app.command()
@_resumable
def run(
    recipe: Optional[str] = typer.Argument(None, help="Recipe YAML file or built-in name (default: stdlib-code). "
                                           "A file without name: runs in runs/<its file name>; its unset settings "
                                           "take the defaults in lmforge/recipe.py, or those of its base: recipe."),
    overrides: Optional[List[str]] = typer.Argument(None, help=OVERRIDES_HELP),
) -> None:
    """Run a whole recipe: every stage in order, skipping the ones already up to date."""
    from lmforge.pipeline import RunDirError, check_run_dir, run_recipe

    overrides = list(overrides or [])
    if recipe and "=" in recipe:  # `lmforge run train.max_steps=10`: an override, not a recipe name
        overrides.insert(0, recipe)
        recipe = None
    try:
        cfg = load_recipe(recipe, overrides)
    except RecipeError as e:
        _fail(str(e), 2)
    log.info("%s", cfg.describe_origin())
    try:
        check_run_dir(cfg)
    except RunDirError as e:
        _fail(str(e), 2)
    outcomes = run_recipe(cfg)
    for o in outcomes:
        log.info("%-9s %-8s %6.1fs", o.stage, o.action, o.seconds)
    log.info("run directory: %s (report: %s)", cfg.run_path, cfg.run_path / "report.md")


@app.command()
def curate(
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
    from lmforge.data.curate import run_curate

    flags = [f"data.{k}={v}" for k, v in
             (("workers", workers), ("executor", executor), ("ray_address", ray_address)) if v is not None]  # fmt: skip
    settings = list(overrides or []) + flags + [f"data.source={source}"]
    if recipe is None:
        cfg = _sections(settings, {"data"})
    else:
        for item in settings:
            if not item.startswith("data."):
                _fail(f"override '{item}': this command takes settings under ['data']", 2)
        try:
            cfg = load_recipe(recipe, settings)
        except RecipeError as e:
            _fail(str(e), 2)
    with _claimed(out, "curate"):
        metrics = run_curate(cfg.data, out)
    log.info("kept %s of %s documents -> %s", metrics["docs_kept"], metrics["docs_in"], out)


@app.command()
def tokenizer(
    curated: Path = typer.Argument(..., help="A curate output directory (train/, val/)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory for tokenizer.json."),
    overrides: Optional[List[str]] = typer.Argument(None, help="tokenizer.key=value settings."),
) -> None:
    """Train a byte-level BPE tokenizer on curated text."""
    from lmforge.tokenizer import run_tokenizer

    cfg = _sections(list(overrides or []), {"tokenizer"})
    with _claimed(out, "tokenizer"):
        metrics = run_tokenizer(curated, cfg.tokenizer, out)
    log.info("vocabulary %s, %.3f bytes/token -> %s", metrics["vocab_size"], metrics["bytes_per_token"], out)


@app.command()
def shards(
    curated: Path = typer.Argument(..., help="A curate output directory."),
    tokenizer_path: Path = typer.Option(..., "--tokenizer", "-t", help="tokenizer.json"),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory for token shards."),
    overrides: Optional[List[str]] = typer.Argument(None, help="shards.key=value settings."),
) -> None:
    """Tokenize curated text into memory-mapped token shards."""
    from lmforge.data.shards import run_shards

    cfg = _sections(list(overrides or []), {"shards"})
    with _claimed(out, "shards"):
        metrics = run_shards(curated, tokenizer_path, cfg.shards, out)
    log.info("%s train / %s validation tokens -> %s", metrics["train_tokens"], metrics["val_tokens"], out)


@app.command()
@_resumable
def pretrain(
    shards_dir: Path = typer.Argument(..., help="A shards directory (index.json, *.bin)."),
    tokenizer_path: Path = typer.Option(..., "--tokenizer", "-t", help="tokenizer.json"),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory; re-running the same job resumes, a "
                             "changed setting or input starts it over."),
    overrides: Optional[List[str]] = typer.Argument(None, help="model.*, train.*, pretrain.* and parallel.* "
                                                    "settings (e.g. pretrain.objective=mlm parallel.data=fsdp)."),
) -> None:
    """Pre-train a model from scratch with a chosen objective (the same job resumes from its last checkpoint in
    --out; a changed setting, shards or tokenizer starts over, replacing lmforge's earlier outputs there).

    Launched with torchrun it trains on every process: see docs/distributed.md.
    """
    from lmforge.pretrain import pretrain as run_pretrain

    cfg = _sections(list(overrides or []), {"model", "train", "pretrain", "parallel"})
    with _output_checked():
        metrics = run_pretrain(shards_dir, tokenizer_path, cfg.model, cfg.train, out, cfg.pretrain, cfg.parallel)
    log.info("final validation loss %.4f; model in %s", metrics.get("final_val_loss") or float("nan"), out / "final")


# Options of `lmforge sft` that only one task or method uses: {parameter: (--task, --method or None for any)}.
SFT_OPTION_SCOPE = {
    "method": ("chat", None), "train_on": ("chat", None),
    "freeze_blocks": ("chat", "full"), "freeze_embeddings": ("chat", "full"),
    "lora_rank": ("chat", "lora"), "lora_alpha": ("chat", "lora"), "lora_dropout": ("chat", "lora"),
    "lora_targets": ("chat", "lora"), "prefix_length": ("chat", "prefix"), "prefix_reparam": ("chat", "prefix"),
    "text_field": ("classify", None), "label_field": ("classify", None), "pooling": ("classify", None),
    "epochs": ("classify", None),
    "prompt_field": ("chat", None), "response_field": ("chat", None), "system_field": ("chat", None),
}  # fmt: skip


def _misplaced_sft_option(ctx: typer.Context, task: str, method: str) -> str | None:
    """The first option the user set that this --task / --method ignores, as an error message (None if none).
    Typer fills in every default, so only options set on the command line count."""
    for param in ctx.command.params:
        scope = SFT_OPTION_SCOPE.get(param.name or "")
        source = ctx.get_parameter_source(param.name or "")
        # By name: typer vendors its own click, whose ParameterSource is not click's.
        if scope is None or source is None or source.name in ("DEFAULT", "DEFAULT_MAP"):
            continue
        flag, (want_task, want_method) = param.opts[0], scope
        if task != want_task:
            return (f"{flag} is a --task {want_task} option, and this run is --task {task}: drop {flag} or add "
                    f"--task {want_task}")  # fmt: skip
        if want_method is not None and method != want_method:
            return (f"{flag} is a --method {want_method} option, and this run is --method {method}: drop {flag} or "
                    f"add --method {want_method}")  # fmt: skip
    return None


@app.command()
@_resumable
def sft(
    ctx: typer.Context,
    checkpoint: Path = typer.Argument(..., help="A pre-trained lmforge model directory."),
    data: Path = typer.Option(..., "--data", help="Instruction or chat data: Alpaca, ShareGPT, messages or "
                              "prompt/response records (.json or .jsonl), other records with --prompt-field and "
                              "--response-field; with --task classify, labelled text (.jsonl, .json, .csv or .tsv)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory; re-running the same job resumes, a "
                             "changed setting, data file or checkpoint starts it over."),
    task: str = typer.Option("chat", "--task", help="chat: instruction tuning with the chat template; classify: a "
                             "new classification head on the frozen model."),
    method: str = typer.Option("full", "--method", help="chat: full, lora or prefix."),
    train_on: str = typer.Option("assistant", "--train-on", help="assistant, last or all: the tokens the loss counts."),
    freeze_blocks: int = typer.Option(0, "--freeze-blocks", min=0, help="Full fine-tuning: freeze the first k blocks."),
    freeze_embeddings: bool = typer.Option(False, "--freeze-embeddings", help="Full fine-tuning: freeze embeddings."),
    lora_rank: int = typer.Option(8, "--lora-rank", min=1, help="LoRA: rank r of each adapter's A and B matrices "
                                  "(more trainable parameters as it grows)."),
    lora_alpha: float = typer.Option(16.0, "--lora-alpha", help="LoRA: scale; the adapters' output is multiplied by "
                                     "alpha / rank."),
    lora_dropout: float = typer.Option(0.0, "--lora-dropout", min=0.0, max=0.99, help="LoRA: dropout on the "
                                       "adapters' input during training."),
    lora_targets: str = typer.Option("q_proj,v_proj", "--lora-targets", help="Comma-separated module-name suffixes; "
                                     "add lm_head when the base model never saw the chat template."),
    prefix_length: int = typer.Option(16, "--prefix-length", min=1, help="Prefix tuning: virtual tokens per layer."),
    prefix_reparam: bool = typer.Option(False, "--prefix-reparam", help="Prefix tuning: learn through an MLP."),
    text_field: Optional[str] = typer.Option(None, "--text-field", help="classify: the text key (auto-detected)."),
    label_field: Optional[str] = typer.Option(None, "--label-field", help="classify: the label key (auto-detected)."),
    prompt_field: Optional[str] = typer.Option(None, "--prompt-field", help="chat: the key of the user turn in "
                                               "records of no known format (GSM8K: question); with --response-field."),
    response_field: Optional[str] = typer.Option(None, "--response-field", help="chat: the key of the assistant "
                                                 "turn (GSM8K: answer)."),
    system_field: Optional[str] = typer.Option(None, "--system-field", help="chat: the key of an optional system "
                                               "message."),
    pooling: str = typer.Option("mean", "--pooling", help="classify: mean (over the text's tokens) or last (the "
                                "final token's state)."),
    epochs: int = typer.Option(30, "--epochs", min=1, help="classify: passes over the cached features."),
    val_fraction: Optional[float] = typer.Option(None, "--val-fraction", min=0.0, max=0.9,
                                                 help="Share held out (default 0.1 for chat, 0.2 for classify)."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Use only the first N records."),
    overrides: Optional[List[str]] = typer.Argument(None, help="train.* settings (train.max_steps=200 ...); under "
                                                    "torchrun, parallel.* settings."),
) -> None:
    """Fine-tune a pre-trained model: instruction tuning (full, optionally with frozen layers; LoRA; prefix
    tuning), reporting held-out loss on the assistant tokens before and after; or, with --task classify, a
    classification head on the frozen model, reporting held-out accuracy."""
    if task not in ("chat", "classify"):
        _fail(f"--task {task!r}: choose chat or classify", 2)
    misplaced = _misplaced_sft_option(ctx, task, method)
    if misplaced:
        _fail(misplaced, 2)
    if task == "classify":
        from lmforge.finetune.classify import train_classifier

        if overrides:
            _fail("--task classify takes no train.* settings; use --epochs", 2)
        with _output_checked():
            m = train_classifier(checkpoint, data, out, text_field=text_field, label_field=label_field,
                                 pooling=pooling, epochs=epochs, limit=limit,
                                 val_fraction=0.2 if val_fraction is None else val_fraction)  # fmt: skip
        acc, base = m["accuracy"], m["majority_baseline"]
        lines = [f"held-out accuracy {acc['value']:.3f} [{acc['ci95'][0]:.3f}, {acc['ci95'][1]:.3f}] on {acc['n']}; "
                 f"majority baseline {base['accuracy']['value']:.3f} (always {base['label']!r}); "
                 f"macro-F1 {m['macro_f1']:.3f}", "| label | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {c['label']!r} | {c['precision']:.3f} | {c['recall']:.3f} | {c['f1']:.3f} | {c['support']} |"
                  for c in m["per_class"]]  # fmt: skip
        typer.echo("\n".join(lines) + f"\nclassifier in {out / 'classifier'}; metrics in {out / 'metrics.json'}")
        return
    from lmforge.finetune.data import FieldMap
    from lmforge.model.lora import LoRAConfig
    from lmforge.model.prefix import PrefixConfig
    from lmforge.finetune.sft import METHODS, finetune

    if method not in METHODS:
        _fail(f"--method {method!r}: choose one of {', '.join(METHODS)}", 2)
    if (prompt_field is None) != (response_field is None) or (system_field and not prompt_field):
        _fail("--prompt-field and --response-field go together (--system-field needs both)", 2)
    fields = FieldMap(prompt_field, response_field, system_field) if prompt_field and response_field else None
    cfg = _sections(list(overrides or []), {"train", "parallel"})  # names a bad override as the user wrote it
    # Fine-tuning defaults (sft.train: fewer steps, a lower learning rate), overridden by train.* settings.
    train_cfg = _sections([f"sft.{o}" for o in overrides or [] if o.startswith("train.")], {"sft"}).sft.train
    targets = tuple(t.strip() for t in lora_targets.split(",") if t.strip())
    lora = LoRAConfig(rank=lora_rank, alpha=lora_alpha, dropout=lora_dropout, targets=targets) if method == "lora" else None
    prefix = PrefixConfig(length=prefix_length, reparam=prefix_reparam) if method == "prefix" else None
    with _output_checked():
        m = finetune(checkpoint, data, out, train_cfg, method=method, train_on=train_on, freeze_blocks=freeze_blocks,
                     freeze_embeddings=freeze_embeddings, lora=lora, prefix=prefix,
                     val_fraction=0.1 if val_fraction is None else val_fraction, limit=limit, fields=fields,
                     parallel=cfg.parallel)  # fmt: skip
    before, after = m.get("heldout_loss_before"), m.get("heldout_loss_after")
    log.info("held-out loss on trained tokens: %s -> %s; %d of %d parameters trained; model in %s",
             f"{before:.4f}" if before is not None else "n/a", f"{after:.4f}" if after is not None else "n/a",
             m["trainable_params"], m["total_params"], out / "final")  # fmt: skip


@app.command("eval")
def eval_(
    checkpoint: Path = typer.Argument(..., help="An lmforge model directory or a transformers model directory."),
    text: Optional[Path] = typer.Option(None, "--text", help="Held-out text for perplexity and bits per byte: a file "
                                        "or directory the readers accept."),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="Comma-separated benchmarks: built-in names found "
                                        "under --task-dir (arc_easy, arc_challenge, hellaswag, piqa, copa, "
                                        "openbook_qa, winogrande, lambada, gsm8k) or NAME=FILE.jsonl."),
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
    from lmforge.eval.run import evaluate_checkpoint
    from lmforge.model.io import require_model_dir

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
        _fail("nothing to evaluate: give --text, --tasks and/or --code", 2)
    cfg = _sections(extra, {"eval"})
    require_model_dir(checkpoint)  # a wrong path fails before the output folder is made
    with _claimed(out, "eval"):
        evaluate_checkpoint(checkpoint, text, cfg.eval, out, training_data=training_data)
    typer.echo((out / "results.md").read_text(encoding="utf-8"))
    log.info("results in %s", out / "results.json")


LM_EVAL_USAGE = """\
usage: lmforge lm-eval --model lmforge --model_args checkpoint=DIR[,device=auto,batch_size=32] --tasks TASK[,TASK]
                       [lm-eval options]

Runs lm-evaluation-harness with lmforge's model type registered; every option is lm-eval's own (listed below).
  lmforge lm-eval --model lmforge --model_args checkpoint=runs/stdlib-code/pretrain/final --tasks arc_easy --limit 100
lm-eval downloads its datasets from the Hugging Face Hub. Offline, score local files with lmforge's own evaluator:
  lmforge eval runs/stdlib-code/pretrain/final --tasks arc_easy --task-dir DIR   (docs/evaluation.md)
"""


@app.command("lm-eval", context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
             add_help_option=False)
def lm_eval_(ctx: typer.Context) -> None:
    """lm-evaluation-harness with lmforge checkpoints: takes lm_eval's own arguments, e.g.
    `lmforge lm-eval --model lmforge --model_args checkpoint=runs/x/pretrain/final --tasks arc_easy`."""
    args = list(ctx.args)
    wants_help = not args or "-h" in args or "--help" in args
    if wants_help:
        typer.echo(LM_EVAL_USAGE)
    try:
        from lmforge.eval.lm_eval_adapter import DatasetUnavailable
        from lmforge.eval.lm_eval_adapter import main as lm_eval_main
    except ImportError as e:
        _fail(f"lmforge lm-eval needs lm-evaluation-harness: pip install lm-eval ({e})")
    if wants_help:  # then lm-eval's own options, which this command passes through
        lm_eval_main(args if args and args[0] in ("run", "ls", "validate") else ["run", "--help"])
        return
    try:
        lm_eval_main(args)
    except DatasetUnavailable as e:
        _fail(str(e))


@app.command()
def generate(
    checkpoint: Path = typer.Argument(..., help="An lmforge model directory (runs/NAME/pretrain/final, "
                                      "runs/NAME/sft/final) or the folder `lmforge export` wrote."),
    prompt: str = typer.Option("", "--prompt", "-p", help="Text to continue (with --chat: the user's message)."),
    max_tokens: int = typer.Option(200, "--max-tokens", "-n", min=1, help="At most this many new tokens (fewer, "
                                   "with a notice, when the prompt leaves less room in the model's context)."),
    temperature: float = typer.Option(0.8, min=0.0, help="0 = greedy."),
    top_k: Optional[int] = typer.Option(50, min=1, help="Sample only among the K most likely next tokens."),
    top_p: Optional[float] = typer.Option(None, min=0.0, max=1.0, help="Sample only among the most likely next "
                                          "tokens whose probabilities add up to P (nucleus sampling; default off)."),
    seed: Optional[int] = typer.Option(None, help="Seed of the sampling generator: the same seed and settings give "
                                       "the same text."),
    chat: bool = typer.Option(False, "--chat", help="Send the prompt as a user message through the chat template "
                              "and print the assistant's reply (stops at <|end|>)."),
    system: Optional[str] = typer.Option(None, "--system", help="With --chat: a system message."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
) -> None:
    """Continue a prompt, streaming the text to the terminal (stops at end-of-sequence); with --chat, reply to it
    as the assistant of a fine-tuned model."""
    from lmforge.infer.chat import chat_once
    from lmforge.infer.engine import stream_text
    from lmforge.infer.loading import load_for_generation

    if system is not None and not chat:
        _fail("--system goes with --chat", 2)
    try:
        model, tok = load_for_generation(checkpoint, device)
        # Both check the prompt on the call, so a prompt that fills the context is reported before any output.
        if chat:
            pieces = chat_once(model, tok, prompt, system=system, max_new_tokens=max_tokens,
                               temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)  # fmt: skip
        else:
            pieces = stream_text(model, tok, prompt, max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                 seed=seed)  # fmt: skip
            sys.stdout.write(prompt)  # plain continuation echoes the prompt it continues
    except (FileNotFoundError, ValueError) as e:  # no such checkpoint; the prompt alone fills the context
        _fail(str(e), 2)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


@app.command()
def chat(
    checkpoint: Path = typer.Argument(..., help="A model directory (a fine-tuned one: runs/NAME/sft/final, or the "
                                      "folder `lmforge export` wrote from it)."),
    system: Optional[str] = typer.Option(None, "--system", "-s", help="System message."),
    max_tokens: int = typer.Option(256, "--max-tokens", "-n", min=1, help="At most this many tokens per reply "
                                   "(capped, with a notice, to half the model's context: the rest holds the "
                                   "conversation)."),
    temperature: float = typer.Option(0.8, min=0.0, help="0 = greedy."),
    top_k: Optional[int] = typer.Option(50, min=1, help="Sample only among the K most likely next tokens."),
    top_p: Optional[float] = typer.Option(None, min=0.0, max=1.0, help="Sample only among the most likely next "
                                          "tokens whose probabilities add up to P (nucleus sampling; default off)."),
    seed: Optional[int] = typer.Option(None, help="Seed of the sampling generator: the same seed and settings give "
                                       "the same text."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
) -> None:
    """Chat with a model in the terminal through its chat template: replies stream as they are generated and the
    conversation is kept (oldest turns dropped when it outgrows the context). /help lists the commands."""
    from lmforge.infer.chat import load_chat, run_chat

    try:
        import readline  # noqa: F401  line editing and history for input(), where the platform has it
    except ImportError:
        pass
    try:
        session = load_chat(checkpoint, device=device, system=system, max_new_tokens=max_tokens,
                            temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)  # fmt: skip
    except (FileNotFoundError, ValueError) as e:  # e.g. no such checkpoint, an unknown device
        _fail(str(e), 2)
    run_chat(session)


@app.command()
def embed(
    checkpoint: Path = typer.Argument(..., help="A model directory."),
    text: Optional[Path] = typer.Option(None, "--text", help="Texts to embed: a file or directory the readers "
                                        "accept, one embedding per document."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="OUT.npy for --text (row ids in OUT.npy.ids.txt)."),
    pairs: Optional[str] = typer.Option(None, "--pairs", help="'stdlib': print recall@1/@10 of docstring -> code "
                                        "retrieval on the held-out standard-library functions."),
    batch_size: int = typer.Option(32, min=1, help="Texts per forward pass; with --finetune-steps, pairs per "
                                   "training step (the other pairs of a batch are each one's negatives)."),
    max_len: Optional[int] = typer.Option(None, min=2, help="Tokens per text (default: the model's max_seq_len)."),
    finetune_steps: int = typer.Option(0, "--finetune-steps", min=0, help="With --pairs: first fine-tune "
                                       "contrastively for this many steps on the training split's pairs."),
    finetune_out: Optional[Path] = typer.Option(None, "--finetune-out", help="Where the fine-tuned model goes."),
) -> None:
    """Mean-pooled, L2-normalised text embeddings (bidirectional attention), or a retrieval score."""
    from lmforge.data.readers import read_documents
    from lmforge.embed import IDS_SUFFIX, embed_texts, finetune_on_pairs, pairs_recall, stdlib_pairs, write_embeddings
    from lmforge.eval.run import TEXT_EXTENSIONS
    from lmforge.model.io import load_checkpoint_tokenizer, load_model
    from lmforge.outdir import claim_output_file

    from lmforge.train.distributed import launched_world_size

    if launched_world_size() > 1:
        # In-batch negatives would shrink to each rank's rows, and every rank would write the same files.
        _fail("lmforge embed runs in one process; launch it without torchrun", 2)
    if (text is None) == (pairs is None):
        _fail("give either --text FILE_OR_DIR (with -o OUT.npy) or --pairs stdlib", 2)
    if text is not None and out is None:
        _fail("--text needs --out OUT.npy", 2)
    if pairs is not None and pairs != "stdlib":
        _fail(f"--pairs {pairs!r} is not supported; allowed: stdlib", 2)
    if finetune_steps and (pairs is None or finetune_out is None):
        _fail("--finetune-steps needs --pairs stdlib and --finetune-out DIR", 2)
    if text is not None:
        with _output_checked():
            claim_output_file(out, IDS_SUFFIX)
    if finetune_steps:
        with _output_checked():
            finetune_on_pairs(checkpoint, finetune_out, steps=finetune_steps, batch_size=batch_size,
                              max_len=max_len or 256)  # fmt: skip
        checkpoint = finetune_out / "final"
    model, args = load_model(checkpoint)
    tok = load_checkpoint_tokenizer(checkpoint)
    max_len = min(max_len or args.max_seq_len, args.max_seq_len)
    if pairs is not None:
        held_out = stdlib_pairs("test")
        recall = pairs_recall(model, tok, held_out, batch_size, max_len)
        typer.echo(f"pairs={len(held_out)} " + " ".join(f"{k}={v:.4f}" for k, v in recall.items()))
        return
    docs = list(read_documents(text, extensions=TEXT_EXTENSIONS))
    if not docs:
        _fail(f"no text to embed in {text}")
    emb = embed_texts(model, tok, [d.text for d in docs], batch_size, max_len)
    write_embeddings(out, emb, [d.id for d in docs])
    log.info("%d embeddings of dimension %d -> %s", emb.shape[0], emb.shape[1], out)


@app.command()
def export(
    checkpoint: Path = typer.Argument(..., help="A model directory."),
    out: Path = typer.Argument(..., help="Output directory: new, empty, or an earlier export (which it replaces)."),
    fmt: str = typer.Option("hf", "--format", help="Only 'hf' (Hugging Face transformers) for now."),
    dtype: str = typer.Option("float32", help="float32 | bfloat16 | float16"),
) -> None:
    """Export a checkpoint to a Hugging Face transformers directory, with its tokenizer and chat template. The
    architecture follows the model: LlamaForCausalLM; Qwen3ForCausalLM for a model with qk_norm (the default
    recipe's; needs transformers >= 4.51); GPT2LMHeadModel for model.arch=gpt2."""
    from lmforge.hf import export_hf

    if fmt != "hf":
        _fail(f"--format {fmt!r} is not supported; allowed: hf", 2)
    with _output_checked():
        path = export_hf(checkpoint, out, dtype=dtype)
    log.info("exported to %s; load with AutoModelForCausalLM.from_pretrained(%r)", path, str(path))


@app.command()
def report(run_dir: Path = typer.Argument(..., help="A run directory, e.g. runs/stdlib-code.")) -> None:
    """Rebuild run_dir/report.md from the manifests the stages left."""
    from lmforge.pipeline import existing_stages
    from lmforge.report.report import build_report

    try:
        build_report(run_dir, existing_stages(run_dir), run_dir / "report")
    except FileNotFoundError as e:  # not a run directory
        _fail(str(e))


def entrypoint() -> None:
    """Console entry with clean one-line errors for the mistakes a user can fix."""
    from lmforge.train.loop import TrainingDiverged

    try:
        app()
    except (FileNotFoundError, ValueError, TrainingDiverged, RuntimeError) as e:
        if logging.getLogger().isEnabledFor(logging.DEBUG):
            raise  # --verbose: the full traceback
        typer.echo(f"error: {e} (run with --verbose for the traceback)", err=True)
        sys.exit(1)


if __name__ == "__main__":
    entrypoint()
