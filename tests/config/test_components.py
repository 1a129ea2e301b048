"""_component_ plug-ins: optimizer, LR schedule, extra loggers and callbacks (adarank.config.components)."""

from __future__ import annotations

import csv
import functools
import io
import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor
from lightning.pytorch.loggers import TensorBoardLogger

from adarank.config import ConfigError, load_config, validate_config
from adarank.config.build import module_kwargs
from adarank.lightning import AdaRankModule
from adarank.lightning.optim import build_lr_scheduler, build_optimizer, component_path
from adarank.modules import adapter_layers, add_adapters

RECIPE = Path(__file__).parent / "recipes" / "components.yaml"


@pytest.fixture(autouse=True)
def _env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADARANK_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_MODE", "disabled")


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Linear(8, 2))
    add_adapters(model, ["0"], 3, modules_to_save=["1"], seed=0)
    return model


def test_component_recipe_validates_runs_and_logs(tmp_path: Path) -> None:
    """TensorBoard + EarlyStopping + LearningRateMonitor + RAdam + cosine LR from one recipe."""
    from adarank.runs import execute, prepare

    cfg = load_config(RECIPE)
    validate_config(cfg)
    run_dir = tmp_path / "run"
    prepared = prepare(RECIPE, [f"run.dir={run_dir}"])
    summary = execute(prepared)
    assert summary["status"] == "ok" and summary["steps"] == 12
    trainer = prepared.module.trainer
    assert any(isinstance(c, EarlyStopping) and c.monitor == "val/loss" for c in trainer.callbacks)
    assert any(isinstance(c, LearningRateMonitor) for c in trainer.callbacks)
    tb = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
    assert len(tb) == 1 and Path(tb[0].save_dir) == run_dir / "logs"
    assert list((run_dir / "logs" / "tb" / "version_0").glob("events.out.tfevents.*"))
    # the optimizer is RAdam over adarank's groups (no weight decay on λ), kept in step with
    # every resize by the controller: each live adapter tensor is in the optimizer
    opt = trainer.optimizers[0]
    assert type(opt) is torch.optim.RAdam and list(opt.defaults["betas"]) == [0.9, 0.99]
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["adapter_lambda"]["weight_decay"] == 0.0
    assert prepared.module.controller.history, "no allocation event: the test shows nothing"
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    for layer in adapter_layers(prepared.model).values():
        assert {id(layer.lora_P), id(layer.lora_lambda), id(layer.lora_Q)} <= in_opt
    # the learning rate logged by LearningRateMonitor follows the closed-form cosine schedule
    text = next((run_dir / "logs" / "csv").rglob("metrics.csv")).read_text()
    rows = [r for r in csv.DictReader(io.StringIO(text)) if r.get("lr-RAdam/adapter")]
    lr0, eta_min, total = 1e-2, 1e-4, 12
    assert len(rows) == total
    for row in rows:
        step = int(row["step"])
        expected = eta_min + (lr0 - eta_min) * (1 + math.cos(math.pi * step / total)) / 2
        assert float(row["lr-RAdam/adapter"]) == pytest.approx(expected, rel=1e-6)


def test_module_kwargs_from_components() -> None:
    kw = module_kwargs(load_config(RECIPE))
    assert kw["optimizer"] == "torch.optim.RAdam"
    assert kw["optimizer_args"] == {"betas": [0.9, 0.99]} and kw["lr"] == 1e-2
    assert kw["lr_scheduler"] == "torch.optim.lr_scheduler.CosineAnnealingLR"
    assert kw["lr_scheduler_args"] == {"eta_min": 1e-4}
    plain = module_kwargs(load_config("planted"))
    assert "optimizer" not in plain and "lr_scheduler" not in plain  # the module's defaults


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        (["optimizer.betaz=1"], r"optimizer.betaz=1: unknown argument of torch.optim.RAdam"),
        (["optimizer.name=sgd"], r"optimizer.name='sgd' and optimizer._component_=.*give one"),
        (["optimizer.params=[]"], r"optimizer.params=\[\]: set by adarank"),
        (["optimizer._component_=torch.nn.Linear"], r"not a optimizer \(a torch.optim"),
        (
            ["lr_scheduler._component_=torch.optim.lr_scheduler.ReduceLROnPlateau"],
            r"needs a monitored metric",
        ),
        (["lr_scheduler=3"], r"lr_scheduler=3: expected null"),
        (["lr_scheduler.T_maxx=3"], r"lr_scheduler.T_maxx=3: unknown argument"),
        (
            ["logger.extra=[{_component_: lightning.pytorch.callbacks.EarlyStopping}]"],
            r"logger.extra\[0\]._component_=.*not a logger",
        ),
        (
            ["logger.extra=[{_component_: lightning.pytorch.loggers.TensorBoardLogger, nam: x}]"],
            r"logger.extra\[0\].nam='x': unknown argument",
        ),
        (["callbacks.extra=[{patience: 3}]"], r"callbacks.extra\[0\]: missing _component_"),
        (
            ["callbacks.extra=[{_component_: lightning.pytorch.callbacks.EarlyStopping}]"],
            r"callbacks.extra\[0\].monitor: missing required argument",
        ),
        (["callbacks.extra={a: 1}"], r"do not fit .*: Cannot merge incompatible container"),
    ],
)
def test_bad_components_are_named(overrides: list[str], pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        validate_config(load_config(RECIPE, overrides))


def test_extra_must_be_a_list() -> None:
    with pytest.raises(ConfigError, match=r"callbacks.extra=\{'a': 1\}: expected a list"):
        validate_config(load_config("planted", ["callbacks.extra={a: 1}"]))


def test_missing_logger_package_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "mlflow" else real(n, *a)
    )
    node = "logger.extra=[{_component_: lightning.pytorch.loggers.MLFlowLogger}]"
    with pytest.raises(ConfigError, match=r"needs the 'mlflow' package.*pip install mlflow"):
        validate_config(load_config(RECIPE, [node]))


def test_module_takes_an_optimizer_class_and_keeps_strings_in_hparams() -> None:
    module = AdaRankModule(
        _model(),
        "regression",
        budget=60,
        optimizer=torch.optim.RAdam,
        optimizer_args={"betas": (0.8, 0.9)},
        weight_decay=0.1,
        lr_scheduler=torch.optim.lr_scheduler.CosineAnnealingLR,
        total_steps=10,
    )
    assert module.hparams.optimizer == "torch.optim.radam.RAdam"
    assert module.hparams.lr_scheduler == "torch.optim.lr_scheduler.CosineAnnealingLR"
    buffer = io.BytesIO()
    torch.save(dict(module.hparams), buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True)["optimizer"] == "torch.optim.radam.RAdam"
    out = module.configure_optimizers()
    opt, sched = out["optimizer"], out["lr_scheduler"]["scheduler"]
    assert type(opt) is torch.optim.RAdam and opt.defaults["betas"] == (0.8, 0.9)
    decay = {g["name"]: g["weight_decay"] for g in opt.param_groups}
    assert decay == {"adapter": 0.1, "adapter_lambda": 0.0, "head": 0.1, "head_no_decay": 0.0}
    assert type(sched) is torch.optim.lr_scheduler.CosineAnnealingLR and sched.T_max == 10
    assert module.controller.optimizer is opt
    with pytest.raises(TypeError, match="not a functools.partial"):
        AdaRankModule(_model(), "regression", optimizer=functools.partial(torch.optim.SGD))
    with pytest.raises(ValueError, match="cannot import module"):
        AdaRankModule(_model(), "regression", optimizer="no_such.Optimizer")


def test_build_optimizer_and_scheduler_arguments() -> None:
    model = _model()
    sgd = build_optimizer(model, "sgd", lr=0.1)
    assert sgd.defaults["momentum"] == 0.9  # the built-in name keeps its default
    plain = build_optimizer(model, "torch.optim.SGD", lr=0.1)
    assert plain.defaults["momentum"] == 0
    with pytest.raises(ValueError, match=r"optimizer arguments \['params'\]"):
        build_optimizer(model, "torch.optim.SGD", lr=0.1, params=[])
    with pytest.raises(ValueError, match="ReduceLROnPlateau is not supported"):
        build_lr_scheduler(sgd, "torch.optim.lr_scheduler.ReduceLROnPlateau", 10)
    linear = build_lr_scheduler(sgd, "torch.optim.lr_scheduler.LinearLR", 10, total_iters=4)
    assert linear.total_iters == 4  # given arguments are kept
    assert component_path(torch.optim.AdamW, "optimizer") == "torch.optim.adamw.AdamW"


def test_factored_optimizer_state_survives_resizes() -> None:
    """Adafactor's row/column moments are not slot-wise: a resized tensor restarts its state."""
    from adarank.allocation import BudgetSchedule, RankController

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 16))
    layers = add_adapters(model, ["0", "1"], 4, seed=0)
    opt = build_optimizer(model, "torch.optim.Adafactor", lr=1e-2)
    schedule = BudgetSchedule.from_fractions(4 * 33, 40, interval=2)
    ctrl = RankController(layers, schedule, optimizer=opt)
    start = ctrl.ranks()
    for step in range(1, 41):
        (model(torch.randn(8, 16)).pow(2).mean() + ctrl.regularizer()).backward()
        ctrl.observe()
        opt.step()
        ctrl.step(step)
        opt.zero_grad()
    assert ctrl.ranks() != start and sum(e.pruned != {} for e in ctrl.history) > 0
    for layer in layers.values():  # every live tensor is optimised with state of its shape
        state = opt.state[layer.lora_P]
        assert state and all(v.dim() == 0 or v.shape[0] in (16, 1) for v in state.values())
