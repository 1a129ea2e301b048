"""Instruction rows for supervised fine-tuning: reading sources and checking row formats.

Sources are local files read with ``datasets.load_dataset`` (format from the suffix: ``.jsonl``
/ ``.json`` → json, ``.csv`` / ``.tsv`` → csv with every column read as a string, ``.parquet``;
json and csv optionally compressed as ``.gz`` / ``.bz2``) or a dataset on the
Hugging Face hub. Every row becomes a *conversation*: a list of ``{"role", "content"}`` dicts
with roles ``system`` / ``user`` / ``assistant``. A prompt/response pair becomes
``[system?, user: prompt, assistant: response]``.

Errors name the source, the row (counted from 1) and the columns found. A value that is absent
(a missing JSON key or ``null``) is an error; an empty response string is not (the datamodule
skips such rows and counts them).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

__all__ = [
    "DATA_FORMATS",
    "FILE_BUILDERS",
    "ROLES",
    "file_builder",
    "load_hub_table",
    "load_table",
    "to_conversations",
]

DATA_FORMATS = ("auto", "messages", "pair")
ROLES = ("system", "user", "assistant")
FILE_BUILDERS = {
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
}
_COMPRESSION = (".gz", ".bz2")

Table = dict[str, list]
Conversation = list[dict[str, str]]


def file_builder(path: str | Path) -> str:
    """The ``datasets`` builder for a file name: ``"json"``, ``"csv"`` or ``"parquet"``.

    Raises:
        ValueError: an unsupported suffix.
    """
    suffixes = [s.lower() for s in Path(path).suffixes]
    if suffixes and suffixes[-1] in _COMPRESSION:
        suffixes = suffixes[:-1]
    builder = FILE_BUILDERS.get(suffixes[-1]) if suffixes else None
    if builder is None:
        raise ValueError(
            f"data file {str(path)!r}: unsupported format; expected a name ending in "
            f"{', '.join(FILE_BUILDERS)} (json/csv optionally compressed: {', '.join(_COMPRESSION)})"
        )
    return builder


def _csv_kwargs(path: Path) -> dict:
    """Read every CSV/TSV column as a string (no number inference, empty cells stay ``""``)."""
    from datasets import Features, Value

    from adarank.data.files import read_header

    header = read_header(path)
    if not header:
        raise ValueError(f"data file {str(path)!r} is empty (no header line)")
    sep = "\t" if ".tsv" in [s.lower() for s in path.suffixes] else ","
    return {
        "sep": sep,
        "features": Features({c: Value("string") for c in header}),
        "keep_default_na": False,
        "encoding": "utf-8-sig",  # a leading byte-order mark is not part of the first name
    }


def load_table(path: str | Path, cache_dir: str | None = None) -> Table:
    """Every column of a local json/jsonl/csv/tsv/parquet file as ``{column: [values]}``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: unsupported format, or a file ``datasets`` cannot parse.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    builder = file_builder(p)
    kwargs = _csv_kwargs(p) if builder == "csv" else {}
    import datasets

    try:
        ds = datasets.load_dataset(
            builder, data_files=str(p), split="train", cache_dir=cache_dir, **kwargs
        )
    except Exception as err:  # datasets raises many types for unparsable files
        raise ValueError(f"data file {str(path)!r} could not be read as {builder}: {err}") from err
    return ds.to_dict()


def load_hub_table(
    name: str, config: str | None, split: str, cache_dir: str | None = None
) -> Table:
    """One split of a Hugging Face hub dataset as ``{column: [values]}`` (needs a network).

    Raises:
        ValueError: the dataset cannot be loaded (offline, unknown name or split).
    """
    import datasets

    try:
        ds = datasets.load_dataset(name, config, split=split, cache_dir=cache_dir)
    except Exception as err:
        raise ValueError(
            f"data.dataset={name!r} (config {config!r}, split {split!r}) is not a built-in "
            f"instruction dataset and loading it from the Hugging Face hub failed: {err}. "
            "Loading hub datasets needs a network (HF_DATASETS_OFFLINE must be unset) or a "
            "filled data.cache_dir; offline, point data.train_file at a local .jsonl/.csv/.parquet"
        ) from err
    return ds.to_dict()


def _n_rows(table: Table) -> int:
    return len(next(iter(table.values()))) if table else 0


def _detect(table: Table, source: str, messages: str, prompt: str, response: str) -> str:
    """``"messages"`` or ``"pair"`` from the columns (and, when both exist, from every row)."""
    cols = list(table)
    has_m, has_p = messages in table, prompt in table and response in table
    if not has_m and not has_p:
        raise ValueError(
            f"{source} row 1: no {messages!r} column and no {prompt!r}/{response!r} columns "
            f"(columns found: {cols}); set data.messages_column or data.prompt_column/"
            "data.response_column"
        )
    if not (has_m and has_p):
        return "messages" if has_m else "pair"
    first: dict[str, int] = {}
    for i in range(_n_rows(table)):
        if table[messages][i] is not None:
            first.setdefault("messages", i)
        elif table[prompt][i] is not None or table[response][i] is not None:
            first.setdefault("pair", i)
        else:
            raise ValueError(
                f"{source} row {i + 1}: neither {messages!r} nor {prompt!r}/{response!r} is "
                f"set (columns found: {cols})"
            )
    if len(first) > 1:
        raise ValueError(
            f"{source}: mixed row formats: row {first['messages'] + 1} has {messages!r}, row "
            f"{first['pair'] + 1} has {prompt!r}/{response!r} (columns found: {cols}); use one "
            "format per file"
        )
    return next(iter(first), "pair")


def _require(table: Table, columns: list[str], source: str) -> None:
    for c in columns:
        if c not in table:
            raise ValueError(f"{source} row 1: no column {c!r} (columns found: {list(table)})")


def _text(value: object, source: str, row: int, what: str, cols: list[str]) -> str:
    if value is None:
        raise ValueError(f"{source} row {row}: {what} is missing (columns found: {cols})")
    if not isinstance(value, str):
        raise ValueError(
            f"{source} row {row}: {what} is {type(value).__name__} {value!r}; expected a string"
        )
    return value


def _messages(value: object, source: str, row: int, column: str, cols: list[str]) -> Conversation:
    if isinstance(value, str):  # CSV cells hold the list as JSON text
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise ValueError(f"{source} row {row}: {column!r} is not valid JSON ({err})") from err
    if value is None:
        raise ValueError(f"{source} row {row}: {column!r} is missing (columns found: {cols})")
    if not isinstance(value, list) or not value:
        raise ValueError(
            f"{source} row {row}: {column!r} must be a non-empty list of "
            f"{{'role', 'content'}} objects, got {str(value)[:80]!r}"
        )
    out = []
    for j, m in enumerate(value):
        where = f"{column}[{j}]"
        if not isinstance(m, Mapping) or m.get("role") not in ROLES:
            role = m.get("role") if isinstance(m, Mapping) else m
            raise ValueError(
                f"{source} row {row}: {where} has role {role!r}; expected one of {list(ROLES)}"
            )
        content = _text(m.get("content"), source, row, f"{where}.content", cols)
        out.append({"role": m["role"], "content": content})
    return out


def to_conversations(
    table: Table,
    source: str,
    *,
    data_format: str = "auto",
    messages_column: str = "messages",
    prompt_column: str = "prompt",
    response_column: str = "response",
    system_prompt: str | None = None,
) -> list[Conversation]:
    """Check every row of ``table`` and turn it into a conversation.

    Args:
        table: ``{column: [values]}`` from :func:`load_table` or a built-in dataset.
        source: how errors name the table (e.g. ``"data.train_file='a.jsonl'"``).
        data_format: ``"auto"`` (from the columns), ``"messages"`` or ``"pair"``.
        messages_column, prompt_column, response_column: column names.
        system_prompt: a system message put first in every conversation that has none.

    Raises:
        ValueError: unknown format, missing columns or values, mixed formats, bad messages.
    """
    if data_format not in DATA_FORMATS:
        raise ValueError(f"data.data_format={data_format!r}: expected one of {list(DATA_FORMATS)}")
    if not table or _n_rows(table) == 0:
        raise ValueError(f"{source}: no rows")
    fmt = data_format
    if fmt == "auto":
        fmt = _detect(table, source, messages_column, prompt_column, response_column)
    cols = list(table)
    convs: list[Conversation] = []
    if fmt == "messages":
        _require(table, [messages_column], source)
        for i, value in enumerate(table[messages_column]):
            convs.append(_messages(value, source, i + 1, messages_column, cols))
    else:
        _require(table, [prompt_column, response_column], source)
        for i, (p, r) in enumerate(zip(table[prompt_column], table[response_column])):
            convs.append(
                [
                    {"role": "user", "content": _text(p, source, i + 1, repr(prompt_column), cols)},
                    {
                        "role": "assistant",
                        "content": _text(r, source, i + 1, repr(response_column), cols),
                    },
                ]
            )
    if system_prompt is not None:
        system = {"role": "system", "content": system_prompt}
        convs = [c if c[0]["role"] == "system" else [system, *c] for c in convs]
    return convs
