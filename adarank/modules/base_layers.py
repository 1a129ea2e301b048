"""What kind of base layer an adapter wraps, and whether a forward is a recomputation.

Kept apart from :mod:`adarank.modules.svd_lora` (which holds the adapter's maths): the shape of
an ``nn.Linear`` / transformers ``Conv1D`` / quantized linear, and the probe that tells an
activation-checkpointing recomputation (a forward inside a backward pass) from a real forward.
Re-exported by ``svd_lora`` for existing imports.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["in_backward_pass", "is_conv1d", "is_quantized", "linear_shape"]

_GRAPH_TASK_ID = getattr(torch._C, "_current_graph_task_id", None)


def in_backward_pass() -> bool:
    """True while this thread runs inside an autograd backward pass.

    A module forward that runs there is an activation-checkpointing recomputation. Uses the
    private ``torch._C._current_graph_task_id()`` (-1 outside a backward pass; the same probe
    ``torch.utils.checkpoint`` relies on). On a torch build without it this returns False:
    statistics are then counted again in recomputations (as without this guard).
    """
    return _GRAPH_TASK_ID is not None and _GRAPH_TASK_ID() != -1


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' GPT-2 style ``Conv1D`` (weight stored as (d_in, d_out))."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def is_quantized(module: nn.Module) -> bool:
    """True for a linear layer whose weight is stored quantized (bitsandbytes ``Linear4bit`` /
    ``Linear8bitLt``, recognised without importing bitsandbytes).

    Such a weight has a ``quant_state`` (packed 4-bit codes) or ``SCB`` (int8 row scales)
    attribute, or a non-floating dtype; its tensor shape is not the layer's ``(d_out, d_in)``.
    """
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return False
    return (
        hasattr(weight, "quant_state") or hasattr(weight, "SCB") or not weight.is_floating_point()
    )


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """Return ``(d_out, d_in)`` of an ``nn.Linear`` or ``Conv1D``.

    For a quantized ``nn.Linear`` subclass (:func:`is_quantized`) this is the logical shape
    (``out_features``, ``in_features``), not that of the packed weight tensor.

    Raises:
        TypeError: if the module is neither.
    """
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if is_conv1d(module):
        return module.nf, module.nx
    raise TypeError(f"expected torch.nn.Linear or transformers Conv1D, got {type(module).__name__}")
