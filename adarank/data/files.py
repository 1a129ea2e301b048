"""Reading text-classification tables (CSV, TSV, JSONL; optionally .gz/.bz2 compressed).

The format follows the file name: ``.csv``, ``.tsv``, ``.jsonl`` (or ``.json`` with one object
per line), each optionally followed by ``.gz`` or ``.bz2``. Text is UTF-8 (a leading byte-order
mark is accepted). Errors name the file, the line, the column and what was found instead: a
CSV/TSV row with more or fewer fields than the header (an unquoted comma in a text would
otherwise shift it into the label), undecodable bytes, a corrupt archive, invalid JSON. Fields
may be up to :data:`MAX_FIELD_CHARS` characters long (texts are truncated later by the
tokenizer).
"""

from __future__ import annotations

import bz2
import contextlib
import csv
import gzip
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path

__all__ = ["table_format", "read_header", "read_columns", "check_table"]

_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl"}
#: longest CSV/TSV field accepted (the csv module's default limit is 131,072)
MAX_FIELD_CHARS = 2**31 - 1


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
        return io.TextIOWrapper(gzip.open(path), encoding="utf-8-sig", newline="")
    if path.suffix == ".bz2":
        return io.TextIOWrapper(bz2.open(path), encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


@contextlib.contextmanager
def _reading(path: Path, where: list[int]) -> Iterator[None]:
    """Turn decoding / archive / csv errors into ValueErrors naming the file and the line."""
    old = csv.field_size_limit(MAX_FIELD_CHARS)
    try:
        yield
    except UnicodeDecodeError as err:
        raise ValueError(
            f"data file {str(path)!r}: not UTF-8 text (byte {err.object[err.start]:#04x} near "
            f"line {where[0] + 1}); save it as UTF-8"
        ) from err
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise ValueError(
            f"data file {str(path)!r}: cannot read it as a {path.suffix or 'text'} file "
            f"({type(err).__name__}: {err})"
        ) from err
    except csv.Error as err:
        raise ValueError(f"data file {str(path)!r} line {where[0]}: {err}") from err
    finally:
        csv.field_size_limit(old)


def _existing(path: str | os.PathLike) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        raise ValueError(f"data file {str(path)!r} is a directory; expected a file")
    if not p.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    return p


def _json_record(p: Path, lineno: int, line: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"data file {str(p)!r} line {lineno}: invalid JSON ({err})") from err
    if not isinstance(record, dict):
        raise ValueError(
            f"data file {str(p)!r} line {lineno}: expected a JSON object, got "
            f"{type(record).__name__} {line.strip()[:60]!r}"
        )
    return record


def read_header(path: str | os.PathLike) -> list[str]:
    """Column names of a table (the CSV/TSV header or the keys of the first JSONL record)."""
    p = _existing(path)
    fmt = table_format(p)
    where = [0]
    with _reading(p, where), _open_text(p) as f:
        if fmt == "jsonl":
            for lineno, line in enumerate(f, 1):
                where[0] = lineno
                if line.strip():
                    return list(_json_record(p, lineno, line))
            return []
        reader = csv.reader(f, delimiter="\t" if fmt == "tsv" else ",")
        return next(reader, [])


def check_table(path: str | os.PathLike, columns: list[str]) -> None:
    """Raise if ``path`` is missing, of an unknown format, or lacks one of ``columns``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: unknown format, unreadable file, or a missing or repeated column (the
            available columns are listed).
    """
    header = read_header(path)
    for col in columns:
        if col not in header:
            raise ValueError(f"data file {str(path)!r} has no column {col!r}; columns: {header}")
        if header.count(col) > 1:
            raise ValueError(f"data file {str(path)!r}: column {col!r} appears twice in the header")


def _csv_rows(p: Path, f: io.TextIOBase, fmt: str, where: list[int]) -> Iterator[dict]:
    reader = csv.reader(f, delimiter="\t" if fmt == "tsv" else ",")
    header = next(reader, [])
    for row in reader:
        where[0] = reader.line_num
        if not row:
            continue  # blank line
        if len(row) != len(header):
            sep = "tab" if fmt == "tsv" else "comma"
            raise ValueError(
                f"data file {str(p)!r} line {reader.line_num}: {len(row)} fields, the header "
                f"has {len(header)} (an unquoted {sep} inside a text? quote the field)"
            )
        yield dict(zip(header, row))


def read_columns(path: str | os.PathLike, columns: list[str]) -> dict[str, list]:
    """Read ``columns`` of every record of a table.

    Returns:
        ``{column: [values...]}`` (strings for CSV/TSV; JSON values for JSONL).

    Raises:
        FileNotFoundError, ValueError: see :func:`check_table`; also a row with the wrong
            number of fields, a JSONL record lacking a column, undecodable bytes (each with
            its line number).
    """
    check_table(path, columns)
    p = _existing(path)
    fmt = table_format(p)
    out: dict[str, list] = {c: [] for c in columns}
    where = [0]
    with _reading(p, where), _open_text(p) as f:
        if fmt == "jsonl":
            for lineno, line in enumerate(f, 1):
                where[0] = lineno
                if not line.strip():
                    continue
                record = _json_record(p, lineno, line)
                for c in columns:
                    if c not in record:
                        raise ValueError(
                            f"data file {str(p)!r} line {lineno}: record has no column {c!r}"
                        )
                    out[c].append(record[c])
        else:
            for row in _csv_rows(p, f, fmt, where):
                for c in columns:
                    out[c].append(row[c])
    return out
