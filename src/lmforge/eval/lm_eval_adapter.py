"""lm-evaluation-harness backend for lmforge checkpoints: `--model lmforge --model_args checkpoint=DIR`.

    python -m lmforge.eval.lm_eval_adapter --model lmforge \
        --model_args checkpoint=runs/x/pretrain/final,device=auto,batch_size=32 \
        --tasks arc_easy --include_path my_tasks/

Requests are tokenized by lm-eval's own code (TemplateLM: the whole string split at the context's tokens,
trailing whitespace of the context moved to the continuation, BOS first) and rolling texts are cut by lm-eval's
own window function; lmforge's scoring engine (lmforge.eval.scorer) then runs the model, batched longest first,
with the log-softmax taken at the continuation positions only. So a checkpoint scores here exactly as its Hugging Face export does under `--model hf`
(for rolling log-likelihoods, `--model hf` with `add_bos_token=False`: with the export's BOS-adding tokenizer
lm-eval 0.4.13 would otherwise put a second BOS in front of its own prefix token).

lm-eval 0.4.13 discovers no external backends, so `main` registers this one and then hands the arguments to
lm-eval's own command line. Without network (or with HF_DATASETS_OFFLINE / HF_HUB_OFFLINE set), `main` checks the
tasks' Hugging Face datasets against the local caches before the model is loaded, and a dataset that cannot be had
raises DatasetUnavailable: one line naming it and pointing to `lmforge eval --task-dir` with local files.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlparse

import torch

try:
    from lm_eval.api.instance import Instance
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window, simple_parse_args_string
except ImportError as e:
    raise ImportError(f"the lm-eval adapter needs lm-evaluation-harness: pip install lm-eval ({e})") from e

from lmforge.eval import scorer
from lmforge.eval.tasks import TASK_NAMES

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 32
# The keys --model_args may set; anything else is refused with this list rather than ignored.
MODEL_ARGS = ("checkpoint", "device", "batch_size", "max_gen_toks", "seed", "max_batch_size")


@register_model("lmforge")
class LmforgeLM(TemplateLM):
    """An lmforge checkpoint (or a transformers directory) as an lm-eval model, scored by lmforge.eval.scorer."""

    def __init__(
        self,
        checkpoint: str | Path | None = None,
        device: str = "auto",
        batch_size: int | str = DEFAULT_BATCH_SIZE,
        max_gen_toks: int = 256,
        seed: int = 1234,
        max_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        from lmforge.train.host import keep_freed_memory

        # As the eval stage does: every batch allocates a [batch, length, vocab] logits tensor, and glibc would
        # otherwise hand it back to the kernel and fault it in afresh each time.
        keep_freed_memory()
        if checkpoint in (None, ""):
            raise ValueError("the lmforge model needs a checkpoint: --model_args checkpoint=runs/NAME/pretrain/final")
        self.lm = scorer.load_language_model(Path(checkpoint), device=str(device))
        self._device = self.lm.device
        self.batch_size = _batch_size(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        self.seed = int(seed)
        del max_batch_size  # lm-eval always passes it; there is no auto batch size to cap here

    # lm-eval passes its own --batch_size (default 1) and --device (default cuda:0) on top of --model_args, as
    # keywords that would collide with ours; model_args win, since the harness sends its defaults even unasked.
    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> LmforgeLM:
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict | None = None) -> LmforgeLM:
        unknown = sorted(set(arg_dict) - set(MODEL_ARGS))
        if unknown:
            raise ValueError(f"unknown lmforge model_args {unknown}; allowed: {', '.join(MODEL_ARGS)}")
        harness = {k: v for k, v in (additional_config or {}).items() if v is not None and k in MODEL_ARGS}
        dev = harness.get("device")
        if dev is not None and str(dev).startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's CLI says cuda:0 when --device is not given; like its hf backend, fall back to what exists.
            log.info("lm-eval asked for device %s but there is no CUDA device; using device=auto", dev)
            harness.pop("device")
        return cls(**(harness | arg_dict))

    @property
    def tokenizer_name(self) -> str:
        return self.lm.name

    def get_model_info(self) -> dict[str, Any]:
        return {"model_name": self.lm.name, "max_length": self.lm.max_len}

    @property
    def eot_token_id(self) -> int | None:
        return self.lm.eos_id

    @property
    def prefix_token_id(self) -> int | None:
        # What an empty context and the first rolling window start with: BOS, as every lmforge sequence does.
        return self.lm.prefix[0] if self.lm.prefix else self.lm.eos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        # As HFLM with a BOS-adding tokenizer: BOS unless told otherwise (lm-eval asks for none on a continuation).
        ids = self.lm.encode(string)
        return ids if add_special_tokens is False else self.lm.prefix + ids

    # loglikelihood itself is TemplateLM's: it tokenizes each (context, continuation) and calls this.
    def _loglikelihood_tokens(
        self, requests: list[tuple[tuple[str, str], list[int], list[int]]], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        for (context, continuation), ctx, cont in requests:
            if not ctx or not cont:
                raise ValueError(f"request ({context[-40:]!r}, {continuation!r}) tokenizes to an empty "
                                 f"{'context' if not ctx else 'continuation'}; nothing to score")  # fmt: skip
        pairs = [(ctx, cont) for _, ctx, cont in requests]
        return scorer.loglikelihood_tokens(self.lm, pairs, batch_size=self.batch_size, progress=not disable_tqdm)

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        # lm-eval's own windows, not scorer.rolling_windows: both cut disjoint windows, but lm-eval widens the last
        # one to a full context, so a text longer than the context window scores differently (and better) there.
        prefix = self.prefix_token_id
        if prefix is None:
            raise ValueError(f"{self.lm.name} has neither a BOS nor an EOS token to start a rolling window with")
        pieces: list[tuple[list[int], list[int]]] = []
        owners: list[int] = []
        for i, r in enumerate(requests):
            tokens = self.tok_encode(str(r.args[0]), add_special_tokens=False)
            for window in get_rolling_token_windows(tokens, prefix, self.lm.max_len, 1):
                pieces.append(make_disjoint_window(window))
                owners.append(i)
        scores = scorer.loglikelihood_tokens(self.lm, pieces, batch_size=self.batch_size, label="rolling",
                                             progress=not disable_tqdm)  # fmt: skip
        totals = [0.0] * len(requests)  # an empty text has no token to predict: log-probability 0
        for owner, (logp, _) in zip(owners, scores):
            totals[owner] += logp
        return totals

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        # The scorer takes one setting per call, so requests are grouped by their generation settings.
        groups: dict[_Gen, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(self._gen_settings(r.args[1]), []).append(i)
        out = [""] * len(requests)
        for gen, rows in groups.items():
            prompts = [str(requests[i].args[0]) for i in rows]
            if gen.temperature == 0.0:
                texts = scorer.generate_until(self.lm, prompts, until=gen.until, max_new_tokens=gen.max_new,
                                              batch_size=self.batch_size, progress=not disable_tqdm)  # fmt: skip
            else:
                texts = self._sample(prompts, gen)
            for i, text in zip(rows, texts):
                out[i] = text
        return out

    def _gen_settings(self, gen_kwargs: dict[str, Any] | None) -> _Gen:
        kw = dict(gen_kwargs or {})
        until = kw.pop("until", None) or ()
        until = (until,) if isinstance(until, str) else tuple(until)
        max_new = int(kw.pop("max_gen_toks", kw.pop("max_new_tokens", self.max_gen_toks)))
        do_sample = bool(kw.pop("do_sample", False))
        temperature = float(kw.pop("temperature", 1.0) or 0.0)
        top_k, top_p = kw.pop("top_k", None), kw.pop("top_p", None)
        if kw:
            raise ValueError(f"unsupported generation settings {sorted(kw)}; the lmforge model honours until, "
                             "max_gen_toks, do_sample, temperature, top_k and top_p")  # fmt: skip
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not do_sample or temperature == 0.0:  # lm-eval's greedy: do_sample false, whatever the temperature
            return _Gen(until, max_new, 0.0, None, None)
        return _Gen(until, max_new, temperature, int(top_k) if top_k else None, float(top_p) if top_p else None)

    def _sample(self, prompts: Sequence[str], gen: _Gen) -> list[str]:
        """Sampled continuations from the KV-cache engine, reproducible from `seed`."""
        if self.lm.module is None:
            raise ValueError("sampling (do_sample=true, temperature>0) needs an lmforge checkpoint; a transformers "
                             "directory is scored greedily only")  # fmt: skip
        if gen.max_new >= self.lm.max_len:
            raise ValueError(f"max_gen_toks={gen.max_new} leaves no room for a prompt in {self.lm.max_len} positions")
        from lmforge.infer.engine import generate

        ids = [(self.lm.prefix + self.lm.encode(p))[-(self.lm.max_len - gen.max_new):] for p in prompts]
        new = generate(self.lm.module, ids, gen.max_new, temperature=gen.temperature, top_k=gen.top_k, top_p=gen.top_p,
                       eos_id=self.lm.eos_id, seed=self.seed)  # fmt: skip
        return [_cut(self.lm.decode(n), gen.until) for n in new]


class _Gen(NamedTuple):
    """One request's generation settings; temperature 0 means greedy."""

    until: tuple[str, ...]
    max_new: int
    temperature: float
    top_k: int | None
    top_p: float | None


def _batch_size(value: int | str) -> int:
    if isinstance(value, str) and value.startswith("auto"):
        # The scorer sorts by length and has no memory probe; a fixed batch is what it is measured with.
        log.info("batch_size=%s: the lmforge model has no automatic batch size; using %d", value, DEFAULT_BATCH_SIZE)
        return DEFAULT_BATCH_SIZE
    try:
        size = int(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"batch_size={value!r} is not a positive integer (or auto)") from e
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {size}")
    return size


def _cut(text: str, until: Sequence[str]) -> str:
    cuts = [text.find(s) for s in until if s and s in text]
    return text[: min(cuts)] if cuts else text


class DatasetUnavailable(RuntimeError):
    """A task's dataset is neither in the local caches nor downloadable; the message says what to do instead."""


_TRUE = ("1", "ON", "YES", "TRUE")
_HUB = "https://huggingface.co"


def hub_unreachable(timeout_s: float = 3.0) -> bool:
    """True when datasets can only come from the local cache: offline mode is set, or the Hub does not answer."""
    if any(os.environ.get(k, "").upper() in _TRUE for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")):
        return True
    url = urlparse(os.environ.get("HF_ENDPOINT") or _HUB)
    try:
        socket.create_connection((url.hostname or "", url.port or 443), timeout=timeout_s).close()
    except OSError:
        return True
    return False


def _task_datasets(names: Sequence[Any], index: dict[str, Any], seen: set[str] | None = None) -> dict[str, tuple]:
    """task name -> (dataset_path, dataset_name, cache_dir) for each task the names reach, groups and tags expanded.
    Names lm-eval does not index (files, inline configs) are left to lm-eval."""
    seen = set() if seen is None else seen
    out: dict[str, tuple] = {}
    for name in names:
        entry = index.get(name) if isinstance(name, str) and name not in seen else None
        if entry is None:
            continue
        seen.add(name)
        cfg = entry.cfg or {}
        if entry.kind.name == "TAG":  # a tag's entry lists its member tasks as its tags
            out |= _task_datasets(sorted(entry.tags), index, seen)
        elif entry.kind.name == "GROUP":
            members = cfg.get("task") or []
            out |= _task_datasets(members if isinstance(members, list) else [members], index, seen)
        elif cfg.get("dataset_path"):
            kwargs = cfg.get("dataset_kwargs") or {}
            out[name] = (str(cfg["dataset_path"]), cfg.get("dataset_name"), kwargs.get("cache_dir"))
    return out


def _cached(path: str, cache_dir: str | None) -> bool:
    """Whether a Hub dataset has a copy in datasets' cache or the Hub's (what datasets reads offline)."""
    from datasets import config
    from huggingface_hub import constants

    return (Path(cache_dir or config.HF_DATASETS_CACHE) / path.replace("/", "___")).is_dir() or \
        (Path(constants.HF_HUB_CACHE) / f"datasets--{path.replace('/', '--')}").is_dir()  # fmt: skip


def missing_datasets(tasks: Sequence[Any], index: dict[str, Any]) -> dict[str, str]:
    """task -> Hub dataset, for the tasks whose dataset is neither local (a packaged builder such as json, or a
    directory) nor in a local cache."""
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

    return {task: path for task, (path, _, cache_dir) in sorted(_task_datasets(tasks, index).items())
            if path not in _PACKAGED_DATASETS_MODULES and not Path(path).exists() and not _cached(path, cache_dir)}


def unavailable_message(needs: str, tasks: Sequence[str]) -> str:
    """One line: what could not be had, and how to score the same benchmarks from local files."""
    local = [t for t in tasks if t in TASK_NAMES]
    instead = (f"lmforge eval CHECKPOINT --tasks {','.join(local)} --task-dir DIR" if local
               else "lmforge eval CHECKPOINT --tasks NAME=FILE.jsonl")  # fmt: skip
    return (f"lm-eval cannot get {needs}: it is not in the local Hugging Face cache and there is no network (or "
            f"HF_DATASETS_OFFLINE is set). Score local files instead: {instead} (docs/evaluation.md lists the "
            "files), or run once with network to cache the dataset")


@contextmanager
def _datasets_checked_first() -> Iterator[None]:
    """lm-eval's CLI builds the model before it fetches the tasks' datasets; this puts an offline check of the
    datasets in front of lm_eval.simple_evaluate (which the CLI imports when it runs), reusing its task index."""
    import lm_eval

    own = vars(lm_eval).get("simple_evaluate")  # lm_eval serves it lazily, through its module __getattr__
    real = lm_eval.simple_evaluate

    def checked(*args: Any, **kwargs: Any) -> Any:
        manager = kwargs.get("task_manager")
        if manager is not None:
            missing = missing_datasets(list(kwargs.get("tasks") or []), manager.task_index)
            if missing:
                needs = ", ".join(f"dataset {path!r} for {task}" for task, path in missing.items())
                raise DatasetUnavailable(unavailable_message(needs, list(missing)))
        return real(*args, **kwargs)

    lm_eval.simple_evaluate = checked
    try:
        yield
    finally:
        if own is None:
            del lm_eval.simple_evaluate
        else:
            lm_eval.simple_evaluate = own


def _arg_tasks(args: Sequence[str]) -> list[str]:
    """The task names of a `--tasks a,b` / `-t a b` / `--tasks=a,b` argument."""
    names: list[str] = []
    taking = False
    for arg in args:
        if arg in ("--tasks", "-t") or arg.startswith("--tasks="):
            taking = True
            arg = arg.partition("=")[2]
        elif arg.startswith("-"):
            taking = False
        if taking:
            names += [n for n in arg.split(",") if n]
    return names


def main(argv: Sequence[str] | None = None) -> None:
    """lm-eval's command line with the lmforge backend registered: `main(["--model", "lmforge", ...])`.

    Takes exactly lm-eval's arguments (`lm_eval --help`); with no subcommand, `run` is assumed, as lm-eval does.
    Raises DatasetUnavailable when a task's dataset can be neither read from the cache nor downloaded.
    """
    offline = hub_unreachable()
    if offline:
        # Before datasets is imported: offline, a missing dataset fails at once instead of after five retries.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from lm_eval.__main__ import cli_evaluate

    # lm-eval's CLI parses sys.argv itself (and inserts `run` there), so the arguments go in through it.
    args = list(sys.argv[1:] if argv is None else argv)
    saved = sys.argv
    sys.argv = ["lm-eval", *args]
    try:
        if offline:
            with _datasets_checked_first():
                cli_evaluate()
        else:
            cli_evaluate()
    except ConnectionError as e:  # datasets' own, for a dataset the check could not foresee (a partial cache)
        raise DatasetUnavailable(unavailable_message(f"a dataset ({e})", _arg_tasks(args))) from e
    finally:
        sys.argv = saved


if __name__ == "__main__":
    try:
        main()
    except DatasetUnavailable as err:
        sys.exit(f"error: {err}")
