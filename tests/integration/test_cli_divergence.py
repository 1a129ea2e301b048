"""The non-finite policy inside Lightning's loop (``optimizer.nonfinite`` behind ``adarank fit``).

A tiny planted model trains on batches of which one holds NaN inputs; the parameters after every
optimizer step are recorded, so "skip" and "fail" are checked against the exact parameters of
the neighbouring steps. The command-line view (exit 1, summary.json) is in
tests/bad_inputs/test_cli_corpus.py.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from adarank.lightning import AdaRankModule
from adarank.lightning.checkpointing import adarank_state
from adarank.lightning.divergence import NonFiniteGuard, TrainingDiverged
from adarank.modules import add_adapters


class Blocks(nn.Module):
    def __init__(self, k: int = 2, d: int = 8) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(k))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([b(x[:, i]) for i, b in enumerate(self.blocks)], dim=1)


class Recorder(pl.Callback):
    """Trainable parameters after every optimizer step (index 0: before training)."""

    def __init__(self) -> None:
        self.after: list[dict[str, torch.Tensor]] = []

    @staticmethod
    def grab(module: AdaRankModule) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in module._trainable().items()}

    def on_train_start(self, trainer, pl_module) -> None:
        self.after = [self.grab(pl_module)]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.after.append(self.grab(pl_module))


def _fit(bad_steps=(), steps: int = 6, budget=None, y_scale: float = 1.0, **kwargs):
    pl.seed_everything(0, verbose=False)
    model = Blocks()
    add_adapters(model, "re:blocks\\.\\d+", init_rank=2, seed=0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8 * steps, 2, 8, generator=g)
    y = y_scale * torch.randn(8 * steps, 2, 8, generator=g)
    for s in bad_steps:  # optimizer step s (1-based) sees batch s - 1
        x[8 * (s - 1)] = float("nan")
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    args = dict(lr=1e-2, warmup_ratio=0.0, interval=2, warmup_steps=1, final_steps=2)
    module = AdaRankModule(model, "regression", budget=budget, **{**args, **kwargs})
    rec = Recorder()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        callbacks=[rec],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    error = None
    try:
        trainer.fit(module, train_dataloaders=loader)
    except TrainingDiverged as err:
        error = err
    return module, rec, error


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("budget", "retract"), [(None, False), (2 * 2 * 17, False), (2 * 2 * 17, True)]
)
def test_skip_drops_exactly_the_bad_step(budget, retract) -> None:
    """A skipped step changes nothing — with the retraction too, which then does not run."""
    module, rec, error = _fit(bad_steps=(3,), budget=budget, nonfinite="skip", retract=retract)
    assert error is None and module.guard.skipped == [3]
    assert len(rec.after) == 7
    assert _same(rec.after[3], rec.after[2])  # step 3 changed nothing
    assert not _same(rec.after[4], rec.after[3])  # and training went on
    assert all(torch.isfinite(t).all() for t in rec.after[-1].values())
    clean, rec_clean, _ = _fit(budget=budget, retract=retract)
    assert _same(rec_clean.after[2], rec.after[2])  # identical up to the bad step


def test_fail_stops_at_the_bad_step_with_the_last_finite_parameters() -> None:
    module, rec, error = _fit(bad_steps=(4,))
    assert isinstance(error, TrainingDiverged) and error.step == 4
    assert "non-finite training loss (nan) at optimizer step 4" in error.reason
    assert len(rec.after) == 4  # steps 1..3 completed
    assert _same(Recorder.grab(module), rec.after[3])


def test_skip_budget_is_bounded() -> None:
    _, _, error = _fit(bad_steps=(2, 3, 5), nonfinite="skip", max_skipped_steps=2)
    assert isinstance(error, TrainingDiverged) and error.step == 5
    assert "3 optimizer steps with non-finite values, more than" in error.reason


def test_an_overflowing_update_is_undone() -> None:
    # finite gradients (large targets), but SGD with lr 1e38 pushes parameters to ±inf
    module, rec, error = _fit(optimizer="sgd", lr=1e38, y_scale=1e6)
    assert isinstance(error, TrainingDiverged) and error.step == 1
    assert "after the update of optimizer step 1" in error.reason
    assert _same(Recorder.grab(module), rec.after[0])


def test_guard_state_travels_in_checkpoints() -> None:
    module, _, _ = _fit(bad_steps=(2,), nonfinite="skip")
    state = adarank_state(module)["guard"]
    assert state["skipped"] == [2] and state["initial_loss"] > 0
    other = NonFiniteGuard("skip")
    other.load_state_dict(state)
    assert other.skipped == [2] and other.initial_loss == state["initial_loss"]


def test_guard_arguments_and_warnings() -> None:
    with pytest.raises(ValueError, match="nonfinite='ignore': expected one of"):
        NonFiniteGuard("ignore")
    with pytest.raises(ValueError, match="max_skipped_steps=-1"):
        NonFiniteGuard("skip", -1)
    guard = NonFiniteGuard()
    guard.initial_loss = 2.0
    assert guard.warnings(15.0) == []
    (warning,) = guard.warnings(50.0)
    assert "final val/loss 50 is 25× the training loss of the first step (2)" in warning
