"""Keep a torch optimizer consistent when adapter parameters are resized.

Pruning and growing replace ``nn.Parameter`` objects. For each replaced parameter we swap it in the
optimizer's ``param_groups`` and re-index every per-element state tensor (Adam's ``exp_avg``,
``exp_avg_sq``, SGD's ``momentum_buffer``, ...) along the rank dimension: surviving slots keep
their moments, new slots start from zero (no stale moments on pruned or new slots). Scalar state
such as Adam's ``step`` is kept. A parameter whose state has tensors of another shape (factored
moments such as Adafactor's row/column statistics) loses its state: the optimizer starts it
afresh at its next step, as for a new parameter.
"""

from __future__ import annotations

import torch

__all__ = ["replace_parameter"]


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
) -> bool:
    """Swap ``old`` for ``new`` in ``optimizer``; state re-indexed by ``keep`` then zero-padded.

    Args:
        optimizer: any torch optimizer whose per-element state has the parameter's shape.
        old, new: the parameter before and after the resize.
        keep: old slot indices that survive (along ``dim``), in their new order.
        n_new: slots appended at the end along ``dim``.
        dim: the rank dimension of this parameter.

    Returns:
        True if ``old`` was found in the optimizer.
    """
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
                value = torch.cat([kept, kept.new_zeros(pad_shape)], dim=dim)
            new_state[key] = value
        optimizer.state[new] = new_state
    return True
