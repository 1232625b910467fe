"""Curate: read a source, run the filters, deduplicate, split train / val, and write curated shards.

The work runs in phases over input shards (groups of input files of about `shard_bytes`), each phase's tasks in
parallel on the chosen executor (lmforge.data.executor), with a serial step between them where the whole corpus
must be seen:

1. map (per shard): read, normalise and filter each document with the per-document filters (size, generated,
   language, quality, toxicity, PII, decontamination); keep the survivors in a work file and count the rest;
2. boilerplate (serial, optional): sum the shards' line document frequencies into the set of frequent lines;
3. sign (per shard, when deduplicating or removing boilerplate): delete boilerplate lines, then hash each
   survivor's text (exact dedup) and compute its MinHash signature and LSH band keys;
4. decide (serial): walk the shards in order and drop exact and near duplicates of earlier documents, the first
   occurrence kept, through one `lmforge.data.dedup.Deduplicator` (whose `apply` streams documents with the same
   decisions); apply `max_docs`; assign splits;
5. write (per shard): write each shard's survivors to `train/part-NNNNN.<fmt>` and `val/part-NNNNN.<fmt>`.

Every task writes its files atomically and then a completion marker (`work/<phase>/NNNNN.json`); a rerun skips the
tasks whose marker exists, so killing the job at any point and running it again loses and duplicates nothing, and
gives byte-identical output. The output depends only on the input and the settings, never on `workers` or the
executor. `work/` is deleted once `stats.json` is written.

A document goes to val when a hash of its id falls below `val_fraction`, so the split does not depend on reading
order or on which other documents exist. To keep both splits usable, when at least two documents are kept and the
hash leaves one split empty, the last document (in input order) of the other split is moved into it.

Outputs in `out_dir`: `train/`, `val/` (lmforge.data.curated), `stats.json` (documents and bytes in, kept,
removed per reason with examples, modified per filter, PII found per kind, bad records skipped, source files
skipped by reason, split sizes, histograms of document signals before and after, warnings naming the setting behind
a large removal), `histograms.png`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from lmforge.data.curate_advice import curation_warnings, no_survivor_message
from lmforge.data.curated import PartWriter, iter_part_records, part_name
from lmforge.data.executor import run_tasks
from lmforge.data.base_filter import Filter
from lmforge.data.dedup import DUPLICATE, NEAR_DUPLICATE, DedupKeys, Deduplicator
from lmforge.data.filters import build_filters
from lmforge.io import atomic_open, atomic_write_json, atomic_write_text
from lmforge.data.base_reader import Document, ErrorLog
from lmforge.data.readers import check_source, read_documents, read_file, source_files
from lmforge.data.readers import stdlib_root, stdlib_source_files
from lmforge.data.web import is_hf_dataset
from lmforge.data.config import DataConfig

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
_EXAMPLES_PER_REASON = 3
_SNIPPET_CHARS = 300
_WORK_FORMAT = "jsonl.zst"
_PLAN_VERSION = 1
# Reason codes of the decide step, stored per document between phases.
_KEEP, _DUPLICATE, _NEAR_DUPLICATE, _BOILERPLATE_ONLY, _OVER_CAP = 0, 1, 2, 3, 4
_CODE_REASONS = {_DUPLICATE: DUPLICATE, _NEAR_DUPLICATE: NEAR_DUPLICATE,
                 _BOILERPLATE_ONLY: "boilerplate only", _OVER_CAP: "over max_docs"}  # fmt: skip
_REASON_CODES = {DUPLICATE: _DUPLICATE, NEAR_DUPLICATE: _NEAR_DUPLICATE}


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8"))


def _example(doc_id: str, text: str) -> dict[str, str]:
    return {"id": doc_id, "snippet": text[:_SNIPPET_CHARS]}


@dataclass
class CurationStats:
    """Documents and bytes in, kept and removed per reason. Bytes are UTF-8 bytes of the text as read."""

    docs_in: int = 0
    docs_kept: int = 0
    bytes_in: int = 0
    bytes_kept: int = 0
    removed: dict[str, dict[str, Any]] = field(default_factory=dict)

    def record(self, doc: Document, reason: str | None, size: int | None = None) -> None:
        """Count one document read; `reason` is None when it was kept."""
        size = _utf8_len(doc.text) if size is None else size
        self.docs_in += 1
        self.bytes_in += size
        if reason is None:
            self.docs_kept += 1
            self.bytes_kept += size
            return
        self.remove(reason, size, doc.id, doc.text)

    def remove(self, reason: str, size: int, doc_id: str | None = None, text: str = "") -> None:
        """Count a removal of a document counted in already, as kept or elsewhere."""
        entry = self.removed.setdefault(reason, {"docs": 0, "bytes": 0, "examples": []})
        entry["docs"] += 1
        entry["bytes"] += size
        if doc_id is not None and len(entry["examples"]) < _EXAMPLES_PER_REASON:
            entry["examples"].append(_example(doc_id, text))

    def merge(self, other: dict[str, Any]) -> None:
        """Add the counts of another shard's `to_dict()`; examples keep the first ones in shard order."""
        for key in ("docs_in", "docs_kept", "bytes_in", "bytes_kept"):
            setattr(self, key, getattr(self, key) + other[key])
        for reason, theirs in other["removed"].items():
            entry = self.removed.setdefault(reason, {"docs": 0, "bytes": 0, "examples": []})
            entry["docs"] += theirs["docs"]
            entry["bytes"] += theirs["bytes"]
            entry["examples"] = (entry["examples"] + theirs["examples"])[:_EXAMPLES_PER_REASON]

    def to_dict(self) -> dict[str, Any]:
        return {
            "docs_in": self.docs_in,
            "docs_kept": self.docs_kept,
            "bytes_in": self.bytes_in,
            "bytes_kept": self.bytes_kept,
            "removed": {reason: dict(entry) for reason, entry in sorted(self.removed.items())},
        }


def split_of(doc_id: str, val_fraction: float) -> Literal["train", "val"]:
    """The split of a document, from a hash of its id alone (stable across runs, machines and Python versions)."""
    digest = hashlib.sha1(doc_id.encode("utf-8")).digest()
    position = int.from_bytes(digest[:8], "big") / 2**64
    return "val" if position < val_fraction else "train"


def apply_filters(doc: Document, filters: list[Filter], modified: dict[str, dict[str, int]] | None = None
                  ) -> Document | str:  # fmt: skip
    """Run `doc` through `filters` in order: the document that survives them all, or the first drop reason.

    With `modified`, a filter that changes the text counts the document and the bytes it removed under its name.
    """
    for f in filters:
        result = f.apply(doc)
        if isinstance(result, str):
            return result
        if modified is not None and result is not doc and result.text != doc.text:
            entry = modified.setdefault(f.name, {"docs": 0, "bytes_removed": 0})
            entry["docs"] += 1
            entry["bytes_removed"] += _utf8_len(doc.text) - _utf8_len(result.text)
        doc = result
    return doc


# -- planning ------------------------------------------------------------------------------------------------------


def plan_shards(cfg: DataConfig, skipped: ErrorLog | None = None) -> list[dict[str, Any]]:
    """The input shards: runs of consecutive input files (sorted by path) of about `cfg.shard_bytes` each.

    A single file, or a dataset saved with HF datasets, is one shard. The files of a source directory that are not
    read (their extension, pipes, links out of the source, ...) are counted in `skipped` when given.
    """
    if cfg.source == "stdlib":
        root = stdlib_root()
        files = [(str(p), p.relative_to(root).as_posix()) for p in stdlib_source_files(cfg.include_tests)]
    else:
        src = Path(cfg.source)
        check_source(src)
        if src.is_file() or is_hf_dataset(src):
            return [{"index": 0, "whole": str(src)}]
        paths = source_files(src, cfg.extensions, follow_symlinks=cfg.follow_symlinks, skipped=skipped)
        files = [(str(p), p.relative_to(src).as_posix()) for p in paths]
    shards: list[dict[str, Any]] = []
    current: list[tuple[str, str]] = []
    size = 0
    for path, rel in files:
        current.append((path, rel))
        try:
            size += Path(path).stat().st_size
        except OSError:
            pass  # a dangling link or a vanished file: the reader counts it as unreadable
        if size >= cfg.shard_bytes:
            shards.append({"index": len(shards), "files": current})
            current, size = [], 0
    if current or not shards:
        shards.append({"index": len(shards), "files": current})
    return shards


def _read_shard(cfg: DataConfig, shard: dict[str, Any], errors: ErrorLog):
    if "whole" in shard:
        yield from read_documents(shard["whole"], text_field=cfg.text_field, errors=errors, text_split=cfg.text_split,
                                  max_chars=cfg.max_chars, hf_split=cfg.hf_split)  # fmt: skip
        return
    split = "file" if cfg.source == "stdlib" else cfg.text_split
    for path, rel in shard["files"]:
        yield from read_file(Path(path), rel, text_field=cfg.text_field, text_split=split, max_chars=cfg.max_chars,
                             errors=errors)  # fmt: skip


# -- phase tasks (module level, so process pools and Ray can pickle them by reference) ---------------------------


def _marker(work: Path, phase: str, index: int) -> Path:
    return work / phase / f"{index:05d}.json"


def _done(work: Path, phase: str, index: int) -> dict[str, Any] | None:
    path = _marker(work, phase, index)
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    with atomic_open(path, "wb") as f:
        np.savez(f, **arrays)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_open(path, "wb") as f:
        np.save(f, array)


def _histograms():
    from lmforge.data.curate_report import SignalHistograms

    return SignalHistograms()


def map_shard(job: dict[str, Any]) -> dict[str, Any]:
    """Phase 1 for one shard: read and filter; survivors to `work/map/NNNNN.jsonl.zst`."""
    cfg, work, shard = DataConfig(**job["cfg"]), Path(job["work"]), job["shard"]
    i = shard["index"]
    if (done := _done(work, "map", i)) is not None:
        return done
    start = time.perf_counter()
    errors, stats, before = ErrorLog(), CurationStats(), _histograms()
    filters = build_filters(cfg)
    modified: dict[str, dict[str, int]] = {}
    pii: Counter[str] = Counter()
    lines = None
    if cfg.boilerplate:
        from lmforge.data.boilerplate import LineCounter

        lines = LineCounter()
    sizes, val = [], []
    writer = PartWriter(work / "map" / f"{i:05d}.{_WORK_FORMAT}", _WORK_FORMAT)
    try:
        for doc in _read_shard(cfg, shard, errors):
            size = _utf8_len(doc.text)
            before.add(doc.text)
            result = apply_filters(doc, filters, modified)
            if isinstance(result, str):
                stats.record(doc, result, size)
                continue
            stats.record(doc, None, size)
            pii.update(result.meta.get("pii", {}))
            writer.write({"id": result.id, "text": result.text, "source": result.source})
            sizes.append(size)
            val.append(split_of(result.id, cfg.val_fraction) == "val")
            if lines is not None:
                lines.add(result.text, cfg.boilerplate_min_chars)
        writer.close()
    except BaseException as e:
        writer.abort(e)
        raise
    arrays = {"bytes": np.asarray(sizes, dtype=np.int64), "val": np.asarray(val, dtype=bool)}
    if lines is not None:
        arrays["line_hashes"], arrays["line_docs"] = lines.to_arrays()
    _save_npz(work / "map" / f"{i:05d}.npz", **arrays)
    result = {"index": i, "stats": stats.to_dict(), "errors": errors.to_dict(), "before": before.to_dict(),
              "modified": modified, "pii": dict(sorted(pii.items())), "seconds": time.perf_counter() - start}  # fmt: skip
    atomic_write_json(_marker(work, "map", i), result)
    return result


def _boilerplate_remover(cfg: DataConfig, work: Path):
    if not cfg.boilerplate:
        return None
    from lmforge.data.boilerplate import BoilerplateRemover

    return BoilerplateRemover(np.load(work / "boilerplate.npy"), cfg.boilerplate_min_chars)


def _strip(remover, text: str) -> tuple[str, int]:
    return (text, 0) if remover is None else remover.strip(text)


def sign_shard(job: dict[str, Any]) -> dict[str, Any]:
    """Phase 3 for one shard: boilerplate removal, then content hashes and MinHash signatures."""
    cfg, work, i = DataConfig(**job["cfg"]), Path(job["work"]), job["shard"]["index"]
    if (done := _done(work, "sign", i)) is not None:
        return done
    remover = _boilerplate_remover(cfg, work)
    dedup = Deduplicator.from_config(cfg)
    digests, sigs, keys, empty, lines_removed = [], [], [], [], 0
    docs_stripped, bytes_stripped = 0, 0
    for record in iter_part_records(work / "map" / f"{i:05d}.{_WORK_FORMAT}"):
        text, removed = _strip(remover, record["text"])
        if removed and text.strip():  # a page left empty counts as removed ("boilerplate only"), not modified
            lines_removed += removed
            docs_stripped += 1
            bytes_stripped += _utf8_len(record["text"]) - _utf8_len(text)
        empty.append(not text.strip())
        found = dedup.keys(text)
        digests.append(found.digest)
        if dedup.near is not None:
            sigs.append(found.signature)
            keys.append(found.bands)
    arrays = {"empty": np.asarray(empty, dtype=bool),
              "digests": np.frombuffer(b"".join(digests), dtype=np.uint8).reshape(len(digests), 20)}  # fmt: skip
    if dedup.near is not None:
        arrays["sigs"] = np.asarray(sigs, dtype=np.uint64).reshape(len(sigs), dedup.near.num_perm)
        arrays["keys"] = np.asarray(keys, dtype=np.uint64).reshape(len(keys), dedup.near.bands)
    _save_npz(work / "sign" / f"{i:05d}.npz", **arrays)
    result = {"index": i, "boilerplate": {"docs": docs_stripped, "lines": lines_removed, "bytes_removed": bytes_stripped}}
    atomic_write_json(_marker(work, "sign", i), result)
    return result


def write_shard(job: dict[str, Any]) -> dict[str, Any]:
    """Phase 5 for one shard: the shard's survivors to `train/` and `val/` part files."""
    cfg, work, out, i = DataConfig(**job["cfg"]), Path(job["work"]), Path(job["out"]), job["shard"]["index"]
    if (done := _done(work, "write", i)) is not None:
        return done
    remover = _boilerplate_remover(cfg, work)
    dest = np.load(work / "decide" / f"{i:05d}.npy")
    after = _histograms()
    writers = {s: PartWriter(out / s / part_name(i, cfg.output_format), cfg.output_format) for s in SPLITS}
    sizes = dict.fromkeys(SPLITS, 0)
    try:
        for row, record in enumerate(iter_part_records(work / "map" / f"{i:05d}.{_WORK_FORMAT}")):
            if dest[row] < 0:
                continue
            split = SPLITS[dest[row]]
            text, _ = _strip(remover, record["text"])
            writers[split].write({"id": record["id"], "text": text, "source": record["source"]})
            sizes[split] += _utf8_len(text)
            after.add(text)
        for w in writers.values():
            w.close()
    except BaseException as e:
        for w in writers.values():
            w.abort(e)
        raise
    result = {"index": i, "docs": {s: writers[s].docs for s in SPLITS}, "bytes": sizes, "after": after.to_dict()}
    atomic_write_json(_marker(work, "write", i), result)
    return result


# -- serial steps --------------------------------------------------------------------------------------------------


def _find_boilerplate(cfg: DataConfig, work: Path, n_shards: int) -> int:
    from lmforge.data.boilerplate import frequent_lines

    path = work / "boilerplate.npy"
    if path.exists():  # a rerun after a kill: the sum over shards is already done
        return len(np.load(path))

    def parts():
        for i in range(n_shards):
            with np.load(work / "map" / f"{i:05d}.npz") as z:
                yield z["line_hashes"], z["line_docs"]

    frequent = frequent_lines(parts(), cfg.boilerplate_min_docs)
    _save_npy(path, frequent)
    return len(frequent)


def _signed_keys(sign: dict[str, np.ndarray], row: int) -> DedupKeys:
    """The dedup keys of one document, as the sign phase stored them."""
    digest = sign["digests"][row].tobytes()
    if "sigs" not in sign:
        return DedupKeys(digest)
    return DedupKeys(digest, sign["sigs"][row], sign["keys"][row].tolist())


def _decide(cfg: DataConfig, work: Path, n_shards: int, signed: bool) -> dict[str, Any]:
    """Phase 4: the destination of every mapped document (0 train, 1 val, -1 dropped) and the removal counts."""
    summary_path = work / "decide.json"
    if summary_path.exists():
        return json.loads(summary_path.read_text(encoding="utf-8"))
    dedup = Deduplicator.from_config(cfg)
    kept = 0
    removed: dict[str, dict[str, Any]] = {}
    dests, last = [], {0: None, 1: None}
    for i in range(n_shards):
        with np.load(work / "map" / f"{i:05d}.npz") as z:
            sizes, val = z["bytes"], z["val"]
        codes = np.zeros(len(sizes), dtype=np.int8)
        if signed:
            with np.load(work / "sign" / f"{i:05d}.npz") as z:
                sign = {k: z[k] for k in z.files}
        for row in range(len(sizes)):
            code = _KEEP
            if signed and sign["empty"][row]:
                code = _BOILERPLATE_ONLY
            # In input order, through the one Deduplicator (lmforge.data.dedup), so the first occurrence is kept.
            elif signed and (reason := dedup.check(_signed_keys(sign, row))) is not None:
                code = _REASON_CODES[reason]
            elif cfg.max_docs is not None and kept >= cfg.max_docs:
                code = _OVER_CAP
            codes[row] = code
            if code == _KEEP:
                kept += 1
                last[int(val[row])] = (i, row)
            else:
                entry = removed.setdefault(_CODE_REASONS[code], {"docs": 0, "bytes": 0, "rows": []})
                entry["docs"] += 1
                entry["bytes"] += int(sizes[row])
                if len(entry["rows"]) < _EXAMPLES_PER_REASON:
                    entry["rows"].append([i, row])
        dest = np.where(codes == _KEEP, val.astype(np.int8), np.int8(-1))
        dests.append(dest)
    moved = None
    n_val = sum(int((d == 1).sum()) for d in dests)
    n_train = sum(int((d == 0).sum()) for d in dests)
    for empty_split, full_split in ((1, 0), (0, 1)):
        count_empty, count_full = (n_val, n_train) if empty_split == 1 else (n_train, n_val)
        # val_fraction 0 asks for no held-out split: an empty val is what was meant, not bad luck of the hash.
        if count_empty == 0 and count_full >= 2 and cfg.val_fraction > 0:
            i, row = last[full_split]
            dests[i][row] = empty_split
            moved = f"last {SPLITS[full_split]} document moved to {SPLITS[empty_split]}"
            break
    for i, dest in enumerate(dests):
        _save_npy(work / "decide" / f"{i:05d}.npy", dest)
    summary = {"removed": removed, "split_adjustment": moved}
    atomic_write_json(summary_path, summary)
    return summary


def _resolve_examples(work: Path, removed: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Replace the decide step's (shard, row) examples by ids and snippets read back from the map files."""
    wanted: dict[int, dict[int, list[dict[str, Any]]]] = {}
    for reason, entry in removed.items():
        entry["examples"] = []
        for i, row in entry.pop("rows"):
            wanted.setdefault(i, {}).setdefault(row, []).append(entry)
    for i, rows in sorted(wanted.items()):
        last = max(rows)
        for row, record in enumerate(iter_part_records(work / "map" / f"{i:05d}.{_WORK_FORMAT}")):
            for entry in rows.get(row, []):
                entry["examples"].append(_example(record["id"], record["text"]))
            if row >= last:
                break
    return removed


# -- the stage -----------------------------------------------------------------------------------------------------


class _Progress:
    """One log line per finished task: documents read, documents/s, and what has been removed so far."""

    def __init__(self, phase: str, total: int) -> None:
        self.phase, self.total, self.done = phase, total, 0
        self.docs = 0
        self.removed: Counter[str] = Counter()
        self.start = time.perf_counter()

    def __call__(self, _: int, result: dict[str, Any]) -> None:
        self.done += 1
        if "stats" in result:
            self.docs += result["stats"]["docs_in"]
            self.removed.update({r: e["docs"] for r, e in result["stats"]["removed"].items()})
        rate = self.docs / max(time.perf_counter() - self.start, 1e-9)
        top = ", ".join(f"{r} {n:,}" for r, n in self.removed.most_common(4))
        log.info("curate %-5s %d/%d shards%s", self.phase, self.done, self.total,
                 f"  {self.docs:,} docs  {rate:,.0f} docs/s  removed: {top or 'none'}" if self.docs else "")  # fmt: skip


def _plan(cfg: DataConfig, out_dir: Path, work: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The shard plan, reused when `work/plan.json` holds the same settings and input list, else started afresh;
    and the files of the source left out of it, by reason (`ErrorLog.to_dict`)."""
    skipped = ErrorLog()
    shards = plan_shards(cfg, skipped)
    settings = cfg.model_dump(mode="json", exclude={"workers", "executor", "ray_address", "plots"})
    plan = {"version": _PLAN_VERSION, "settings": settings, "shards": shards}
    path = work / "plan.json"
    # ASCII-escaped JSON: a file name that is not valid UTF-8 reaches here as a lone surrogate, which no UTF-8
    # writer accepts; the escape round-trips it exactly.
    text = json.dumps(plan, indent=1, ensure_ascii=True) + "\n"
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return shards, skipped.to_dict()
    # A different plan: nothing in work/ or the split directories belongs to it.
    for stale in [work, *(out_dir / s for s in SPLITS)]:
        shutil.rmtree(stale, ignore_errors=True)
    (out_dir / "stats.json").unlink(missing_ok=True)
    atomic_write_text(path, text)
    return shards, skipped.to_dict()


def run_curate(cfg: DataConfig, out_dir: Path) -> dict[str, Any]:
    """Curate `cfg.source` into `out_dir` (see the module docstring); returns flat metrics for the manifest.

    Raises ValueError when no document survives, after writing stats.json so the reasons can be inspected.
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    work = out_dir / "work"
    shards, skipped_files = _plan(cfg, out_dir, work)
    # A killed run leaves its half-written temporary files behind; they never become outputs, so they go.
    for d in (work, *(out_dir / s for s in SPLITS)):
        for tmp in d.rglob("*.tmp-*") if d.exists() else ():
            tmp.unlink(missing_ok=True)
    base = {"cfg": cfg.model_dump(mode="json"), "work": str(work), "out": str(out_dir)}
    jobs = [{**base, "shard": s} for s in shards]
    run = {"workers": cfg.workers, "executor": cfg.executor, "address": cfg.ray_address}
    timings: dict[str, float] = {}

    def phase(name: str, fn, progress: bool = False) -> list[dict[str, Any]]:
        t = time.perf_counter()
        on_result = _Progress(name, len(jobs)) if progress else None
        results = run_tasks(fn, jobs, on_result=on_result, **run)
        timings[name] = round(time.perf_counter() - t, 3)
        return results

    mapped = phase("map", map_shard, progress=True)
    boilerplate_lines = None
    if cfg.boilerplate:
        boilerplate_lines = _find_boilerplate(cfg, work, len(shards))
    signed = cfg.dedup or cfg.near_dedup or cfg.boilerplate
    signs = phase("sign", sign_shard) if signed else []
    decided = _decide(cfg, work, len(shards), signed)
    written = phase("write", write_shard)
    report = _report(cfg, mapped, signs, decided, written, work, boilerplate_lines)
    report["skipped_files"] = skipped_files
    report["warnings"] = curation_warnings(report, cfg.extensions)
    atomic_write_json(out_dir / "stats.json", report)
    if cfg.plots:
        _plot(report, out_dir / "histograms.png")
    shutil.rmtree(work, ignore_errors=True)
    _print_summary(report)
    if report["docs_kept"] == 0:
        raise ValueError(no_survivor_message(report, cfg.source, out_dir / "stats.json"))
    for warning in report["warnings"]:
        log.warning("curate: %s", warning)
    return _metrics(report, len(shards), time.perf_counter() - start, timings)


def _report(cfg, mapped, signs, decided, written, work, boilerplate_lines) -> dict[str, Any]:
    stats, errors = CurationStats(), ErrorLog()
    for m in mapped:
        stats.merge(m["stats"])
        errors.merge(m["errors"])
    removed = _resolve_examples(work, decided["removed"])
    for reason, entry in removed.items():
        stats.docs_kept -= entry["docs"]
        stats.bytes_kept -= entry["bytes"]
        stats.removed[reason] = entry
    modified: dict[str, dict[str, int]] = {}
    for m in mapped:
        for name, entry in m["modified"].items():
            mine = modified.setdefault(name, {"docs": 0, "bytes_removed": 0})
            mine["docs"] += entry["docs"]
            mine["bytes_removed"] += entry["bytes_removed"]
    if signs and cfg.boilerplate:
        modified["boilerplate"] = {"docs": sum(s["boilerplate"]["docs"] for s in signs),
                                   "bytes_removed": sum(s["boilerplate"]["bytes_removed"] for s in signs),
                                   "lines": sum(s["boilerplate"]["lines"] for s in signs)}  # fmt: skip
    pii: Counter[str] = Counter()
    for m in mapped:
        pii.update(m["pii"])
    before, after = _histograms(), _histograms()
    for m in mapped:
        before.merge(type(before).from_dict(m["before"]))
    for w in written:
        after.merge(type(after).from_dict(w["after"]))
    report = {
        **stats.to_dict(),
        "modified": dict(sorted(modified.items())),
        "pii_found": dict(sorted(pii.items())),
        "boilerplate_lines": boilerplate_lines,
        "skipped_bad": errors.to_dict(),
        "splits": {s: {"docs": sum(w["docs"][s] for w in written), "bytes": sum(w["bytes"][s] for w in written)}
                   for s in SPLITS},  # fmt: skip
        "split_adjustment": decided["split_adjustment"],
        "shards": len(mapped),
        "output_format": cfg.output_format,
        "histograms": {"before": before.to_dict(), "after": after.to_dict()},
    }
    return report


def _plot(report: dict[str, Any], path: Path) -> None:
    from lmforge.data.curate_report import SignalHistograms, plot_histograms

    hists = report["histograms"]
    plot_histograms(SignalHistograms.from_dict(hists["before"]), SignalHistograms.from_dict(hists["after"]), path)


def _print_summary(report: dict[str, Any]) -> None:
    """The summary table on stderr, beside the log lines, leaving stdout to whatever the caller prints."""
    from rich.console import Console

    from lmforge.data.curate_report import print_summary

    print_summary(report, Console(stderr=True))


def _metrics(report: dict[str, Any], n_shards: int, seconds: float, timings: dict[str, float]) -> dict[str, Any]:
    metrics: dict[str, Any] = {
        "docs_in": report["docs_in"],
        "docs_kept": report["docs_kept"],
        "docs_train": report["splits"]["train"]["docs"],
        "docs_val": report["splits"]["val"]["docs"],
        "bytes_train": report["splits"]["train"]["bytes"],
        "bytes_val": report["splits"]["val"]["bytes"],
        "docs_skipped_bad": report["skipped_bad"]["total"],
        "files_skipped": report["skipped_files"]["total"],
        "shards": n_shards,
    }
    for reason, entry in sorted(report["removed"].items()):
        # "gopher: duplicate 5-grams" -> removed_gopher_duplicate_5_grams: a plain identifier for dashboards
        metrics["removed_" + "_".join(re.findall(r"[a-z0-9]+", reason.lower()))] = entry["docs"]
    metrics["seconds"] = round(seconds, 3)
    metrics["docs_per_s"] = round(report["docs_in"] / max(seconds, 1e-9), 1)
    metrics.update({f"seconds_{k}": v for k, v in timings.items()})
    return metrics


__all__ = ["run_curate", "plan_shards", "split_of", "apply_filters", "CurationStats", "SPLITS"]
