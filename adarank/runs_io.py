"""Files of a run directory: strict JSON and atomic writes.

Every JSON file adarank writes is strict JSON (RFC 8259): NaN and ±inf, which ``json.dump``
would write as bare ``NaN`` / ``Infinity`` tokens that other parsers reject, are written as
``null`` and listed under the key ``"nonfinite_values"`` (``{"metrics.val/loss": "nan"}``).
Files are written to a temporary file in the same directory, then renamed over the target, so a
reader never sees half a file.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["NONFINITE_KEY", "dumps_strict", "to_strict", "write_json", "write_text"]

#: key under which :func:`write_json` lists the non-finite numbers it replaced by null
NONFINITE_KEY = "nonfinite_values"


def to_strict(obj: Any, path: str = "") -> tuple[Any, dict[str, str]]:
    """A JSON-safe copy of ``obj`` and the non-finite numbers replaced by None.

    Mappings keep their (string) keys, tuples become lists, numpy / torch scalars become Python
    numbers, anything else that JSON cannot hold becomes its ``str``.

    Returns:
        ``(copy, {dotted.path: "nan" | "inf" | "-inf"})``.
    """
    notes: dict[str, str] = {}

    def walk(value: Any, where: str) -> Any:
        if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
            value = value.item()  # numpy / torch scalar
        if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
            return value
        if isinstance(value, float):
            if math.isfinite(value):
                return value
            notes[where or "."] = str(value)
            return None
        if isinstance(value, Mapping):
            return {str(k): walk(v, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [walk(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return str(value)

    return walk(obj, path), notes


def dumps_strict(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` of :func:`to_strict` (``obj``), with the notes under :data:`NONFINITE_KEY`.

    Notes are added only when ``obj`` is a mapping; otherwise non-finite numbers just become
    null.
    """
    clean, notes = to_strict(obj)
    if notes and isinstance(clean, dict):
        clean[NONFINITE_KEY] = notes
    return json.dumps(clean, allow_nan=False, **kwargs)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` atomically (temporary file in the same directory, then ``os.replace``)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as strict, indented JSON, atomically (see the module docstring)."""
    write_text(path, dumps_strict(obj, indent=2, sort_keys=True) + "\n")
