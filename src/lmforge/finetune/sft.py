"""Supervised fine-tuning: chat conversations rendered with the template, packed, and trained with the one loop.

`finetune_conversations` renders and packs the training conversations into rows of `seq_len` and trains one of
- "full": the whole model, optionally with the first blocks and/or the embeddings frozen;
- "lora": low-rank adapters on chosen linear layers only (lmforge.model.lora);
- "prefix": learned key/value prefixes for every layer only (lmforge.model.prefix).
The loss counts only the tokens the template marks as targets (`labels != -100`), normalised by the trained
tokens of the whole optimizer step. `read_split` reads a file of records and holds a seeded share out; the sft
stage (lmforge.finetune.stage.run_sft, which `lmforge sft` runs too) brings the two together.

    out_dir/final/          the fine-tuned model as a checkpoint every tool loads (load_model). LoRA: the adapters
                            merged in. Prefix: the unchanged base weights plus final/prefix/, which load_model
                            attaches (a prefix cannot be merged into weights)
    out_dir/adapter/        LoRA only: the adapter alone (save_adapter), to apply to the base again later
    out_dir/prefix/         prefix only: the prefix alone (save_prefix)

Checkpoints written during LoRA or prefix training hold the live (wrapped) weights, because that is what the loop
loads strictly when it resumes; only `final/` is converted to a plain model.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch
from safetensors.torch import save_model as st_save_model
from torch import Tensor, nn

from lmforge.data.batches import ShuffledRows
from lmforge.data.loader import check_batch_layout
from lmforge.finetune.data import Conversation, FieldMap, read_conversations
from lmforge.finetune.template import IGNORE_INDEX, Packed, TrainOn, pack, render
from lmforge.io import staged_dir
from lmforge.losses import LossContext, LossResult, ce_loss, cross_entropy, label_count, shift_labels
from lmforge.model.io import (
    PREFIX_DIR,
    TOKENIZER,
    WEIGHTS,
    has_prefix,
    load_checkpoint_tokenizer,
    load_model,
    write_model_files,
)
from lmforge.model.lora import (
    LoRAConfig,
    apply_lora,
    base_state_dict,
    merge_lora,
    save_adapter,
    trainable_parameters,
)
from lmforge.model.modes import evaluating
from lmforge.model.prefix import PrefixConfig, apply_prefix, remove_prefix, save_prefix
from lmforge.model.transformer import ModelArgs, Transformer
from lmforge.train.config import ParallelConfig, TrainConfig
from lmforge.train.distributed import check_batch, init_world
from lmforge.train.loop import FINAL_DIR, train
from lmforge.train.loop import OUTPUTS as LOOP_OUTPUTS

log = logging.getLogger(__name__)

Method = Literal["full", "lora", "prefix"]
METHODS: tuple[str, ...] = ("full", "lora", "prefix")
ADAPTER_NAME = "default"
ADAPTER_DIR = "adapter"
OUTPUTS = (*LOOP_OUTPUTS, ADAPTER_DIR, PREFIX_DIR)  # what a job writes in its folder


class SFTBatches(ShuffledRows):
    """Endless, resumable batches of packed rows, reshuffled every epoch (lmforge.data.batches.ShuffledRows: the
    order of epoch e is `default_rng((seed, e)).permutation(n)`, the state {epoch, position}, and a batch may
    straddle two epochs).

    `batch_size` is the global micro-batch. Under data parallelism every rank walks the same order and keeps its
    own `batch_size / world_size` rows of each global batch, so the global batches do not depend on the ranks.
    Batches hold `input_ids`, `doc_ids` and `labels` aligned with the logits (lmforge.losses: the template's
    per-token labels shifted by one)."""

    def __init__(self, packed: Packed, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if not packed.ids:
            raise ValueError("no packed rows to train on: the training split rendered to nothing")
        check_batch_layout(len(packed.ids[0]), batch_size, rank, world_size)
        if batch_size % world_size:
            raise ValueError(f"batch_size={batch_size} must split evenly over {world_size} ranks (rank {rank})")
        super().__init__(len(packed.ids), batch_size // world_size, seed, rank, world_size, carry_over=True)
        self.ids = torch.tensor(packed.ids, dtype=torch.long)
        self.labels = shift_labels(torch.tensor(packed.labels, dtype=torch.long))
        self.doc_ids = torch.tensor(packed.doc_ids, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.ids)

    def __next__(self) -> dict[str, Tensor]:
        rows = torch.from_numpy(self._next_rows())
        return {"input_ids": self.ids[rows], "labels": self.labels[rows], "doc_ids": self.doc_ids[rows]}


def sft_loss(model: nn.Module, batch: dict[str, Tensor], ctx: LossContext | None = None) -> LossResult:
    """Cross-entropy of the trained tokens, the step's share of it (the batch's mean without `ctx`; 0, not NaN,
    for a batch with no trained token). Metric `token_accuracy`: the share of trained tokens the model ranks
    first."""
    logits = model(batch["input_ids"], doc_ids=batch["doc_ids"])
    labels = batch["labels"]
    ctx = ctx or LossContext.local(label_count(labels))
    loss, metrics = ce_loss(logits, labels, ctx)
    hits = ((logits.detach().argmax(-1) == labels) & (labels != IGNORE_INDEX)).sum()
    return loss, {**metrics, "token_accuracy": ctx.mean(hits)}


def heldout_loss(model: nn.Module, rows: Packed, batch_size: int) -> float:
    """Mean CE per trained token over every row of `rows` (all rows, fixed order: comparable across calls)."""
    if not rows.ids:
        raise ValueError("held-out set is empty")
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with evaluating(model), torch.no_grad():
        for start in range(0, len(rows.ids), batch_size):
            sl = slice(start, start + batch_size)
            ids, doc_ids, labels = (torch.tensor(getattr(rows, f)[sl], dtype=torch.long, device=device)
                                    for f in ("ids", "doc_ids", "labels"))  # fmt: skip
            labels = shift_labels(labels)
            total += float(cross_entropy(model(ids, doc_ids=doc_ids), labels))
            count += int(label_count(labels))
    if count == 0:
        raise ValueError("held-out set has no trained tokens (every label is -100)")
    return total / count


def split_heldout(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, held-out indices): a seeded permutation, so the split does not depend on file order quirks
    or on the training config. Held-out gets round(n * val_fraction) items, at least 1 when val_fraction > 0."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = max(1, round(n * val_fraction)) if val_fraction > 0 else 0
    if n - n_val < 1:
        raise ValueError(f"{n} conversations leave nothing to train on with val_fraction={val_fraction}")
    perm = np.random.default_rng(seed).permutation(n)
    return sorted(int(i) for i in perm[n_val:]), sorted(int(i) for i in perm[:n_val])


def freeze(model: Transformer, blocks: int, embeddings: bool) -> None:
    """Freeze the first `blocks` blocks and/or the input embeddings (a tied lm_head shares, so freezes, them)."""
    layers = model.model.layers
    if not 0 <= blocks <= len(layers):
        raise ValueError(f"freeze_blocks={blocks}, but the model has {len(layers)} blocks")
    for layer in layers[:blocks]:
        layer.requires_grad_(False)
    if embeddings:
        model.model.embed_tokens.requires_grad_(False)
        if hasattr(model.model, "embed_positions"):
            model.model.embed_positions.requires_grad_(False)


def render_pack(tok: Any, convs: list, train_on: TrainOn, seq_len: int, one_per_row: bool = False,
                split: str = "training") -> Packed:  # fmt: skip
    """Render conversations with the template and pack them into rows of seq_len (one per row if asked)."""
    packed = pack([render(tok, c, train_on) for c in convs], seq_len, tok.pad_id, one_per_row)
    if packed.truncated:
        log.warning("%s: %d of %d conversations are longer than seq_len=%d tokens and lose their end",
                    split, packed.truncated, len(convs), seq_len)  # fmt: skip
    return packed


def write_plain(model: nn.Module, args: ModelArgs, dest: Path, tokenizer_path: Path) -> None:
    """Merge the adapter, then write the base weights through a fresh plain Transformer, atomically."""
    merge_lora(model, ADAPTER_NAME)
    plain = Transformer(args)
    plain.load_state_dict(base_state_dict(model), strict=True)
    with staged_dir(dest) as tmp:
        write_model_files(plain, args, tmp, tokenizer_path)


def _write_base(model: nn.Module, args: ModelArgs, dest: Path, tokenizer_path: Path) -> None:
    """Prefix tuning: the base weights (unchanged) as a plain checkpoint with the prefix in dest/prefix/."""
    with staged_dir(dest) as tmp:
        save_prefix(model, tmp / PREFIX_DIR)
        remove_prefix(model)
        write_model_files(model, args, tmp, tokenizer_path)


def live_checkpoint_writer(save_tuned: Callable[[nn.Module, Path], Any]) -> Callable[[nn.Module, Path], None]:
    """LoRA and prefix checkpoints: the live wrapped weights (what the loop reloads on resume), and beside them
    what `save_tuned(model, directory)` writes (the adapter or the prefix alone)."""

    def write(model: nn.Module, directory: Path) -> None:
        st_save_model(model, str(directory / WEIGHTS), metadata={"format": "pt"})
        save_tuned(model, directory)

    return write


def _unfreeze_head_hint(method: str, lora: LoRAConfig | None) -> str:
    """The exact option that lets the output layer train, for the frozen-output-layer warning."""
    if method == "lora":
        targets = ",".join((*(lora or LoRAConfig()).targets, "lm_head"))
        return f"pass --lora-targets {targets} (in a recipe: sft.lora_targets: [{targets.replace(',', ', ')}])"
    if method == "prefix":
        return "prefix tuning cannot train it: use --method lora --lora-targets q_proj,v_proj,lm_head, or --method full"
    return "drop --freeze-embeddings: the output layer is tied to the embeddings and freezes with them"


def read_split(
    data: Path, val_fraction: float, seed: int, limit: int | None = None, fields: FieldMap | None = None
) -> tuple[list[Conversation], list[Conversation], dict[str, Any]]:
    """(training, held-out conversations, skip counts) of an instruction file, `val_fraction` held out by seed;
    `fields` maps records in no known format (lmforge.finetune.data.FieldMap)."""
    convs, skipped = read_conversations(data, limit=limit, fields=fields)
    if not convs:
        raise ValueError(f"no usable conversations in {data} ({skipped.count} records skipped)")
    train_idx, val_idx = split_heldout(len(convs), val_fraction, seed)
    log.info("%d conversations: %d for training, %d held out", len(convs), len(train_idx), len(val_idx))
    counts = {"skipped_records": skipped.count, "skipped_examples": skipped.examples}
    return [convs[i] for i in train_idx], [convs[i] for i in val_idx], counts


def finetune_conversations(
    checkpoint: Path,
    train_convs: list[Conversation],
    heldout_convs: list[Conversation],
    out_dir: Path,
    train_cfg: TrainConfig,
    *,
    method: Method = "full",
    train_on: TrainOn = "assistant",
    freeze_blocks: int = 0,
    freeze_embeddings: bool = False,
    lora: LoRAConfig | None = None,
    prefix: PrefixConfig | None = None,
    seed: int = 0,
    after_training: Callable[[nn.Module], dict[str, Any]] | None = None,
    parallel: ParallelConfig | None = None,
) -> dict[str, Any]:
    """Fine-tune `checkpoint` on `train_convs`, reporting the loss on `heldout_convs` (may be empty) before and
    after. `after_training(model)` runs on the tuned model (adapters or prefix still attached) and its dict joins
    the metrics. Writes `out_dir/final/` (and `adapter/` or `prefix/`, see the module docstring)."""
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if method not in METHODS:
        raise ValueError(f"method={method!r}; choose one of {list(METHODS)}")
    if method != "full" and (freeze_blocks or freeze_embeddings):
        raise ValueError(f"freeze_blocks/freeze_embeddings apply to method='full'; {method} trains its own "
                         "parameters only")  # fmt: skip
    if lora is not None and method != "lora":
        raise ValueError(f"a LoRAConfig was given but method={method!r}; pass method='lora' to use it")
    if prefix is not None and method != "prefix":
        raise ValueError(f"a PrefixConfig was given but method={method!r}; pass method='prefix' to use it")
    if not train_convs:
        raise ValueError("no conversations to train on")
    world = init_world(parallel or ParallelConfig(), train_cfg.device)
    if world.distributed and (world.pp_size > 1 or (parallel and parallel.data != "ddp")):
        raise ValueError("fine-tuning runs data parallel with parallel.data=ddp only (no fsdp or pipeline): the "
                         "adapters, prefixes and frozen layers are applied to the whole model in every rank")  # fmt: skip
    check_batch(train_cfg, world)
    if has_prefix(checkpoint):
        raise ValueError(f"{checkpoint} is prefix-tuned (it has {PREFIX_DIR}/); fine-tune its base model instead, "
                         "the checkpoint the prefix was trained on")  # fmt: skip
    model, args = load_model(checkpoint, dtype=torch.float32)  # fp32 master weights, whatever the stored dtype
    if train_cfg.seq_len is None:  # fine-tuning settings leave it to the model
        train_cfg = train_cfg.model_copy(update={"seq_len": args.max_seq_len})
    if train_cfg.seq_len > args.max_seq_len:
        raise ValueError(f"train.seq_len={train_cfg.seq_len} exceeds the model's max_seq_len={args.max_seq_len}")
    tok = load_checkpoint_tokenizer(checkpoint)
    tokenizer_path = checkpoint / TOKENIZER
    # A prefix is seen from position 0 at inference, but from a packed conversation's row offset in training
    # (positions are absolute and prefix keys carry none): prefix tuning trains one conversation per row.
    one_per_row = method == "prefix"
    train_rows = render_pack(tok, train_convs, train_on, train_cfg.seq_len, one_per_row)
    val_rows = (render_pack(tok, heldout_convs, train_on, train_cfg.seq_len, one_per_row, split="held-out")
                if heldout_convs else None)  # fmt: skip
    loader = SFTBatches(train_rows, train_cfg.batch_size, seed, rank=world.dp_rank, world_size=world.dp_size)

    if method == "lora":
        torch.manual_seed(seed)  # the A matrices are drawn at random: the same seed gives the same adapters
        apply_lora(model, lora or LoRAConfig(), ADAPTER_NAME)
        writer = live_checkpoint_writer(lambda m, d: save_adapter(m, ADAPTER_NAME, d / ADAPTER_DIR))
    elif method == "prefix":
        torch.manual_seed(seed)
        apply_prefix(model, prefix or PrefixConfig())
        writer = live_checkpoint_writer(lambda m, d: save_prefix(m, d / PREFIX_DIR))
    else:
        freeze(model, freeze_blocks, freeze_embeddings)
        writer = lambda m, d: write_model_files(m, args, d, tokenizer_path)  # noqa: E731
    trainable, total = trainable_parameters(model)
    if trainable == 0:
        raise ValueError("nothing left to train: every parameter is frozen")
    head = ("lm_head.", "model.embed_tokens.") if args.tie_embeddings else ("lm_head.",)
    if not any(p.requires_grad for n, p in model.named_parameters() if n.startswith(head)):
        # Measured in docs/finetuning.md ("Choosing a method"): without it, no reply ever ended its turn.
        log.warning("the output layer is frozen (method=%s): a model pre-trained without the chat template has "
                    "pushed <|end|> down at every step and may never learn to end its turn; %s", method,
                    _unfreeze_head_hint(method, lora))  # fmt: skip

    val_fn = (lambda m: heldout_loss(m, val_rows, train_cfg.batch_size)) if val_rows else None
    val_batches = -(-len(val_rows.ids) // train_cfg.batch_size) if val_rows else None
    if val_fn:
        log.info("held-out loss before fine-tuning, on %d batches...", val_batches)
    before = val_fn(model) if val_fn else None
    metrics = train(model, sft_loss, loader, train_cfg, out_dir,
                    tokens_per_batch=train_cfg.batch_size * train_cfg.seq_len * train_cfg.grad_accum,
                    val_fn=val_fn, write_model_files=writer, parallel=parallel, val_batches=val_batches)  # fmt: skip
    if val_fn:
        log.info("held-out loss after fine-tuning, on %d batches...", val_batches)
    after = val_fn(model) if val_fn else None
    extra = after_training(model) if after_training else {}
    # Rank 0 writes, as the loop does: it replaces the loop's wrapped final/ by a plain checkpoint.
    if world.is_main and method == "lora":
        save_adapter(model, ADAPTER_NAME, out_dir / ADAPTER_DIR)  # before merging: the adapter alone
        write_plain(model, args, out_dir / FINAL_DIR, tokenizer_path)
    elif world.is_main and method == "prefix":
        save_prefix(model, out_dir / PREFIX_DIR)
        _write_base(model, args, out_dir / FINAL_DIR, tokenizer_path)
    return {
        **metrics,
        **extra,
        "method": method,
        "heldout_loss_before": before,
        "heldout_loss_after": after,
        "trainable_params": trainable,
        "total_params": total,
        "train_conversations": len(train_convs),
        "heldout_conversations": len(heldout_convs),
        "train_rows": len(train_rows.ids),
        "truncated_conversations": train_rows.truncated,
    }
