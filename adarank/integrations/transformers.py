"""``AdaRankCallback``: rank allocation under a parameter budget inside the Hugging Face ``Trainer``.

For ``transformers.Trainer`` and the trainers built on it (TRL's ``SFTTrainer``)::

    AdaRankCallback(trainer, budget=...)   registers itself; hooks the model's load_state_dict
    trainer.train(resume_from_checkpoint=...)
        model weights loaded       adapter layers first resized to the checkpoint's ranks
        on_train_begin             schedule from state.max_steps; RankController attached to the
                                   torch optimizer inside accelerate's AcceleratedOptimizer;
                                   controller state restored when resuming
        backward × gradient_accumulation_steps, gradient clipping
        on_pre_optimizer_step      controller.observe()   (gradients complete)
        optimizer.step()
        on_optimizer_step          controller.step(global_step + 1): prune / grow, optimizer
                                   param groups and state re-indexed
        lr_scheduler.step(), zero_grad(), global_step += 1
        on_step_end                after an allocation: {"rank/<module>": ...} to every
                                   ``report_to`` integration and ``state.log_history``
        checkpoint-N/ written      on_save: ``adarank_adapter/`` + ``adarank_state.pt``

Steps are optimizer steps (the hooks run once per step whatever the gradient accumulation);
``global_step + 1`` counts the steps taken including the current one, as the controller expects.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from adarank.allocation import AllocationEvent, BudgetSchedule, RankController, resolve_budget
from adarank.allocation.budget import SCHEDULE_DEFAULTS
from adarank.allocation.controller import CONTROLLER_DEFAULTS
from adarank.integrations.hf_state import (
    ADAPTER_DIR,
    STATE_NAME,
    STATE_VERSION,
    check_state,
    layer_info,
    read_state,
    resize_before_load,
    resize_layers,
)
from adarank.modules import adapter_layers, count_parameters, save_adapter

__all__ = [
    "ADAPTER_DIR",
    "STATE_NAME",
    "AdaRankCallback",
    "event_metrics",
    "read_state",
    "unwrap_optimizer",
]

#: callbacks that print every log to the console (transformers' and TRL's)
_CONSOLE_CALLBACKS = ("PrinterCallback", "ProgressCallback")


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside wrappers such as accelerate's ``AcceleratedOptimizer``.

    Raises:
        TypeError: no ``torch.optim.Optimizer`` is found.
    """
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"expected a torch optimizer (or a wrapper with .optimizer), got {type(optimizer)!r}"
        )
    return optimizer


def event_metrics(event: AllocationEvent) -> dict[str, float]:
    """The metrics logged for one allocation (the keys of the Lightning integration)."""
    metrics = {
        "budget/target_params": float(event.target_params),
        "budget/live_params": float(event.live_params),
        "alloc/pruned": float(event.n_pruned),
        "alloc/grown": float(event.n_grown),
    }
    metrics.update({f"score/{k}": float(v) for k, v in event.score_summary.items()})
    metrics.update({f"rank/{name}": float(rank) for name, rank in event.ranks.items()})
    return metrics


def _check_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for name, layer in adapter_layers(model).items():
        if any(id(p) not in held for p in (layer.lora_P, layer.lora_lambda, layer.lora_Q)):
            raise ValueError(
                f"the Trainer's optimizer does not hold the adapter parameters of {name!r}: an "
                "optimizer passed to the Trainer must be built from the model's parameters after "
                "AdaRankCallback.prepare_resume (or let the Trainer create the optimizer)"
            )


class AdaRankCallback(TrainerCallback):
    """Allocate adapter ranks under a parameter budget while a ``Trainer`` trains.

    Build the Trainer first, then the callback (it adds itself to the Trainer)::

        trainer = Trainer(model=model, args=args, train_dataset=train)
        AdaRankCallback(trainer, budget="0.5%")
        trainer.train()

    Args:
        trainer: a ``transformers.Trainer`` (or subclass, e.g. TRL's ``SFTTrainer``) whose model
            already has adapters (:func:`adarank.add_adapters`).
        budget: final adapter parameters b_T: an int, ``"150k"`` or a percentage of the frozen
            base parameters (``"0.5%"``).
        init_budget_ratio: b_0 / b_T, the budget during warm-up.
        warmup_frac: fraction of the optimizer steps before the first allocation.
        final_frac: fraction of the steps at the end with the rank pattern frozen.
        warmup_steps: warm-up in steps (overrides ``warmup_frac``).
        final_steps: final phase in steps (overrides ``final_frac``).
        interval: optimizer steps between allocations.
        decay: budget decay ``"cubic"``, ``"linear"`` or ``"constant"``.
        min_rank: lower bound on every layer's rank.
        max_rank: upper bound on every layer's rank (None: each layer's capacity).
        scorer: importance score (``"energy"``, ``"sensitivity"``, ``"magnitude"``).
        grow: allow growing new triplets (else prune only).
        retract: re-orthonormalise P and Q exactly after every optimizer step, keeping ΔW.
        denoise_growth: score growth candidates by what stands above the batch's gradient noise.
        seed: seed of the growth sketches (None: ``args.seed``).
        log_ranks: log ``rank/<module>`` and ``budget/*`` at every allocation.

    Attributes:
        controller: the :class:`~adarank.allocation.RankController` (None before training).
        schedule: its :class:`~adarank.allocation.BudgetSchedule` (length ``state.max_steps``).
        param_budget: the resolved final budget in parameters.
        base_params: frozen base-model parameters.
    """

    def __init__(
        self,
        trainer: Any,
        budget: int | float | str,
        *,
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
        retract: bool = CONTROLLER_DEFAULTS["retract"],
        denoise_growth: bool = CONTROLLER_DEFAULTS["denoise_growth"],
        seed: int | None = None,
        log_ranks: bool = True,
    ) -> None:
        model = getattr(trainer, "model", None)
        if not isinstance(model, nn.Module) or not hasattr(trainer, "add_callback"):
            raise TypeError(
                f"trainer must be a transformers Trainer with a model, got {type(trainer)!r}"
            )
        if getattr(trainer, "model_init", None) is not None:
            raise ValueError(
                "AdaRankCallback does not support Trainer(model_init=...): the model is rebuilt "
                "at train(); pass a model with adapters instead"
            )
        if not adapter_layers(model):
            raise ValueError(
                "the Trainer's model has no adapter layers: call adarank.add_adapters(model, ...) "
                "before building the Trainer"
            )
        self.trainer = trainer
        self.model = model
        self.base_params = count_parameters(model)["base"]
        self.param_budget = resolve_budget(budget, self.base_params)
        self.schedule_options = {
            "init_budget_ratio": init_budget_ratio,
            "warmup_frac": warmup_frac,
            "final_frac": final_frac,
            "warmup_steps": warmup_steps,
            "final_steps": final_steps,
            "interval": interval,
            "decay": decay,
        }
        self.controller_options = {
            "scorer": scorer,
            "min_rank": min_rank,
            "max_rank": max_rank,
            "grow": grow,
            "retract": retract,
            "denoise_growth": denoise_growth,
        }
        # everything but the run's length (known at train()) is checked now
        probe = RankController(adapter_layers(model), None, **self.controller_options)
        try:
            sched = BudgetSchedule.from_fractions(self.param_budget, 10**9, **self.schedule_options)
            sched.check_bounds(probe.min_params(), probe.max_params())
        finally:
            probe.close()  # takes its capture hooks off the layers again
        self.seed = seed
        self.log_ranks = bool(log_ranks)
        self.controller: RankController | None = None
        self.schedule: BudgetSchedule | None = None
        self._pending: dict | None = None
        self._event: AllocationEvent | None = None
        self._hook = model.register_load_state_dict_pre_hook(resize_before_load)
        trainer.add_callback(self)

    # ------------------------------------------------------------------ public helpers
    @property
    def history(self) -> list[AllocationEvent]:
        """Every allocation so far (restored on resume)."""
        return [] if self.controller is None else self.controller.history

    def state_dict(self) -> dict:
        """What ``checkpoint-N/adarank_state.pt`` holds (``torch.load(weights_only=True)``)."""
        return {
            "version": STATE_VERSION,
            "global_step": 0 if self.controller is None else self.controller.global_step,
            "param_budget": self.param_budget,
            "base_params": self.base_params,
            "layers": layer_info(self.model),
            "controller": None if self.controller is None else self.controller.state_dict(),
        }

    def save(self, checkpoint_dir: str | os.PathLike) -> None:
        """Write ``adarank_adapter/`` and ``adarank_state.pt`` into ``checkpoint_dir``."""
        out, state = Path(checkpoint_dir), self.state_dict()
        metadata = {"param_budget": self.param_budget, "step": state["global_step"]}
        save_adapter(self.model, out / ADAPTER_DIR, metadata=metadata)
        tmp = out / f".{STATE_NAME}.tmp"
        torch.save(state, tmp)
        os.replace(tmp, out / STATE_NAME)

    def prepare_resume(self, checkpoint_dir: str | os.PathLike) -> None:
        """Resize the adapter layers to ``checkpoint_dir``'s ranks and stage its controller state.

        Needed only when the checkpoint is not ``args.output_dir/checkpoint-<step>`` (e.g. it
        was copied from another run); call it before ``trainer.train(resume_from_checkpoint=
        checkpoint_dir)``.

        Raises:
            FileNotFoundError / ValueError: no adarank state there, or one from another model
                or budget.
        """
        state = read_state(checkpoint_dir)
        check_state(state, self.model, self.param_budget, Path(checkpoint_dir) / STATE_NAME)
        layers = state["layers"]
        resize_layers(
            self.model,
            {n: int(c["rank"]) for n, c in layers.items()},
            {n: int(c["shift_rank"]) for n, c in layers.items()},
        )
        self._pending = state

    # ------------------------------------------------------------------ Trainer hooks
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._check_setup(args, model)
        self.schedule = BudgetSchedule.from_fractions(
            self.param_budget, int(state.max_steps), **self.schedule_options
        )
        torch_optimizer = unwrap_optimizer(optimizer)
        _check_optimizer(torch_optimizer, self.model)
        if self.controller is not None:  # a previous train() call's hooks come off
            self.controller.close()
        self.controller = RankController(
            adapter_layers(self.model),
            self.schedule,
            optimizer=torch_optimizer,
            seed=args.seed if self.seed is None else self.seed,
            **self.controller_options,
        )
        self._event = None
        if state.global_step > 0:
            self._restore(args, int(state.global_step))

    def _check_setup(self, args, model) -> None:
        if model is not None and model is not self.model:
            raise ValueError("the Trainer's model is not the one AdaRankCallback was built with")
        trainer = self.trainer
        sharded = getattr(trainer, "is_deepspeed_enabled", False) or getattr(
            trainer, "is_fsdp_enabled", False
        )
        if sharded or args.world_size > 1:
            raise ValueError(
                "AdaRankCallback runs in a single process: pruning and growing replace adapter "
                "parameters, which DistributedDataParallel, FSDP and DeepSpeed wrappers created "
                "by the Trainer cannot follow. Use adarank.lightning (DDP supported) for "
                f"multi-GPU training (world_size={args.world_size}, sharded={bool(sharded)})"
            )

    def _restore(self, args, step: int) -> None:
        state = self._pending
        if state is None:
            ckpt = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{step}"
            if not (ckpt / STATE_NAME).is_file():
                raise ValueError(
                    f"training resumes at step {step} but {ckpt / STATE_NAME} does not exist; "
                    "for a checkpoint outside args.output_dir call "
                    "callback.prepare_resume(checkpoint_dir) before trainer.train("
                    "resume_from_checkpoint=checkpoint_dir)"
                )
            state = read_state(ckpt)
            check_state(state, self.model, self.param_budget, ckpt / STATE_NAME)
        if state["global_step"] != step:
            raise ValueError(
                f"the adarank state is from step {state['global_step']} but the Trainer resumes "
                f"at step {step}; pass the same checkpoint to prepare_resume and train"
            )
        self.controller.load_state_dict(state["controller"])
        self._pending = None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.controller is not None:
            self.controller.observe()

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.controller is not None:
            # the Trainer increments global_step after this hook: +1 = steps taken incl. this one
            self._event = self.controller.step(int(state.global_step) + 1)

    def on_step_end(self, args, state, control, **kwargs):
        event, self._event = self._event, None
        if event is not None and self.log_ranks:
            self._report(args, state, control, event_metrics(event))

    def _report(self, args, state, control, metrics: dict[str, float]) -> None:
        """Send ``metrics`` at this step to every logging callback except the console printers.

        Unlike ``Trainer.log`` this neither resets ``control.should_log`` (the step's loss log)
        nor takes the metrics a trainer accumulates for its next log (TRL's ``SFTTrainer``), and
        the console is not flooded with one rank per module.
        """
        state.log_history.append({**metrics, "epoch": state.epoch, "step": state.global_step})
        handler = self.trainer.callback_handler
        every = handler.callbacks
        handler.callbacks = [
            cb
            for cb in every
            if cb is not self and not type(cb).__name__.endswith(_CONSOLE_CALLBACKS)
        ]
        try:
            handler.call_event("on_log", args, state, control, logs=dict(metrics))
        finally:
            handler.callbacks = every

    def on_save(self, args, state, control, **kwargs):
        if self.controller is None or not args.should_save:
            return
        ckpt = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if ckpt.is_dir():
            self.save(ckpt)
