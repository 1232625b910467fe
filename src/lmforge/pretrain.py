"""The pretrain stage: a fresh transformer, the token shards and an objective, fed to the one training loop.

The objective (`pretrain.objective`) is causal LM, BERT-style MLM, T5 span corruption (as a prefix LM), prefix LM,
contrastive sentence embeddings, or a weighted mixture of them. `ObjectiveBatches` turns each loader batch into
the objective's batch; the random choices it makes (masking, spans, prefixes, views, and the objective drawn from
a mixture) come from a generator seeded by the loader's position, so a resumed run makes the same choices.
With `pretrain.packing: best_fit`, rows hold whole documents (lmforge.data.packing); `document_masking` stops
attention at document boundaries.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch
import typer

from lmforge.data.batches import BatchesWrapper
from lmforge import verbs
from lmforge.data.loader import BatchLoader
from lmforge.data.shards import open_split
from lmforge.hub import resolve_model_dir
from lmforge.model.io import load_model, read_model_args, write_model_files
from lmforge.model.modes import evaluating
from lmforge.model.transformer import ModelArgs, Transformer
from lmforge.outdir import inputs_fingerprint, start_job
from lmforge.losses import LossContext, LossResult, ce_loss, cross_entropy, label_count
from lmforge.objectives import IGNORE_INDEX, mlm_accuracy, objective_batch, objective_loss, objective_loss_tokens
from lmforge.model.config import ModelConfig
from lmforge.objectives import PretrainConfig
from lmforge.train.config import ParallelConfig, TrainConfig
from lmforge.tokenizer import Tokenizer
from lmforge.train.distributed import check_batch, init_world
from lmforge.train.loop import METRICS_FILE, OUTPUTS, train
from lmforge.registry import ReportContext, Stage, StageContext, register
from lmforge.report.format import fmt, plot_training_curve

log = logging.getLogger(__name__)


def validation_windows(split, seq_len: int, n_windows: int, bos_id: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed set of held-out windows spread evenly over the split, so every validation reads the same tokens.

    Targets that are BOS (the start of the next document) are ignored: no text stands behind them.
    """
    available = (split.n_tokens - 1) // seq_len
    if available < 1:
        raise ValueError(f"validation split has {split.n_tokens} tokens, fewer than seq_len+1={seq_len + 1}")
    starts = np.linspace(0, (available - 1) * seq_len, num=min(n_windows, available)).astype(np.int64)
    windows = []
    for s in starts:
        chunk = torch.from_numpy(split.slice(int(s), int(s) + seq_len + 1))
        x, y = chunk[:-1].clone(), chunk[1:].clone()
        y[y == bos_id] = IGNORE_INDEX
        windows.append((x, y))
    return windows


def make_val_fn(windows: list[tuple[torch.Tensor, torch.Tensor]], batch_size: int):
    """Mean held-out loss (nats per token) over fixed windows."""

    @torch.no_grad()
    def val_fn(model: torch.nn.Module) -> float:
        device = next(model.parameters()).device
        total, count = 0.0, 0
        with evaluating(model):
            for i in range(0, len(windows), batch_size):
                xs = torch.stack([w[0] for w in windows[i : i + batch_size]]).to(device)
                ys = torch.stack([w[1] for w in windows[i : i + batch_size]]).to(device)
                total += float(cross_entropy(model(xs), ys))
                count += int(label_count(ys))
        return total / max(count, 1)

    return val_fn


def objective_weights(cfg: PretrainConfig) -> dict[str, float]:
    """The objective mixture as normalised weights, in a fixed order."""
    raw = cfg.objective if isinstance(cfg.objective, dict) else {cfg.objective: 1.0}
    total = sum(raw.values())
    return {name: raw[name] / total for name in sorted(raw)}


class ObjectiveBatches(BatchesWrapper):
    """Wraps a loader of (x, y[, doc_ids]) windows; yields `(objective, batch)` for `MixtureLoss`.

    The generator for each batch is seeded from (seed, the loader's state before the batch), so the choices repeat
    exactly after a resume; the state passes through to the wrapped loader.
    """

    def __init__(self, loader, cfg: PretrainConfig, tokenizer: Tokenizer, seed: int, document_masking: bool) -> None:
        super().__init__(loader)
        self.loader, self.cfg, self.tokenizer, self.seed = loader, cfg, tokenizer, seed
        self.weights = objective_weights(cfg)
        self.document_masking = document_masking

    def _generator(self) -> torch.Generator:
        state = self.loader.state_dict()
        key = [self.seed] + [int(v) for v in state.values() if isinstance(v, (int, np.integer))]
        g = torch.Generator()
        g.manual_seed(int(np.random.SeedSequence(key).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1)))
        return g

    def __next__(self):
        g = self._generator()
        batch = next(self.loader)
        names = list(self.weights)
        if len(names) == 1:
            name = names[0]
        else:
            pick = torch.multinomial(torch.tensor(list(self.weights.values())), 1, generator=g).item()
            name = names[int(pick)]
        if len(batch) == 3:  # packed rows: (x, y, doc_ids); only causal LM reads them (checked in pretrain)
            x, y, doc_ids = batch
            return name, (x, y, doc_ids if self.document_masking else None)
        x, y = batch
        return name, objective_batch(name, x, y, self.cfg, self.tokenizer, g)

    def loss_tokens(self, item) -> int:
        name, batch = item
        return objective_loss_tokens(name, batch)


class MixtureLoss:
    """loss_fn(model, (objective, batch), ctx): the named objective's loss (lmforge.losses.LogitsLoss).

    One objective normalises by the step's loss tokens. A mixture's objectives count different things (next tokens,
    masked tokens, pairs), so there each micro-batch's mean weighs the same, as the mixture weights intend, and the
    metrics `<objective>_share` say which share of the step's micro-batches drew each objective.
    """

    def __init__(self, cfg: PretrainConfig) -> None:
        self.losses = {name: objective_loss(name, cfg) for name in objective_weights(cfg)}

    def __call__(self, model: torch.nn.Module, item, ctx: LossContext | None = None) -> LossResult:
        name, batch = item
        if len(self.losses) == 1:
            return self.losses[name](model, batch, ctx)
        if ctx is not None:
            ctx = ctx.per_micro_batch(objective_loss_tokens(name, batch))
        loss, _ = self.losses[name](model, batch, ctx)  # objectives' own metrics differ: only the shares are kept
        return loss, {f"{other}_share": float(other == name) for other in self.losses}

    def split(self, item) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, labels) of a causal-LM batch, for pipeline-parallel stages."""
        name, batch = item
        if name != "clm" or len(self.losses) > 1 or (len(batch) == 3 and batch[2] is not None):
            raise ValueError("pipeline parallelism runs causal LM without document masking; set pretrain.objective="
                             "clm and pretrain.document_masking=false, or parallel.pipeline=1")  # fmt: skip
        return batch[0], batch[1]

    def from_logits(self, logits: torch.Tensor, labels: torch.Tensor, ctx: LossContext | None = None) -> LossResult:
        """The causal-LM loss from the logits, as `clm_loss` computes it after its forward."""
        return ce_loss(logits, labels, ctx)


def objective_val_fn(windows, batch_size: int, cfg: PretrainConfig, tokenizer: Tokenizer, seed: int):
    """Held-out loss of the mixture's main objective (causal LM when it is in the mixture, else the heaviest).

    The noise (masks, spans, prefixes, views) comes from a fixed generator, so every evaluation scores the same
    batches. Returns the mean loss over the fixed windows.
    """
    weights = objective_weights(cfg)
    main = "clm" if "clm" in weights else max(weights, key=weights.get)
    if main == "clm":
        return make_val_fn(windows, batch_size), main
    loss = objective_loss(main, cfg)

    @torch.no_grad()
    def val_fn(model: torch.nn.Module) -> float:
        device = next(model.parameters()).device
        g = torch.Generator()
        g.manual_seed(seed)
        total, count = 0.0, 0
        with evaluating(model):
            for i in range(0, len(windows), batch_size):
                xs = torch.stack([w[0] for w in windows[i : i + batch_size]])
                ys = torch.stack([w[1] for w in windows[i : i + batch_size]])
                # validation_windows hides BOS targets from the causal loss; the objective builders want the raw
                # tokens.
                ys = torch.where(ys == IGNORE_INDEX, tokenizer.doc_start_id, ys)
                batch = objective_batch(main, xs, ys, cfg, tokenizer, g)
                batch = {k: v.to(device) for k, v in batch.items()} if isinstance(batch, dict) else batch
                total += float(loss(model, batch)[0]) * len(xs)
                count += len(xs)
        return total / max(count, 1)

    return val_fn, main


def mlm_val_accuracy(model, windows, cfg: PretrainConfig, tokenizer: Tokenizer, seed: int) -> float:
    """Masked-token accuracy of `model` on the fixed held-out windows (fixed masking)."""
    g = torch.Generator()
    g.manual_seed(seed)
    device = next(model.parameters()).device
    xs = torch.stack([w[0] for w in windows])
    batch = objective_batch("mlm", xs, xs, cfg, tokenizer, g)
    with torch.no_grad():
        return mlm_accuracy(model, {k: v.to(device) for k, v in batch.items()})


def _initial_model(cfg: ModelConfig, tokenizer: Tokenizer) -> tuple[Transformer, ModelArgs]:
    """A new model of the recipe's shape, randomly initialised; or, with model.init_from, the imported model
    (trained in fp32 like any other: bf16 comes from autocast on CUDA, not from the stored weights)."""
    if not cfg.init_from:
        args = ModelArgs.from_config(cfg, tokenizer.vocab_size)
        model = Transformer(args)
        model.init_weights()
        return model, args
    model, args = load_model(resolve_model_dir(cfg.init_from), dtype=torch.float32)
    if tokenizer.vocab_size > args.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but model.init_from={cfg.init_from!r} "
                         f"embeds only {args.vocab_size}: continued pre-training needs the model's own tokenizer")
    log.info("continuing pre-training of %s", cfg.init_from)
    return model, args


def pretrain(
    shards_dir: Path,
    tokenizer_path: Path,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    out_dir: Path,
    pretrain_cfg: PretrainConfig | None = None,
    parallel_cfg: ParallelConfig | None = None,
) -> dict:
    """Train a model from scratch on `shards_dir` with `pretrain_cfg`'s objective; the final model lands in
    `out_dir/final/`. Re-running the same job (settings, shards and tokenizer) on the same `out_dir` resumes from
    its last checkpoint; a different one starts over (lmforge.outdir.start_job). Under torchrun, every rank calls
    this; `parallel_cfg` says how they split the work.
    """
    pretrain_cfg = pretrain_cfg or PretrainConfig()
    parallel_cfg = parallel_cfg or ParallelConfig()
    world = init_world(parallel_cfg, train_cfg.device)
    rows = check_batch(train_cfg, world)  # this rank's share of each global micro-batch
    if world.pp_size > 1 and set(objective_weights(pretrain_cfg)) != {"clm"}:
        raise ValueError(f"parallel.pipeline={world.pp_size} runs causal LM only; pretrain.objective is "
                         f"{pretrain_cfg.objective}")  # fmt: skip
    if "contrastive" in objective_weights(pretrain_cfg) and not parallel_cfg.find_unused_parameters:
        # Contrastive steps use the hidden states, not the output head: DDP must not wait for its gradients.
        parallel_cfg = parallel_cfg.model_copy(update={"find_unused_parameters": True})
    weights = objective_weights(pretrain_cfg)
    if pretrain_cfg.packing == "best_fit" and set(weights) != {"clm"}:
        raise ValueError(f"pretrain.packing=best_fit packs documents for causal LM; objective {pretrain_cfg.objective}"
                         " needs pretrain.packing=window")  # fmt: skip
    if pretrain_cfg.document_masking and pretrain_cfg.packing != "best_fit":
        raise ValueError("pretrain.document_masking needs pretrain.packing=best_fit (rows of whole documents)")
    settings = {"model": model_cfg.semantic(), "train": train_cfg.semantic(), "pretrain": pretrain_cfg.semantic()}
    inputs = {"shards": inputs_fingerprint(shards_dir), "tokenizer": inputs_fingerprint(tokenizer_path)}
    if model_cfg.init_from:
        inputs["init_from"] = inputs_fingerprint(resolve_model_dir(model_cfg.init_from))
    start_job(out_dir, "pretrain", settings, inputs, OUTPUTS, world)
    tokenizer = Tokenizer.from_file(tokenizer_path)
    torch.manual_seed(train_cfg.seed)
    model, args = _initial_model(model_cfg, tokenizer)
    log.info(
        "model: %d layers, d_model %d, %d heads (%d kv), %.2fM parameters (%.2fM non-embedding)",
        args.n_layers, args.d_model, args.n_heads, args.n_kv_heads,
        model.num_params() / 1e6, model.num_params(non_embedding=True) / 1e6,
    )  # fmt: skip

    train_split = open_split(shards_dir, "train")
    val_split = open_split(shards_dir, "val")
    if pretrain_cfg.packing == "best_fit":
        from lmforge.data.packing import PackedLoader

        base = PackedLoader(train_split, train_cfg.seq_len, rows, train_cfg.seed, pad_id=tokenizer.pad_id,
                            rank=world.dp_rank, world_size=world.dp_size)  # fmt: skip
    else:
        base = BatchLoader(train_split, train_cfg.seq_len, rows, train_cfg.seed, rank=world.dp_rank,
                           world_size=world.dp_size)  # fmt: skip
    loader = ObjectiveBatches(base, pretrain_cfg, tokenizer, train_cfg.seed, pretrain_cfg.document_masking)
    # Pipeline stages were built for this rank's row count; other layouts score in the global batch size.
    val_rows = rows if world.pp_size > 1 else train_cfg.batch_size
    windows, val_fn, val_objective = [], None, None
    if val_split.n_tokens:
        windows = validation_windows(val_split, train_cfg.seq_len, train_cfg.eval_batches * train_cfg.batch_size,
                                     tokenizer.doc_start_id)  # fmt: skip
        val_fn, val_objective = objective_val_fn(windows, val_rows, pretrain_cfg, tokenizer, train_cfg.seed)
    else:
        log.info("no validation split (data.val_fraction=0): training without a validation loss")
    log.info("objective: %s (validation: %s loss)", ", ".join(f"{k} {v:.2f}" for k, v in weights.items()),
             val_objective or "no")  # fmt: skip

    metrics = train(
        model,
        MixtureLoss(pretrain_cfg),
        loader,
        train_cfg,
        out_dir,
        flops_per_token=model.flops_per_token(train_cfg.seq_len),
        tokens_per_batch=train_cfg.batch_size * train_cfg.seq_len * train_cfg.grad_accum,
        val_fn=val_fn,
        write_model_files=lambda m, d: write_model_files(m, args, d, tokenizer_path),
        parallel=parallel_cfg,
        val_batches=-(-len(windows) // val_rows) if windows else None,
    )
    metrics["val_objective"] = val_objective
    metrics["val_split"] = bool(windows)
    if "mlm" in weights and windows:
        metrics["val_mlm_accuracy"] = mlm_val_accuracy(model, windows, pretrain_cfg, tokenizer, train_cfg.seed)
    metrics.update(
        params=model.num_params(),
        non_embedding_params=model.num_params(non_embedding=True),
        flops_per_token=model.flops_per_token(train_cfg.seq_len),
        train_tokens_available=train_split.n_tokens,
        epochs=metrics.get("tokens", 0) / max(train_split.n_tokens, 1),
    )
    return metrics


def _pretrain_stage(ctx: StageContext) -> dict:
    s = ctx.settings
    return pretrain(ctx.input("shards"), ctx.input("tokenizer"), s.model, s.train, ctx.out, s.pretrain, s.parallel)


def _check_lengths(settings) -> None:
    if settings.model.init_from:
        if "import" in settings.stages:
            raise ValueError("stages lists both import and pretrain: with model.init_from, pretrain continues "
                             "pre-training the imported model itself; remove 'import' (or 'pretrain' to use the "
                             "model as it is)")  # fmt: skip
        try:
            context = read_model_args(resolve_model_dir(settings.model.init_from)).max_seq_len
        except FileNotFoundError as e:
            raise ValueError(f"model.init_from={settings.model.init_from!r}: {e}") from None
        if settings.train.seq_len > context:
            raise ValueError(f"train.seq_len={settings.train.seq_len} exceeds the context of model.init_from="
                             f"{settings.model.init_from!r} ({context} tokens)")  # fmt: skip
        return
    if settings.train.seq_len > settings.model.max_seq_len:
        raise ValueError(f"train.seq_len={settings.train.seq_len} exceeds model.max_seq_len={settings.model.max_seq_len}")


def _budget(pre: dict) -> str:
    """The time budget and how much of it was used, when the run had one (train.max_time)."""
    if not pre.get("max_time"):
        return ""
    used = pre.get("train_seconds") or 0.0
    return (f" of a {pre['max_time']:g} s budget (train.max_time, {used / pre['max_time']:.0%} used; stopped by "
            f"{pre.get('stopped_by')})")


def _pretrain_report(ctx: ReportContext) -> list[str]:
    pre = ctx.metrics
    lines = [
        "## Pre-training",
        "",
        f"- parameters: {fmt(pre.get('params'))} ({fmt(pre.get('non_embedding_params'))} non-embedding)",
        f"- steps: {fmt(pre.get('steps'))}, tokens: {fmt(pre.get('tokens'))} ({fmt(pre.get('epochs'), '.2f')} epochs)",
        f"- throughput: {fmt(pre.get('tokens_per_s'), '.4g')} tokens/s, MFU {fmt(pre.get('mfu'), '.1%')} of a "
        f"measured peak of {fmt((pre.get('peak_flops') or 0) / 1e9, '.1f')} GFLOP/s",
        f"- final train loss {fmt(pre.get('final_loss'))}, validation loss "
        + (fmt(pre.get("final_val_loss")) if pre.get("val_split", True) else "none (no val split: data.val_fraction=0)"),
        f"- wall time {fmt(pre.get('train_seconds'), '.1f')} s{_budget(pre)}; skipped (bad) steps: "
        f"{pre.get('skipped_steps', 0)}",
        "",
    ]
    png = ctx.out / "loss.png"
    if plot_training_curve(ctx.stage_dir / METRICS_FILE, png):
        lines += [f"![training curve]({png.relative_to(ctx.root)})", ""]
    return lines


@verbs.resumable
def pretrain_verb(
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
    cfg = verbs.settings(list(overrides or []), {"model", "train", "pretrain", "parallel"})
    with verbs.output_checked():
        metrics = verbs.run_stage(PRETRAIN_STAGE, cfg, out, shards=shards_dir, tokenizer=tokenizer_path)
    log.info("final validation loss %.4f; model in %s", metrics.get("final_val_loss") or float("nan"), out / "final")


PRETRAIN_STAGE = register(Stage(
    name="pretrain", order=40, run=_pretrain_stage, training=True, needs=("shards", "tokenizer"),
    sections={"model": ModelConfig, "train": TrainConfig, "pretrain": PretrainConfig, "parallel": ParallelConfig},
    fingerprinted=("model", "train", "pretrain"), check=_check_lengths,
    produces={"model": "final", "base_model": "final"}, report=_pretrain_report, verb=pretrain_verb,
    default=lambda settings: not settings.model.init_from,  # an imported model is pre-trained already
))  # fmt: skip
