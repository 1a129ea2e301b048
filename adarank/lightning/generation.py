"""Greedy-decoded evaluation of instruction-tuned causal LMs: answer accuracy and samples.

A datamodule that can be evaluated this way (``adarank.data.SFTDataModule``) offers
``generation_examples(n) -> [{"prompt", "prompt_ids", "reference", "short"}, ...]`` (validation
rows, deterministic order) and ``stop_token_ids``. :class:`GenerationEvaluator` then reports:

* ``val/answer_acc`` — at every validation: the fraction of the examples with a *short* reference
  (≤ 16 tokens, e.g. "positive") whose greedy continuation equals the reference after
  :func:`normalize_answer` (lower case, surrounding punctuation and white space removed);
* ``base/val/answer_acc``, ``base/val/loss``, ``base/val/ppl`` — once, before the first optimizer
  step of a fresh run. Adapters start function-preserving (λ = 0 or P = 0), so this is the
  frozen base model; the values are kept in the callback's state and survive a resume;
* ``samples.jsonl`` in the run directory — the prompts, references and generations of the base
  model (``"stage": "base"``) and of the latest validation (``"stage": "tuned"``), rewritten
  atomically after each validation; with a ``WandbLogger`` the same rows as a ``wandb.Table``
  under ``samples``.

Decoding is greedy (``do_sample=False``) with left-padded batches through the model's
``generate`` when it has one (transformers models), else a plain greedy loop without a cache.
"""

from __future__ import annotations

import json
import math
import os
import re
import string
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from typing_extensions import override

from adarank.lightning.tasks import run_task

__all__ = [
    "GenerationEvaluator",
    "SAMPLES_JSONL",
    "answer_accuracy",
    "greedy_generate",
    "normalize_answer",
]

SAMPLES_JSONL = "samples.jsonl"
_PUNCT = string.punctuation + "“”‘’«»…"


def normalize_answer(text: str) -> str:
    """Lower case, collapse white space, strip surrounding punctuation and white space."""
    text = re.sub(r"\s+", " ", text.lower()).strip()
    return text.strip(_PUNCT + " ")


def answer_accuracy(generated: Sequence[str], references: Sequence[str]) -> float:
    """Exact match after :func:`normalize_answer`, as a fraction (nan when empty)."""
    if len(generated) != len(references):
        raise ValueError(f"{len(generated)} generations for {len(references)} references")
    if not references:
        return math.nan
    hits = sum(normalize_answer(g) == normalize_answer(r) for g, r in zip(generated, references))
    return hits / len(references)


def _left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, ...]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


def _greedy_loop(model: nn.Module, ids, mask, max_new_tokens: int, stop: set[int]) -> torch.Tensor:
    """Greedy decoding without a cache, for models that have no ``generate``."""
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    new = []
    for _ in range(max_new_tokens):
        out = model(input_ids=ids, attention_mask=mask)
        logits = out.logits if hasattr(out, "logits") else out
        nxt = logits[:, -1].argmax(-1)  # (B,)
        new.append(nxt)
        done |= torch.isin(nxt, torch.tensor(sorted(stop), device=nxt.device))
        ids = torch.cat([ids, nxt[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(nxt)[:, None]], 1)
        if bool(done.all()):
            break
    return torch.stack(new, 1)


@torch.no_grad()
def greedy_generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    pad_id: int,
    stop_ids: Sequence[int],
    max_new_tokens: int = 16,
    batch_size: int = 16,
) -> list[list[int]]:
    """Greedy continuations of tokenised prompts, cut before the first stop token.

    Args:
        model: a causal LM (``generate`` is used when present); put in eval mode for the call.
        prompts: token ids of each prompt (including any generation prompt of the template).
        pad_id: id used for left padding (masked out).
        stop_ids: token ids that end a response (not included in the result).
        max_new_tokens: decoding length limit.
        batch_size: prompts per forward.

    Returns:
        the new token ids of each prompt (without the prompt and the stop token).
    """
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}, batch_size={batch_size}: expected ≥ 1")
    stop = {int(s) for s in stop_ids}
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    results: list[list[int]] = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            ids, mask = _left_pad(chunk, pad_id, device)
            if hasattr(model, "generate"):
                out = model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    num_beams=1,
                    eos_token_id=sorted(stop) or None,
                    pad_token_id=pad_id,
                )[:, ids.shape[1] :]
            else:
                out = _greedy_loop(model, ids, mask, max_new_tokens, stop)
            for row in out.tolist():
                cut = next((i for i, t in enumerate(row) if t in stop), len(row))
                results.append(row[:cut])
    finally:
        model.train(was_training)
    return results


def _atomic_write_lines(path: Path, rows: list[dict]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n")
    os.replace(tmp, path)


class GenerationEvaluator(Callback):
    """Greedy-decoded answer accuracy and sample tables (keys in the module docstring).

    Args:
        run_dir: where ``samples.jsonl`` goes (None: ``trainer.default_root_dir``).
        num_examples: validation examples decoded at each validation (0 disables the callback).
        max_new_tokens: decoding length limit.
        num_samples: rows per stage in ``samples.jsonl`` and the W&B table.
        batch_size: prompts per generation batch.
        evaluate_base: evaluate the untouched base model before training (fresh runs only).

    Attributes:
        base_metrics: ``{"base/val/answer_acc": ..., "base/val/loss": ..., "base/val/ppl": ...}``
            once measured ({} before; non-finite values left out); part of the callback state
            in checkpoints.
        last_metrics: the latest ``{"val/answer_acc": ...}``.
        summary_metrics: ``base_metrics`` (what a run's ``summary.json`` adds to its metrics).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike | None = None,
        *,
        num_examples: int = 100,
        max_new_tokens: int = 16,
        num_samples: int = 8,
        batch_size: int = 16,
        evaluate_base: bool = True,
    ) -> None:
        super().__init__()
        for name, value, low in (
            ("num_examples", num_examples, 0),
            ("max_new_tokens", max_new_tokens, 1),
            ("num_samples", num_samples, 0),
            ("batch_size", batch_size, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"callbacks.generation.{name}={value!r}: expected an int ≥ {low}")
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.num_examples, self.max_new_tokens = num_examples, max_new_tokens
        self.num_samples, self.batch_size = num_samples, batch_size
        self.evaluate_base = bool(evaluate_base)
        self.base_metrics: dict[str, float] = {}
        self.base_rows: list[dict] = []
        self.last_metrics: dict[str, float] = {}
        self.last_rows: list[dict] = []

    @property
    def summary_metrics(self) -> dict[str, float]:
        return dict(self.base_metrics)

    # ------------------------------------------------------------------ evaluation
    def _examples(self, trainer: pl.Trainer) -> list[dict]:
        data = trainer.datamodule
        if data is None or not hasattr(data, "generation_examples"):
            raise TypeError(
                "GenerationEvaluator needs a datamodule with generation_examples() "
                f"(e.g. adarank.data.SFTDataModule), got {type(data).__name__}"
            )
        return list(data.generation_examples(self.num_examples))

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[float, list]:
        """Decode the examples; returns (answer accuracy over short references, sample rows)."""
        data = trainer.datamodule
        examples = self._examples(trainer)
        tokenizer = data.tokenizer
        with trainer.precision_plugin.forward_context():
            new_ids = greedy_generate(
                pl_module.model,
                [ex["prompt_ids"] for ex in examples],
                pad_id=int(tokenizer.pad_token_id),
                stop_ids=list(data.stop_token_ids),
                max_new_tokens=self.max_new_tokens,
                batch_size=self.batch_size,
            )
        texts = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in new_ids]
        short = [i for i, ex in enumerate(examples) if ex.get("short", True)]
        acc = answer_accuracy([texts[i] for i in short], [examples[i]["reference"] for i in short])
        rows = [
            {
                "prompt": ex["prompt"],
                "reference": ex["reference"],
                "generated": text,
                "correct": normalize_answer(text) == normalize_answer(ex["reference"]),
            }
            for ex, text in zip(examples[: self.num_samples], texts)
        ]
        return acc, rows

    @torch.no_grad()
    def _base_loss(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float:
        """Token-weighted validation loss of the model as it is (response tokens only)."""
        model, total, count = pl_module.model, 0.0, 0
        was_training = model.training
        model.eval()
        try:
            for batch in trainer.datamodule.val_dataloader():
                batch = pl_module.transfer_batch_to_device(batch, pl_module.device, 0)
                with trainer.precision_plugin.forward_context():
                    out = run_task(pl_module.task, model, batch)
                total += float(out.loss) * out.weight
                count += out.weight
        finally:
            model.train(was_training)
        return total / count if count else math.nan

    # ------------------------------------------------------------------ hooks
    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.num_examples or not self.evaluate_base:
            return
        if trainer.global_step != 0 or self.base_metrics:
            return  # resumed: the base figures come from the checkpoint
        acc, rows = self.evaluate(trainer, pl_module)
        loss = self._base_loss(trainer, pl_module)
        measured = {
            "base/val/answer_acc": acc,  # nan when no example has a short reference
            "base/val/loss": loss,
            "base/val/ppl": math.exp(min(loss, 700.0)),
        }
        self.base_metrics = {k: v for k, v in measured.items() if math.isfinite(v)}
        self.base_rows = [{"stage": "base", "step": 0, **r} for r in rows]
        for logger in trainer.loggers:
            logger.log_metrics(self.base_metrics, step=0)
        self._write(trainer)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.num_examples or trainer.sanity_checking:
            return
        acc, rows = self.evaluate(trainer, pl_module)
        self.last_metrics = {"val/answer_acc": acc}
        step = int(trainer.global_step)
        self.last_rows = [{"stage": "tuned", "step": step, **r} for r in rows]
        if math.isfinite(acc):
            pl_module.log("val/answer_acc", acc, prog_bar=True)
        self._write(trainer)
        self._log_table(trainer, step)

    def _write(self, trainer: pl.Trainer) -> None:
        if not trainer.is_global_zero:
            return
        run_dir = self.run_dir or Path(trainer.default_root_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        _atomic_write_lines(run_dir / SAMPLES_JSONL, self.base_rows + self.last_rows)

    def _log_table(self, trainer: pl.Trainer, step: int) -> None:
        from lightning.pytorch.loggers import WandbLogger

        rows = self.base_rows + self.last_rows
        cols = ["stage", "step", "prompt", "reference", "generated", "correct"]
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and rows:
                data = [[r[c] for c in cols] for r in rows]
                logger.log_table(key="samples", columns=cols, data=data, step=step)

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"base_metrics": dict(self.base_metrics), "base_rows": list(self.base_rows)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base_metrics = dict(state_dict.get("base_metrics", {}))
        self.base_rows = list(state_dict.get("base_rows", []))
