"""Decode speed of the continuous-batching engine against `generate` alone and transformers' generate.

    nice -n 10 python benchmarks/engine_decode.py [--checkpoint runs/stdlib-code/pretrain/final] [--new 96]
        [--compile] [--draft K]

The checkpoint (by default the default run's pre-trained model) is exported with lmforge.hf.export_hf to a
temporary directory, which transformers loads (fp32, eval mode, SDPA attention). Prompts are the first
`--prompt-tokens` tokens of standard-library source files. All greedy, one process, `--threads` torch threads.

- concurrency 1: the prompts one after another: `BatchEngine` (started, submit and read each request's events),
  `lmforge.infer.engine.generate` on one prompt, transformers' `model.generate(do_sample=False)` on one prompt,
  and the engine stepped in the caller's thread (not started: no hand-off of tokens between threads);
- concurrency 8: the 8 prompts submitted at once to the engine; `generate` given the 8 prompts in one call (it
  batches equal lengths, so the prompts are cut to one length there); transformers sequentially (the issue's
  baseline: sequential transformers generation on the same weights).

Every method generates exactly `--new` tokens per prompt (stop tokens off: the engine's `ignore_eos`, `generate`
without eos, transformers with `min_new_tokens`), so tokens/s counts the same work: new tokens / wall time, prompt
prefill included. Each measurement is the best of `--repeats` rounds, each round running the three methods in
turn. The last line sums it up: decode_ratio_c1 (engine
over transformers at concurrency 1) and throughput_ratio_c8 (the engine at 8 over sequential transformers).
"""

from __future__ import annotations

import argparse
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def load(checkpoint: Path):
    from lmforge.hf import export_hf, load_causal_lm
    from lmforge.infer.loading import load_for_generation

    model, tok = load_for_generation(checkpoint, device="cpu")
    with tempfile.TemporaryDirectory(prefix="engine_decode_") as tmp:
        export_hf(checkpoint, Path(tmp) / "hf")
        hf = load_causal_lm(Path(tmp) / "hf", torch.device("cpu"))
    return model, tok, hf


def make_prompts(tok, n: int, length: int) -> list[list[int]]:
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:n]
    return [([tok.doc_start_id] + tok.encode(f.read_text(encoding="utf-8")))[:length] for f in files]


def best_interleaved(fns: list, repeats: int) -> list[float]:
    """The fastest wall time of each function over `repeats` rounds that run them in turn (a busy moment of a
    shared machine then slows one round of every method, not all rounds of one)."""
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, t in zip(fns, times, strict=True):
            t0 = time.perf_counter()
            fn()
            t.append(time.perf_counter() - t0)
    return [min(t) for t in times]


def engine_run(engine, prompts, new: int, concurrent: bool) -> None:
    from lmforge.infer.batching import SamplingParams

    params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
    if concurrent:
        handles = [engine.submit(p, params) for p in prompts]
        done = [list(h)[-1] for h in handles]
    else:
        done = [list(engine.submit(p, params))[-1] for p in prompts]
    assert all(d.completion_tokens == new for d in done), [d.completion_tokens for d in done]


def hf_run(hf, prompts, new: int) -> None:
    with torch.inference_mode():
        for p in prompts:
            out = hf.generate(torch.tensor([p]), max_new_tokens=new, min_new_tokens=new, do_sample=False)
            assert out.shape[1] == len(p) + new


def smoke_checkpoint(directory: Path) -> Path:
    """--smoke: a tiny random model with a tokenizer trained on a few standard-library files."""
    from lmforge.model.io import save_model
    from lmforge.model.transformer import ModelArgs, Transformer
    from lmforge.tokenizer import train_tokenizer

    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:20]
    tok = train_tokenizer(iter(f.read_text(encoding="utf-8") for f in files), vocab_size=512)
    tok.save(directory / "tokenizer.json")
    args = ModelArgs(vocab_size=tok.vocab_size, n_layers=1, d_model=32, n_heads=2, n_kv_heads=2, head_dim=16,
                     mlp_hidden=64, max_seq_len=128)  # fmt: skip
    torch.manual_seed(0)
    return save_model(directory / "model", Transformer(args), args, directory / "tokenizer.json")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", type=Path, default=ROOT / "runs/stdlib-code/pretrain/final")
    ap.add_argument("--new", type=int, default=96)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared 2-core machine)")
    ap.add_argument("--compile", action="store_true", help="BatchEngine(compile=True): the compiled decode step")
    ap.add_argument("--draft", type=int, default=0, help="BatchEngine(draft=K): n-gram speculative decoding")
    ap.add_argument("--smoke", action="store_true", help="a few seconds on a tiny random model: does it run?")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.smoke:
        with tempfile.TemporaryDirectory() as tmp:
            args.checkpoint, args.new, args.repeats = smoke_checkpoint(Path(tmp)), 8, 1
            measure(args)
        return
    measure(args)


def measure(args: argparse.Namespace) -> None:
    from lmforge.infer.batching import BatchEngine, SamplingParams
    from lmforge.infer.engine import generate

    model, tok, hf = load(args.checkpoint)
    prompts = make_prompts(tok, 8, args.prompt_tokens)
    ones = prompts[:4]
    engine = BatchEngine(model, tok, max_batch=8, compile=args.compile, draft=args.draft)
    engine.start()  # with --compile, compiles every graph first
    # The same engine stepped in the caller's thread (never started): what handing each token to another thread
    # costs at one request.
    inline = BatchEngine(model, tok, max_batch=8, compile=args.compile, draft=args.draft)
    params = SamplingParams(max_tokens=args.new, temperature=0, ignore_eos=True)
    rows = []
    try:
        for label, n_prompts, conc in (("1", ones, False), ("8", prompts, True)):
            n_tokens = len(n_prompts) * args.new
            if conc:
                gen = lambda: generate(model, n_prompts, args.new, temperature=0)  # noqa: E731
            else:
                gen = lambda: [generate(model, [p], args.new, temperature=0) for p in n_prompts]  # noqa: E731
            fns = [lambda: engine_run(engine, n_prompts, args.new, conc), gen, lambda: hf_run(hf, n_prompts, args.new)]
            if not conc:
                fns.append(lambda: [inline.generate(p, params) for p in n_prompts])
            times = best_interleaved(fns, args.repeats)
            rows.append((label, *(n_tokens / t for t in times)))
    finally:
        engine.stop()
    print("| concurrency | engine tok/s | generate tok/s | transformers (sequential) tok/s | engine / transformers |")
    print("|---|---|---|---|---|")
    for label, e, g, h, *_ in rows:
        print(f"| {label} | {e:,.0f} | {g:,.0f} | {h:,.0f} | {e / h:.2f}x |")
    (_, e1, g1, h1, i1), (_, e8, g8, h8) = rows
    print(f"At concurrency 1 the engine stepped in the caller's thread: {i1:,.0f} tok/s ({i1 / h1:.2f}x transformers)")
    print(f"decode_ratio_c1={e1 / h1:.2f} inline_ratio_c1={i1 / h1:.2f} generate_ratio_c1={g1 / h1:.2f} "
          f"throughput_ratio_c8={e8 / h8:.2f} "
          f"engine_c1_tok_s={e1:.0f} engine_c8_tok_s={e8:.0f} compile={int(args.compile)} "
          f"draft={args.draft}")  # fmt: skip


if __name__ == "__main__":
    main()
