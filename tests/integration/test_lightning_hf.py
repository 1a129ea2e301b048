"""Trainer.fit on tiny random transformers: ranks change, files and metrics agree."""

from __future__ import annotations

import csv

import lightning.pytorch as pl
import torch

from adarank.lightning import AdaRankModule, RankTrajectoryLogger
from adarank.modules import add_adapters


def _fit(model, task, batches, tmp_path, **kwargs):
    pl.seed_everything(0, verbose=False)
    cb = RankTrajectoryLogger(tmp_path)
    module = AdaRankModule(
        model, task, interval=2, warmup_steps=2, final_steps=2, lr=5e-3, **kwargs
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=12,
        logger=False,
        callbacks=[cb],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )

    def loader(items):  # pre-built dict batches, as a collator would produce them
        return torch.utils.data.DataLoader(items, batch_size=None)

    trainer.fit(module, loader(batches), loader(batches[:2]))
    return module, trainer, cb


def _check_history(module, cb, tmp_path):
    history = module.controller.history
    assert history and sum(e.n_pruned + e.n_grown for e in history) > 0
    assert module.controller.live_params() <= module.param_budget
    with open(tmp_path / "ranks.csv", newline="") as f:
        rows = [(int(r["step"]), r["layer"], int(r["rank"])) for r in csv.DictReader(f)]
    assert rows == [(e.step, n, r) for e in history for n, r in e.ranks.items()]
    assert (tmp_path / "rank_heatmap.png").stat().st_size > 1000
    assert len(cb.history) == len(history)


def test_bert_classification(make_tiny_bert, token_batch, tmp_path):
    model = make_tiny_bert().train()
    add_adapters(model, ["query", "value", "dense"], init_rank=2, modules_to_save="classifier")
    batches = []
    for i in range(4):
        ids = token_batch(batch=8, seq=8, seed=i)
        labels = (ids[:, 0] > 48).long()
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    module, trainer, cb = _fit(
        model, "classification", batches, tmp_path, budget=2000, head_lr=1e-2
    )
    _check_history(module, cb, tmp_path)
    assert {"val/acc", "val/f1", "val/loss"} <= set(trainer.callback_metrics)


def test_gpt2_causal_lm(make_tiny_gpt2, token_batch, tmp_path):
    model = make_tiny_gpt2().train()
    add_adapters(model, ["c_attn", "c_proj", "c_fc"], init_rank=2)
    batches = []
    for i in range(4):
        ids = token_batch(batch=4, seq=8, seed=i)
        mask = torch.ones_like(ids)
        mask[0, 6:] = 0
        batches.append({"input_ids": ids, "attention_mask": mask})
    module, trainer, cb = _fit(model, "causal_lm", batches, tmp_path, budget=2500)
    _check_history(module, cb, tmp_path)
    m = trainer.callback_metrics
    assert torch.isclose(m["val/ppl"], torch.exp(m["val/loss"]))
