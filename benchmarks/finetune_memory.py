"""Trainable parameters, memory and step time of full fine-tuning, LoRA and prefix tuning on the same model and data.

    python benchmarks/finetune_memory.py                                   # the default recipe's pre-trained model
    python benchmarks/finetune_memory.py --checkpoint runs/stdlib-code/pretrain/final --steps 30
    python benchmarks/finetune_memory.py --depth 8 --batch-size 8 --steps 5  # a larger random-init model
    python benchmarks/finetune_memory.py --device cuda                     # GPU: peak from the CUDA allocator
    python benchmarks/finetune_memory.py --smoke                           # seconds: a tiny model, 2 steps each

Every method trains the same packed rows (Alpaca records from ../shared/data/instruct, or --data FILE) with the
same loss, batch and AdamW, on the checkpoint given (without one, a random-init model of the default recipe's
shape: memory and step time do not depend on the weights). Each method runs in its own process, so its peak
memory is its own:

- "state MB": parameters + gradients + AdamW's two moments, counted from the tensors (what the method must hold
  between steps whatever the batch);
- "peak MB": on CPU the growth of the process's peak resident memory over the loaded model (parameters,
  gradients, optimizer state and activations together, plus allocator slack); on CUDA max_memory_allocated;
- "step ms": median time of a training step (forward, backward, AdamW) after warm-up steps.

The last line sums up as key=value pairs. --smoke checks that every method still runs: unless --checkpoint is
given, a random-init depth-2 model with a 512-token vocabulary; batch 2 x 64, 2 steps after 1 warm-up, one thread
(its figures mean nothing).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "instruct" / "alpaca_data_sample2000.json"
# "key" names the method in the summary line.
METHODS = {
    "full": {"key": "full", "method": "full"},
    "full, first 2 blocks + embeddings frozen": {"key": "full_frozen", "method": "full", "freeze_blocks": 2,
                                                 "freeze_embeddings": True},  # fmt: skip
    "LoRA r=8 on q,v": {"key": "lora_qv", "method": "lora", "rank": 8, "targets": ["q_proj", "v_proj"]},
    "LoRA r=8 on every linear": {"key": "lora_all", "method": "lora", "rank": 8,
                                 "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"]},  # fmt: skip
    "prefix, 16 tokens": {"key": "prefix", "method": "prefix", "length": 16},
    "prefix, 16 tokens through an MLP": {"key": "prefix_mlp", "method": "prefix", "length": 16, "reparam": True},
}
# --smoke: (depth, vocabulary, batch size, sequence length, steps, warm-up steps, threads); depth 2 because one
# method freezes the first 2 blocks, one thread because a smoke run shares the machine with the test suite.
SMOKE = (2, 512, 2, 64, 2, 1, 1)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _default_model(path: Path, data: Path, depth: int | None, vocab_size: int | None = None) -> Path:
    """A random-init model of the default recipe's shape (or of `depth` on the recipe's depth dial), with a
    tokenizer trained on the data (the chat tokens are reserved by every lmforge tokenizer) of the recipe's
    vocabulary size unless `vocab_size` is given."""
    from lmforge.model.io import save_model
    from lmforge.model.transformer import ModelArgs, Transformer
    from lmforge.recipe import load_recipe
    from lmforge.tokenizer import train_tokenizer

    recipe = load_recipe()
    records = json.loads(data.read_text(encoding="utf-8"))
    texts = [" ".join(str(r.get(k, "")) for k in ("instruction", "input", "output")) for r in records]
    tok = train_tokenizer(iter(texts), vocab_size=vocab_size or recipe.tokenizer.vocab_size)
    tok.save(path / "tokenizer.json")
    model_cfg = recipe.model.model_copy(update={"depth": depth}) if depth else recipe.model
    args = ModelArgs.from_config(model_cfg, tok.vocab_size)
    torch.manual_seed(0)
    return save_model(path / "ckpt", Transformer(args), args, path / "tokenizer.json")


def run_one(name: str, checkpoint: Path, data: Path, steps: int, warmup: int, batch: int, seq_len: int,
            device: str) -> dict:  # fmt: skip
    """Train one method in this process and measure it."""
    from lmforge.finetune.data import read_conversations
    from lmforge.model.lora import LoRAConfig, apply_lora, trainable_parameters
    from lmforge.model.prefix import PrefixConfig, apply_prefix
    from lmforge.finetune.sft import SFTBatches, render_pack, freeze, sft_loss
    from lmforge.model.io import load_checkpoint_tokenizer, load_model

    spec = METHODS[name]
    torch.manual_seed(0)
    model, _ = load_model(checkpoint, device=device)
    tok = load_checkpoint_tokenizer(checkpoint)
    if spec["method"] == "lora":
        apply_lora(model, LoRAConfig(rank=spec["rank"], alpha=2.0 * spec["rank"], targets=tuple(spec["targets"])))
    elif spec["method"] == "prefix":
        apply_prefix(model, PrefixConfig(length=spec["length"], reparam=spec.get("reparam", False)))
    else:
        freeze(model, spec.get("freeze_blocks", 0), spec.get("freeze_embeddings", False))
    model.to(device)
    trainable, total = trainable_parameters(model)
    convs, _ = read_conversations(data, limit=800)
    rows = render_pack(tok, convs, "assistant", seq_len, one_per_row=spec["method"] == "prefix")
    batches = SFTBatches(rows, batch, seed=0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    base_rss = _rss_mb()
    times = []
    for step in range(warmup + steps):
        batch_t = {k: v.to(device) for k, v in next(batches).items()}
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss, _ = sft_loss(model, batch_t)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    # Parameters (all, trainable or not) + a gradient and two AdamW moments per trainable parameter, fp32.
    state_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) + 3 * 4 * trainable
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _rss_mb() - base_rss
    return {"method": name, "trainable": trainable, "total": total, "trainable_pct": 100.0 * trainable / total,
            "state_mb": state_bytes / 2**20, "peak_mb": peak, "step_ms": 1000 * statistics.median(times),
            "loss": float(loss.detach())}  # fmt: skip


def _measure_in_child(name: str, args: list[str]) -> dict:
    """run_one for method `name` in a fresh process, so that its peak memory is its own."""
    cmd = [sys.executable, __file__, "--one", name, *args]
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout  # its errors show on stderr
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=None, help="Default: runs/stdlib-code/pretrain/final if it "
                    "exists, else a random-init model of that shape.")  # fmt: skip
    ap.add_argument("--depth", type=int, default=None, help="A random-init model of this depth (width 64 x depth) "
                    "instead of a checkpoint.")  # fmt: skip
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads; 0 = all cores.")
    ap.add_argument("--smoke", action="store_true", help="a few seconds on a tiny random-init model: does it run?")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child process measuring one method
    a = ap.parse_args()
    vocab = None  # the recipe's
    if a.smoke:
        depth, vocab, a.batch_size, a.seq_len, a.steps, a.warmup, a.threads = SMOKE
        a.depth = a.depth or (None if a.checkpoint else depth)  # a checkpoint given is used as it is
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.one:
        print(json.dumps(run_one(a.one, a.checkpoint, a.data, a.steps, a.warmup, a.batch_size, a.seq_len, a.device)))
        return
    if not a.data.exists():
        sys.exit(f"{a.data} is missing: give --data FILE (Alpaca, ShareGPT, messages or prompt/response records)")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = a.checkpoint
        if a.depth:
            ckpt = _default_model(Path(tmp), a.data, a.depth, vocab)
        elif ckpt is None:
            default = ROOT / "runs" / "stdlib-code" / "pretrain" / "final"
            ckpt = default if default.exists() else _default_model(Path(tmp), a.data, None)
        print(f"model {ckpt}; data {a.data}; batch {a.batch_size} x {a.seq_len}; {a.steps} steps after "
              f"{a.warmup} warm-up; device {a.device}; torch threads {a.threads or torch.get_num_threads()}")
        common = ["--checkpoint", str(ckpt), "--data", str(a.data), "--steps", str(a.steps), "--warmup",
                  str(a.warmup), "--batch-size", str(a.batch_size), "--seq-len", str(a.seq_len), "--device", a.device,
                  "--threads", str(a.threads)]  # fmt: skip
        # Measured one at a time, so no method's step time shares the cores; a smoke run's one-thread methods
        # run two at a time, as its figures mean nothing.
        with ThreadPoolExecutor(2 if a.smoke else 1) as pool:
            rows = list(pool.map(lambda name: _measure_in_child(name, common), METHODS))
    full = rows[0]
    print("\n| method | trainable params | % of model | state MB | peak MB | step ms | vs full |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['trainable']:,} | {r['trainable_pct']:.2f}% | {r['state_mb']:.1f} | "
              f"{r['peak_mb']:.0f} | {r['step_ms']:.0f} | {r['step_ms'] / full['step_ms']:.2f}x |")
    summary = [f"params={full['total']}"]
    for r in rows:
        key = METHODS[r["method"]]["key"]
        summary += [f"{key}_trainable={r['trainable']}", f"{key}_state_mb={r['state_mb']:.1f}",
                    f"{key}_peak_mb={r['peak_mb']:.0f}", f"{key}_step_ms={r['step_ms']:.0f}"]  # fmt: skip
    print(" ".join(summary))


if __name__ == "__main__":
    main()
