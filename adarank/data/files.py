"""Reading text-classification tables (CSV, TSV, JSONL; optionally .gz/.bz2 compressed).

The format follows the file name: ``.csv``, ``.tsv``, ``.jsonl`` (or ``.json`` with one object
per line), each optionally followed by ``.gz`` or ``.bz2``. Errors name the file, the column
and what was found instead.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import os
from pathlib import Path

__all__ = ["table_format", "read_header", "read_columns", "check_table"]

_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl"}


def table_format(path: str | os.PathLike) -> str:
    """``"csv"``, ``"tsv"`` or ``"jsonl"`` from the file name (compression suffix ignored).

    Raises:
        ValueError: unsupported extension.
    """
    suffixes = Path(path).suffixes
    if suffixes and suffixes[-1] in (".gz", ".bz2"):
        suffixes = suffixes[:-1]
    fmt = _FORMATS.get(suffixes[-1].lower()) if suffixes else None
    if fmt is None:
        raise ValueError(
            f"data file {str(path)!r}: unsupported format; expected a name ending in "
            ".csv, .tsv or .jsonl (optionally .gz/.bz2)"
        )
    return fmt


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path), encoding="utf-8", newline="")
    if path.suffix == ".bz2":
        return io.TextIOWrapper(bz2.open(path), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _existing(path: str | os.PathLike) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    return p


def read_header(path: str | os.PathLike) -> list[str]:
    """Column names of a table (the CSV/TSV header or the keys of the first JSONL record)."""
    p = _existing(path)
    fmt = table_format(p)
    with _open_text(p) as f:
        if fmt == "jsonl":
            for line in f:
                if line.strip():
                    record = json.loads(line)
                    if not isinstance(record, dict):
                        raise ValueError(f"{p}: first JSONL line is not an object: {line[:80]!r}")
                    return list(record)
            return []
        reader = csv.reader(f, delimiter="\t" if fmt == "tsv" else ",")
        return next(reader, [])


def check_table(path: str | os.PathLike, columns: list[str]) -> None:
    """Raise if ``path`` is missing, of an unknown format, or lacks one of ``columns``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: unknown format or a missing column (the available columns are listed).
    """
    header = read_header(path)
    for col in columns:
        if col not in header:
            raise ValueError(f"data file {str(path)!r} has no column {col!r}; columns: {header}")


def read_columns(path: str | os.PathLike, columns: list[str]) -> dict[str, list]:
    """Read ``columns`` of every record of a table.

    Returns:
        ``{column: [values...]}`` (strings for CSV/TSV; JSON values for JSONL).

    Raises:
        FileNotFoundError, ValueError: see :func:`check_table`; also a JSONL record lacking a
            column (its line number is given).
    """
    check_table(path, columns)
    p = _existing(path)
    fmt = table_format(p)
    out: dict[str, list] = {c: [] for c in columns}
    with _open_text(p) as f:
        if fmt == "jsonl":
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{p}:{lineno}: invalid JSON ({err})") from err
                for c in columns:
                    if c not in record:
                        raise ValueError(f"{p}:{lineno}: record has no column {c!r}")
                    out[c].append(record[c])
        else:
            reader = csv.DictReader(f, delimiter="\t" if fmt == "tsv" else ",")
            for row in reader:
                for c in columns:
                    out[c].append(row[c])
    return out
