"""The run report: one Markdown page, built only from the manifests and logs the stages left on disk."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from lmforge.io import atomic_open, atomic_write_text
from lmforge.runs import read_manifest

log = logging.getLogger(__name__)


def _load_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_training_curve(metrics_path: Path, out_png: Path) -> bool:
    """Training loss per step and validation loss where measured; returns False when there is nothing to plot."""
    records = _load_jsonl(metrics_path)
    steps = [r["step"] for r in records if "loss" in r]
    if not steps:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(steps, [r["loss"] for r in records if "loss" in r], lw=1, alpha=0.8, label="train loss")
    val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    if val:
        ax.plot(*zip(*val), "o-", lw=2, label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(out_png, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return True


def _fmt(value, spec: str = ".4g") -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return format(value, spec)
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"  # counts of documents, bytes, tokens, parameters
    return str(value)


def _stage_table(run_path: Path, stages: list[str]) -> list[str]:
    lines = ["| stage | status | seconds | peak memory (MB) | fingerprint |", "|---|---|---:|---:|---|"]
    for stage in stages:
        m = read_manifest(run_path / stage) or {}
        t = m.get("timings", {})
        lines.append(f"| {stage} | {m.get('status', 'not run')} | {_fmt(t.get('seconds'), '.1f')} | "
                     f"{_fmt(t.get('peak_rss_mb'), '.0f')} | `{m.get('fingerprint', '')}` |")  # fmt: skip
    return lines


def _sft_section(sft: dict) -> list[str]:
    """Fine-tuning: held-out loss and greedy-generation rates before and after, and a few held-out samples."""
    before, after = sft.get("generation_before") or {}, sft.get("generation_after") or {}
    lines = [
        "## Fine-tuning",
        "",
        f"- method: {sft.get('method')}; data: {sft.get('data')} ({sft.get('train_conversations')} training, "
        f"{sft.get('heldout_conversations')} held-out conversations); {sft.get('trainable_params', 0):,} of "
        f"{sft.get('total_params', 0):,} parameters trained",
        f"- held-out loss on the trained (assistant) tokens: {_fmt(sft.get('heldout_loss_before'))} before, "
        f"{_fmt(sft.get('heldout_loss_after'))} after; {sft.get('steps')} steps in "
        f"{_fmt(sft.get('train_seconds'), '.1f')} s",
    ]
    if before:
        lines.append(f"- greedy replies to held-out prompts that end their turn: {_fmt(before.get('ended_turn'), '.0%')}"
                     f" before, {_fmt(after.get('ended_turn'), '.0%')} after")  # fmt: skip
    if "completes_function" in before:
        lines.append(f"- replies that complete a function which parses: {_fmt(before['completes_function'], '.0%')} "
                     f"before, {_fmt(after.get('completes_function'), '.0%')} after")  # fmt: skip
    lines.append("")
    for i, sample in enumerate(sft.get("samples") or [], start=1):
        lines += [f"### Fine-tuning sample {i}", "", "Prompt:", "", "```python", sample["prompt"], "```", "",
                  "Before:", "", "```python", sample["before"], "```", "", "After:", "", "```python", sample["after"],
                  "```", ""]  # fmt: skip
    return lines


def _removed_table(cur: dict) -> list[str]:
    """The curate stage's removals by reason (its `removed_<reason>` metrics), largest first."""
    removed = sorted(((k[len("removed_"):], v) for k, v in cur.items() if k.startswith("removed_") and v),
                     key=lambda kv: (-kv[1], kv[0]))  # fmt: skip
    if not removed:
        return ["No document was removed.", ""]
    read = cur.get("docs_in") or 0
    lines = ["| reason | documents removed | share of documents read |", "|---|---:|---:|"]
    for reason, n in removed:
        lines.append(f"| {reason.replace('_', ' ')} | {n:,} | {_fmt(n / read if read else None, '.1%')} |")
    return [*lines, ""]


def build_report(run_path: Path, stages: list[str], out_dir: Path) -> dict:
    """Write `run_path/report.md` (with the training curve in `out_dir`) and return headline metrics."""
    if not stages:
        raise FileNotFoundError(
            f"{run_path} is not a run directory: a run directory, made by `lmforge run`, holds a recipe.yaml and a "
            "folder per stage (curate/, tokenizer/, shards/, pretrain/, ...) with a manifest.json, and there is no "
            "stage there to report on"
        )
    m = {s: (read_manifest(run_path / s) or {}).get("metrics", {}) for s in stages}
    cur, tok, sh, pre, ev = (m.get(k, {}) for k in ("curate", "tokenizer", "shards", "pretrain", "eval"))
    curve = plot_training_curve(run_path / "pretrain" / "metrics.jsonl", out_dir / "loss.png")
    total_s = sum((read_manifest(run_path / s) or {}).get("timings", {}).get("seconds", 0.0) for s in stages)

    lines = [f"# Run report: {run_path.name}", ""]
    if ev:
        bpb = ev.get("val_bpb", float("inf"))
        verdict = "beats" if bpb < ev.get("xz_bpb", 0) else "does not beat"
        concat = "also beats" if bpb < ev.get("xz_concat_bpb", 0) else "does not beat"
        lines += [
            f"**Held-out bits per byte: {_fmt(ev.get('val_bpb'))}** vs `xz -9e` {_fmt(ev.get('xz_bpb'))} on the "
            f"same files compressed one by one (ratio {_fmt(ev.get('bpb_vs_xz'), '.3f')}): the model {verdict} xz. "
            f"With all held-out files in one stream xz reaches {_fmt(ev.get('xz_concat_bpb'))}, which the model "
            f"{concat}.",
            "",
        ]
    lines += ["## Stages", "", *_stage_table(run_path, stages), "", f"Total stage time: {total_s:.1f} s.", ""]
    if cur:
        lines += [
            "## Data",
            "",
            f"- documents read: {_fmt(cur.get('docs_in'))}, kept: {_fmt(cur.get('docs_kept'))} "
            f"(train {_fmt(cur.get('docs_train'))}, validation {_fmt(cur.get('docs_val'))}); bad records skipped: "
            f"{_fmt(cur.get('docs_skipped_bad', 0))}",
            f"- bytes: train {_fmt(cur.get('bytes_train'))}, validation {_fmt(cur.get('bytes_val'))}",
            "",
            *_removed_table(cur),
        ]
    if tok:
        lines += ["## Tokenizer", "", f"- vocabulary: {_fmt(tok.get('vocab_size'))} tokens; "
                  f"{_fmt(tok.get('bytes_per_token'), '.3f')} bytes per token on held-out text", ""]  # fmt: skip
    if sh:
        lines += ["## Token shards", "", f"- train tokens: {_fmt(sh.get('train_tokens'))}, validation tokens: "
                  f"{_fmt(sh.get('val_tokens'))}; tokenized at {_fmt(sh.get('tokens_per_s'), '.3g')} tokens/s",
                  ""]  # fmt: skip
    if pre:
        lines += [
            "## Pre-training",
            "",
            f"- parameters: {_fmt(pre.get('params'))} ({_fmt(pre.get('non_embedding_params'))} non-embedding)",
            f"- steps: {_fmt(pre.get('steps'))}, tokens: {_fmt(pre.get('tokens'))} "
            f"({_fmt(pre.get('epochs'), '.2f')} epochs)",
            f"- throughput: {_fmt(pre.get('tokens_per_s'), '.4g')} tokens/s, MFU {_fmt(pre.get('mfu'), '.1%')} of a "
            f"measured peak of {_fmt((pre.get('peak_flops') or 0) / 1e9, '.1f')} GFLOP/s",
            f"- final train loss {_fmt(pre.get('final_loss'))}, validation loss {_fmt(pre.get('final_val_loss'))}",
            f"- wall time {_fmt(pre.get('train_seconds'), '.1f')} s; skipped (bad) steps: {pre.get('skipped_steps', 0)}",
            "",
        ]
        if curve:
            lines += ["![training curve](report/loss.png)", ""]
    if m.get("sft"):
        lines += _sft_section(m["sft"])
    if ev:
        lines += [
            "## Evaluation",
            "",
            f"- held-out loss {_fmt(ev.get('val_loss'))} nats/token over {_fmt(ev.get('val_tokens'))} tokens "
            f"({_fmt(ev.get('val_bytes'))} bytes)",
            f"- bits per byte {_fmt(ev.get('val_bpb'))}; xz -9e {_fmt(ev.get('xz_bpb'))} per file, "
            f"{_fmt(ev.get('xz_concat_bpb'))} concatenated",
            f"- scored at {_fmt(ev.get('eval_tokens_per_s'), '.4g')} tokens/s",
            "",
        ]
        card = run_path / "eval" / "results.md"
        if card.exists() and "| task |" in card.read_text(encoding="utf-8"):
            table = card.read_text(encoding="utf-8")
            lines += ["### Benchmarks", "", table[table.index("| task |"):], ""]
        samples_md = run_path / "eval" / "samples.md"
        if samples_md.exists():
            body = samples_md.read_text(encoding="utf-8").split("\n", 1)[1]
            lines += ["## Samples", body.replace("## Sample", "### Sample")]
    if (run_path / "export" / "hf").exists():
        lines += ["## Export", "", "Hugging Face directory: `export/hf` (loads with `AutoModelForCausalLM`).", ""]
    atomic_write_text(run_path / "report.md", "\n".join(lines) + "\n")
    log.info("report written to %s", run_path / "report.md")
    return {"report": str(run_path / "report.md"), "val_bpb": ev.get("val_bpb"), "xz_bpb": ev.get("xz_bpb")}
