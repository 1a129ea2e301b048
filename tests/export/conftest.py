"""Fixtures for the export tests: tiny adapted models with every feature an export must carry.

``make_adapted(kind, seed, ...)`` builds a tiny random BERT (sequence classification, ``nn.Linear``)
or GPT-2 (``Conv1D``) with adarank adapters whose λ are random (so ΔW ≠ 0), per-layer ranks that
differ, one layer pruned to rank 0, one layer whose base was shifted by a data-aware init
(``shift_P shift_Q``) and, for BERT, a trained classifier head in ``modules_to_save``. The base
weights of ``make_tiny_bert(0)`` / ``make_tiny_gpt2(0)`` are the *original* weights that PEFT
and the multi-adapter server apply adapters to.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch

from adarank.modules import adapter_layers, add_adapters

BERT_TARGETS = ["query", "value", "intermediate.dense"]
GPT2_TARGETS = ["c_attn", "c_fc"]
BERT_ZERO = "bert.encoder.layer.1.attention.self.query"
BERT_SHIFT = "bert.encoder.layer.0.attention.self.value"
GPT2_ZERO = "transformer.h.1.mlp.c_fc"
GPT2_SHIFT = "transformer.h.0.attn.c_attn"


def _perturb(model: torch.nn.Module, seed: int, zero: str | None, shift: str | None) -> None:
    g = torch.Generator().manual_seed(1000 + seed)
    layers = adapter_layers(model)
    with torch.no_grad():
        for i, layer in enumerate(layers.values()):
            if i % 2:  # ranks differ between layers
                layer.prune([0])
            layer.lora_lambda.copy_(torch.randn(layer.rank, generator=g))
        if zero is not None:
            layers[zero].prune(range(layers[zero].rank))
        if shift is not None:
            layer = layers[shift]
            P0 = 0.1 * torch.randn(layer.d_out, 2, generator=g)
            layer.shift_base(P0, torch.randn(2, layer.d_in, generator=g))
        for name, p in model.named_parameters():
            if p.requires_grad and "lora_" not in name:  # modules_to_save: a "trained" head
                p.add_(0.5 * torch.randn(p.shape, generator=g))


@pytest.fixture
def make_adapted(make_tiny_bert, make_tiny_gpt2) -> Callable[..., torch.nn.Module]:
    """Factory ``(kind="bert"|"gpt2", seed=0, *, rank=4, zero=True, shift=True, saved=...)``."""

    def build(
        kind: str = "bert",
        seed: int = 0,
        *,
        rank: int = 4,
        zero: bool = True,
        shift: bool = True,
        saved: Sequence[str] | None = ("classifier",),
    ) -> torch.nn.Module:
        if kind == "bert":
            model = make_tiny_bert(0, num_labels=3)
            add_adapters(model, BERT_TARGETS, rank, modules_to_save=saved, seed=seed)
            _perturb(model, seed, BERT_ZERO if zero else None, BERT_SHIFT if shift else None)
        else:
            model = make_tiny_gpt2(0)
            add_adapters(model, GPT2_TARGETS, rank, seed=seed)
            _perturb(model, seed, GPT2_ZERO if zero else None, GPT2_SHIFT if shift else None)
        return model.eval()

    return build


@pytest.fixture
def make_base(make_tiny_bert, make_tiny_gpt2) -> Callable[[str], torch.nn.Module]:
    """Factory ``(kind) -> the original base model`` matching :func:`make_adapted`."""

    def build(kind: str = "bert") -> torch.nn.Module:
        return make_tiny_bert(0, num_labels=3) if kind == "bert" else make_tiny_gpt2(0)

    return build


@pytest.fixture
def logits() -> Callable[..., torch.Tensor]:
    """Function ``(model, ids, **kwargs) -> model(input_ids=ids, **kwargs).logits`` (no grad)."""

    def run(model: torch.nn.Module, ids: torch.Tensor, **kwargs) -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=ids, **kwargs).logits

    return run


@pytest.fixture
def special_layers() -> dict[str, tuple[str, str]]:
    """``{kind: (rank-0 layer, shifted layer)}`` of :func:`make_adapted`'s models."""
    return {"bert": (BERT_ZERO, BERT_SHIFT), "gpt2": (GPT2_ZERO, GPT2_SHIFT)}
