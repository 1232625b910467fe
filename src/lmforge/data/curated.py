"""Curated shards: the files the curate stage writes and every later stage reads.

A curated split is a directory (`train/`, `val/`) of `part-NNNNN.<format>` files, one per input shard, each holding
`{"id", "text", "source"}` records in input order. Formats:
- `jsonl.zst` (default): JSON lines compressed with zstandard at a fixed level on one thread, so the same records
  always give the same bytes;
- `jsonl`: the same lines uncompressed;
- `parquet`: columns id, text, source (needs pyarrow).
Readers find parts by name, so a split written in any format is read the same way.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from lmforge.io import atomic_open

OutputFormat = Literal["jsonl.zst", "jsonl", "parquet"]
OUTPUT_FORMATS = ("jsonl.zst", "jsonl", "parquet")
_ZSTD_LEVEL = 3
_PARQUET_ROWS_PER_GROUP = 4096


def part_name(index: int, fmt: OutputFormat) -> str:
    return f"part-{index:05d}.{fmt}"


class PartWriter:
    """Writes one part file atomically: nothing appears under the final name until `close` succeeds."""

    def __init__(self, path: Path, fmt: OutputFormat) -> None:
        if fmt not in OUTPUT_FORMATS:
            raise ValueError(f"output format {fmt!r}: allowed values are {list(OUTPUT_FORMATS)}")
        self.path, self.fmt = Path(path), fmt
        self.docs = 0
        self._rows: list[dict[str, str]] = []
        self._ctx = atomic_open(self.path, "wb")
        self._file = self._ctx.__enter__()
        self._zst: Any = None
        self._parquet: Any = None
        if fmt == "jsonl.zst":
            import zstandard

            self._zst = zstandard.ZstdCompressor(level=_ZSTD_LEVEL, threads=0).stream_writer(self._file, closefd=False)
            self._frame_end = zstandard.FLUSH_FRAME
        elif fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            schema = pa.schema([("id", pa.string()), ("text", pa.string()), ("source", pa.string())])
            self._parquet = pq.ParquetWriter(self._file, schema, compression="zstd")

    def write(self, record: dict[str, str]) -> None:
        self.docs += 1
        if self._parquet is not None:
            self._rows.append(record)
            if len(self._rows) >= _PARQUET_ROWS_PER_GROUP:
                self._flush_rows()
            return
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        (self._zst or self._file).write(line)

    def _flush_rows(self) -> None:
        import pyarrow as pa

        if self._rows:
            self._parquet.write_table(pa.Table.from_pylist(self._rows, schema=self._parquet.schema))
            self._rows = []

    def close(self) -> None:
        if self._parquet is not None:
            self._flush_rows()
            self._parquet.close()
        if self._zst is not None:
            self._zst.flush(self._frame_end)
        self._ctx.__exit__(None, None, None)

    def abort(self, exc: BaseException) -> None:
        """Drop the temporary file: the final name keeps whatever it held before."""
        try:
            self._ctx.__exit__(type(exc), exc, exc.__traceback__)
        except BaseException:
            pass


def part_files(split_dir: Path) -> list[Path]:
    """The part files of a curated split directory, in part order."""
    return sorted(p for p in Path(split_dir).glob("part-*") if ".tmp-" not in p.name)


def iter_part_records(path: Path) -> Iterator[dict[str, Any]]:
    """The records of one part file, streamed."""
    path = Path(path)
    if path.name.endswith(".parquet"):
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            yield from batch.to_pylist()
        return
    with open(path, "rb") as raw:
        if path.name.endswith(".zst"):
            import zstandard

            stream: Any = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(raw), encoding="utf-8")
        else:
            stream = io.TextIOWrapper(raw, encoding="utf-8")
        for line in stream:
            if line.strip():
                yield json.loads(line)


def iter_split_records(curate_dir: Path, split: str) -> Iterator[dict[str, Any]]:
    """Every record of `curate_dir/<split>/`, parts in order."""
    split_dir = Path(curate_dir) / split
    if not split_dir.is_dir():
        raise FileNotFoundError(f"{split_dir} does not exist: is {curate_dir} the output of the curate stage?")
    for path in part_files(split_dir):
        yield from iter_part_records(path)


def iter_split_texts(curate_dir: Path, split: str) -> Iterator[str]:
    """The text of every record of a curated split, streamed."""
    for record in iter_split_records(curate_dir, split):
        yield record["text"]
