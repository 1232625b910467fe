"""Tables: CSV and Parquet files, one document per row, the text taken from the column `text_field` names.

A CSV file's first row is the header. The other columns of a row become the document's metadata, as the other keys
of a JSON Lines record do. Ids are `path:line`, the line where the row starts (a quoted field may span lines).

Bad rows are skipped and counted like bad JSON Lines records: `not utf-8` (the undecodable line is dropped),
`malformed csv` (the csv module rejects the row, or it has fewer fields than the text column needs),
`csv field too long` (a field over the csv module's limit of 131,072 characters), `empty` and `invalid unicode`.
A header without the text column is a setting error, raised at once with the columns present.

A Parquet file is read in batches of rows of the text column only, with pyarrow (imported when one is read).
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

from lmforge.data.base_reader import Document, ErrorLog, _checked_text, _chunks, _CorruptFile, _lines

_PARQUET_BATCH_ROWS = 1024


def _decoded_lines(path: Path, errors: ErrorLog) -> Iterator[str]:
    for lineno, raw in enumerate(_lines(_chunks(path)), start=1):
        try:
            # utf-8-sig on the first line: spreadsheet programs save CSV with a byte-order mark.
            yield raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError:
            errors.add("not utf-8", path, lineno)
            yield ""  # keeps the csv module's line count equal to the file's


def _missing_column_error(path: Path, text_field: str, header: list[str]) -> ValueError:
    return ValueError(
        f"{path}:1: CSV header has no column '{text_field}' (data.text_field); columns present: {header}. "
        f"Set data.text_field to the column that holds the text."
    )


def read_csv(path: Path, rel: str, text_field: str, errors: ErrorLog) -> Iterator[Document]:
    """The rows of CSV file `path` as documents (see the module docstring)."""
    rows = csv.reader(_decoded_lines(path, errors))
    try:
        header = next(rows)
    except StopIteration:
        errors.add("empty", path)
        return
    except csv.Error:
        errors.add("malformed csv", path, 1)
        return
    if text_field not in header:
        raise _missing_column_error(path, text_field, header)
    column = header.index(text_field)
    start = rows.line_num + 1
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except csv.Error as e:
            errors.add("csv field too long" if "field limit" in str(e) else "malformed csv", path, start)
            start = rows.line_num + 1
            continue
        line, start = start, rows.line_num + 1
        if not row:
            continue  # a blank line is not a record
        if len(row) <= column:
            errors.add("malformed csv", path, line)
            continue
        text = _checked_text(row[column], path, line, errors)
        if text is not None:
            meta = {name: value for i, (name, value) in enumerate(zip(header, row)) if i != column}
            yield Document(id=f"{rel}:{line}", text=text, source=str(path), meta=meta)


def read_parquet(path: Path, rel: str, text_field: str, errors: ErrorLog) -> Iterator[Document]:
    """The rows of Parquet file `path` as documents, ids `rel:row`."""
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError(
            f"reading {path} needs pyarrow, which is not installed: pip install pyarrow"
        ) from e
    from pyarrow import ArrowException

    # pyarrow reports a truncated or corrupt file as ArrowInvalid (a ValueError that would pass for the setting
    # error below and end the run), as OSError (a corrupt page) or as UnicodeDecodeError (a mangled string). From a
    # file that did open, each ends the file with one "corrupt parquet file" error, as for a corrupt compressed file.
    corrupt = (ArrowException, OSError, UnicodeDecodeError)
    with open(path, "rb") as f:  # opened here, so that a file that cannot be opened stays an "unreadable file"
        try:
            parquet = pq.ParquetFile(f)
            names = parquet.schema_arrow.names
        except corrupt as e:
            raise _CorruptFile("corrupt parquet file", str(e)) from e
        if text_field not in names:
            raise ValueError(
                f"{path}: parquet file has no column '{text_field}' (data.text_field); columns present: "
                f"{sorted(names)}. Set data.text_field to the column that holds the text."
            )
        row = 0
        batches = parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=[text_field])
        while True:
            try:
                values = next(batches).column(0).to_pylist()
            except StopIteration:
                return
            except corrupt as e:
                raise _CorruptFile("corrupt parquet file", str(e)) from e
            for value in values:
                row += 1
                text = _checked_text(value, path, row, errors)
                if text is not None:
                    yield Document(id=f"{rel}:{row}", text=text, source=str(path))
