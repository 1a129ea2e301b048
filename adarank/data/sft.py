"""Supervised fine-tuning (instruction) data for decoder LLMs.

Batches are dicts ``{"input_ids", "attention_mask", "labels"}`` of shape (B, T), right-padded to
the longest sequence of the batch with the pad id; ``labels`` equal ``input_ids`` on response
tokens (each assistant response and the end-of-turn/eos token that closes it) and are ``-100``
on prompt tokens (system, user, template scaffolding, the generation prompt) and padding, so the
``causal_lm`` task trains on responses only. Packed batches add ``position_ids``.

Rows (:mod:`adarank.data.sft_rows`): ``messages`` lists or prompt/response pairs from local
json/jsonl/csv/tsv/parquet files, a Hugging Face hub dataset, or the built-in ``rotten_tomatoes``
sentiment instructions (:mod:`adarank.data.instructions`). Rendering, masking and the truncation
policy: :mod:`adarank.data.sft_render`. Everything wrong with the data raises ``ValueError`` in
:meth:`SFTDataModule.setup`, before training; what was truncated, dropped or skipped is counted
in :attr:`SFTDataModule.report` and printed as one line.

Packing (``packing=True``) concatenates the tokenised training examples greedily, in order, into
sequences of at most ``max_length`` tokens; each keeps its own labels and ``position_ids``
restart at 0 for every example. Attention still crosses example boundaries within a sequence
(transformers uses ``position_ids`` for positions only when an attention mask is given).
Validation is never packed.
"""

from __future__ import annotations

import sys

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from adarank.data.classification import split_indices
from adarank.data.instructions import INSTRUCTION_DATASETS
from adarank.data.resumable import ResumableDataLoader
from adarank.data.sft_render import (
    IGNORE_INDEX,
    TEMPLATES,
    TRUNCATION_POLICIES,
    Encoded,
    encode,
    fit_length,
    resolve_template,
    stop_token_ids,
    trim_conversations,
)
from adarank.data.sft_rows import (
    DATA_FORMATS,
    load_hub_table,
    load_table,
    to_conversations,
)

__all__ = ["SHORT_REFERENCE_TOKENS", "SFTCollator", "SFTDataModule", "pack_examples"]

SHORT_REFERENCE_TOKENS = 16  # a reference this short (in tokens) counts as a "short" answer


def pack_examples(
    examples: list[tuple[list[int], list[int]]], max_length: int
) -> list[tuple[list[int], list[int], list[int]]]:
    """Greedily concatenate ``(ids, labels)`` examples, in order, into sequences ≤ ``max_length``.

    Returns:
        ``(ids, labels, position_ids)`` per sequence; positions restart at 0 per example.
    """
    out: list[tuple[list[int], list[int], list[int]]] = []
    ids: list[int] = []
    labels: list[int] = []
    pos: list[int] = []
    for ex_ids, ex_labels in examples:
        if ids and len(ids) + len(ex_ids) > max_length:
            out.append((ids, labels, pos))
            ids, labels, pos = [], [], []
        ids, labels = ids + ex_ids, labels + ex_labels
        pos = pos + list(range(len(ex_ids)))
    if ids:
        out.append((ids, labels, pos))
    return out


class _Sequences(Dataset):
    def __init__(self, seqs: list[tuple[list[int], ...]]) -> None:
        self.seqs = [tuple(torch.tensor(x, dtype=torch.long) for x in s) for s in seqs]

    def __len__(self) -> int:
        return len(self.seqs)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        s = self.seqs[i]
        item = {"input_ids": s[0], "labels": s[1]}
        if len(s) > 2:
            item["position_ids"] = s[2]
        return item


class SFTCollator:
    """Right-pad a list of items to the longest one (pad id, mask 0, labels -100, position 0)."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = int(pad_id)

    def __call__(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        length = max(len(it["input_ids"]) for it in items)
        fill = {"input_ids": self.pad_id, "labels": IGNORE_INDEX, "position_ids": 0}
        batch = {
            k: torch.full((len(items), length), v, dtype=torch.long)
            for k, v in fill.items()
            if k in items[0]
        }
        mask = torch.zeros(len(items), length, dtype=torch.long)
        for b, it in enumerate(items):
            n = len(it["input_ids"])
            mask[b, :n] = 1
            for k in batch:
                batch[k][b, :n] = it[k]
        batch["attention_mask"] = mask
        return batch


_CHOICES = {"data_format": DATA_FORMATS, "template": TEMPLATES, "truncation": TRUNCATION_POLICIES}


def _check_options(choices: dict[str, object], counts: dict[str, object]) -> None:
    """Raise ValueError for an unknown choice or a count that is not a positive integer
    (``max_length`` ≥ 2; ``None`` allowed for the optional caps and batch size)."""
    for name, value in choices.items():
        if value not in _CHOICES[name]:
            raise ValueError(f"data.{name}={value!r}: expected one of {list(_CHOICES[name])}")
    for name, value in counts.items():
        minimum = 2 if name == "max_length" else 1
        if value is None and name in ("max_train_examples", "max_val_examples", "eval_batch_size"):
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"data.{name}={value!r}: expected an integer ≥ {minimum}")


class SFTDataModule(L.LightningDataModule):
    """Instruction rows rendered with a chat (or plain) template, loss on responses only.

    Args:
        tokenizer: model name or path whose tokenizer to use (see :func:`build_tokenizer`).
        dataset: built-in instruction data (``"rotten_tomatoes"``) or a Hugging Face hub dataset
            name (needs a network); ignored when ``train_file`` is set.
        train_file: local ``.jsonl``/``.json``/``.csv``/``.tsv``/``.parquet`` of training rows.
        val_file: validation rows; default a seeded split of the training rows.
        data_format: ``"auto"`` (from the columns), ``"messages"`` or ``"pair"``.
        messages_column: column of ``[{"role", "content"}, ...]`` lists.
        prompt_column: column of prompts (pair format).
        response_column: column of responses (pair format).
        system_prompt: system message put first in every conversation that has none.
        template: ``"auto"`` (the tokenizer's chat template if it has one, else plain),
            ``"chat"`` or ``"plain"``.
        chat_template: a Jinja chat template (text or a file path) replacing the tokenizer's.
        max_length: tokens per example (and per packed sequence).
        truncation: over-long examples: ``"truncate"`` (cut the response tail), ``"drop"``
            or ``"error"``.
        min_response_tokens: ``truncate`` drops an example keeping fewer response tokens.
        packing: concatenate training examples into sequences of ``max_length``.
        val_size: validation rows for the split, a count (int) or a fraction (float).
        max_train_examples: keep the first N training rows after the split (None = all).
        max_val_examples: keep the first N validation rows (None = all).
        batch_size: training batch size.
        eval_batch_size: validation batch size (default ``batch_size``).
        num_workers: DataLoader workers.
        seed: seed of the split and the training order.
        cache_dir: ``datasets`` cache directory (default the Hugging Face cache).
        dataset_config: configuration name of a hub dataset.
        train_split: split of a hub dataset to train on.
        val_split: split of a hub dataset to validate on (None: a seeded split of train).
        tokenizer_options: keyword arguments of :func:`build_tokenizer` (e.g. ``gguf_file``,
            ``revision``) so that the tokenizer matches a model loaded with them.
    """

    task_type = "causal_lm"

    def __init__(
        self,
        tokenizer: str,
        dataset: str | None = "rotten_tomatoes",
        train_file: str | None = None,
        val_file: str | None = None,
        data_format: str = "auto",
        messages_column: str = "messages",
        prompt_column: str = "prompt",
        response_column: str = "response",
        system_prompt: str | None = None,
        template: str = "auto",
        chat_template: str | None = None,
        max_length: int = 256,
        truncation: str = "truncate",
        min_response_tokens: int = 1,
        packing: bool = False,
        val_size: int | float = 200,
        max_train_examples: int | None = None,
        max_val_examples: int | None = None,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        cache_dir: str | None = None,
        dataset_config: str | None = None,
        train_split: str = "train",
        val_split: str | None = None,
        tokenizer_options: dict | None = None,
    ) -> None:
        super().__init__()
        if train_file is None and not dataset:
            raise ValueError(
                "data: set data.train_file or data.dataset (e.g. 'rotten_tomatoes' or a hub name)"
            )
        _check_options(
            {"data_format": data_format, "template": template, "truncation": truncation},
            {
                "max_length": max_length,
                "min_response_tokens": min_response_tokens,
                "batch_size": batch_size,
                "max_train_examples": max_train_examples,
                "max_val_examples": max_val_examples,
                "eval_batch_size": eval_batch_size,
            },
        )
        self.tokenizer_name, self.tokenizer_options = tokenizer, dict(tokenizer_options or {})
        self.dataset = None if train_file is not None else dataset
        self.train_file, self.val_file = train_file, val_file
        self.columns = {
            "data_format": data_format,
            "messages_column": messages_column,
            "prompt_column": prompt_column,
            "response_column": response_column,
            "system_prompt": system_prompt,
        }
        self.template, self.chat_template = template, chat_template
        self.max_length, self.truncation = max_length, truncation
        self.min_response_tokens, self.packing = min_response_tokens, bool(packing)
        self.val_size, self.seed = val_size, seed
        self.max_train_examples, self.max_val_examples = max_train_examples, max_val_examples
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers, self.cache_dir = num_workers, cache_dir
        self.dataset_config = dataset_config
        self.train_split, self.val_split = train_split, val_split
        self.tokenizer = None
        self.template_used: str | None = None
        self.stop_token_ids: list[int] = []
        self.report: dict[str, int | float] = {}
        self.train_set: _Sequences | None = None
        self.val_set: _Sequences | None = None
        self._val_examples: list[Encoded] = []

    # ----------------------------------------------------------------------------- reading rows
    def _table(self, which: str) -> tuple[dict[str, list], str] | None:
        """``(table, source)`` of the training or validation rows (None: split from train)."""
        path = self.train_file if which == "train" else self.val_file
        if path is not None:
            return load_table(path, self.cache_dir), f"data.{which}_file={path!r}"
        builtin = self.dataset is None or self.dataset in INSTRUCTION_DATASETS
        if which == "val" and (builtin or self.val_split is None):
            return None
        if self.dataset in INSTRUCTION_DATASETS:
            rows = INSTRUCTION_DATASETS[self.dataset]()
            return {k: [r[k] for r in rows] for k in rows[0]}, self.dataset
        split = self.train_split if which == "train" else self.val_split
        table = load_hub_table(self.dataset, self.dataset_config, split, self.cache_dir)
        return table, f"data.dataset={self.dataset!r} split {split!r}"

    def _rows(self) -> dict[str, tuple[list[list[dict]], list[str]]]:
        """``{"train"|"val": (conversations, how errors name each row)}`` (checked, split)."""
        out = {}
        for which in ("train", "val"):
            got = self._table(which)
            if got is None:
                continue
            table, source = got
            convs = to_conversations(table, source, **self.columns)
            out[which] = (convs, [f"{source} row {i + 1}" for i in range(len(convs))])
        if "val" not in out:
            convs, wheres = out["train"]
            if len(convs) < 2:
                raise ValueError(
                    f"{wheres[0].rsplit(' row', 1)[0]}: need at least 2 rows to "
                    "split off validation (or set data.val_file)"
                )
            tr, va = split_indices(len(convs), self.val_size, self.seed)
            out["train"] = ([convs[i] for i in tr], [wheres[i] for i in tr])
            out["val"] = ([convs[i] for i in va], [wheres[i] for i in va])
        for which, cap in (("train", self.max_train_examples), ("val", self.max_val_examples)):
            if cap is not None:
                convs, wheres = out[which]
                out[which] = (convs[:cap], wheres[:cap])
        return out

    # ------------------------------------------------------------------------------- encoding
    def _encode_split(self, which: str, convs, wheres) -> list[Encoded]:
        kept, idx = trim_conversations(convs)
        wheres = [wheres[i] for i in idx]
        examples = encode(self.tokenizer, kept, self.template_used, wheres, self.stop_token_ids)
        keep, counts = fit_length(
            examples, wheres, self.max_length, self.truncation, self.min_response_tokens
        )
        examples = [examples[i] for i in keep]
        r = self.report
        r[f"{which}/rows"] = len(convs)
        r[f"{which}/examples"] = len(examples)
        r.update({f"{which}/{k}": v for k, v in counts.items()})
        r[f"{which}/skipped_empty_response"] = len(convs) - len(kept)
        r[f"{which}/tokens"] = sum(len(e.input_ids) for e in examples)
        r[f"{which}/response_tokens"] = sum(
            sum(t != IGNORE_INDEX for t in e.labels) for e in examples
        )
        if not examples:
            raise ValueError(
                f"no {which} examples left: {self._describe(which)} (check data.max_length, "
                "data.truncation and the response columns)"
            )
        return examples

    def _describe(self, which: str) -> str:
        r = self.report
        return (
            f"{which} {r[f'{which}/rows']:,} rows -> {r[f'{which}/examples']:,} examples "
            f"({r[f'{which}/truncated']:,} truncated, "
            f"{r[f'{which}/dropped_too_long']:,} dropped as too long, "
            f"{r[f'{which}/dropped_no_room']:,} dropped: prompt leaves no room, "
            f"{r[f'{which}/skipped_empty_response']:,} skipped: empty response), "
            f"{r[f'{which}/response_tokens']:,} response tokens"
        )

    def setup(self, stage: str | None = None) -> None:
        """Read, check, split, render and tokenise (idempotent; raises ValueError on bad data)."""
        if self.train_set is not None:
            return
        from adarank.models.hf import build_tokenizer

        tokenizer = build_tokenizer(self.tokenizer_name, **self.tokenizer_options)
        self.template_used = resolve_template(tokenizer, self.template, self.chat_template)
        self.tokenizer = tokenizer
        self.stop_token_ids = stop_token_ids(tokenizer, self.template_used)
        rows = self._rows()
        self.report = {}
        train = self._encode_split("train", *rows["train"])
        val = self._encode_split("val", *rows["val"])
        seqs = [(e.input_ids, e.labels) for e in train]
        if self.packing:
            seqs = pack_examples(seqs, self.max_length)
        self.report["train/packed_sequences"] = len(seqs) if self.packing else 0
        self._val_examples = val
        self.val_set = _Sequences([(e.input_ids, e.labels) for e in val])
        self.train_set = _Sequences(seqs)
        packed = f", packed into {len(seqs):,} sequences" if self.packing else ""
        print(
            f"sft data ({self.train_file or self.dataset}, {self.template_used} template, "
            f"max_length {self.max_length}): {self._describe('train')}{packed}; "
            f"{self._describe('val')}",
            file=sys.stderr,
        )

    # ----------------------------------------------------------------------------- loaders
    def _pad_id(self) -> int:
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return int(pad if pad is not None else 0)

    def train_dataloader(self) -> ResumableDataLoader:
        """Seeded per-epoch shuffle (``seed + epoch``), resumable mid-epoch from a checkpoint."""
        return ResumableDataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=True,
            seed=self.seed,
            collate_fn=SFTCollator(self._pad_id()),
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.val_set,
            batch_size=self.eval_batch_size,
            collate_fn=SFTCollator(self._pad_id()),
            num_workers=self.num_workers,
        )

    def generation_examples(self, n: int | None = None) -> list[dict]:
        """Prompts and references of the first ``n`` validation examples (all when None).

        Returns:
            ``[{"prompt": str, "prompt_ids": list[int], "reference": str, "short": bool}]``:
            the rendered prompt up to the last response (generation prompt included, never
            truncated), its token ids exactly as in training, the reference response stripped,
            and whether it has at most :data:`SHORT_REFERENCE_TOKENS` tokens.
        """
        if self.val_set is None:
            raise RuntimeError("call setup() before generation_examples()")
        examples = self._val_examples if n is None else self._val_examples[:n]
        if not examples:
            return []
        refs = [e.reference for e in examples]
        lengths = [len(x) for x in self.tokenizer(refs, add_special_tokens=False)["input_ids"]]
        return [
            {
                "prompt": e.prompt_text,
                "prompt_ids": e.prompt_ids(),
                "reference": e.reference,
                "short": k <= SHORT_REFERENCE_TOKENS,
            }
            for e, k in zip(examples, lengths)
        ]
