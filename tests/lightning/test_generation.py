"""Greedy decoding and answer accuracy (adarank.lightning.generation)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from adarank.lightning.generation import (
    GenerationEvaluator,
    answer_accuracy,
    greedy_generate,
    normalize_answer,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Positive", "positive"),
        ("  positive.\n", "positive"),
        ('"Negative!"', "negative"),
        ("The capital  of\nFrance is Paris.", "the capital of france is paris"),
        ("", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_answer_accuracy_counts_exact_matches_after_normalisation():
    assert answer_accuracy(["Positive.", "negative", "positive review"], ["positive"] * 3) == (
        pytest.approx(1 / 3)
    )
    assert math.isnan(answer_accuracy([], []))
    with pytest.raises(ValueError, match="2 generations for 1 references"):
        answer_accuracy(["a", "b"], ["a"])


def _reference_greedy(model, prompt: list[int], steps: int, stop: set[int]) -> list[int]:
    """Unpadded, uncached greedy decoding: argmax of the full forward, one token at a time."""
    ids = torch.tensor([prompt])
    new: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            nxt = int(model(input_ids=ids).logits[0, -1].argmax())
            if nxt in stop:
                break
            new.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    return new


class _NoGenerate(nn.Module):
    """A causal LM without ``generate`` (exercises the plain greedy loop)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


@pytest.mark.parametrize("wrap", [False, True], ids=["generate", "plain-loop"])
def test_greedy_generate_matches_unpadded_reference(make_tiny_gpt2, wrap):
    model = make_tiny_gpt2(seed=3)
    prompts = [[5, 9, 17, 3, 40], [11, 2], [7, 7, 8, 60, 1, 33, 21]]  # unequal: left padding
    stop = {0}
    ref = [_reference_greedy(model, p, 6, stop) for p in prompts]
    target = _NoGenerate(model) if wrap else model
    model.train()
    out = greedy_generate(target, prompts, pad_id=0, stop_ids=[0], max_new_tokens=6, batch_size=2)
    assert out == ref
    assert model.training, "the caller's train/eval mode is restored"


def test_greedy_generate_cuts_at_the_first_stop_token(make_tiny_gpt2):
    model = make_tiny_gpt2(seed=3)
    prompt = [5, 9, 17, 3, 40]
    free = _reference_greedy(model, prompt, 6, set())
    stop_at = free[2]  # the third generated token becomes a stop token
    out = greedy_generate(model, [prompt], pad_id=0, stop_ids=[stop_at], max_new_tokens=6)
    assert out == [free[: free.index(stop_at)]]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_examples": -1}, "num_examples"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"batch_size": 1.5}, "batch_size"),
        ({"num_samples": True}, "num_samples"),
    ],
)
def test_generation_evaluator_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=f"callbacks.generation.{match}"):
        GenerationEvaluator(None, **kwargs)
