"""Multiple-choice scoring speed: lmforge's scorer against lm-eval's Hugging Face backend, same model, same requests.

    python benchmarks/eval_throughput.py [--checkpoint runs/stdlib-code/pretrain/final] [--n-arc 500] [--repeats 3]
    python benchmarks/eval_throughput.py --smoke     # seconds: a tiny random-init model, 8 questions, one pass

The checkpoint is exported with lmforge.hf.export_hf to a temporary directory, which lm-eval's HFLM loads; both
score every choice of the first N ARC-Easy questions and the HellaSwag-format file from shared/data/eval as
(context, " " + choice) requests (ARC's context is query + "\\nAnswer:", as lm-eval's arc_easy builds it).
When the checkpoint is missing or no longer loads, a random-initialised model of the default recipe's size (depth 3,
d_model 192, vocab 8192, QK-norm) stands in, with the runs tokenizer or, failing that, a BPE of the same size
trained on the Python standard library: speed does not depend on the weights.

Both run on 2 threads, warm up on their longest batch, and are timed over `--repeats` full passes (the fastest
pass is reported: this machine is shared, and the fastest pass is the least disturbed). Each is measured twice, in
fresh processes: with glibc's default malloc, and with lmforge.train.host.keep_freed_memory (which lmforge's eval
stage and lm-eval adapter apply; it spares re-faulting the big logits tensors on every batch). Printed: a Markdown
table (examples/s, requests/s, time relative to the scorer, max |log-prob difference| against the scorer, acc and
acc_norm per data set) and the speed-up against the fastest HFLM setting; the last line sums it up as key=value
pairs. Without lm-eval installed only lmforge's scorer is measured (a note says so).

--smoke checks that the benchmark still runs: unless --checkpoint is given, a random-initialised depth-1 model
with a BPE-512 tokenizer trained on a few standard-library files, 8 ARC-Easy questions, one pass, HFLM at batch 4,
one thread.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from lmforge.eval import scorer  # noqa: E402
from lmforge.hf import export_hf  # noqa: E402
from lmforge.model.io import read_model_args, save_model  # noqa: E402
from lmforge.model.transformer import ModelArgs, Transformer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EVAL = ROOT.parent / "shared" / "data" / "eval"
RUN = ROOT / "runs" / "stdlib-code"
BATCH = 32
# The default recipe's size (speed does not depend on the weights), and the --smoke model.
DEFAULT_SIZE = ModelArgs(vocab_size=8192, n_layers=3, d_model=192, n_heads=3, n_kv_heads=3, head_dim=64,
                         mlp_hidden=512, max_seq_len=256, qk_norm=True, zero_init_out=False)  # fmt: skip
SMOKE_SIZE = ModelArgs(vocab_size=512, n_layers=1, d_model=64, n_heads=1, n_kv_heads=1, head_dim=64, mlp_hidden=128,
                       max_seq_len=256, qk_norm=True, zero_init_out=False)  # fmt: skip
SMOKE_TOKENIZER_FILES = 20
PHASES = {"default": "default malloc", "tuned": "keep_freed_memory"}
HAVE_LM_EVAL = importlib.util.find_spec("lm_eval") is not None

Pair = tuple[str, str]


def load_docs(n_arc: int) -> dict[str, list[dict]]:
    def read(path: Path, n: int | None = None) -> list[dict]:
        with path.open(encoding="utf-8") as f:
            return [json.loads(line) for i, line in enumerate(f) if n is None or i < n]

    arc = read(EVAL / "mc" / "arc_easy.jsonl", n_arc)
    hellaswag = [d for p in sorted((EVAL / "hellaswag").glob("*.jsonl")) for d in read(p)]
    return {"ARC-Easy": [d | {"context": d["query"] + "\nAnswer:"} for d in arc],
            "HellaSwag": [d | {"context": d["query"]} for d in hellaswag]}  # fmt: skip


def pairs_of(docs: list[dict]) -> list[Pair]:
    return [(d["context"], " " + c) for d in docs for c in d["choices"]]


def accuracy(docs: list[dict], lls: list[float]) -> tuple[float, float]:
    """lm-eval's acc (highest log-likelihood) and acc_norm (highest log-likelihood per character of the choice)."""
    acc = norm = 0
    i = 0
    for d in docs:
        scores = lls[i : i + len(d["choices"])]
        i += len(d["choices"])
        acc += max(range(len(scores)), key=lambda j: scores[j]) == d["gold"]
        norm += max(range(len(scores)), key=lambda j: scores[j] / len(d["choices"][j])) == d["gold"]
    return acc / len(docs), norm / len(docs)


def stdlib_tokenizer(tmp: Path, vocab_size: int, n_files: int | None = None) -> Path:
    """A BPE tokenizer trained on the standard library's top-level modules (the first `n_files` of them)."""
    from lmforge.tokenizer import train_tokenizer

    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:n_files]
    tok = train_tokenizer([f.read_text(encoding="utf-8", errors="replace") for f in files], vocab_size)
    tok.save(tmp / "tokenizer.json")
    return tmp / "tokenizer.json"


def random_model(tmp: Path, args: ModelArgs, tok_file: Path) -> Path:
    torch.manual_seed(0)
    return save_model(tmp / "ckpt", Transformer(args).eval(), args, tok_file)


def checkpoint(tmp: Path, path: Path | None) -> tuple[Path, str]:
    """The trained checkpoint when it loads; else a random-initialised model of its size, which scores as fast.
    No path (--smoke): a tiny random-initialised model."""
    from lmforge.model.io import load_checkpoint_tokenizer
    from lmforge.tokenizer import Tokenizer

    if path is None:
        tok_file = stdlib_tokenizer(tmp, SMOKE_SIZE.vocab_size, SMOKE_TOKENIZER_FILES)
        return random_model(tmp, SMOKE_SIZE, tok_file), "random-init depth-1 smoke-test model"
    try:
        load_checkpoint_tokenizer(path)
        return path, str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
    except (FileNotFoundError, ValueError) as e:
        why = str(e).split(";")[0]
    try:
        tok_file, tok_label = RUN / "tokenizer" / "tokenizer.json", "the runs tokenizer"
        Tokenizer.from_file(tok_file)
    except (FileNotFoundError, ValueError):
        # The default recipe's corpus is Python source; a BPE of its size trained on the stdlib (~2 s) stands in.
        tok_file = stdlib_tokenizer(tmp, DEFAULT_SIZE.vocab_size)
        tok_label = "a BPE-8192 tokenizer trained here on the stdlib"
    ckpt = random_model(tmp, DEFAULT_SIZE, tok_file)
    return ckpt, f"random-init default-size model with {tok_label} ({path} unusable: {why})"


Row = tuple[str, Callable[[list], list], list]


def lm_eval_rows(ckpt: Path, export: Path, pairs: list[Pair], hf_batch_sizes: list[int]) -> list[Row]:
    """The lm-eval side: lmforge through its lm-eval adapter, and HFLM at each batch size."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from lmforge.eval.lm_eval_adapter import LmforgeLM

    instances = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
    adapter = LmforgeLM(checkpoint=str(ckpt), device="cpu", batch_size=BATCH)
    hfs = {bs: HFLM(pretrained=str(export), device="cpu", batch_size=bs) for bs in hf_batch_sizes}
    return [
        (f"lmforge via the lm-eval adapter (batch {BATCH})", lambda p: adapter.loglikelihood(p, disable_tqdm=True),
         instances),
        *((f"lm-eval HFLM (batch {bs}{', its default' if bs == 1 else ''})",
           lambda p, hf=hf: hf.loglikelihood(p, disable_tqdm=True), instances) for bs, hf in hfs.items()),
    ]  # fmt: skip


def measure(ckpt: Path, export: Path, sets: dict[str, list[dict]], repeats: int, hf_batch_sizes: list[int],
            threads: int) -> dict:  # fmt: skip
    """One process's measurements: the scorer, and (with lm-eval installed) the adapter and HFLM at each batch size."""
    torch.set_num_threads(threads)
    docs = [d for ds in sets.values() for d in ds]
    pairs = pairs_of(docs)
    # Every backend sorts longest first, so warming up on the longest batch brings the allocator to its peak.
    longest = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0] + pairs[i][1]))[:BATCH]
    lm = scorer.load_language_model(ckpt, device="cpu")
    timed: list[Row] = [
        (f"lmforge scorer (batch {BATCH})", lambda p: scorer.loglikelihood(lm, p, batch_size=BATCH, progress=False),
         pairs),
    ]  # fmt: skip
    if HAVE_LM_EVAL:
        timed += lm_eval_rows(ckpt, export, pairs, hf_batch_sizes)
    for _, fn, inputs in timed:
        fn([inputs[i] for i in longest])
    best = [float("inf")] * len(timed)
    results: list[list] = [[] for _ in timed]
    for _ in range(repeats):  # round-robin, so a disturbance of the shared machine hits every backend alike
        for k, (_, fn, inputs) in enumerate(timed):
            start = time.perf_counter()
            results[k] = fn(inputs)
            best[k] = min(best[k], time.perf_counter() - start)
    out = [(name, best[k], [lp for lp, _ in results[k]]) for k, (name, _, _) in enumerate(timed)]
    return {"rows": out}


def report(results: dict[str, dict], sets: dict[str, list[dict]]) -> None:
    docs = [d for ds in sets.values() for d in ds]
    n_req = sum(len(d["choices"]) for d in docs)
    ref_name, ref_sec, ref = results["default malloc"]["rows"][0]
    print("\n| backend | malloc | examples/s | requests/s | time vs lmforge scorer (default malloc) | max abs "
          "log-prob diff | " + " | ".join(f"{k} acc / acc_norm" for k in sets) + " |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|" + "---:|" * len(sets))
    for malloc, r in results.items():
        for name, sec, lls in r["rows"]:
            accs, i = [], 0
            for ds in sets.values():
                n = sum(len(d["choices"]) for d in ds)
                accs.append("%.3f / %.3f" % accuracy(ds, lls[i : i + n]))
                i += n
            diff = max(abs(x - y) for x, y in zip(lls, ref))
            print(f"| {name} | {malloc} | {len(docs) / sec:.1f} | {n_req / sec:.0f} | {sec / ref_sec:.2f}x | "
                  f"{diff:.1e} | " + " | ".join(accs) + " |")  # fmt: skip
    if not HAVE_LM_EVAL:
        return
    hf_best = min(sec for r in results.values() for name, sec, _ in r["rows"] if name.startswith("lm-eval"))
    for malloc, r in results.items():
        ours = r["rows"][0][1]
        hf = min(sec for name, sec, _ in r["rows"] if name.startswith("lm-eval"))
        print(f"\n{malloc}: lmforge scorer {hf / ours:.2f}x the fastest HFLM setting in the same process; "
              f"{hf_best / ours:.2f}x the fastest HFLM overall")  # fmt: skip


def summary(results: dict[str, dict], sets: dict[str, list[dict]]) -> str:
    """The key=value line: examples/s per backend and the scorer's speed-up over the fastest HFLM, per malloc."""
    docs = [d for ds in sets.values() for d in ds]
    ref = results["default malloc"]["rows"][0][2]
    out = {"examples": len(docs), "requests": sum(len(d["choices"]) for d in docs)}
    for malloc, suffix in (("default malloc", ""), ("keep_freed_memory", "_tuned")):
        rows = results[malloc]["rows"]
        ours = rows[0][1]
        out[f"lmforge_examples_per_s{suffix}"] = f"{len(docs) / ours:.1f}"
        for name, sec, _ in rows:
            if name.startswith("lmforge via"):
                out[f"adapter_examples_per_s{suffix}"] = f"{len(docs) / sec:.1f}"
        hf = [sec for name, sec, _ in rows if name.startswith("lm-eval")]
        if hf:
            out[f"hflm_examples_per_s{suffix}"] = f"{len(docs) / min(hf):.1f}"
            out[f"speedup{suffix}"] = f"{min(hf) / ours:.2f}"
    diff = max(abs(x - y) for r in results.values() for _, _, lls in r["rows"] for x, y in zip(lls, ref))
    out["max_logprob_diff"] = f"{diff:.1e}"
    return " ".join(f"{k}={v}" for k, v in out.items())


def token_counts(ckpt: Path, sets: dict[str, list[dict]]) -> str:
    lm = scorer.load_language_model(ckpt, device="cpu")
    docs = [d for ds in sets.values() for d in ds]
    enc = [scorer.encode_pair(lm, *p) for p in pairs_of(docs)]
    n_tok, n_cont = sum(len(c) + len(x) for c, x in enc), sum(len(x) for _, x in enc)
    n_ctx = sum(len(scorer.encode_pair(lm, d["context"], " " + d["choices"][0])[0]) for d in docs)
    return (f"tokens: {n_tok} in all rows, {n_cont} of them continuation targets; with each context run once: "
            f"{n_ctx} + {n_cont} = {n_ctx + n_cont} ({n_tok / (n_ctx + n_cont):.2f}x fewer)")  # fmt: skip


def run_phase(phase: str, work: Path, a: argparse.Namespace) -> dict:
    """measure() in a fresh process, with glibc's default malloc ("default") or with freed memory kept ("tuned")."""
    env = os.environ | ({"LMFORGE_MALLOC_TUNING": "0"} if phase == "default" else {})
    cmd = [sys.executable, __file__, "--phase", phase, "--work", str(work), "--n-arc", str(a.n_arc),
           "--repeats", str(a.repeats), "--hf-batch-sizes", a.hf_batch_sizes, "--threads", str(a.threads)]  # fmt: skip
    subprocess.run(cmd, env=env, check=True)
    return json.loads((work / f"{phase}.json").read_text(encoding="utf-8"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", type=Path, default=None, help="default: runs/stdlib-code/pretrain/final "
                    "(with --smoke: a tiny random-initialised model)")  # fmt: skip
    ap.add_argument("--n-arc", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hf-batch-sizes", default="1,32,64", help="HFLM batch sizes to try (1 is its default)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--phase", choices=tuple(PHASES), help=argparse.SUPPRESS)  # internal: one measurement
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--smoke", action="store_true", help="a few seconds on a tiny model: does it still run?")
    a = ap.parse_args()
    if a.smoke:
        # One thread: a smoke run shares the machine with the test suite.
        a.n_arc, a.repeats, a.hf_batch_sizes, a.threads = 8, 1, "4", 1
    elif a.checkpoint is None:
        a.checkpoint = RUN / "pretrain" / "final"
    sets = load_docs(a.n_arc)
    batch_sizes = [int(b) for b in a.hf_batch_sizes.split(",")]
    if a.phase:
        if a.phase == "tuned":
            from lmforge.train.host import keep_freed_memory

            keep_freed_memory()
        out = measure(a.work / "ckpt", a.work / "hf", sets, a.repeats, batch_sizes, a.threads)
        (a.work / f"{a.phase}.json").write_text(json.dumps(out), encoding="utf-8")
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ckpt, label = checkpoint(work, a.checkpoint)
        if ckpt != work / "ckpt":
            shutil.copytree(ckpt, work / "ckpt")
        export_hf(work / "ckpt", work / "hf")
        n_params = Transformer(read_model_args(work / "ckpt")).num_params()
        print(f"model: {label}, {n_params:,} parameters; {sum(map(len, sets.values()))} questions "
              f"({', '.join(f'{k} {len(v)}' for k, v in sets.items())}), {len(pairs_of(sum(sets.values(), [])))} "
              f"requests; {a.threads} threads; fastest of {a.repeats} passes")  # fmt: skip
        print(token_counts(work / "ckpt", sets))
        if not HAVE_LM_EVAL:
            print("lm-eval is not installed: only lmforge's scorer is measured (pip install -e '.[eval]' to compare)")
        # glibc's malloc setting cannot be undone in a process, so each setting is measured in a fresh one: one
        # after the other, except in a smoke run, whose one-thread figures mean nothing.
        with ThreadPoolExecutor(2 if a.smoke else 1) as pool:
            measured = pool.map(lambda phase: run_phase(phase, work, a), PHASES)
            results = dict(zip(PHASES.values(), measured))
        report(results, sets)
        print(summary(results, sets))


if __name__ == "__main__":
    main()
