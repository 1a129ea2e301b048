"""Task losses and validation metrics, checked against references computed another way."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from adarank.lightning.tasks import build_metrics, compute_metrics, run_task, update_metrics


class Logits(nn.Module):
    def __init__(self, d: int = 6, c: int = 3) -> None:
        super().__init__()
        self.lin = nn.Linear(d, c)

    def forward(self, x):
        return self.lin(x)


def test_classification_loss_and_metrics_match_manual(seed):
    model = Logits()
    x = torch.randn(10, 6)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 0, 1, 2])
    out = run_task("classification", model, {"x": x, "labels": labels})
    logp = torch.log_softmax(model(x), -1)
    assert out.loss.item() == pytest.approx(-logp[torch.arange(10), labels].mean().item(), rel=1e-6)
    metrics = build_metrics("classification", num_classes=3)
    update_metrics("classification", metrics, out)
    got = compute_metrics("classification", metrics)
    pred = logp.argmax(-1).numpy()
    y = labels.numpy()
    f1s = []
    for c in range(3):
        tp = np.sum((pred == c) & (y == c))
        prec = tp / max(1, np.sum(pred == c))
        rec = tp / max(1, np.sum(y == c))
        f1s.append(0.0 if tp == 0 else 2 * prec * rec / (prec + rec))
    assert set(got) == {"val/loss", "val/acc", "val/f1"}
    assert got["val/acc"].item() == pytest.approx(float(np.mean(pred == y)))
    assert got["val/f1"].item() == pytest.approx(float(np.mean(f1s)), abs=1e-6)
    assert got["val/loss"].item() == pytest.approx(out.loss.item(), rel=1e-6)


def test_causal_lm_loss_matches_transformers_shifted_loss(make_tiny_gpt2, token_batch):
    model = make_tiny_gpt2()
    ids = token_batch(batch=3, seq=8)
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0  # right padding in the first row
    out = run_task("causal_lm", model, {"input_ids": ids, "attention_mask": mask})
    labels = ids.masked_fill(mask == 0, -100)
    ref = model(input_ids=ids, attention_mask=mask, labels=labels).loss  # HF shifts internally
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert out.weight == int((labels[:, 1:] != -100).sum())
    metrics = build_metrics("causal_lm")
    update_metrics("causal_lm", metrics, out)
    got = compute_metrics("causal_lm", metrics)
    assert got["val/ppl"].item() == pytest.approx(np.exp(out.loss.item()), rel=1e-5)


def test_causal_lm_val_loss_is_token_weighted():
    metrics = build_metrics("causal_lm")
    from adarank.lightning.tasks import TaskOutput

    update_metrics("causal_lm", metrics, TaskOutput(torch.tensor(1.0), None, None, 30))
    update_metrics("causal_lm", metrics, TaskOutput(torch.tensor(4.0), None, None, 10))
    got = compute_metrics("causal_lm", metrics)
    assert got["val/loss"].item() == pytest.approx((30 * 1 + 10 * 4) / 40)


@pytest.mark.parametrize("as_dict", [False, True])
def test_regression_batches_and_mse(seed, as_dict):
    model = nn.Linear(4, 2)
    x, y = torch.randn(5, 4), torch.randn(5, 2)
    batch = {"x": x, "y": y} if as_dict else (x, y)
    out = run_task("regression", model, batch)
    assert out.loss.item() == pytest.approx(((model(x) - y) ** 2).mean().item(), rel=1e-6)
    metrics = build_metrics("regression")
    update_metrics("regression", metrics, out)
    got = compute_metrics("regression", metrics)
    assert got["val/mse"].item() == pytest.approx(out.loss.item(), rel=1e-6)


def test_task_errors():
    with pytest.raises(ValueError, match="task='seq2seq'"):
        run_task("seq2seq", nn.Linear(2, 2), None)
    with pytest.raises(ValueError, match="prediction shape"):
        run_task("regression", nn.Linear(4, 2), (torch.randn(3, 4), torch.randn(3, 3)))
    with pytest.raises(TypeError, match="dict batches"):
        run_task("classification", nn.Linear(4, 2), (torch.randn(3, 4), torch.zeros(3)))
    with pytest.raises(KeyError, match="labels"):
        run_task("classification", Logits(), {"x": torch.randn(2, 6)})
    with pytest.raises(ValueError, match="num_classes"):
        build_metrics("classification", None)


class _HideLogitsToKeep(torch.nn.Module):
    """The same model behind a forward without ``logits_to_keep``: the full-logits path."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


def test_causal_lm_logits_only_at_labelled_positions_give_the_same_loss_and_gradients():
    from adarank.models import build_hf_model
    from adarank.modules import add_adapters

    model = build_hf_model("tiny-llama", task="causal_lm", seed=0).train()
    add_adapters(model, "all-linear", 3, factor_init="lora", seed=0)
    with torch.no_grad():  # move the adapters off their function-preserving start
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    ids = torch.randint(5, 200, (3, 12), generator=torch.Generator().manual_seed(1))
    labels = torch.full_like(ids, -100)
    labels[0, 5:8], labels[1, 9:11], labels[2, 3] = ids[0, 5:8], ids[1, 9:11], ids[2, 3]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    seen: dict[str, int] = {}

    def record(module, args, out) -> None:
        seen.setdefault("T", out.shape[1])

    hook = model.lm_head.register_forward_hook(record)

    def loss_and_grads(m):
        out = run_task("causal_lm", m, batch)
        grads = torch.autograd.grad(out.loss, [p for p in model.parameters() if p.requires_grad])
        return out, grads

    kept, kept_grads = loss_and_grads(model)
    hook.remove()
    full, full_grads = loss_and_grads(_HideLogitsToKeep(model))
    # labels at t = 5, 6, 7, 9, 10, 3 are predicted from positions t - 1: 6 distinct positions
    assert seen["T"] == 6
    assert kept.weight == full.weight == 6
    torch.testing.assert_close(kept.loss, full.loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(kept_grads, full_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
