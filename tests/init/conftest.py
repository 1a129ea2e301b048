"""Tiny random BERT with adapters, and calibration batches, for the init tests."""

from __future__ import annotations

import pytest
import torch

from adarank import add_adapters

TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=97,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=32,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = BertForSequenceClassification(cfg).float()
    model.eval()
    return model


def make_batches(n: int, seed: int = 1, batch: int = 4, length: int = 10) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 97, (batch, length), generator=g)
        mask = torch.ones(batch, length, dtype=torch.long)
        mask[0, length // 2 :] = 0  # one padded row
        labels = torch.randint(0, 2, (batch,), generator=g)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def with_adapters(seed: int = 0, rank: int = 4):
    model = tiny_bert(seed)
    add_adapters(model, TARGETS, rank, modules_to_save=["classifier"], seed=seed)
    model.eval()
    return model


@pytest.fixture
def batches() -> list[dict]:
    return make_batches(6)
