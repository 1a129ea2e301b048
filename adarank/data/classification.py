"""Text classification data: CSV/TSV/JSONL files or the built-in ``rotten_tomatoes`` corpus.

Batches are dicts ``{"input_ids": (B, T), "attention_mask": (B, T), "labels": (B,)}`` where T is
the longest sequence in the batch (padding beyond it is trimmed). Everything that can be wrong
with the data (missing file or column, an empty text, a single class, a validation label unseen
in training) raises in :meth:`TextClassificationDataModule.setup`, before training starts.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from adarank.data.files import read_columns
from adarank.data.resumable import ResumableDataLoader
from adarank.data.rotten_tomatoes import LABELS as RT_LABELS
from adarank.data.rotten_tomatoes import load_rotten_tomatoes
from adarank.data.tokenized import tokenize_texts

__all__ = ["DATASETS", "TextClassificationDataModule", "label_mapping", "split_indices"]

DATASETS = ("rotten_tomatoes",)


def label_mapping(labels: list) -> list[str]:
    """Sorted distinct labels as strings (numerically if every label is an integer)."""
    names = {str(v) for v in labels}
    try:
        return sorted(names, key=int)
    except ValueError:
        return sorted(names)


def split_indices(n: int, val_size: int | float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded shuffle of ``range(n)`` into (train, val); ``val_size`` is a count or a fraction.

    Raises:
        ValueError: the split would leave either side empty.
    """
    if isinstance(val_size, bool) or not isinstance(val_size, (int, float)):
        raise TypeError(f"data.val_size={val_size!r}: expected an int count or a float fraction")
    n_val = int(round(val_size * n)) if isinstance(val_size, float) else int(val_size)
    if not 0 < n_val < n:
        raise ValueError(
            f"data.val_size={val_size!r} gives {n_val} validation examples out of {n}; "
            f"expected between 1 and {n - 1} (a count) or a fraction in (0, 1)"
        )
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order[n_val:], order[:n_val]


class _Encoded(Dataset):
    def __init__(self, enc: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
        self.enc, self.labels = enc, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.enc["input_ids"][i],
            "attention_mask": self.enc["attention_mask"][i],
            "labels": self.labels[i],
        }


def collate_trim(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack a batch and trim padding columns beyond its longest sequence."""
    batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}
    length = int(batch["attention_mask"].sum(dim=1).max())
    for k in ("input_ids", "attention_mask"):
        batch[k] = batch[k][:, : max(length, 1)]
    return batch


class TextClassificationDataModule(L.LightningDataModule):
    """Labelled texts tokenised with the model's tokenizer.

    Args:
        tokenizer: model name or path whose tokenizer to use (see :func:`build_tokenizer`).
        dataset: built-in corpus (``"rotten_tomatoes"``); ignored when ``train_file`` is set.
        train_file: CSV/TSV/JSONL of training examples; setting it switches any recipe to it.
        val_file: validation examples; default a seeded split of the training data.
        text_column: column holding the text.
        label_column: column holding the label (strings or ints; mapped to ids in sorted order).
        val_size: validation count (int) or fraction (float) for the seeded split.
        max_train_samples: keep the first N training examples after the split (None = all).
        max_val_samples: keep the first N validation examples (None = all).
        max_length: tokens per text (longer texts are truncated).
        batch_size: training batch size.
        eval_batch_size: validation batch size (default ``2 * batch_size``).
        num_workers: DataLoader workers.
        seed: seed of the split and the training shuffle.
        cache: cache tokenised tensors on disk (``.cache/tokenized``).
    """

    task_type = "classification"

    def __init__(
        self,
        tokenizer: str,
        dataset: str | None = None,
        train_file: str | None = None,
        val_file: str | None = None,
        text_column: str = "text",
        label_column: str = "label",
        val_size: int | float = 0.1,
        max_train_samples: int | None = None,
        max_val_samples: int | None = None,
        max_length: int = 128,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        cache: bool = True,
    ) -> None:
        super().__init__()
        if train_file is None and dataset is None:
            raise ValueError("data: set data.train_file or data.dataset (e.g. 'rotten_tomatoes')")
        if train_file is None and dataset not in DATASETS:
            raise ValueError(f"data.dataset={dataset!r}: expected one of {list(DATASETS)}")
        for name, value in (("max_length", max_length), ("batch_size", batch_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"data.{name}={value!r}: expected a positive integer")
        self.tokenizer_name = tokenizer
        self.dataset = None if train_file is not None else dataset
        self.train_file, self.val_file = train_file, val_file
        self.text_column, self.label_column = text_column, label_column
        self.val_size, self.seed = val_size, seed
        self.max_train_samples, self.max_val_samples = max_train_samples, max_val_samples
        self.max_length, self.batch_size = max_length, batch_size
        self.eval_batch_size = eval_batch_size or 2 * batch_size
        self.num_workers, self.cache = num_workers, cache
        self.label_names: list[str] = []
        self.tokenizer = None
        self.train_set: _Encoded | None = None
        self.val_set: _Encoded | None = None

    @property
    def num_labels(self) -> int:
        """Number of classes (after :meth:`setup`)."""
        if not self.label_names:
            raise RuntimeError("call setup() before reading num_labels")
        return len(self.label_names)

    def _read(self, path: str) -> tuple[list[str], list]:
        cols = read_columns(path, [self.text_column, self.label_column])
        return cols[self.text_column], cols[self.label_column]

    @staticmethod
    def _check(texts: list, labels: list, source: str) -> list[str]:
        """Check every example; returns the labels as strings (surrounding spaces removed).

        Labels must be strings or integers: ``1`` and ``1.0`` (or ``True``) would otherwise
        become different classes.
        """
        if not texts:
            raise ValueError(f"{source}: no examples")
        out = []
        for i, (t, y) in enumerate(zip(texts, labels)):
            if not isinstance(t, str):
                raise ValueError(
                    f"{source}: example {i} has a {type(t).__name__} text ({t!r}); expected a string"
                )
            if not t.strip():
                raise ValueError(f"{source}: example {i} has an empty text ({t!r})")
            if isinstance(y, bool) or not isinstance(y, (str, int)):
                raise ValueError(
                    f"{source}: example {i} has the label {y!r} ({type(y).__name__}); "
                    "expected a string or an integer"
                )
            if isinstance(y, str) and not y.strip():
                raise ValueError(f"{source}: example {i} has an empty label ({y!r})")
            out.append(str(y).strip())
        return out

    def _load(self) -> tuple[list[str], list[str], list[str], list[str], list[str]]:
        if self.train_file is not None:
            texts, labels = self._read(self.train_file)
            source = f"data.train_file={self.train_file!r}"
            names = None
        else:
            texts, labels = load_rotten_tomatoes()
            source, names = "rotten_tomatoes", list(RT_LABELS)
        labels = self._check(texts, labels, source)
        names = names or label_mapping(labels)
        if len(set(labels)) < 2:
            raise ValueError(
                f"{source}: only one class ({labels[0]!r}) in column {self.label_column!r}; "
                "classification needs at least two"
            )
        if self.val_file is not None:
            vt, vl = self._read(self.val_file)
            vl = self._check(vt, vl, f"data.val_file={self.val_file!r}")
            unseen = sorted(set(vl) - set(names))
            if unseen:
                raise ValueError(
                    f"data.val_file={self.val_file!r} has labels {unseen[:5]} not in the "
                    f"training labels {names[:10]}"
                )
            return texts, labels, vt, vl, names
        tr, va = split_indices(len(texts), self.val_size, self.seed)
        return (
            [texts[i] for i in tr],
            [labels[i] for i in tr],
            [texts[i] for i in va],
            [labels[i] for i in va],
            names,
        )

    def setup(self, stage: str | None = None) -> None:
        """Read, check, split and tokenise (idempotent; raises on bad data)."""
        if self.train_set is not None:
            return
        from adarank.models.hf import build_tokenizer

        tt, tl, vt, vl, names = self._load()
        if self.max_train_samples is not None:
            tt, tl = tt[: self.max_train_samples], tl[: self.max_train_samples]
        if self.max_val_samples is not None:
            vt, vl = vt[: self.max_val_samples], vl[: self.max_val_samples]
        self.label_names = names
        ids = {n: i for i, n in enumerate(names)}
        self.tokenizer = build_tokenizer(self.tokenizer_name)
        self.train_set = _Encoded(
            tokenize_texts(self.tokenizer, tt, self.max_length, use_cache=self.cache),
            torch.tensor([ids[y] for y in tl], dtype=torch.long),
        )
        self.val_set = _Encoded(
            tokenize_texts(self.tokenizer, vt, self.max_length, use_cache=self.cache),
            torch.tensor([ids[y] for y in vl], dtype=torch.long),
        )

    def train_dataloader(self) -> ResumableDataLoader:
        """Seeded per-epoch shuffle (``seed + epoch``), resumable mid-epoch from a checkpoint."""
        return ResumableDataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=True,
            seed=self.seed,
            collate_fn=collate_trim,
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.val_set,
            batch_size=self.eval_batch_size,
            collate_fn=collate_trim,
            num_workers=self.num_workers,
        )

    def save_labels(self, path: str | os.PathLike) -> None:
        """Write ``{"labels": [...], "label2id": {...}}`` to ``path`` atomically."""
        p = Path(path)
        tmp = p.with_name(f".{p.name}.tmp")
        mapping = {
            "labels": self.label_names,
            "label2id": {n: i for i, n in enumerate(self.label_names)},
        }
        tmp.write_text(json.dumps(mapping, indent=2, allow_nan=False))
        os.replace(tmp, p)
