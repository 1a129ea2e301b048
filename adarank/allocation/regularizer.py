"""Orthogonality regulariser (AdaLoRA, Zhang et al. 2023, Eq. 4).

    R(P, Q) = γ Σ_layers ( ‖PᵀP − I‖_F² + ‖QQᵀ − I‖_F² )     over live triplets only

It is returned as a loss term that the training loop adds explicitly — never hidden in a forward
pass that some wrappers bypass (peft #432).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["orthogonality_penalty"]


def orthogonality_penalty(layers: Iterable, gamma: float) -> torch.Tensor:
    """``γ Σ (‖PᵀP − I‖² + ‖QQᵀ − I‖²)``; a zero tensor (no graph) when γ = 0 or no live triplet."""
    if gamma < 0:
        raise ValueError(f"orth_reg gamma={gamma} must be ≥ 0")
    total = None
    for layer in layers:
        r = layer.rank
        if r == 0 or gamma == 0:
            continue
        P, Q = layer.lora_P, layer.lora_Q
        eye = torch.eye(r, device=P.device, dtype=P.dtype)
        term = ((P.T @ P - eye) ** 2).sum() + ((Q @ Q.T - eye) ** 2).sum()
        total = term if total is None else total + term
    if total is None:
        return torch.zeros(())
    return gamma * total
