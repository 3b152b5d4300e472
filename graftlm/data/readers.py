"""Data-file readers and their one validation pass: every row checked once, problems collected.

Files are JSONL (one object a line), CSV (header row; a chat ``messages`` cell holds JSON) or
Parquet, holding one row format (`graftlm.data.formats`). Every problem names the file and line
(CSV: the row's first line, the header being line 1; Parquet: ``row N``), so a user can fix a file
in one pass.
"""

from __future__ import annotations

import codecs
import csv
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from graftlm.data.formats import WHERE, format_of, row_problem, unknown_format
from graftlm.errors import GraftError

logger = logging.getLogger("graftlm")

MAX_LISTED = 10  # problems spelled out in one error; the rest are counted

_SUFFIXES = {
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".parquet": "parquet",
}


class RowErrors:
    """Collects bad rows so a user sees many problems in one run instead of one per run."""

    def __init__(self, source: str):
        self.source = source
        self.items: list[tuple[int, str, str]] = []  # (order, where, problem)

    def add(self, order: int, where: str, problem: str) -> None:
        self.items.append((order, where, problem))

    def __len__(self) -> int:
        return len(self.items)

    def finish(self, *, skip: bool, total: int) -> None:
        """Raise one error listing the problems, or log them as warnings when skipping."""
        if not self.items:
            return
        self.items.sort()
        count = len(self.items)
        shown = self.items[:MAX_LISTED]
        if skip:
            for _, where, problem in shown:
                logger.warning("skipping bad row %s: %s", where, problem)
            logger.warning("skipped %d bad rows of %d in %s", count, total, self.source)
            return
        listed = "".join(f"\n  {where}: {problem}" for _, where, problem in shown)
        more = f"\n  ... and {count - MAX_LISTED} more" if count > MAX_LISTED else ""
        raise GraftError(
            f"{self.source}: {count} bad rows of {total} (fix them, or skip them with "
            f"skip_bad_rows=True / --skip-bad-rows):{listed}{more}"
        )


# ---------------------------------------------------------------------------------------------
# File readers: each yields (where, row, problem) with exactly one of row / problem set.

Read = Iterator[tuple[str, Any, "str | None"]]


def _not_utf8(raw: bytes, err: UnicodeDecodeError) -> str:
    return f"not UTF-8 (byte {raw[err.start]:#04x} at column {err.start + 1})"


def _jsonl_rows(path: Path) -> Read:
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            where = f"{path}:{number}"
            if number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield where, None, _not_utf8(raw, err)
                continue
            if not line.strip():
                continue  # a blank line holds no row
            try:
                yield where, json.loads(line), None
            except json.JSONDecodeError as err:
                yield where, None, f"not valid JSON: {err.msg} at column {err.colno}"
            except (RecursionError, ValueError) as err:  # nested too deep, a 5000-digit number
                yield where, None, f"not valid JSON: {_json_problem(err)}"


def _json_problem(err: Exception) -> str:
    return "nested too deeply" if isinstance(err, RecursionError) else str(err)


def _csv_rows(path: Path) -> Read:
    # Decode line by line (a UTF-8 sequence never contains b"\n") so a bad byte names its line;
    # the csv module then sees text and handles quoted fields that span lines.
    lines, bad = [], {}
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
            try:
                lines.append(raw.decode("utf-8"))
            except UnicodeDecodeError as err:
                bad[number] = _not_utf8(raw, err)
                lines.append(raw.decode("utf-8", errors="replace"))
    # Long texts exceed the csv module's default 128 KiB field limit.
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))
    reader = csv.reader(lines)
    try:
        header = next(reader, None)
    except csv.Error as err:
        raise GraftError(f"{path}:1: header is not valid CSV: {err}") from None
    if header is None:
        return
    if 1 in bad:
        raise GraftError(f"{path}:1: header is {bad[1]}")
    header = [name.strip() for name in header]
    start = reader.line_num + 1
    while True:
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            yield f"{path}:{start}", None, f"not valid CSV: {err}"
            start = reader.line_num + 1
            continue
        where, first, start = f"{path}:{start}", start, reader.line_num + 1
        problems = [bad[n] for n in range(first, start) if n in bad]
        if problems:
            yield where, None, problems[0]
        elif not record:
            continue  # blank line
        elif len(record) != len(header):
            yield where, None, f"{len(record)} fields but the header has {len(header)}"
        else:
            row = dict(zip(header, record))
            messages = row.get("messages")
            if isinstance(messages, str):
                try:
                    row["messages"] = json.loads(messages)
                except json.JSONDecodeError as err:
                    yield where, None, f"column 'messages' is not valid JSON: {err.msg}"
                    continue
                except (RecursionError, ValueError) as err:
                    problem = _json_problem(err)
                    yield where, None, f"column 'messages' is not valid JSON: {problem}"
                    continue
            yield where, row, None


def _parquet_rows(path: Path) -> Read:
    try:  # pyarrow (heavy to import) only when a Parquet file is read
        import pyarrow.parquet as pq
    except ImportError:
        raise GraftError("reading Parquet files needs pyarrow: pip install pyarrow") from None
    from pyarrow import ArrowException

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
        number = 0
        for batch in batches:
            for row in batch.to_pylist():
                number += 1
                yield f"{path}:row {number}", row, None
    # ArrowInvalid is a ValueError, ArrowIOError an OSError, ArrowNotImplementedError neither
    except (OSError, ValueError, ArrowException) as err:
        raise GraftError(f"{path}: not a readable Parquet file: {err}") from None


def read_rows_counted(
    path: str | Path, *, skip_bad_rows: bool = False, require_answer: bool = True
) -> tuple[list[dict], str, int]:
    """`read_rows`, also returning the number of bad rows skipped."""
    path = Path(path)
    kind = _SUFFIXES.get(path.suffix.lower())
    if not path.exists():
        raise GraftError(f"data file not found: {path}")
    if path.is_dir():
        raise GraftError(f"{path} is a directory; expected a .jsonl, .csv or .parquet file")
    if kind is None:
        raise GraftError(
            f"{path}: unknown data file type {path.suffix!r}; use .jsonl, .csv or .parquet"
        )
    reader = {"jsonl": _jsonl_rows, "csv": _csv_rows, "parquet": _parquet_rows}[kind]

    errors = RowErrors(str(path))
    valid: list[tuple[int, str, dict, str]] = []
    total = 0
    for order, (where, row, problem) in enumerate(reader(path)):
        total += 1
        fmt = None
        if problem is None and isinstance(row, dict):
            fmt = format_of(row)
            problem = unknown_format(row) if fmt is None else None
        if problem is None:
            problem = row_problem(row, fmt or "text", require_answer=require_answer)
        if problem:
            errors.add(order, where, problem)
        else:
            valid.append((order, where, row, fmt))
    if total == 0:
        raise GraftError(f"{path} is empty: no rows")

    # The first valid row fixes the format: one bad first row should not hide the file's format.
    file_fmt = valid[0][3] if valid else None
    rows = []
    for order, where, row, fmt in valid:
        if fmt != file_fmt:
            errors.add(
                order,
                where,
                f"row is in {fmt} format but the file's first valid row ({valid[0][1]}) is in "
                f"{file_fmt} format; use one format per file",
            )
        else:
            rows.append({**row, WHERE: where})
    errors.finish(skip=skip_bad_rows, total=total)
    if not rows:
        raise GraftError(f"{path}: no valid rows ({len(errors)} bad rows skipped)")
    return rows, file_fmt, len(errors)


def read_rows(
    path: str | Path, *, skip_bad_rows: bool = False, require_answer: bool = True
) -> tuple[list[dict], str]:
    """Read and validate every row of a data file.

    Args:
        path: a ``.jsonl`` (or ``.json``/``.ndjson`` holding JSON Lines), ``.csv`` or ``.parquet`` file.
        skip_bad_rows: log bad rows as warnings and skip them instead of raising.
        require_answer: rows must carry an answer (assistant turn, completion, output), as training
            needs; pass False for generation inputs.

    Returns:
        ``(rows, format)``: each row is the file's row plus a ``"_where"`` key (``"file:line"``, or
        ``"file:row N"`` for Parquet); drop it before writing rows back out. ``format`` is one of
        `FORMATS`.

    Raises:
        GraftError: the file is missing, empty or of an unknown type; or it has bad rows (the first
            ten listed with file:line and problem, plus the total) and ``skip_bad_rows`` is False; or
            no valid row is left.
    """
    rows, fmt, _ = read_rows_counted(
        path, skip_bad_rows=skip_bad_rows, require_answer=require_answer
    )
    return rows, fmt
