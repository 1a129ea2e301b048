"""Shared test fixtures: offline environment, seeding, tiny random-init transformers models.

Everything here is generic so that every test package can use it:

* ``seed`` — seeds ``random``, ``numpy`` and ``torch`` and returns the seed (0);
* ``tiny_bert_config`` / ``tiny_gpt2_config`` — factories ``(**overrides) -> config`` for
  random-init models that need no download (hidden 32, 2 layers, dropout off);
* ``make_tiny_bert`` / ``make_tiny_gpt2`` — factories ``(seed=0, **overrides) -> model`` that
  build the same weights for the same seed (``eval()`` mode);
* ``token_batch`` — factory ``(batch=4, seq=8, vocab=..., seed=0) -> LongTensor`` of token ids.

``transformers`` is imported lazily inside the factories, so tests that do not use them do not
pay for the import.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

# never touch the network from tests (online W&B without a network hangs ~100 s)
for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_key, _value)

# the test machines are small and shared: one intra-op thread unless told otherwise
torch.set_num_threads(int(os.environ.get("ADARANK_TEST_THREADS", "1")))

TINY_VOCAB = 96  # vocabulary of the tiny models


def seed_everything(seed: int) -> None:
    """Seed ``random``, ``numpy`` and ``torch`` (CPU and, if present, CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@pytest.fixture
def seed() -> int:
    """Seed every RNG with 0 and return the seed."""
    seed_everything(0)
    return 0


def _tiny_bert_config(**overrides: Any):
    from transformers import BertConfig

    kwargs: dict[str, Any] = dict(
        vocab_size=TINY_VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=2,
        pad_token_id=0,
    )
    kwargs.update(overrides)
    return BertConfig(**kwargs)


def _tiny_gpt2_config(**overrides: Any):
    from transformers import GPT2Config

    kwargs: dict[str, Any] = dict(
        vocab_size=TINY_VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=32,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=TINY_VOCAB - 1,
        eos_token_id=TINY_VOCAB - 1,
    )
    kwargs.update(overrides)
    return GPT2Config(**kwargs)


@pytest.fixture
def tiny_bert_config() -> Callable[..., Any]:
    """Factory ``(**overrides) -> BertConfig`` (hidden 32, 2 layers, 2 heads, 2 labels)."""
    return _tiny_bert_config


@pytest.fixture
def tiny_gpt2_config() -> Callable[..., Any]:
    """Factory ``(**overrides) -> GPT2Config`` (n_embd 32, 2 layers, 2 heads)."""
    return _tiny_gpt2_config


@pytest.fixture
def make_tiny_bert() -> Callable[..., torch.nn.Module]:
    """Factory ``(seed=0, **config_overrides) -> BertForSequenceClassification`` in eval mode."""

    def build(seed: int = 0, **overrides: Any) -> torch.nn.Module:
        from transformers import BertForSequenceClassification

        torch.manual_seed(seed)
        return BertForSequenceClassification(_tiny_bert_config(**overrides)).eval()

    return build


@pytest.fixture
def make_tiny_gpt2() -> Callable[..., torch.nn.Module]:
    """Factory ``(seed=0, **config_overrides) -> GPT2LMHeadModel`` in eval mode."""

    def build(seed: int = 0, **overrides: Any) -> torch.nn.Module:
        from transformers import GPT2LMHeadModel

        torch.manual_seed(seed)
        return GPT2LMHeadModel(_tiny_gpt2_config(**overrides)).eval()

    return build


@pytest.fixture
def token_batch() -> Callable[..., torch.Tensor]:
    """Factory ``(batch=4, seq=8, vocab=TINY_VOCAB, seed=0) -> (batch, seq) token ids``."""

    def build(batch: int = 4, seq: int = 8, vocab: int = TINY_VOCAB, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        return torch.randint(1, vocab, (batch, seq), generator=g)

    return build
