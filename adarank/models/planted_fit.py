"""Train adapters on a :class:`PlantedTask` with a plain PyTorch loop (adaptive or uniform).

This is the loop the README shows: ``observe()`` after backward, ``step()`` after the optimizer.
Used by ``scripts/bench_planted.py`` and the tests.
"""

from __future__ import annotations

import copy
import time

import torch

from adarank.allocation import BudgetSchedule, RankController
from adarank.allocation.budget import SCHEDULE_DEFAULTS, schedule_points
from adarank.allocation.controller import CONTROLLER_DEFAULTS
from adarank.models.planted import PlantedTask
from adarank.modules import add_adapters, count_parameters

__all__ = ["fit_planted", "uniform_rank_for_budget"]


def uniform_rank_for_budget(task: PlantedTask, budget: int) -> int:
    """Largest uniform rank whose parameter count does not exceed ``budget``."""
    per_rank = sum(2 * d + 1 for d in task.dims)
    return max(0, min(budget // per_rank, min(task.dims)))


def fit_planted(
    task: PlantedTask,
    method: str = "adaptive",
    *,
    budget: int | None = None,
    steps: int = 3000,
    batch_size: int = 256,
    lr: float = 5e-3,
    init_rank: int | None = None,
    interval: int = 25,
    warmup_frac: float = SCHEDULE_DEFAULTS["warmup_frac"],
    final_frac: float = 0.25,
    scorer: str = CONTROLLER_DEFAULTS["scorer"],
    grow: bool = True,
    orth_reg: float = 0.1,
    denoise_growth: bool = CONTROLLER_DEFAULTS["denoise_growth"],
    seed: int = 0,
) -> dict:
    """Train on ``task`` and report held-out error, ranks and parameter counts.

    Args:
        task: the planted task (its base model is copied, not modified).
        method: ``"adaptive"`` (RankController under the budget) or ``"uniform"`` (fixed rank,
            the largest uniform rank within the budget, allocation off).
        budget: final adapter parameters; default the planted parameter count.
        steps, batch_size, lr: Adam training loop settings (lr decays linearly to 0).
        init_rank: adaptive start rank; default: uniform rank of 1.5 × budget.
        interval, warmup_frac, final_frac: schedule settings.
        scorer, grow, orth_reg, denoise_growth: controller settings.
        seed: seed of the adapter init and batch order.
    """
    if method not in ("adaptive", "uniform"):
        raise ValueError(f"method={method!r}: expected 'adaptive' or 'uniform'")
    budget = task.planted_params if budget is None else int(budget)
    model = copy.deepcopy(task.model)
    torch.manual_seed(seed)
    if method == "uniform":
        rank = uniform_rank_for_budget(task, budget)
    else:
        b0 = schedule_points(budget, steps)[0]
        rank = init_rank if init_rank is not None else uniform_rank_for_budget(task, b0)
    # scaling 1 (AdaLoRA's parametrisation): the planted benchmark's lr is tuned for it
    layers = add_adapters(model, ["re:blocks\\.\\d+"], rank, scaling=1.0, seed=seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    controller = None
    if method == "adaptive":
        schedule = BudgetSchedule.from_fractions(
            budget, steps, warmup_frac=warmup_frac, final_frac=final_frac, interval=interval
        )
        controller = RankController(
            layers,
            schedule,
            scorer=scorer,
            grow=grow,
            orth_reg=orth_reg,
            denoise_growth=denoise_growth,
            optimizer=opt,
            seed=seed,
        )
    gen = torch.Generator().manual_seed(seed)
    n = len(task.x_train)
    start = time.perf_counter()
    start_params = count_parameters(model)["adapter"]
    for step in range(1, steps + 1):
        for group in opt.param_groups:
            group["lr"] = lr * (1.0 - (step - 1) / steps)
        idx = torch.randint(0, n, (batch_size,), generator=gen)
        loss = task.loss(model(task.x_train[idx]), task.y_train[idx])
        if controller is not None:
            loss = loss + controller.regularizer()
        loss.backward()
        if controller is not None:
            controller.observe()
        opt.step()
        if controller is not None:
            controller.step(step)
        opt.zero_grad(set_to_none=True)
    wall = time.perf_counter() - start
    ranks = {name: layer.rank for name, layer in layers.items()}
    heldout = task.heldout_mse(model)
    return {
        "method": method,
        "seed": seed,
        "heldout_mse": heldout,
        "excess_mse": heldout - task.noise_floor,
        "ranks": ranks,
        "rank_recovery_error": task.rank_recovery_error(ranks),
        "live_params": count_parameters(model)["adapter"],
        "start_params": start_params,
        "param_budget": budget,
        "wall_s": wall,
        "alloc_s": controller.alloc_time_s if controller else 0.0,
        "allocator_state_bytes": controller.state_memory_bytes() if controller else 0,
        "model": model,
        "controller": controller,
    }
