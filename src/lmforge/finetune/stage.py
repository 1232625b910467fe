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
from typing import Any

import numpy as np
from torch import nn

from lmforge.io import atomic_open
from lmforge.data.curated import iter_split_records
from lmforge.data.code_pairs import CodePair, pairs_from_documents
from lmforge.finetune.code_pairs import completes_function, conversation
from lmforge.finetune.data import Conversation, FieldMap
from lmforge.model.lora import LoRAConfig
from lmforge.model.prefix import PrefixConfig
from lmforge.finetune.sft import finetune_conversations, read_split, split_heldout
from lmforge.finetune.template import prompt_ids, render
from lmforge.infer.chat import chat_stop_ids
from lmforge.infer.engine import cap_new_tokens, generate
from lmforge.model.io import load_checkpoint_tokenizer, load_model, read_model_args
from lmforge.model.modes import evaluating
from lmforge.recipe import ParallelConfig, SFTConfig
from lmforge.tokenizer import Tokenizer
from lmforge.train.distributed import init_world

log = logging.getLogger(__name__)

DOCSTRING_PAIRS = "docstring_pairs"


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
    assert cfg.train.seq_len is not None, "run_sft_stage resolves seq_len"
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
        outs = generate(model, ids, max_new_tokens, temperature=0.0, stop_ids=chat_stop_ids(tok))
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


def run_sft_stage(root: Path, cfg: SFTConfig, out: Path, parallel: ParallelConfig | None = None) -> dict[str, Any]:
    """Fine-tune root/pretrain/final into out/final/; the stage's metrics."""
    checkpoint = root / "pretrain" / "final"
    if cfg.train.seq_len is None:  # as long as the pre-trained model allows
        seq_len = read_model_args(checkpoint).max_seq_len
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"seq_len": seq_len})})
    world = init_world(parallel or ParallelConfig(), cfg.train.device)  # under torchrun every rank trains
    main = world.is_main
    tok = load_checkpoint_tokenizer(checkpoint)
    counts: dict[str, Any] = {}
    code_prompts: list[str] | None = None
    if cfg.data == DOCSTRING_PAIRS:
        log.info("deriving signature + docstring -> body pairs from the functions in %s...", root / "curate")
        train_pairs, heldout_pairs, counts = docstring_pairs(root / "curate", tok, cfg)
        train_convs = [conversation(p) for p in train_pairs]
        heldout_convs = [conversation(p) for p in heldout_pairs]
        if main:
            _write_conversations(out / "data" / "train.jsonl", train_convs, [p.id for p in train_pairs])
            _write_conversations(out / "data" / "heldout.jsonl", heldout_convs, [p.id for p in heldout_pairs])
    else:
        fields = FieldMap(cfg.prompt_field, cfg.response_field, cfg.system_field) if cfg.prompt_field else None
        train_convs, heldout_convs, counts = read_split(Path(cfg.data), cfg.val_fraction, cfg.train.seed, cfg.limit,
                                                        fields)  # fmt: skip

    base, args = load_model(checkpoint, device=world.device)
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


__all__ = ["run_sft_stage", "docstring_pairs", "generation_check"]
