"""Causal language modelling on plain text: concatenate, tokenise, cut into fixed blocks.

Batches are dicts ``{"input_ids": (B, T), "attention_mask": (B, T), "labels": (B, T)}`` with
``labels == input_ids`` (the model shifts them). Sources: ``train_file`` / ``val_file`` (UTF-8
text, documents separated by blank lines) or the built-in ``rotten_tomatoes`` snippets.
"""

from __future__ import annotations

import random
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from adarank.data.resumable import ResumableDataLoader
from adarank.data.rotten_tomatoes import load_rotten_tomatoes
from adarank.data.tokenized import tokenize_texts

__all__ = ["CausalLMDataModule", "read_documents"]


def read_documents(path: str) -> list[str]:
    """Documents of a text file (blocks separated by blank lines; empty blocks dropped).

    Raises:
        FileNotFoundError: missing file.  ValueError: the file holds no text.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"text file {path!r} does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"text file {path!r}: not UTF-8 (byte {err.object[err.start]:#04x} at offset "
            f"{err.start}); save it as UTF-8"
        ) from err
    docs = [d.strip() for d in text.split("\n\n")]
    docs = [d for d in docs if d]
    if not docs:
        raise ValueError(f"text file {path!r} is empty")
    return docs


class _Blocks(Dataset):
    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks  # (N, T)

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.blocks[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def _chunk(ids: torch.Tensor, block_size: int) -> torch.Tensor:
    n = ids.numel() // block_size
    return ids[: n * block_size].view(n, block_size)


class CausalLMDataModule(L.LightningDataModule):
    """Fixed-length token blocks for next-token prediction.

    Args:
        tokenizer: model name or path whose tokenizer to use.
        dataset: built-in corpus (``"rotten_tomatoes"``); ignored when ``train_file`` is set.
        train_file: plain text file.
        val_file: plain text file; default a seeded split of the training blocks.
        block_size: tokens per block.
        val_size: validation blocks for the split, a count (int) or a fraction (float).
        max_train_blocks: keep at most this many training blocks (None = all).
        batch_size: training batch size.
        eval_batch_size: validation batch size (default ``batch_size``).
        num_workers: DataLoader workers.
        seed: split and shuffle seed.
        cache: cache tokenised tensors on disk.
    """

    task_type = "causal_lm"

    def __init__(
        self,
        tokenizer: str,
        dataset: str | None = None,
        train_file: str | None = None,
        val_file: str | None = None,
        block_size: int = 64,
        val_size: int | float = 0.1,
        max_train_blocks: int | None = None,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        cache: bool = True,
    ) -> None:
        super().__init__()
        if train_file is None and dataset != "rotten_tomatoes":
            raise ValueError(
                f"data.dataset={dataset!r}: expected 'rotten_tomatoes' or a data.train_file"
            )
        if not isinstance(block_size, int) or block_size < 2:
            raise ValueError(f"data.block_size={block_size!r}: expected an integer ≥ 2")
        self.tokenizer_name, self.dataset = tokenizer, dataset
        self.train_file, self.val_file = train_file, val_file
        self.block_size, self.val_size, self.seed = block_size, val_size, seed
        self.max_train_blocks = max_train_blocks
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers, self.cache = num_workers, cache
        self.tokenizer = None
        self.train_set: _Blocks | None = None
        self.val_set: _Blocks | None = None

    def _blocks(self, docs: list[str]) -> torch.Tensor:
        ids = tokenize_texts(self.tokenizer, docs, None, kind="flat", use_cache=self.cache)
        return _chunk(ids["input_ids"], self.block_size)

    def setup(self, stage: str | None = None) -> None:
        """Read, tokenise and chunk (idempotent; raises on bad data)."""
        if self.train_set is not None:
            return
        from adarank.data.classification import split_indices
        from adarank.models.hf import build_tokenizer

        self.tokenizer = build_tokenizer(self.tokenizer_name)
        if self.train_file is not None:
            docs, source = read_documents(self.train_file), f"data.train_file={self.train_file!r}"
        else:
            docs, source = load_rotten_tomatoes()[0], "rotten_tomatoes"
        train = self._blocks(docs)
        if self.val_file is not None:
            val = self._blocks(read_documents(self.val_file))
        else:
            if train.shape[0] < 2:
                raise ValueError(
                    f"{source} gives {train.shape[0]} block(s) of {self.block_size} tokens; "
                    "need at least 2 to split off validation (more text or smaller block_size)"
                )
            tr, va = split_indices(train.shape[0], self.val_size, self.seed)
            train, val = train[tr], train[va]
        if train.shape[0] == 0 or val.shape[0] == 0:
            raise ValueError(f"{source}: fewer tokens than one block of {self.block_size}")
        if self.max_train_blocks is not None:
            keep = list(range(train.shape[0]))
            random.Random(self.seed).shuffle(keep)
            train = train[sorted(keep[: self.max_train_blocks])]
        self.train_set, self.val_set = _Blocks(train), _Blocks(val)

    def train_dataloader(self) -> ResumableDataLoader:
        """Seeded per-epoch shuffle (``seed + epoch``), resumable mid-epoch from a checkpoint."""
        return ResumableDataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=True,
            seed=self.seed,
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.val_set, batch_size=self.eval_batch_size, num_workers=self.num_workers
        )
