"""The sft stage of a recipe: fine-tune pretrain/final with the chat template and show what changed.

Data is either a file of instruction records (`sft.data: path`, a seeded `val_fraction` held out) or, by default,
signature + docstring -> body pairs derived from the run's own curated code (`sft.data: docstring_pairs`):
training pairs from curate/train, held-out pairs from curate/val, which pre-training never trained on. The pairs
are written to `sft/data/{train,heldout}.jsonl` (messages format), so `lmforge sft --data` can reuse them.

Besides the held-out loss before and after, the stage decodes greedily from held-out prompts with the model
before and after tuning: the share of generations that end their turn within `gen_tokens` (instead of running
on), and for docstring pairs the share whose body completes a function that parses.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, List, Optional

import numpy as np
import torch
import typer
from torch import nn

from lmforge import verbs
from lmforge.io import atomic_open
from lmforge.data.curated import iter_split_records
from lmforge.data.code_pairs import CodePair, pairs_from_documents
from lmforge.finetune.code_pairs import completes_function, conversation
from lmforge.finetune.data import Conversation, FieldMap
from lmforge.model.lora import LoRAConfig
from lmforge.model.prefix import PrefixConfig
from lmforge.finetune.sft import OUTPUTS, finetune_conversations, read_split, split_heldout
from lmforge.finetune.template import prompt_ids, render
from lmforge.infer.engine import cap_new_tokens, generate
from lmforge.model.io import load_checkpoint_tokenizer, load_model, read_model_args, require_checkpoint
from lmforge.outdir import inputs_fingerprint, start_job
from lmforge.model.modes import evaluating
from lmforge.finetune.config import SFTConfig
from lmforge.train.config import ParallelConfig
from lmforge.tokenizer import Tokenizer
from lmforge.registry import ReportContext, Stage, StageContext, register
from lmforge.report.format import fmt
from lmforge.train.distributed import init_world

log = logging.getLogger(__name__)

DOCSTRING_PAIRS = "docstring_pairs"
PAIRS_DIR = "data"  # the docstring pairs as messages records, for reuse with `lmforge sft --data`


def _curated_docs(curate_dir: Path, split: str) -> list[tuple[str, str]]:
    return [(str(r["id"]), r["text"]) for r in iter_split_records(curate_dir, split)]


def _fits(tok: Tokenizer, pairs: list[CodePair], seq_len: int) -> tuple[list[CodePair], int]:
    """The pairs whose whole conversation fits in seq_len tokens: a truncated body would teach the model to stop
    mid-function. Returns (kept, dropped count)."""
    kept = [p for p in pairs if len(render(tok, conversation(p))[0]) <= seq_len]
    return kept, len(pairs) - len(kept)


def docstring_pairs(curate_dir: Path, tok: Tokenizer, cfg: SFTConfig) -> tuple[list[CodePair], list[CodePair], dict]:
    """(training pairs, held-out pairs, counts) from the curated splits; held-out prompts never repeat a
    training prompt."""
    assert cfg.train.seq_len is not None, "run_sft resolves seq_len"
    seen: set[str] = set()
    # Held-out first: its prompts are then never trained on, even where a training file has a copy.
    heldout, bad_val = pairs_from_documents(_curated_docs(curate_dir, "val"), seen)
    heldout, long_val = _fits(tok, heldout, cfg.train.seq_len)
    heldout = _spread(heldout, cfg.heldout_pairs)
    # Training files in a seeded order, so a max_pairs cap samples the whole corpus, not its first directories.
    docs = _curated_docs(curate_dir, "train")
    docs = [docs[i] for i in np.random.default_rng(cfg.train.seed).permutation(len(docs))]
    train, bad_train = pairs_from_documents(docs, seen, limit=cfg.max_pairs)
    train, long_train = _fits(tok, train[: cfg.max_pairs], cfg.train.seq_len)
    if not heldout and len(train) > 1 and cfg.val_fraction > 0:
        # A small corpus may put no documented function in curate/val: hold out a share of the training pairs.
        keep, held = split_heldout(len(train), cfg.val_fraction, cfg.train.seed)
        log.warning("%s/val has no docstring pair that fits; holding out %d of the %d training pairs instead "
                    "(sft.val_fraction=%g)", curate_dir, len(held), len(train), cfg.val_fraction)  # fmt: skip
        train, heldout = [train[i] for i in keep], _spread([train[i] for i in held], cfg.heldout_pairs)
    if not train or not heldout:
        raise ValueError(f"{curate_dir}: found {len(train)} training and {len(heldout)} held-out docstring pairs "
                         f"that fit sft.train.seq_len={cfg.train.seq_len} tokens ({long_train + long_val} were "
                         "longer); the curated data needs documented Python functions, and rows long enough to hold "
                         "them (model.max_seq_len), or set sft.data to an instruction file")  # fmt: skip
    counts = {"unparsable_files": bad_train + bad_val, "too_long_pairs": long_train + long_val}
    return train, heldout, counts


def _spread(items: list, n: int) -> list:
    """At most n items, evenly spread over the list (a fixed, order-preserving subset)."""
    if len(items) <= n:
        return items
    return [items[i] for i in np.linspace(0, len(items) - 1, n).round().astype(int)]


def _write_conversations(path: Path, convs: list[Conversation], ids: list[str] | None = None) -> None:
    with atomic_open(path, "w") as f:
        for i, conv in enumerate(convs):
            record: dict[str, Any] = {"messages": [{"role": m.role, "content": m.content} for m in conv]}
            if ids is not None:
                record["id"] = ids[i]
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def generation_check(
    model: nn.Module, tok: Tokenizer, prompts: list[Conversation], max_new_tokens: int, code_prompts: list[str] | None
) -> dict[str, Any]:
    """Greedy replies to `prompts` (each the conversation before the reply): the share that end the turn
    (`<|end|>` or EOS) within max_new_tokens, and with `code_prompts` (each prompt's code) the share that complete
    a function that parses. Returns the rates and the replies."""
    log.info("generating greedy replies to %d held-out prompts, up to %d tokens each...", len(prompts), max_new_tokens)
    ids = [prompt_ids(tok, conv) for conv in prompts]
    with evaluating(model):
        outs = generate(model, ids, max_new_tokens, temperature=0.0, stop_ids=tok.stop_ids)
    # A row that stopped early ended its turn; one that used every token ran on (or ended exactly at the limit,
    # which generate cannot tell apart and which counts against it).
    ended = [len(o) < max_new_tokens for o in outs]
    replies = [tok.decode(o, skip_special_tokens=True) for o in outs]
    result: dict[str, Any] = {"ended_turn": float(np.mean(ended)), "replies": replies,
                              "mean_new_tokens": float(np.mean([len(o) for o in outs]))}  # fmt: skip
    if code_prompts is not None:
        parsed = [e and completes_function(p, r) for p, r, e in zip(code_prompts, replies, ended)]
        result["completes_function"] = float(np.mean(parsed))
    return result


def _gen_prompts(tok: Tokenizer, heldout: list[Conversation], cfg: SFTConfig, gen_tokens: int,
                 max_seq_len: int) -> list[int]:  # fmt: skip
    """Indices of held-out conversations to decode from: their prompt leaves room for gen_tokens."""
    room = [i for i, c in enumerate(heldout)
            if c[-1].role == "assistant" and len(prompt_ids(tok, c[:-1])) + gen_tokens <= max_seq_len]  # fmt: skip
    return _spread(room, cfg.gen_prompts)


def run_sft(checkpoint: Path, curate_dir: Path | None, cfg: SFTConfig, out: Path,
            parallel: ParallelConfig | None = None) -> dict[str, Any]:  # fmt: skip
    """Fine-tune `checkpoint` into out/final/ on `cfg.data` (docstring pairs from `curate_dir`, or a file of
    records); the stage's metrics. `lmforge sft` and the recipe's sft stage both run this."""
    if cfg.train.seq_len is None:  # as long as the pre-trained model allows
        seq_len = read_model_args(checkpoint).max_seq_len
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"seq_len": seq_len})})
    pairs = cfg.data == DOCSTRING_PAIRS
    if pairs and curate_dir is None:
        raise ValueError("sft.data=docstring_pairs derives its pairs from a run's curated code; give a data file "
                         "instead (lmforge sft --data FILE)")  # fmt: skip
    checkpoint = require_checkpoint(checkpoint)  # before the output folder is made
    world = init_world(parallel or ParallelConfig(), cfg.train.device)  # under torchrun every rank trains
    main = world.is_main
    # The same job (settings, checkpoint, data) resumes in `out`; a different one starts over.
    inputs = {"checkpoint": inputs_fingerprint(checkpoint), "data": inputs_fingerprint(curate_dir if pairs else cfg.data)}
    start_job(out, "sft", cfg.semantic(), inputs, (*OUTPUTS, PAIRS_DIR), world)
    tok = load_checkpoint_tokenizer(checkpoint)
    counts: dict[str, Any] = {}
    code_prompts: list[str] | None = None
    if pairs:
        log.info("deriving signature + docstring -> body pairs from the functions in %s...", curate_dir)
        train_pairs, heldout_pairs, counts = docstring_pairs(curate_dir, tok, cfg)
        train_convs = [conversation(p) for p in train_pairs]
        heldout_convs = [conversation(p) for p in heldout_pairs]
        if main:
            _write_conversations(out / PAIRS_DIR / "train.jsonl", train_convs, [p.id for p in train_pairs])
            _write_conversations(out / PAIRS_DIR / "heldout.jsonl", heldout_convs, [p.id for p in heldout_pairs])
    else:
        fields = FieldMap(cfg.prompt_field, cfg.response_field, cfg.system_field) if cfg.prompt_field else None
        train_convs, heldout_convs, counts = read_split(Path(cfg.data), cfg.val_fraction, cfg.train.seed, cfg.limit,
                                                        fields)  # fmt: skip

    base, args = load_model(checkpoint, device=world.device, dtype=torch.float32)  # fp32 master weights
    # A small model's context may not hold sft.gen_tokens: half of it stays for the prompts.
    gen_tokens = cap_new_tokens(cfg.gen_tokens, args.max_seq_len, setting="sft.gen_tokens")
    chosen = _gen_prompts(tok, heldout_convs, cfg, gen_tokens, args.max_seq_len)
    prompts = [heldout_convs[i][:-1] for i in chosen]
    if cfg.data == DOCSTRING_PAIRS:
        code_prompts = [heldout_pairs[i].prompt for i in chosen]
    before = generation_check(base, tok, prompts, gen_tokens, code_prompts) if prompts else None
    del base

    def after_training(model: nn.Module) -> dict[str, Any]:
        if not prompts:
            return {}
        after = generation_check(model, tok, prompts, gen_tokens, code_prompts)
        return {"generation_before": _rates(before), "generation_after": _rates(after),
                "samples": [{"prompt": _last_user(p), "before": b, "after": a}
                            for p, b, a in zip(prompts[: cfg.samples], before["replies"], after["replies"])]}  # fmt: skip

    metrics = finetune_conversations(
        checkpoint, train_convs, heldout_convs, out, cfg.train, method=cfg.method, train_on=cfg.train_on,
        freeze_blocks=cfg.freeze_blocks, freeze_embeddings=cfg.freeze_embeddings,
        lora=LoRAConfig(rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                        targets=tuple(cfg.lora_targets)) if cfg.method == "lora" else None,
        prefix=PrefixConfig(length=cfg.prefix_length, reparam=cfg.prefix_reparam) if cfg.method == "prefix" else None,
        seed=cfg.train.seed, after_training=after_training, parallel=parallel,
    )  # fmt: skip
    log.info("sft: held-out loss %.4f -> %.4f", metrics["heldout_loss_before"] or float("nan"),
             metrics["heldout_loss_after"] or float("nan"))  # fmt: skip
    return {**metrics, **counts, "data": cfg.data}


def _rates(check: dict[str, Any] | None) -> dict[str, float]:
    return {k: v for k, v in (check or {}).items() if k != "replies"}


def _last_user(conv: Conversation) -> str:
    return next((m.content for m in reversed(conv) if m.role == "user"), "")


def _sft_stage(ctx: StageContext) -> dict[str, Any]:
    curated = ctx.inputs.get("curated")
    return run_sft(ctx.input("model"), curated, ctx.settings.sft, ctx.out, ctx.settings.parallel)


def _check_lengths(settings: Any) -> None:
    sft_len, max_len = settings.sft.train.seq_len, settings.model.max_seq_len
    if sft_len is not None and sft_len > max_len:
        raise ValueError(f"sft.train.seq_len={sft_len} exceeds model.max_seq_len={max_len}")


def _sft_report(ctx: ReportContext) -> list[str]:
    """Fine-tuning: held-out loss and greedy-generation rates before and after, and a few held-out samples."""
    sft = ctx.metrics
    before, after = sft.get("generation_before") or {}, sft.get("generation_after") or {}
    lines = [
        "## Fine-tuning",
        "",
        f"- method: {sft.get('method')}; data: {sft.get('data')} ({sft.get('train_conversations')} training, "
        f"{sft.get('heldout_conversations')} held-out conversations); {sft.get('trainable_params', 0):,} of "
        f"{sft.get('total_params', 0):,} parameters trained",
        f"- held-out loss on the trained (assistant) tokens: {fmt(sft.get('heldout_loss_before'))} before, "
        f"{fmt(sft.get('heldout_loss_after'))} after; {sft.get('steps')} steps in "
        f"{fmt(sft.get('train_seconds'), '.1f')} s",
    ]
    if before:
        lines.append(f"- greedy replies to held-out prompts that end their turn: {fmt(before.get('ended_turn'), '.0%')}"
                     f" before, {fmt(after.get('ended_turn'), '.0%')} after")  # fmt: skip
    if "completes_function" in before:
        lines.append(f"- replies that complete a function which parses: {fmt(before['completes_function'], '.0%')} "
                     f"before, {fmt(after.get('completes_function'), '.0%')} after")  # fmt: skip
    lines.append("")
    for i, sample in enumerate(sft.get("samples") or [], start=1):
        lines += [f"### Fine-tuning sample {i}", "", "Prompt:", "", "```python", sample["prompt"], "```", "",
                  "Before:", "", "```python", sample["before"], "```", "", "After:", "", "```python", sample["after"],
                  "```", ""]  # fmt: skip
    return lines


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


@verbs.resumable
def sft_verb(
    ctx: typer.Context,
    checkpoint: Path = typer.Argument(..., help="A pre-trained model: an lmforge checkpoint, "
                                      "a Hugging Face model directory, or a hub id in the local cache."),
    data: Path = typer.Option(..., "--data", help="Instruction or chat data: Alpaca, ShareGPT, messages or "
                              "prompt/response records (.json or .jsonl), other records with --prompt-field and "
                              "--response-field; with --task classify, labelled text (.jsonl, .json, .csv or .tsv)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory; re-running the same job resumes, a "
                             "changed setting, data file or checkpoint starts it over."),
    task: str = typer.Option("chat", "--task", help="chat: instruction tuning with the chat template; classify: a "
                             "new classification head on the frozen model."),
    method: Optional[str] = typer.Option(None, "--method", help="chat: full (default), lora or prefix."),
    train_on: Optional[str] = typer.Option(None, "--train-on", help="assistant (default), last or all: the tokens "
                                           "the loss counts."),
    freeze_blocks: Optional[int] = typer.Option(None, "--freeze-blocks", min=0, help="Full fine-tuning: freeze the "
                                                "first k blocks."),
    freeze_embeddings: bool = typer.Option(False, "--freeze-embeddings", help="Full fine-tuning: freeze embeddings."),
    lora_rank: Optional[int] = typer.Option(None, "--lora-rank", min=1, help="LoRA: rank r of each adapter's A and "
                                            "B matrices (more trainable parameters as it grows; default 8)."),
    lora_alpha: Optional[float] = typer.Option(None, "--lora-alpha", help="LoRA: scale; the adapters' output is "
                                               "multiplied by alpha / rank (default 16)."),
    lora_dropout: Optional[float] = typer.Option(None, "--lora-dropout", min=0.0, max=0.99, help="LoRA: dropout on "
                                                 "the adapters' input during training (default 0)."),
    lora_targets: Optional[str] = typer.Option(None, "--lora-targets", help="Comma-separated module-name suffixes "
                                               "(default q_proj,v_proj); add lm_head when the base model never saw "
                                               "the chat template."),
    prefix_length: Optional[int] = typer.Option(None, "--prefix-length", min=1, help="Prefix tuning: virtual tokens "
                                                "per layer (default 16)."),
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
        verbs.fail(f"--task {task!r}: choose chat or classify", 2)
    misplaced = _misplaced_sft_option(ctx, task, method or "full")
    if misplaced:
        verbs.fail(misplaced, 2)
    if task == "classify":
        from lmforge.finetune.classify import train_classifier

        if overrides:
            verbs.fail("--task classify takes no train.* settings; use --epochs", 2)
        with verbs.output_checked():
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
    from lmforge.finetune.sft import METHODS

    if method is not None and method not in METHODS:
        verbs.fail(f"--method {method!r}: choose one of {', '.join(METHODS)}", 2)
    if (prompt_field is None) != (response_field is None) or (system_field and not prompt_field):
        verbs.fail("--prompt-field and --response-field go together (--system-field needs both)", 2)
    # The options are the sft stage's settings (lmforge.finetune.config.SFTConfig, whose defaults apply to the
    # ones not given); train.* settings are its sft.train.* (fine-tuning defaults: fewer steps, a lower rate).
    chosen = {"data": str(data), "method": method, "train_on": train_on, "freeze_blocks": freeze_blocks,
              "freeze_embeddings": freeze_embeddings or None, "lora_rank": lora_rank, "lora_alpha": lora_alpha,
              "lora_dropout": lora_dropout, "prefix_length": prefix_length, "prefix_reparam": prefix_reparam or None,
              "prompt_field": prompt_field, "response_field": response_field, "system_field": system_field,
              "val_fraction": val_fraction, "limit": limit,
              "lora_targets": [t.strip() for t in lora_targets.split(",") if t.strip()] if lora_targets else None}
    cfg = verbs.stage_settings("sft", overrides, chosen)
    with verbs.output_checked():
        m = verbs.run_stage(SFT_STAGE, cfg, out, model=checkpoint)
    before, after = m.get("heldout_loss_before"), m.get("heldout_loss_after")
    log.info("held-out loss on trained tokens: %s -> %s; %d of %d parameters trained; model in %s",
             f"{before:.4f}" if before is not None else "n/a", f"{after:.4f}" if after is not None else "n/a",
             m["trainable_params"], m["total_params"], out / "final")  # fmt: skip


# Not a default stage: fine-tuning needs data chosen for it (a recipe adds "sft" to its stages).
SFT_STAGE = register(Stage(
    name="sft", order=50, run=_sft_stage, sections={"sft": SFTConfig}, needs=("model", "curated"), training=True,
    default=False, check=_check_lengths, produces={"model": "final"}, report=_sft_report, verb=sft_verb,
))  # fmt: skip


__all__ = ["run_sft", "docstring_pairs", "generation_check"]
