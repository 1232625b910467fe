"""The `lmforge` command: one verb per lifecycle stage, each a thin call into one function."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import List, Optional

import click
import typer
from typer.core import TyperGroup

from lmforge import registry, verbs
from lmforge.label.cli import label_app
from lmforge.rag.cli import rag_app
from lmforge.recipe import RecipeError, load_recipe
from lmforge.serve.cli import serve

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


@app.command()
@verbs.resumable
def run(
    recipe: Optional[str] = typer.Argument(None, help="Recipe YAML file or built-in name (default: stdlib-code). "
                                           "A file without name: runs in runs/<its file name>; its unset settings "
                                           "take the stages' schema defaults (docs/settings.md), or those of its base: recipe."),
    overrides: Optional[List[str]] = typer.Argument(None, help=verbs.OVERRIDES_HELP),
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
        verbs.fail(str(e), 2)
    log.info("%s", cfg.describe_origin())
    try:
        check_run_dir(cfg)
    except RunDirError as e:
        verbs.fail(str(e), 2)
    outcomes = run_recipe(cfg)
    for o in outcomes:
        log.info("%-9s %-8s %6.1fs", o.stage, o.action, o.seconds)
    log.info("run directory: %s (report: %s)", cfg.run_path, cfg.run_path / "report.md")














LM_EVAL_USAGE = """\
usage: lmforge lm-eval --model lmforge --model_args checkpoint=DIR[,device=auto,batch_size=32] --tasks TASK[,TASK]
                       [lm-eval options]

Runs lm-evaluation-harness with lmforge's model type registered; every option is lm-eval's own (listed below).
  lmforge lm-eval --model lmforge --model_args checkpoint=runs/stdlib-code/pretrain/final --tasks arc_easy --limit 100
lm-eval downloads its datasets from the Hugging Face Hub. Offline, score local files with lmforge's own evaluator:
  lmforge eval runs/stdlib-code/pretrain/final --tasks arc_easy --task-dir DIR   (docs/evaluation.md)
"""


def add_stage_verbs() -> None:
    """Every registered stage's verb (`Stage.verb`, declared beside the stage), named after the stage, in lifecycle
    order; a stage registered later (a plug-in) is added by calling this again."""
    present = {command.name for command in app.registered_commands}
    for stage in registry.all_stages():
        if stage.verb is not None and stage.name not in present:
            app.command(stage.name)(stage.verb)


add_stage_verbs()

app.add_typer(label_app, name="label")  # `lmforge label ...`: the labelling app's commands
app.add_typer(rag_app, name="rag")  # `lmforge rag index|ask`: answers from documents (lmforge.rag)
app.command("serve")(serve)  # `lmforge serve CKPT`: the OpenAI-compatible server (lmforge.serve)


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
        verbs.fail(f"lmforge lm-eval needs lm-evaluation-harness: pip install lm-eval ({e})")
    if wants_help:  # then lm-eval's own options, which this command passes through
        lm_eval_main(args if args and args[0] in ("run", "ls", "validate") else ["run", "--help"])
        return
    try:
        lm_eval_main(args)
    except DatasetUnavailable as e:
        verbs.fail(str(e))


@app.command()
def generate(
    checkpoint: Path = typer.Argument(..., help="A model: an lmforge checkpoint (runs/NAME/pretrain/final, "
                                      "runs/NAME/sft/final), a Hugging Face model directory, or a hub id in "
                                      "the local cache."),
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
        verbs.fail("--system goes with --chat", 2)
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
        verbs.fail(str(e), 2)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


@app.command()
def chat(
    checkpoint: Path = typer.Argument(..., help="A model (a fine-tuned lmforge checkpoint: runs/NAME/sft/final), "
                                      "a Hugging Face model directory, or a hub id in the local cache."),
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
    docs: Optional[Path] = typer.Option(None, "--docs", help="An index (lmforge rag index): each message is sent "
                                        "with the chunks retrieved for it, numbered for [n] citations; after each "
                                        "reply its sources (file:lines) and its citations, checked, are listed."),
    k: int = typer.Option(4, "--k", min=1, help="With --docs: chunks retrieved per message."),
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
        if docs is not None:
            from lmforge.rag.answer import DocsAugmenter
            from lmforge.rag.index import Index

            budget = session.model.args.max_seq_len - session.max_new_tokens
            augmenter = DocsAugmenter(Index.open(docs), session.tokenizer, budget, k)
            session.augment, session.annotate = augmenter, augmenter.notes
    except (FileNotFoundError, ValueError) as e:  # e.g. no such checkpoint, an unknown device
        verbs.fail(str(e), 2)
    run_chat(session)


@app.command()
def embed(
    checkpoint: Path = typer.Argument(..., help="A model: an lmforge checkpoint, a Hugging Face model "
                                      "directory, or a hub id in the local cache."),
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
    from lmforge.infer.loading import load_for_generation
    from lmforge.outdir import claim_output_file

    from lmforge.train.distributed import launched_world_size

    if launched_world_size() > 1:
        # In-batch negatives would shrink to each rank's rows, and every rank would write the same files.
        verbs.fail("lmforge embed runs in one process; launch it without torchrun", 2)
    if (text is None) == (pairs is None):
        verbs.fail("give either --text FILE_OR_DIR (with -o OUT.npy) or --pairs stdlib", 2)
    if text is not None and out is None:
        verbs.fail("--text needs --out OUT.npy", 2)
    if pairs is not None and pairs != "stdlib":
        verbs.fail(f"--pairs {pairs!r} is not supported; allowed: stdlib", 2)
    if finetune_steps and (pairs is None or finetune_out is None):
        verbs.fail("--finetune-steps needs --pairs stdlib and --finetune-out DIR", 2)
    if text is not None:
        with verbs.output_checked():
            claim_output_file(out, IDS_SUFFIX)
    if finetune_steps:
        with verbs.output_checked():
            finetune_on_pairs(checkpoint, finetune_out, steps=finetune_steps, batch_size=batch_size,
                              max_len=max_len or 256)  # fmt: skip
        checkpoint = finetune_out / "final"
    model, tok = load_for_generation(checkpoint, "cpu")
    args = model.args
    max_len = min(max_len or args.max_seq_len, args.max_seq_len)
    if pairs is not None:
        held_out = stdlib_pairs("test")
        recall = pairs_recall(model, tok, held_out, batch_size, max_len)
        typer.echo(f"pairs={len(held_out)} " + " ".join(f"{k}={v:.4f}" for k, v in recall.items()))
        return
    docs = list(read_documents(text, extensions=TEXT_EXTENSIONS))
    if not docs:
        verbs.fail(f"no text to embed in {text}")
    emb = embed_texts(model, tok, [d.text for d in docs], batch_size, max_len)
    write_embeddings(out, emb, [d.id for d in docs])
    log.info("%d embeddings of dimension %d -> %s", emb.shape[0], emb.shape[1], out)






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
