"""Task heads: how a batch becomes a loss, and which validation metrics a task reports.

Three tasks, chosen by name in :class:`~adarank.lightning.module.AdaRankModule`:

``"classification"``
    A transformers sequence-classification model (or any module returning ``.logits`` or a
    logits tensor, shape ``(B, C)``). The batch is a dict from a tokenizer/collator with a
    ``"labels"`` (or ``"label"``) entry. Loss: cross-entropy. Metrics: ``val/loss``,
    ``val/acc`` (micro accuracy), ``val/f1`` (macro F1).
``"causal_lm"``
    A causal language model returning ``.logits`` ``(B, T, V)``. Labels are ``batch["labels"]``
    if given, else ``input_ids`` with padding (``attention_mask == 0``) set to ``-100``; the
    logits at position t predict the label at t + 1 (shift inside this module, so models are
    called *without* labels). Loss: token-mean cross-entropy ignoring ``-100``. Models that take
    transformers' ``logits_to_keep`` compute logits only at positions whose next token carries a
    label in some row (same loss; for instruction data most positions are prompt). Metrics:
    ``val/loss`` (token-weighted over the whole validation set) and ``val/ppl = exp(val/loss)``.
``"regression"``
    Any module mapping ``x`` to a prediction with ``y``'s shape (the planted task). The batch
    is ``(x, y)`` or a dict with ``"x"``/``"y"`` (or ``"inputs"``/``"targets"``). Loss: MSE.
    Metrics: ``val/loss`` and ``val/mse`` (element-weighted over the validation set).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn

__all__ = ["TASKS", "TaskOutput", "build_metrics", "compute_metrics", "run_task", "update_metrics"]

TASKS = ("classification", "causal_lm", "regression")
IGNORE_INDEX = -100


@dataclass
class TaskOutput:
    """Result of one forward pass.

    Attributes:
        loss: scalar task loss (mean over the batch's elements/tokens).
        preds: predictions for the metrics (logits (B, C), or regression outputs).
        target: targets matching ``preds`` (labels (B,), or regression targets).
        weight: number of elements the loss averages over (tokens for LM, for weighted means).
    """

    loss: torch.Tensor
    preds: torch.Tensor | None
    target: torch.Tensor | None
    weight: int


def check_task(task: str) -> str:
    """Validate a task name.

    Raises:
        ValueError: if ``task`` is not one of :data:`TASKS`.
    """
    if task not in TASKS:
        raise ValueError(f"task={task!r} is not supported; expected one of {list(TASKS)}")
    return task


def _logits(output: Any) -> torch.Tensor:
    if torch.is_tensor(output):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, Mapping):
        logits = output.get("logits")
    if logits is None:
        raise TypeError(
            f"model output of type {type(output).__name__} has no 'logits'; classification and "
            "causal_lm tasks need a model returning logits (e.g. a transformers *For* model)"
        )
    return logits


def _require_dict(batch: Any, task: str) -> dict:
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"task={task!r} expects dict batches from a tokenizer/collator, got {type(batch).__name__}"
        )
    return dict(batch)


def _classification(model: nn.Module, batch: Any) -> TaskOutput:
    inputs = _require_dict(batch, "classification")
    labels = inputs.pop("labels", None)
    if labels is None:
        labels = inputs.pop("label", None)
    if labels is None:
        raise KeyError("classification batch has no 'labels' (or 'label') entry")
    logits = _logits(model(**inputs))  # (B, C)
    loss = F.cross_entropy(logits.float(), labels)
    return TaskOutput(loss, logits.detach(), labels, int(labels.numel()))


@functools.lru_cache(maxsize=64)
def _takes_logits_to_keep(model_type: type) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model_type.forward).parameters
    except (TypeError, ValueError):
        return False


def _label_positions(model: nn.Module, shift_labels: torch.Tensor) -> torch.Tensor | None:
    """Positions t (1-D, shared by the batch) whose next token carries a label, when computing
    logits only there saves work: the model takes transformers' ``logits_to_keep`` and some
    positions carry no label in any row (instruction data: prompts and padding). None: all."""
    if not _takes_logits_to_keep(type(model)):
        return None
    labelled = (shift_labels != IGNORE_INDEX).any(0)  # (T - 1,)
    if bool(labelled.all()) or not bool(labelled.any()):
        return None
    return labelled.nonzero().squeeze(1)


def _causal_lm(model: nn.Module, batch: Any) -> TaskOutput:
    inputs = _require_dict(batch, "causal_lm")
    labels = inputs.pop("labels", None)
    if "input_ids" not in inputs:
        raise KeyError("causal_lm batch has no 'input_ids' entry")
    if labels is None:
        labels = inputs["input_ids"].clone()
        mask = inputs.get("attention_mask")
        if mask is not None:
            labels = labels.masked_fill(mask == 0, IGNORE_INDEX)
    shift_labels = labels[:, 1:]  # position t predicts token t + 1
    keep = _label_positions(model, shift_labels)
    if keep is None:
        shift_logits = _logits(model(**inputs))[:, :-1].float()  # (B, T - 1, V)
    else:  # only the positions that carry a label go through the (vocab-wide) output head
        shift_logits = _logits(model(**inputs, logits_to_keep=keep)).float()  # (B, K, V)
        shift_labels = shift_labels[:, keep]
    n_tokens = int((shift_labels != IGNORE_INDEX).sum())
    loss = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
    )
    return TaskOutput(loss, None, None, n_tokens)


def _regression_xy(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    if isinstance(batch, Mapping):
        for kx, ky in (("x", "y"), ("inputs", "targets")):
            if kx in batch and ky in batch:
                return batch[kx], batch[ky]
    raise TypeError(
        "regression batches must be (x, y) or a dict with 'x'/'y' or 'inputs'/'targets', "
        f"got {type(batch).__name__}"
    )


def _regression(model: nn.Module, batch: Any) -> TaskOutput:
    x, y = _regression_xy(batch)
    out = model(x)
    pred = out if torch.is_tensor(out) else _logits(out)
    if pred.shape != y.shape:
        raise ValueError(
            f"regression prediction shape {tuple(pred.shape)} != target {tuple(y.shape)}"
        )
    loss = F.mse_loss(pred.float(), y.float())
    return TaskOutput(loss, pred.detach(), y, int(y.numel()))


_RUNNERS = {"classification": _classification, "causal_lm": _causal_lm, "regression": _regression}


def run_task(task: str, model: nn.Module, batch: Any) -> TaskOutput:
    """Forward ``batch`` through ``model`` and compute the task loss (see module docstring)."""
    return _RUNNERS[check_task(task)](model, batch)


def build_metrics(task: str, num_classes: int | None = None) -> nn.ModuleDict:
    """torchmetrics objects for validation (they sync across processes under DDP).

    Args:
        task: one of :data:`TASKS`.
        num_classes: number of classes (classification only).

    Raises:
        ValueError: classification without ``num_classes >= 2``.
    """
    metrics: dict[str, torchmetrics.Metric] = {"loss": torchmetrics.MeanMetric()}
    if check_task(task) == "classification":
        if num_classes is None or int(num_classes) < 2:
            raise ValueError(
                f"classification needs num_classes >= 2, got {num_classes!r} (pass num_classes "
                "or use a model whose config has num_labels)"
            )
        metrics["acc"] = torchmetrics.classification.MulticlassAccuracy(
            int(num_classes), average="micro"
        )
        metrics["f1"] = torchmetrics.classification.MulticlassF1Score(
            int(num_classes), average="macro"
        )
    elif task == "regression":
        metrics["mse"] = torchmetrics.MeanSquaredError()
    return nn.ModuleDict(metrics)


def update_metrics(task: str, metrics: nn.ModuleDict, out: TaskOutput) -> None:
    """Accumulate one validation batch (loss weighted by its element/token count)."""
    if out.weight > 0:
        metrics["loss"].update(out.loss.detach().float(), weight=out.weight)
    if task == "classification":
        metrics["acc"].update(out.preds, out.target)
        metrics["f1"].update(out.preds, out.target)
    elif task == "regression":
        metrics["mse"].update(out.preds.float(), out.target.float())


def compute_metrics(task: str, metrics: nn.ModuleDict, prefix: str = "val") -> dict[str, float]:
    """Compute and reset; returns ``{f"{prefix}/loss": ..., ...}`` (keys in module docstring)."""
    out = {f"{prefix}/{name}": metric.compute() for name, metric in metrics.items()}
    if task == "causal_lm":
        out[f"{prefix}/ppl"] = torch.exp(out[f"{prefix}/loss"])
    for metric in metrics.values():
        metric.reset()
    return out
