"""``AdaRankModule``: a LightningModule that trains adapters and re-allocates their ranks.

Where each piece of AdaRank (Zhang et al. 2023, §3) happens in Lightning's loop::

    training_step          task loss + γ·R(P, Q)  (orthogonality term, Eq. 4; logged separately)
    backward (× accumulate_grad_batches)
    on_before_optimizer_step   non-finite check (divergence.py), then controller.observe()
                               (gradients complete: after accumulation and AMP unscaling)
    optimizer_step         optimizer.step(); non-finite check of the parameters;
                           controller.step(global_step)  (prune / grow, §3.3)
                           → under DDP: decisions checked equal on all processes, DDP re-wrapped
    callbacks' on_train_batch_end   (loggers and checkpoints see the new ranks)

``global_step`` counts optimizer steps, never micro-batches, so gradient accumulation changes
neither the schedule nor the decisions. The controller is built in ``configure_optimizers``,
when ``trainer.estimated_stepping_batches`` gives the schedule's length.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from typing_extensions import override

from adarank.allocation import BudgetSchedule, resolve_budget
from adarank.allocation.budget import SCHEDULE_DEFAULTS
from adarank.allocation.controller import CONTROLLER_DEFAULTS
from adarank.allocation.regularizer import orthogonality_penalty
from adarank.lightning import checkpointing, distributed
from adarank.lightning.divergence import NonFiniteGuard
from adarank.lightning.optim import (
    OPTIMIZERS,
    build_lr_scheduler,
    build_optimizer,
    component_path,
    import_component,
    linear_warmup_decay,
)
from adarank.lightning.tasks import build_metrics, check_task, compute_metrics, run_task
from adarank.lightning.tasks import update_metrics as _update_metrics
from adarank.modules import adapter_layers, count_parameters

__all__ = ["OPTIMIZER_DEFAULTS", "SCHEDULE_ARGS", "AdaRankModule"]

#: the one definition of the optimizer defaults of :class:`AdaRankModule`, read by the config
#: schema (``adarank.config.structured``); lr 3e-3 with ``add_adapters``' scaling 16 is what the
#: shipped transformer recipes train with
OPTIMIZER_DEFAULTS = {
    "optimizer": "adamw",
    "lr": 3e-3,
    "head_lr": None,
    "weight_decay": 0.0,
    "lambda_weight_decay": 0.0,
    "warmup_ratio": 0.06,
    "nonfinite": "fail",
    "max_skipped_steps": 10,
}

#: ``AdaRankModule`` arguments passed to :meth:`BudgetSchedule.from_fractions`
SCHEDULE_ARGS = (
    "init_budget_ratio",
    "warmup_frac",
    "final_frac",
    "warmup_steps",
    "final_steps",
    "interval",
    "decay",
)


def _batch_size(batch: Any) -> int:
    if torch.is_tensor(batch):
        return int(batch.shape[0])
    if isinstance(batch, (tuple, list)) and batch:
        return _batch_size(batch[0])
    if isinstance(batch, dict):
        for key in ("input_ids", "x", "inputs", "labels"):
            if key in batch:
                return _batch_size(batch[key])
        return _batch_size(next(iter(batch.values())))
    return 1


def _check_frac(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
        raise ValueError(f"{name}={value!r} must be a fraction in [0, 1)")


class AdaRankModule(pl.LightningModule):
    """Train a model that has SVD-LoRA adapters, with ranks allocated under a parameter budget.

    Args:
        model: a ``torch.nn.Module`` (transformers models included) with adapters already added
            (:func:`adarank.add_adapters`).
        task: ``"classification"``, ``"causal_lm"`` or ``"regression"``
            (see :mod:`adarank.lightning.tasks` for batches, losses and metric keys).
        budget: final adapter parameter budget b_T — an int, ``"150k"`` or a percentage of the
            frozen base parameters (``"0.5%"``); None trains at fixed ranks (allocation off).
        init_budget_ratio: b_0 / b_T, the budget during warm-up (AdaLoRA uses ≈ 1.5).
        warmup_frac: fraction of the optimizer steps before the first allocation (t_w).
        final_frac: fraction of steps at the end with the rank pattern frozen (t_f).
        warmup_steps: t_w in steps (overrides ``warmup_frac``).
        final_steps: t_f in steps (overrides ``final_frac``).
        interval: ΔT, optimizer steps between allocations.
        decay: budget decay ``"cubic"``, ``"linear"`` or ``"constant"``.
        min_rank: lower bound on every layer's rank.
        max_rank: upper bound on every layer's rank (None: each layer's capacity).
        scorer: importance score name passed to the controller (e.g. ``"energy"``).
        grow: allow growing new triplets (else prune only).
        orth_reg: γ of the orthogonality regulariser (0 disables it).
        retract: re-orthonormalise P and Q exactly after every optimizer step, keeping ΔW
            (``RankController(retract=...)``; with allocation on).
        denoise_growth: score growth candidates by what stands above the batch's gradient noise
            (``RankController(denoise_growth=...)``, docs/theory.md).
        lr: learning rate of the adapters (default 3e-3, for ``add_adapters``' default
            scaling 16; defaults of the optimizer options: :data:`OPTIMIZER_DEFAULTS`, of the
            schedule: ``SCHEDULE_DEFAULTS``, of the allocation: ``CONTROLLER_DEFAULTS``).
        head_lr: learning rate of the ``modules_to_save`` parameters (default ``lr``).
        weight_decay: weight decay of P, Q and head matrices (never of λ, biases, norms).
        lambda_weight_decay: decoupled weight decay of λ alone: bounds each singular value of
            ΔW near ``scaling / lambda_weight_decay`` whatever the learning rate (see
            :mod:`adarank.lightning.optim`); 0 turns it off.
        optimizer: ``"adamw"``, ``"adam"``, ``"sgd"``, or an optimizer class (or its import
            path, e.g. ``"torch.optim.RAdam"``) called with the parameter groups (adapter /
            λ without weight decay / head; see :mod:`adarank.lightning.optim`).
        warmup_ratio: fraction of steps of linear learning-rate warm-up (then linear decay);
            the built-in schedule, used when ``lr_scheduler`` is None.
        optimizer_args: further keyword arguments of the optimizer (``betas``, ``eps``, ...).
        lr_scheduler: a learning-rate scheduler class or factory (or its import path), called
            as ``lr_scheduler(optimizer, **lr_scheduler_args)`` and stepped every optimizer
            step; its ``total_steps`` / ``num_training_steps`` / ``T_max`` argument gets the
            run's steps unless given. None: linear warm-up and decay (``warmup_ratio``).
        lr_scheduler_args: keyword arguments of ``lr_scheduler``.
        total_steps: optimizer steps of the run; None uses ``trainer.estimated_stepping_batches``.
        num_classes: classes for classification metrics (default ``model.config.num_labels``).
        nonfinite: a step with a non-finite loss, gradient or updated parameter ``"fail"``s the
            run (``TrainingDiverged``; the last finite parameters are kept) or is ``"skip"``ped
            (see :mod:`adarank.lightning.divergence`).
        max_skipped_steps: most steps ``"skip"`` may drop before the run fails.

    Attributes:
        controller: the ``RankController`` (None before ``configure_optimizers`` and when
            ``budget`` is None).
        guard: the :class:`~adarank.lightning.divergence.NonFiniteGuard` (skipped steps,
            initial loss).
        param_budget: the resolved final budget in parameters (None: allocation off).
        base_params: number of frozen base-model parameters.
    """

    def __init__(
        self,
        model: nn.Module,
        task: str,
        *,
        budget: int | float | str | None = None,
        init_budget_ratio: float = SCHEDULE_DEFAULTS["init_budget_ratio"],
        warmup_frac: float = SCHEDULE_DEFAULTS["warmup_frac"],
        final_frac: float = SCHEDULE_DEFAULTS["final_frac"],
        warmup_steps: int | None = None,
        final_steps: int | None = None,
        interval: int = SCHEDULE_DEFAULTS["interval"],
        decay: str = SCHEDULE_DEFAULTS["decay"],
        min_rank: int = CONTROLLER_DEFAULTS["min_rank"],
        max_rank: int | None = CONTROLLER_DEFAULTS["max_rank"],
        scorer: str = CONTROLLER_DEFAULTS["scorer"],
        grow: bool = CONTROLLER_DEFAULTS["grow"],
        orth_reg: float = CONTROLLER_DEFAULTS["orth_reg"],
        retract: bool = CONTROLLER_DEFAULTS["retract"],
        denoise_growth: bool = CONTROLLER_DEFAULTS["denoise_growth"],
        lr: float = OPTIMIZER_DEFAULTS["lr"],
        head_lr: float | None = OPTIMIZER_DEFAULTS["head_lr"],
        weight_decay: float = OPTIMIZER_DEFAULTS["weight_decay"],
        lambda_weight_decay: float = OPTIMIZER_DEFAULTS["lambda_weight_decay"],
        optimizer: str | type[torch.optim.Optimizer] = OPTIMIZER_DEFAULTS["optimizer"],
        warmup_ratio: float = OPTIMIZER_DEFAULTS["warmup_ratio"],
        optimizer_args: dict | None = None,
        lr_scheduler: str | Callable | None = None,
        lr_scheduler_args: dict | None = None,
        total_steps: int | None = None,
        num_classes: int | None = None,
        nonfinite: str = OPTIMIZER_DEFAULTS["nonfinite"],
        max_skipped_steps: int = OPTIMIZER_DEFAULTS["max_skipped_steps"],
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.task = check_task(task)
        if not adapter_layers(model):
            raise ValueError(
                "model has no adapter layers: call adarank.add_adapters(model, ...) first"
            )
        # hyper-parameters keep import paths: checkpoints load with weights_only=True
        optimizer = component_path(optimizer, "optimizer")
        if optimizer not in OPTIMIZERS:
            if "." not in optimizer:
                raise ValueError(
                    f"optimizer={optimizer!r} must be one of {list(OPTIMIZERS)} or an optimizer "
                    "class (or its import path)"
                )
            import_component(optimizer, "optimizer")
        if lr_scheduler is not None:
            lr_scheduler = component_path(lr_scheduler, "lr_scheduler")
            import_component(lr_scheduler, "lr_scheduler")
        optimizer_args = dict(optimizer_args or {})
        lr_scheduler_args = dict(lr_scheduler_args or {})
        for name, value in (("warmup_frac", warmup_frac), ("final_frac", final_frac)):
            _check_frac(name, value)
        _check_frac("warmup_ratio", warmup_ratio)
        if not (math.isfinite(init_budget_ratio) and init_budget_ratio >= 1.0):
            raise ValueError(f"init_budget_ratio={init_budget_ratio} must be >= 1")
        if orth_reg < 0:
            raise ValueError(f"orth_reg={orth_reg} must be >= 0")
        if not isinstance(retract, bool):
            raise TypeError(f"retract={retract!r}: expected True or False")
        if not isinstance(denoise_growth, bool):
            raise TypeError(f"denoise_growth={denoise_growth!r}: expected True or False")
        if total_steps is not None and (isinstance(total_steps, bool) or int(total_steps) < 1):
            raise ValueError(f"total_steps={total_steps!r} must be a positive int or None")
        self.guard = NonFiniteGuard(nonfinite, max_skipped_steps)
        self._step_updates = True  # whether the coming optimizer step changes the adapters
        self.model = model
        self.base_params = count_parameters(model)["base"]
        self.param_budget = None if budget is None else resolve_budget(budget, self.base_params)
        if self.task == "classification" and num_classes is None:
            num_classes = getattr(getattr(model, "config", None), "num_labels", None)
        self.val_metrics = build_metrics(self.task, num_classes)
        self.save_hyperparameters(ignore=["model"])
        self.controller = None
        self.schedule: BudgetSchedule | None = None
        self._pending_controller_state: dict | None = None
        self._pending_rng_state: dict | None = None
        self._rng_after_batch: dict | None = None  # global RNGs at the last training batch's end

    # ------------------------------------------------------------------ forward / steps
    @override
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def regularizer(self) -> torch.Tensor:
        """γ-weighted orthogonality term (Eq. 4); a zero tensor when γ = 0."""
        if self.controller is not None:
            return self.controller.regularizer()
        return orthogonality_penalty(adapter_layers(self.model).values(), self.hparams.orth_reg)

    @override
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        out = run_task(self.task, self.model, batch)
        reg = self.regularizer().to(out.loss.device)
        bs = _batch_size(batch)
        self.guard.note_loss(out.loss)
        self.log("train/loss", out.loss.detach(), prog_bar=True, batch_size=bs)
        self.log("train/orth_reg", reg.detach().float(), batch_size=bs)
        return out.loss + reg

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        out = run_task(self.task, self.model, batch)
        _update_metrics(self.task, self.val_metrics, out)

    @override
    def on_validation_epoch_end(self) -> None:
        metrics = compute_metrics(self.task, self.val_metrics, prefix="val")
        self.log_dict(metrics, prog_bar=True)

    # ------------------------------------------------------------------ optimizer / controller
    def _total_steps(self) -> int:
        if self.hparams.total_steps is not None:
            return int(self.hparams.total_steps)
        est = self.trainer.estimated_stepping_batches
        if not math.isfinite(est) or est < 1:
            raise ValueError(
                f"cannot infer the schedule length (trainer.estimated_stepping_batches={est}); "
                "set max_steps/max_epochs on the Trainer or pass total_steps"
            )
        return int(est)

    def _build_schedule(self, total: int) -> BudgetSchedule:
        hp = self.hparams
        return BudgetSchedule.from_fractions(
            self.param_budget,
            int(total),
            **{k: hp[k] for k in SCHEDULE_ARGS},
        )

    @override
    def configure_optimizers(self) -> dict:
        hp = self.hparams
        optimizer = build_optimizer(
            self.model,
            hp.optimizer,
            lr=hp.lr,
            head_lr=hp.head_lr,
            weight_decay=hp.weight_decay,
            lambda_weight_decay=hp.lambda_weight_decay,
            **hp.optimizer_args,
        )
        total = self._total_steps()
        if hp.lr_scheduler is not None:
            scheduler = build_lr_scheduler(
                optimizer, hp.lr_scheduler, total, **hp.lr_scheduler_args
            )
        else:
            lr_lambda = functools.partial(
                linear_warmup_decay, total_steps=total, warmup_ratio=hp.warmup_ratio
            )
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
        if self.controller is not None:  # configured again (another fit): its hooks come off
            self.controller.close()
        self.controller = None
        if self.param_budget is not None:
            from adarank.allocation import RankController

            self.schedule = self._build_schedule(total)
            self.controller = RankController(
                adapter_layers(self.model),
                self.schedule,
                scorer=hp.scorer,
                min_rank=hp.min_rank,
                max_rank=hp.max_rank,
                grow=hp.grow,
                orth_reg=hp.orth_reg,
                retract=hp.retract,
                denoise_growth=hp.denoise_growth,
            )
            self.controller.attach_optimizer(optimizer)
            if self._pending_controller_state is not None:
                self.controller.load_state_dict(self._pending_controller_state)
                self._pending_controller_state = None
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }

    @override
    def setup(self, stage: str) -> None:
        checkpointing.check_strategy(self.trainer, allocation=self.param_budget is not None)
        if self.trainer.world_size > 1:
            distributed.ignore_empty_parameters(self)

    def _trainable(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    @override
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        step = int(self.trainer.global_step) + 1
        params = self._trainable()
        # "fail" raises here, before the update; "skip" drops the step's gradients below
        finite = self.guard.before_update(params, step, check_grads=scaler is None)
        self._step_updates = finite  # a skipped step leaves the factors alone: no retraction
        if self.controller is not None:
            # all-reduces its statistics under torch.distributed; ignores non-finite ones
            self.controller.observe()
        if not finite:
            for p in params.values():  # the optimizer leaves parameters without gradients alone
                p.grad = None

    @override
    def optimizer_step(
        self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None
    ) -> None:
        optimizer.step(closure=optimizer_closure)
        self.guard.after_update(self._trainable(), int(self.trainer.global_step) + 1)
        self.after_optimizer_step()

    def after_optimizer_step(self) -> Any:
        """Run the allocation for the optimizer step just taken; returns the event or None."""
        if self.controller is None:
            return None
        # Lightning counts the step as completed only after this hook returns: +1 so that the
        # controller gets the number of optimizer steps taken including this one
        step = int(self.trainer.global_step) + 1
        before = [id(p) for p in self.model.parameters()]
        event = self.controller.step(step, updated=self._step_updates)
        if event is not None:
            distributed.check_same_decision(self, step, self.controller.ranks())
        if [id(p) for p in self.model.parameters()] != before:
            distributed.rewrap_ddp(self.trainer, self)
        self.log("live_params", float(self.controller.live_params()), prog_bar=True, logger=False)
        self.log("budget", float(self.schedule.budget(step)), prog_bar=True, logger=False)
        return event

    # ------------------------------------------------------------------ checkpoints
    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # only what training changes: the frozen base is rebuilt from the config on resume
        sd = checkpoint.get("state_dict")
        if isinstance(sd, dict):
            checkpoint["state_dict"] = checkpointing.trainable_state_dict(self, sd)
        checkpoint[checkpointing.KEY] = checkpointing.adarank_state(self)
        rng = checkpointing.rng_state()
        if checkpointing.reconcile_stopped_epoch(checkpoint) and self._rng_after_batch:
            # written after fit stopped: resume as from the last batch's end, before any
            # validation that followed it (which the resumed loop runs again)
            rng = self._rng_after_batch
        checkpoint[checkpointing.RNG_KEY] = rng

    @override
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._rng_after_batch = checkpointing.rng_state()

    @override
    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """Load a state dict; the frozen base parameters may be absent (checkpoints omit them).

        Raises:
            ValueError: ``strict`` and any other tensor is missing, unexpected or misshapen.
        """
        if strict:
            problem = checkpointing.check_state_dict(self, state_dict)
            if problem:
                raise ValueError(f"state dict does not match the model: {problem}")
        return super().load_state_dict(state_dict, strict=False, assign=assign)

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpointing.reconcile_stopped_epoch(checkpoint)  # loops are restored after this hook
        self._pending_controller_state = checkpointing.restore_layers(self, checkpoint)
        if self._trainer is not None and self.trainer.world_size > 1:
            # restored before DDP wraps the module (after setup): rank-0 layers stay out of it
            distributed.ignore_empty_parameters(self)
        self.guard.load_state_dict(checkpoint[checkpointing.KEY].get("guard"))
        self._pending_rng_state = checkpoint.get(checkpointing.RNG_KEY)

    @override
    def on_train_start(self) -> None:
        # global RNGs as at the save: the resumed run draws the same dropout masks
        if self._pending_rng_state is not None:
            checkpointing.set_rng_state(self._pending_rng_state)
            self._pending_rng_state = None
