"""Load test of `lmforge serve` over loopback against sequential transformers generation on the same weights.

    python benchmarks/serve_load.py [--checkpoint runs/stdlib-code/sft/final] [--new 64] [--server-threads 1]
        [--compile] [--draft K]
    python benchmarks/serve_load.py --smoke          # seconds: a tiny random model, a few requests

The server runs in its own process on 127.0.0.1 (a free port), started as a user starts it (`lmforge serve CKPT`).
Clients stream chat completions (`stream_options.include_usage`) with prompts of realistic lengths: the
instructions (and inputs) of the shared Alpaca sample, in file order, through the model's chat template, cut to
leave room for the reply. Every request is greedy and asks for exactly `--new` tokens (`ignore_eos`), so every
method does the same work. At each concurrency (1, 8, 32) a bounded number of requests (`--requests-per-slot` per
client, at least 16) go out through that many client threads; every request must end with its usage chunk and
`[DONE]`, or it counts as lost.

Per concurrency: throughput (completion tokens / wall time), time to first token (p50, p99: request sent -> first
content chunk) and inter-token latency (p50, p99: between consecutive content chunks; the server sends tokens that
are ready together as one chunk), and the server's resident memory after the level. Each client thread keeps one
connection open, as an SDK client does. Then one client disconnects mid-stream and the server must stay healthy and
release the request. The baseline, never measured beside the server (so the two never share the cores):
transformers' `generate(do_sample=False, min_new_tokens=max_new_tokens=--new)` on the model exported by
lmforge.hf.export_hf, one prompt after another, on the same prompts, with 1 and with 2 torch threads, once before
the server starts and once after it stopped; the fastest is the baseline. The server runs as `--server-threads`,
`--compile` and `--draft` say. The last line: decode_ratio_c1 (server tok/s at concurrency 1 over transformers)
and throughput_ratio_c32 (server tok/s at 32 over transformers).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
ALPACA = ROOT.parent / "shared" / "data" / "instruct" / "alpaca_data_sample2000.json"
MODEL = "bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`lmforge serve` in a subprocess on loopback; SIGTERM on exit."""

    def __init__(self, checkpoint: Path, max_batch: int, threads: int | None, compile: bool = False,
                 draft: int = 0) -> None:  # fmt: skip
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "lmforge.cli", "serve", str(checkpoint), "--port", str(self.port),
               "--model-name", MODEL, "--max-batch", str(max_batch), "--device", "cpu",
               *(["--threads", str(threads)] if threads else []), *(["--compile"] if compile else []),
               "--draft", str(draft)]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited {self.proc.returncode}: {self.proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError("the server did not answer /health within 120 s")

    def rss_mb(self) -> float:
        return psutil.Process(self.proc.pid).memory_info().rss / 2**20

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def prompts(tok, n: int, max_prompt: int) -> list[list[dict]]:
    """Chat messages from the Alpaca sample (its first n records), cut to at most max_prompt template tokens."""
    from lmforge.finetune.data import Message
    from lmforge.finetune.template import prompt_ids

    out = []
    for record in json.loads(ALPACA.read_text(encoding="utf-8"))[:n]:
        text = "\n\n".join(x for x in (record["instruction"], record.get("input") or "") if x)
        while len(prompt_ids(tok, [Message("user", text)])) > max_prompt:
            text = text[: int(len(text) * 0.8)]
        out.append([{"role": "user", "content": text}])
    return out


def one_request(http: httpx.Client, url: str, messages: list[dict], new: int) -> dict:
    """Stream one chat completion; the send time, each content chunk's arrival, and the usage chunk."""
    body = {"model": MODEL, "messages": messages, "max_tokens": new, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    sent, arrivals, usage, done = time.perf_counter(), [], None, False
    with http.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                arrivals.append(time.perf_counter())
    return {"sent": sent, "arrivals": arrivals, "usage": usage, "done": done}


def level(url: str, all_prompts: list[list[dict]], concurrency: int, count: int, new: int) -> dict:
    """`count` requests through `concurrency` client threads; throughput, latencies, lost requests."""
    results: list[dict] = []
    errors: list[str] = []
    queue = list(range(count))
    lock = threading.Lock()

    def client(http: httpx.Client) -> None:
        while True:
            with lock:
                if not queue:
                    return
                i = queue.pop(0)
            try:
                r = one_request(http, url, all_prompts[i % len(all_prompts)], new)
            except Exception as e:  # a failed request is lost, and counted
                with lock:
                    errors.append(repr(e))
                continue
            with lock:
                results.append(r)

    # Each client keeps its connection open between requests, as an SDK client does; making the clients (an SSL
    # context each) is not part of the measured time.
    clients = [httpx.Client(timeout=300) for _ in range(concurrency)]
    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(http,)) for http in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    for http in clients:
        http.close()
    complete = [r for r in results if r["done"] and r["usage"] and r["usage"]["completion_tokens"] == new]
    ttft = [r["arrivals"][0] - r["sent"] for r in complete if r["arrivals"]]
    itl = [b - a for r in complete for a, b in zip(r["arrivals"], r["arrivals"][1:])]
    tokens = sum(r["usage"]["completion_tokens"] for r in complete)
    return {"requests": count, "lost": count - len(complete), "errors": errors[:3], "tok_s": tokens / wall,
            "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99), "itl_p50": pct(itl, 50), "itl_p99": pct(itl, 99),
            "wall": wall}  # fmt: skip


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def disconnect_check(server: Server, messages: list[dict], new: int) -> bool:
    """A client leaves after 3 chunks; the server stays healthy and frees the request."""
    body = {"model": MODEL, "messages": messages, "max_tokens": new, "temperature": 0, "ignore_eos": True,
            "stream": True}  # fmt: skip
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as r:
        for n, _ in enumerate(r.iter_lines()):
            if n >= 3:
                break
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        metrics = httpx.get(f"{server.url}/metrics", timeout=5).text
        running = [line for line in metrics.splitlines() if line.startswith("lmforge_running_requests ")]
        if running and float(running[0].split()[1]) == 0:
            return httpx.get(f"{server.url}/health", timeout=5).status_code == 200
        time.sleep(0.2)
    return False


def draft_counts(url: str) -> tuple[float, float]:
    """The server's drafted and accepted tokens so far (`--draft`), from /metrics."""
    values = {}
    for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("lmforge_draft_tokens_total", "lmforge_draft_tokens_accepted_total"):
            values[name] = float(value)
    return values.get("lmforge_draft_tokens_total", 0.0), values.get("lmforge_draft_tokens_accepted_total", 0.0)


def transformers_tok_s(checkpoint: Path, all_prompts: list[list[dict]], n: int, new: int,
                       rounds: int = 2) -> dict[int, float]:  # fmt: skip
    """Sequential greedy transformers generation of exactly `new` tokens on the first n prompts, with 1 and with 2
    torch threads (on 2 cores the tiny models here often run faster on one: the baseline is the faster)."""
    from lmforge.finetune.data import Message
    from lmforge.finetune.template import prompt_ids
    from lmforge.hf import export_hf, load_causal_lm
    from lmforge.model.io import load_checkpoint_tokenizer

    tok = load_checkpoint_tokenizer(checkpoint)
    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(checkpoint, Path(tmp) / "hf")
        hf = load_causal_lm(Path(tmp) / "hf", torch.device("cpu"))
        ids = [prompt_ids(tok, [Message(**m) for m in msgs]) for msgs in all_prompts[:n]]
        before = torch.get_num_threads()
        with torch.inference_mode():
            for _ in range(rounds):  # the fastest round counts
                for threads in (1, 2):
                    torch.set_num_threads(threads)
                    hf.generate(torch.tensor([ids[0]]), max_new_tokens=4, do_sample=False)  # warm-up
                    start = time.perf_counter()
                    for p in ids:
                        out = hf.generate(torch.tensor([p]), max_new_tokens=new, min_new_tokens=new, do_sample=False)
                        assert out.shape[1] == len(p) + new
                    rates[threads] = max(rates.get(threads, 0.0), n * new / (time.perf_counter() - start))
        torch.set_num_threads(before)
    return rates


def smoke_checkpoint(directory: Path) -> Path:
    """--smoke: a tiny random chat model with a tokenizer trained on the Alpaca sample's first records."""
    from lmforge.model.io import save_model
    from lmforge.model.transformer import ModelArgs, Transformer
    from lmforge.tokenizer import train_tokenizer

    records = json.loads(ALPACA.read_text(encoding="utf-8"))[:300]
    tok = train_tokenizer(iter(r["instruction"] + " " + r["output"] for r in records), vocab_size=512)
    tok.save(directory / "tokenizer.json")
    args = ModelArgs(vocab_size=tok.vocab_size, n_layers=1, d_model=32, n_heads=2, n_kv_heads=2, head_dim=16,
                     mlp_hidden=64, max_seq_len=256)  # fmt: skip
    torch.manual_seed(0)
    return save_model(directory / "model", Transformer(args), args, directory / "tokenizer.json")


def run(checkpoint: Path, new: int, per_slot: int, levels: tuple[int, ...], baseline_n: int,
        threads: int | None = None, compile: bool = False, draft: int = 0) -> None:  # fmt: skip
    from lmforge.model.io import load_checkpoint_tokenizer, read_model_args

    tok = load_checkpoint_tokenizer(checkpoint)
    context = read_model_args(checkpoint).max_seq_len
    all_prompts = prompts(tok, 64, context - new - 1)
    # The baseline runs before and after the server (never beside it), and its fastest figure counts: the machine's
    # speed drifts by a fifth over a minute here, and a slow moment must not flatter the server.
    before = transformers_tok_s(checkpoint, all_prompts, baseline_n, new, rounds=1)
    server = Server(checkpoint, max_batch=max(levels), threads=threads, compile=compile, draft=draft)
    rows, rss = [], []
    try:
        rss.append(server.rss_mb())
        for c in levels:
            rows.append((c, level(server.url, all_prompts, c, max(16, per_slot * c), new)))
            rss.append(server.rss_mb())
        drafted, accepted = draft_counts(server.url)  # before the disconnect check adds its own
        healthy = disconnect_check(server, all_prompts[0], new)
    finally:
        code = server.stop()
    after = transformers_tok_s(checkpoint, all_prompts, baseline_n, new, rounds=1)
    rates = {n: max(before[n], after[n]) for n in before}
    base = max(rates.values())
    print("| concurrency | requests | lost | tok/s | x transformers | TTFT p50 / p99 ms | ITL p50 / p99 ms |")
    print("|---|---|---|---|---|---|---|")
    for c, r in rows:
        print(f"| {c} | {r['requests']} | {r['lost']} | {r['tok_s']:,.0f} | {r['tok_s'] / base:.2f} | "
              f"{1e3 * r['ttft_p50']:.0f} / {1e3 * r['ttft_p99']:.0f} | {1e3 * r['itl_p50']:.1f} / "
              f"{1e3 * r['itl_p99']:.1f} |")  # fmt: skip
    for n_threads, rate in rates.items():
        print(f"| transformers, sequential, {n_threads} thread(s) | {baseline_n} | - | {rate:,.0f} | "
              f"{rate / base:.2f} | - | - |")  # fmt: skip
    lost = sum(r["lost"] for _, r in rows)
    for _, r in rows:
        if r["errors"]:
            print(f"errors: {r['errors']}")
    if draft:
        print(f"drafted tokens: {drafted:.0f}, accepted: {accepted:.0f} ({accepted / max(drafted, 1):.0%})")
    print(f"server RSS MB after each level: {', '.join(f'{x:.0f}' for x in rss)}; disconnect left it healthy: "
          f"{healthy}; SIGTERM exit code {code}")  # fmt: skip
    by = dict(rows)
    top = max(levels)
    print(f"decode_ratio_c1={by[1]['tok_s'] / base:.2f} throughput_ratio_c{top}={by[top]['tok_s'] / base:.2f} "
          f"tok_s_c1={by[1]['tok_s']:.0f} tok_s_c{top}={by[top]['tok_s']:.0f} transformers_tok_s={base:.0f} "
          f"ttft_p99_ms_c{top}={1e3 * by[top]['ttft_p99']:.0f} lost={lost} healthy_after_disconnect={int(healthy)} "
          f"rss_mb_max={max(rss):.0f} server_threads={threads or 0} compile={int(compile)} draft={draft} "
          f"draft_accepted={accepted / max(drafted, 1):.2f}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", type=Path, default=ROOT / "runs/stdlib-code/sft/final")
    ap.add_argument("--new", type=int, default=64, help="tokens per reply (exactly: ignore_eos)")
    ap.add_argument("--requests-per-slot", type=int, default=2, help="requests per client thread at each level")
    ap.add_argument("--baseline-prompts", type=int, default=8, help="prompts transformers generates for")
    ap.add_argument("--server-threads", type=int, help="lmforge serve --threads (default: torch's)")
    ap.add_argument("--compile", action="store_true", help="lmforge serve --compile")
    ap.add_argument("--draft", type=int, default=0, help="lmforge serve --draft (n-gram speculative decoding)")
    ap.add_argument("--smoke", action="store_true", help="a few seconds on a tiny random model: does it run?")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.smoke:
        with tempfile.TemporaryDirectory() as tmp:
            run(smoke_checkpoint(Path(tmp)), 8, 1, (1, 8, 32), 2)
        return
    run(args.checkpoint, args.new, args.requests_per_slot, (1, 8, 32), args.baseline_prompts, args.server_threads,
        args.compile, args.draft)


if __name__ == "__main__":
    main()
