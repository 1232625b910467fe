"""DPO training-step time and peak memory: lmforge against TRL's DPOTrainer, on the same model, pairs and batch.

    python benchmarks/align_vs_trl.py                        # the default recipe's model shape, hh-rlhf pairs
    python benchmarks/align_vs_trl.py --checkpoint runs/stdlib-code/sft/final --steps 20
    python benchmarks/align_vs_trl.py --batch-size 4 --max-len 512 --threads 2
    python benchmarks/align_vs_trl.py --smoke                # seconds: a tiny model, 2 steps (figures mean nothing)

The model is --checkpoint, or runs/stdlib-code/sft/final when it exists, or else a random-init model of the default
recipe's shape with a tokenizer of the recipe's vocabulary size trained on the pairs (step time and memory do not
depend on the weights); it is exported to Hugging Face (lmforge export) for TRL. The pairs are the first ones of
--data (hh-rlhf by default) that fit --max-len whole, written out in TRL's conversational format: lmforge renders
them with its chat template, TRL tokenises them with the exported one, and the run stops unless both sides count the
same tokens (tests/align/test_trl_parity.py checks the ids themselves, and the losses).

Each side runs in its own process (its peak memory is its own), fp32 on the CPU with the same torch threads, the
same sequence of batches of --batch-size pairs (chosen and rejected rows in one padded batch on both sides) and
torch AdamW. A step is forward, DPO loss (sigmoid, beta 0.1), backward and the optimizer step, timed after warm-up
steps; TRL's runs through DPOTrainer.compute_loss, with no Trainer loop around it (its best case):

- "lmforge": lmforge.align.dpo.PreferenceLoss, the loss `lmforge dpo` trains with, its reference log-probabilities
  cached once before training with the starting policy (lmforge.align.ref_cache), so a step runs one forward;
- "TRL": DPOTrainer as configured by default, a frozen reference model run on every batch;
- "TRL, precomputed reference": precompute_ref_log_probs=True, the reference log-probabilities computed once when
  the trainer is built, as lmforge does.

"peak MB" is the growth of the process's peak resident memory (ru_maxrss) from after the imports to the end: models,
reference cache or model, data, gradients, AdamW state and activations (the libraries' own code is left out); "of
which setup MB" is that growth by the first step. "setup s" is the time spent before the first step (lmforge: the
reference cache; TRL: building the trainer, tokenising, its reference pass when precomputed).

The last line: dpo_speed_ratio = TRL step time / lmforge step time and dpo_mem_ratio = lmforge peak / TRL peak (both
against TRL as configured by default), then each side's figures.
"""

from __future__ import annotations

import argparse
import importlib.util
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
DATA = ROOT.parent / "shared" / "data" / "preference" / "hh-rlhf_helpful-base_test.jsonl.gz"
SFT_FINAL = ROOT / "runs" / "stdlib-code" / "sft" / "final"
BETA = 0.1
# "key" prefixes the side's figures in the summary line.
SIDES = {"lmforge": {"key": "lmforge"}, "TRL": {"key": "trl", "precompute": False},
         "TRL, precomputed reference": {"key": "trl_precomputed", "precompute": True}}  # fmt: skip
# --smoke: (depth, vocabulary, batch size, max length, steps, warm-up steps, threads)
SMOKE = (1, 512, 2, 128, 2, 1, 1)


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _make_model(path: Path, texts: list[str], depth: int | None, vocab_size: int | None) -> Path:
    """A random-init model of the default recipe's shape (or `depth` on its depth dial) and a tokenizer trained on
    `texts` (every lmforge tokenizer reserves the chat tokens)."""
    from lmforge.model.io import save_model
    from lmforge.model.transformer import ModelArgs, Transformer
    from lmforge.recipe import load_recipe
    from lmforge.tokenizer import train_tokenizer

    recipe = load_recipe()
    tok = train_tokenizer(iter(texts), vocab_size=vocab_size or recipe.tokenizer.vocab_size)
    tok.save(path / "tokenizer.json")
    model_cfg = recipe.model.model_copy(update={"depth": depth}) if depth else recipe.model
    args = ModelArgs.from_config(model_cfg, tok.vocab_size)
    torch.manual_seed(0)
    return save_model(path / "ckpt", Transformer(args), args, path / "tokenizer.json")


def _write_pairs(checkpoint: Path, data: Path, n: int, max_len: int, out: Path) -> int:
    """The first `n` pairs of `data` that lmforge renders whole within `max_len`, as TRL conversational records."""
    from lmforge.align.preferences import read_preferences, render_pair
    from lmforge.finetune.data import BadRecord
    from lmforge.model.io import load_checkpoint_tokenizer

    tok = load_checkpoint_tokenizer(checkpoint)
    pairs, _ = read_preferences(data)
    kept = []
    for pair in pairs:
        try:
            if render_pair(tok, pair, max_len).truncated:
                continue
        except BadRecord:
            continue
        messages = [{"role": m.role, "content": m.content} for m in pair.prompt]
        kept.append({"prompt": messages, "chosen": [{"role": "assistant", "content": pair.chosen}],
                     "rejected": [{"role": "assistant", "content": pair.rejected}]})  # fmt: skip
        if len(kept) == n:
            break
    out.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    return len(kept)


def _timed_steps(step, batches: list, warmup: int) -> tuple[list[float], float]:
    """Run `step(batch)` (which returns the loss) on each batch; (step times after warm-up in s, the first loss)."""
    times, first = [], None
    for i, batch in enumerate(batches):
        t0 = time.perf_counter()
        loss = step(batch)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        first = loss if first is None else first
    return times, float(first)


def run_lmforge(checkpoint: Path, pairs_file: Path, batch_size: int, n_batches: int, warmup: int,
                max_len: int) -> dict:  # fmt: skip
    from lmforge.align.dpo import PreferenceLoss
    from lmforge.align.pair_batches import collate_pairs
    from lmforge.align.preferences import read_preferences, render_pair
    from lmforge.align.ref_cache import compute_reference
    from lmforge.model.io import load_checkpoint_tokenizer, load_model

    base = _peak_mb()
    t0 = time.perf_counter()
    model, _ = load_model(checkpoint, dtype=torch.float32)
    tok = load_checkpoint_tokenizer(checkpoint)
    records, _ = read_preferences(pairs_file, format="trl")
    pairs = [render_pair(tok, p, max_len) for p in records]
    # The starting policy is the reference: its log-probabilities, cached before the first step.
    loss_fn = PreferenceLoss("sigmoid", BETA, reference=compute_reference(model, pairs, tok.pad_id, batch_size))
    setup_s, setup_mb = time.perf_counter() - t0, _peak_mb() - base
    batches = []
    for k in range(n_batches):
        index = torch.arange(k * batch_size, (k + 1) * batch_size) % len(pairs)
        batches.append({**collate_pairs([pairs[i] for i in index], tok.pad_id), "index": index})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    model.train()

    def step(batch: dict) -> float:
        loss, _ = loss_fn(model, batch)  # what lmforge.align.dpo.train_dpo hands the training loop
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    times, first_loss = _timed_steps(step, batches, warmup)
    tokens = sum(int(b["lengths"].sum()) for b in batches)
    return {"step_ms": 1000 * statistics.median(times), "peak_mb": _peak_mb() - base, "process_peak_mb": _peak_mb(),
            "setup_s": setup_s, "setup_mb": setup_mb, "first_loss": first_loss, "tokens": tokens}  # fmt: skip


def run_trl(hf_dir: Path, pairs_file: Path, batch_size: int, n_batches: int, warmup: int, precompute: bool,
            out_dir: Path) -> dict:  # fmt: skip
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    base = _peak_mb()
    t0 = time.perf_counter()
    records = [json.loads(line) for line in pairs_file.read_text(encoding="utf-8").splitlines()]
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    config = DPOConfig(output_dir=str(out_dir), beta=BETA, loss_type=["sigmoid"], report_to="none", use_cpu=True,
                       max_length=None, per_device_train_batch_size=batch_size, precompute_ref_log_probs=precompute,
                       save_strategy="no", logging_strategy="no")  # fmt: skip
    trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(records),
                         processing_class=AutoTokenizer.from_pretrained(hf_dir))  # fmt: skip
    # With precompute_ref_log_probs the trainer has run its reference pass already: the examples carry the results.
    keys = ["prompt_ids", "chosen_ids", "rejected_ids"] + (["ref_chosen_logps", "ref_rejected_logps"] * precompute)
    examples = [{k: trainer.train_dataset[i][k] for k in keys} for i in range(len(records))]
    batches = [trainer.data_collator([examples[i % len(examples)] for i in range(k * batch_size, (k + 1) * batch_size)])
               for k in range(n_batches)]  # fmt: skip
    setup_s, setup_mb = time.perf_counter() - t0, _peak_mb() - base
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    model.train()

    def step(batch: dict) -> float:
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    times, first_loss = _timed_steps(step, batches, warmup)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    return {"step_ms": 1000 * statistics.median(times), "peak_mb": _peak_mb() - base, "process_peak_mb": _peak_mb(),
            "setup_s": setup_s, "setup_mb": setup_mb, "first_loss": first_loss, "tokens": tokens}  # fmt: skip


def _measure_in_child(side: str, args: list[str]) -> dict:
    """One side in a fresh process, so that its peak memory is its own."""
    cmd = [sys.executable, __file__, "--one", side, *args]
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout  # its errors show on stderr
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=None, help="Default: runs/stdlib-code/sft/final if it exists, "
                    "else a random-init model of the default recipe's shape.")  # fmt: skip
    ap.add_argument("--depth", type=int, default=None, help="A random-init model of this depth instead.")
    ap.add_argument("--data", type=Path, default=DATA, help="Preference pairs (any format lmforge reads).")
    ap.add_argument("--batch-size", type=int, default=8, help="Pairs per step.")
    ap.add_argument("--max-len", type=int, default=256, help="Pairs longer than this (either side) are left out.")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads; 0 = all cores.")
    ap.add_argument("--smoke", action="store_true", help="a few seconds on a tiny random-init model: does it run?")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child process measuring one side
    ap.add_argument("--work", type=Path, default=None, help=argparse.SUPPRESS)  # the child's model and pairs
    a = ap.parse_args()
    vocab = None  # the recipe's
    if a.smoke:
        depth, vocab, a.batch_size, a.max_len, a.steps, a.warmup, a.threads = SMOKE
        a.depth = a.depth or (None if a.checkpoint else depth)
    if a.threads:
        torch.set_num_threads(a.threads)
    n_batches = a.warmup + a.steps
    if a.one:
        work = a.work
        if a.one == "lmforge":
            result = run_lmforge(work / "ckpt", work / "pairs.jsonl", a.batch_size, n_batches, a.warmup, a.max_len)
        else:
            result = run_trl(work / "hf", work / "pairs.jsonl", a.batch_size, n_batches, a.warmup,
                             SIDES[a.one]["precompute"], work / "trl_out")  # fmt: skip
        print(json.dumps(result))
        return
    if not a.data.exists():
        sys.exit(f"{a.data} is missing: give --data FILE (hh-rlhf, TRL, LLaMA-Factory or PandaLM preference pairs)")
    have_trl = importlib.util.find_spec("trl") is not None
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ckpt = a.checkpoint
        if ckpt is None and (a.depth or not SFT_FINAL.exists()):
            from lmforge.align.preferences import read_preferences

            pairs, _ = read_preferences(a.data, limit=2000)
            texts = [" ".join([*(m.content for m in p.prompt), p.chosen, p.rejected]) for p in pairs]
            ckpt = _make_model(work, texts, a.depth, vocab)
        ckpt = Path(ckpt or SFT_FINAL)
        if ckpt != work / "ckpt":
            (work / "ckpt").symlink_to(ckpt.resolve())
        n_pairs = _write_pairs(ckpt, a.data, a.batch_size * n_batches, a.max_len, work / "pairs.jsonl")
        if have_trl:
            from lmforge.hf import export_hf

            export_hf(ckpt, work / "hf")
        threads = a.threads or torch.get_num_threads()
        print(f"model {ckpt}; data {a.data}: {n_pairs} pairs of at most {a.max_len} tokens; batch {a.batch_size} "
              f"pairs; {a.steps} steps after {a.warmup} warm-up; fp32 CPU; torch threads {threads}")
        common = ["--work", str(work), "--batch-size", str(a.batch_size), "--max-len", str(a.max_len), "--steps",
                  str(a.steps), "--warmup", str(a.warmup), "--threads", str(a.threads)]  # fmt: skip
        # One at a time, so that no side's step time shares the cores with another's; a smoke run's figures mean
        # nothing, so its sides run together.
        sides = [side for side in SIDES if have_trl or side == "lmforge"]
        with ThreadPoolExecutor(len(sides) if a.smoke else 1) as pool:
            rows = dict(zip(sides, pool.map(lambda side: _measure_in_child(side, common), sides)))
    if len({r["tokens"] for r in rows.values()}) > 1:
        sys.exit(f"the sides tokenised the pairs differently: tokens {({s: r['tokens'] for s, r in rows.items()})}")
    ours = rows["lmforge"]
    print("\n| DPO step | step ms | vs lmforge | peak MB | of which setup MB | process peak MB | setup s "
          "| first loss |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for side, r in rows.items():
        print(f"| {side} | {r['step_ms']:.0f} | {r['step_ms'] / ours['step_ms']:.2f}x | {r['peak_mb']:.0f} | "
              f"{r['setup_mb']:.0f} | {r['process_peak_mb']:.0f} | {r['setup_s']:.1f} | {r['first_loss']:.6f} |")
    summary = []
    if have_trl:
        trl = rows["TRL"]
        summary += [f"dpo_speed_ratio={trl['step_ms'] / ours['step_ms']:.2f}",
                    f"dpo_mem_ratio={ours['peak_mb'] / trl['peak_mb']:.2f}"]  # fmt: skip
    for side, r in rows.items():
        key = SIDES[side]["key"]
        summary += [f"{key}_step_ms={r['step_ms']:.0f}", f"{key}_peak_mb={r['peak_mb']:.0f}"]
    print(" ".join(summary + [f"pairs={n_pairs}", f"batch={a.batch_size}", f"tokens={ours['tokens']}"]))


if __name__ == "__main__":
    main()
