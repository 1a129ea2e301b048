"""Keep a torch optimizer consistent when adapter parameters are resized.

Pruning and growing replace ``nn.Parameter`` objects. For each replaced parameter we swap it in the
optimizer's ``param_groups`` and re-index every per-element state tensor (Adam's ``exp_avg``,
``exp_avg_sq``, SGD's ``momentum_buffer``, ...) along the rank dimension: surviving slots keep
their moments; new slots start with a zero first moment and, for second-moment estimates
(Adam's ``exp_avg_sq``, ``max_exp_avg_sq``, RMSprop's ``square_avg``), the mean over the surviving
slots of the same parameter (per row of P / column of Q). Scalar state such as Adam's ``step`` is
kept (the global step t): with a zero second moment a new slot's n-th update under a consistent
gradient would be ``(1 − β1ⁿ)/(1 − β1ᵗ) / √((1 − β2ⁿ)/(1 − β2ᵗ))`` × lr — ≈ 3 × lr for slots born
late in a 337-step run, up to 6.5 × lr after thousands of steps — a kick no surviving slot gets;
with the inherited mean they start at about (1 − β1) × the size of the surviving slots' steps and
grow as momentum builds (docs/theory.md). ``second_moment="zero"`` restores the zero start.
A parameter whose state has tensors of another shape (factored moments such as Adafactor's
row/column statistics) loses its state: the optimizer starts it afresh at its next step, as for
a new parameter.
"""

from __future__ import annotations

import torch

__all__ = ["SECOND_MOMENT_KEYS", "replace_parameter"]

#: optimizer state keys that hold running second moments (scale estimates) of the gradient
SECOND_MOMENT_KEYS = ("exp_avg_sq", "max_exp_avg_sq", "square_avg")
_NEW_SLOT_MOMENTS = ("mean", "zero")


def _factored(value: object, param: torch.Tensor) -> bool:
    """A state tensor with dimensions that are not the parameter's (no slot-wise remap)."""
    return torch.is_tensor(value) and value.dim() > 0 and value.shape != param.shape


def replace_parameter(
    optimizer: torch.optim.Optimizer,
    old: torch.nn.Parameter,
    new: torch.nn.Parameter,
    keep: torch.Tensor,
    n_new: int,
    dim: int,
    *,
    second_moment: str = "mean",
) -> bool:
    """Swap ``old`` for ``new`` in ``optimizer``; state re-indexed by ``keep`` then zero-padded.

    Args:
        optimizer: any torch optimizer whose per-element state has the parameter's shape.
        old, new: the parameter before and after the resize.
        keep: old slot indices that survive (along ``dim``), in their new order.
        n_new: slots appended at the end along ``dim``.
        dim: the rank dimension of this parameter.
        second_moment: ``"mean"`` (new slots of a second-moment state start at the surviving
            slots' mean, see the module docstring) or ``"zero"``.

    Returns:
        True if ``old`` was found in the optimizer.
    """
    if second_moment not in _NEW_SLOT_MOMENTS:
        raise ValueError(f"second_moment={second_moment!r}: expected one of {_NEW_SLOT_MOMENTS}")
    found = False
    for group in optimizer.param_groups:
        params = group["params"]
        for i, p in enumerate(params):
            if p is old:
                params[i] = new
                found = True
    if not found:
        return False
    state = optimizer.state.pop(old, None)
    if state and any(_factored(v, old) for v in state.values()):
        return True  # state not shaped like the parameter (e.g. Adafactor's): starts afresh
    if state:
        new_state = {}
        idx = keep.to(old.device)
        for key, value in state.items():
            if torch.is_tensor(value) and value.shape == old.shape:
                kept = value.index_select(dim, idx)
                pad_shape = list(kept.shape)
                pad_shape[dim] = n_new
                pad = kept.new_zeros(pad_shape)
                if second_moment == "mean" and key in SECOND_MOMENT_KEYS and kept.shape[dim]:
                    pad += kept.mean(dim=dim, keepdim=True)
                value = torch.cat([kept, pad], dim=dim)
            new_state[key] = value
        optimizer.state[new] = new_state
    return True
