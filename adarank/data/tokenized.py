"""Tokenisation with an on-disk cache of the resulting tensors.

The cache key hashes the tokenizer identity (class, name, vocabulary size), the max length and
every text, so any change re-tokenises. Entries are ``torch.save`` dicts of int tensors under
``$ADARANK_CACHE_DIR/tokenized/<sha>.pt`` (default ``.cache/tokenized``), written to a temporary
file then ``os.replace``-d, and read back with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch

__all__ = ["cache_dir", "tokenize_texts", "tokenizer_id"]


def cache_dir() -> Path:
    """``$ADARANK_CACHE_DIR/tokenized`` (default ``.cache/tokenized``)."""
    return Path(os.environ.get("ADARANK_CACHE_DIR", ".cache")).expanduser() / "tokenized"


def tokenizer_id(tokenizer) -> str:
    """A string identifying a tokenizer for cache keys."""
    name = getattr(tokenizer, "name_or_path", "") or ""
    return f"{type(tokenizer).__name__}|{name}|{len(tokenizer)}|{tokenizer.padding_side}"


def _key(tokenizer, texts: list[str], max_length: int | None, kind: str) -> str:
    h = hashlib.sha256(f"{kind}|{tokenizer_id(tokenizer)}|{max_length}".encode())
    for t in texts:
        h.update(t.encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
    return h.hexdigest()[:24]


def _atomic_save(obj: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def tokenize_texts(
    tokenizer,
    texts: list[str],
    max_length: int | None,
    *,
    kind: str = "pad",
    use_cache: bool = True,
) -> dict[str, torch.Tensor]:
    """Tokenise ``texts`` (cached).

    Args:
        tokenizer: a transformers tokenizer.
        texts: the strings.
        max_length: truncation length (``kind="pad"``); ignored for ``kind="flat"``.
        kind: ``"pad"`` → ``input_ids``/``attention_mask`` of shape (N, max_length) padded on the
            right; ``"flat"`` → one ``input_ids`` of shape (total tokens,) with the tokenizer's
            eos token between texts (for causal-LM chunking).
        use_cache: read/write the on-disk cache.

    Returns:
        a dict of int64 tensors.
    """
    path = cache_dir() / f"{_key(tokenizer, texts, max_length, kind)}.pt"
    if use_cache and path.is_file():
        try:
            return torch.load(path, weights_only=True)
        except Exception:  # a corrupt cache entry is re-created below
            path.unlink(missing_ok=True)
    if kind == "pad":
        enc = tokenizer(
            texts,
            max_length=max_length,
            truncation=True,
            padding="max_length",
            return_tensors="pt",
        )
        out = {"input_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long()}
    elif kind == "flat":
        eos = (
            tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        )
        ids: list[int] = []
        for piece in tokenizer(texts, add_special_tokens=False)["input_ids"]:
            ids.extend(piece)
            if eos is not None:
                ids.append(eos)
        out = {"input_ids": torch.tensor(ids, dtype=torch.long)}
    else:
        raise ValueError(f"kind={kind!r}: expected 'pad' or 'flat'")
    if use_cache:
        _atomic_save(out, path)
    return out
