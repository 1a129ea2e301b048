"""Atomic output directories for exports: write into a hidden sibling, then ``os.replace``."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_directory"]


@contextlib.contextmanager
def atomic_directory(out: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``out`` only if the block succeeds.

    A crash or an exception leaves no half-written export behind (the temporary directory is
    removed) and an existing ``out`` untouched.

    Args:
        out: final directory path.
        overwrite: replace an existing non-empty ``out``; otherwise that is an error.

    Raises:
        FileExistsError: ``out`` exists, is not empty and ``overwrite`` is False.
        NotADirectoryError: ``out`` exists and is a file.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"export destination {str(out)!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"export destination {str(out)!r} is not empty; choose another --out or pass "
            "--overwrite"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        yield tmp
        _usual_modes(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old"))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _usual_modes(root: Path) -> None:
    """Give ``root`` and everything in it the modes of a plain ``open``/``mkdir`` (umask applied).

    ``mkdtemp`` creates 0700 directories and some writers (safetensors) 0600 files; an export is
    meant to be shared, so it gets 0644 files and 0755 directories under the usual umask 022.
    """
    umask = os.umask(0)
    os.umask(umask)
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
