"""Sharded training of the frozen base with rank allocation: the ``sharded_base`` strategy.

Under :class:`ShardedBaseStrategy` (``Trainer(strategy="sharded_base")``, ``adarank fit ...
trainer.strategy=sharded_base trainer.devices=N``) every process holds 1/N of each frozen base
parameter, sharded with PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``) over a
one-dimensional data-parallel device mesh, while the adapters stay whole on every process:

* **sharded** — exactly the parameters with ``requires_grad=False``: each module of
  :func:`shard_units` (the model's transformer blocks, named by Hugging Face's
  ``_no_split_modules``; otherwise the base layer of every adapter) becomes one FSDP unit, whose
  weights are all-gathered just before its forward (and again for its backward) and freed after;
  the model itself is the root unit and takes the remaining frozen parameters (embeddings, norms,
  heads);
* **replicated** — every trainable parameter (the adapter factors P, λ, Q and the
  ``modules_to_save``), passed to ``fully_shard`` as ``ignored_params``. They are ordinary
  tensors: the strategy averages their gradients over the processes after the backward pass,
  before ``on_before_optimizer_step`` (:func:`average_gradients`), as DDP would.

Allocation decisions stay identical on every process exactly as under DDP: the controller sums
its forward statistics over the processes (``RankController.observe``), reads the averaged
gradients, and :func:`adarank.lightning.distributed.check_same_decision` compares the decision
hashes. A prune or a growth replaces adapter parameters by new plain tensors of the new shape,
which FSDP never owned, so nothing is re-sharded or re-wrapped after a resize.

Checkpoints are the ordinary single-file, adapter-only checkpoints of
:mod:`adarank.lightning.checkpointing`: the sharded entries (the frozen base) are left out of the
module state dict, the optimizer state holds only replicated parameters, and process 0 writes the
file. A resume restores the adapters *before* the strategy shards the base, on the plain model
the run rebuilt from its config (the base fingerprint check and a data-aware init's shift work
unchanged).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry
from lightning.pytorch.strategies.strategy import Strategy
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn
from typing_extensions import override

from adarank.modules import adapter_layers

__all__ = [
    "STRATEGY_NAME",
    "ShardReport",
    "ShardedBaseStrategy",
    "average_gradients",
    "gathered",
    "is_sharded",
    "register_strategy",
    "replicated_parameters",
    "shard_frozen_base",
    "shard_units",
    "sharded_numel",
]

#: the ``trainer.strategy`` name under which :class:`ShardedBaseStrategy` is registered
STRATEGY_NAME = "sharded_base"


def _dtensor_type() -> type:
    from torch.distributed.tensor import DTensor

    return DTensor


def _fsdp_module_type() -> type:
    from torch.distributed.fsdp import FSDPModule

    return FSDPModule


def is_sharded(model: nn.Module) -> bool:
    """True when some module of ``model`` was passed to ``fully_shard``."""
    kind = _fsdp_module_type()
    return any(isinstance(m, kind) for m in model.modules())


def replicated_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The trainable parameters (adapters, ``modules_to_save``): kept whole on every process."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def shard_units(model: nn.Module) -> list[str]:
    """Names of the submodules that become FSDP units (the root, ``model``, comes on top).

    The modules whose class is listed in the model's ``_no_split_modules`` (Hugging Face's
    transformer blocks); for a model without that list, the base layer of every adapter layer.
    Nested units come before the units that contain them.
    """
    block_classes = set(getattr(model, "_no_split_modules", None) or ())
    if block_classes:
        names = [n for n, m in model.named_modules() if n and type(m).__name__ in block_classes]
    else:
        names = [f"{n}.base_layer" for n, layer in adapter_layers(model).items()]
    return sorted(names, key=lambda n: -n.count("."))


@dataclass
class ShardReport:
    """What :func:`shard_frozen_base` did.

    Attributes:
        units: the FSDP units, root last (``""``).
        sharded: names of the sharded (frozen) parameters.
        replicated: names of the replicated (trainable) parameters.
        local_numel: elements of the sharded parameters held by this process.
        global_numel: elements of the sharded parameters in the whole model.
        local_numel_per_process: ``local_numel`` of every process (filled in by the strategy).
    """

    units: list[str]
    sharded: list[str]
    replicated: list[str]
    local_numel: int
    global_numel: int
    local_numel_per_process: list[int] | None = None

    def summary(self) -> dict[str, Any]:
        """The ``sharded_base`` entry of a run's ``summary.json``."""
        return {
            "processes": len(self.local_numel_per_process or [self.local_numel]),
            "base_params": self.global_numel,
            "local_base_params": list(self.local_numel_per_process or [self.local_numel]),
            "units": len(self.units),
        }


def sharded_numel(model: nn.Module) -> tuple[int, int]:
    """``(elements held by this process, elements in total)`` of the sharded parameters."""
    kind = _dtensor_type()
    local = total = 0
    for p in model.parameters():
        if isinstance(p, kind):
            local += p.to_local().numel()
            total += p.numel()
    return local, total


def shard_frozen_base(
    model: nn.Module, mesh: Any, *, reshard_after_forward: bool = True
) -> ShardReport:
    """Shard every frozen parameter of ``model`` over ``mesh``; trainable ones stay whole.

    Calls ``fully_shard`` on each of :func:`shard_units` and then on ``model`` (the root), with
    the trainable parameters as ``ignored_params``. A model that is already sharded is left as
    it is (the report describes it).

    Args:
        model: the adapted model (frozen base, trainable adapters).
        mesh: a one-dimensional ``DeviceMesh`` of the data-parallel processes.
        reshard_after_forward: free each unit's gathered weights after its forward (FSDP2's
            option; the root keeps FSDP2's own default).

    Returns:
        a :class:`ShardReport`.
    """
    from torch.distributed.fsdp import fully_shard

    if is_sharded(model):  # (fully_shard renamed the classes: list the units it made)
        fsdp = _fsdp_module_type()
        units = [n for n, m in model.named_modules() if n and isinstance(m, fsdp)]
        units.sort(key=lambda n: -n.count("."))
    else:
        units = shard_units(model)
        ignored = set(replicated_parameters(model).values())
        for name in units:
            fully_shard(
                model.get_submodule(name),
                mesh=mesh,
                reshard_after_forward=reshard_after_forward,
                ignored_params=ignored,
            )
        fully_shard(model, mesh=mesh, ignored_params=ignored)
    kind = _dtensor_type()
    local, total = sharded_numel(model)
    return ShardReport(
        units=[*units, ""],
        sharded=[n for n, p in model.named_parameters() if isinstance(p, kind)],
        replicated=[n for n, p in model.named_parameters() if not isinstance(p, kind)],
        local_numel=local,
        global_numel=total,
    )


def average_gradients(params: list[nn.Parameter], group: Any = None) -> None:
    """Average the gradients of replicated parameters over the processes (one all-reduce).

    A parameter without a gradient on some processes counts as a zero gradient there; one that
    has no gradient on any process keeps ``grad=None`` (the optimizer skips it, as under DDP).
    Every process must pass the same parameters in the same order (identical allocation
    decisions guarantee it). No-op without ``torch.distributed`` or with one process.
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return
    world = dist.get_world_size(group)
    params = [p for p in params if p.numel()]
    if world <= 1 or not params:
        return
    device = params[0].device
    dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
    flat = [
        (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(device, dtype)
        for p in params
    ]
    has = torch.tensor([p.grad is not None for p in params], dtype=dtype, device=device)
    buf = torch.cat([*flat, has])  # summed in float32 at least (bf16 adapters included)
    dist.all_reduce(buf, group=group)
    counts = buf[-len(params) :].tolist()
    offset = 0
    for p, count in zip(params, counts):
        part = buf[offset : offset + p.numel()]
        offset += p.numel()
        if count > 0:
            grad = (part / world).view_as(p).to(p.dtype)
            if p.grad is None:
                p.grad = grad
            else:
                p.grad.copy_(grad)


@contextlib.contextmanager
def gathered(model: nn.Module) -> Iterator[None]:
    """Within the block, every FSDP unit of ``model`` holds its full (unsharded) weights.

    Collective: every process must enter it. Used around code that reads the base weights
    outside a forward pass on one process (the fingerprint of an adapter file). No-op for a
    model that is not sharded.
    """
    units = [m for m in model.modules() if isinstance(m, _fsdp_module_type())]
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()


class ShardedBaseStrategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` restricted to FSDP2 of the frozen base.

    Overrides of ``ModelParallelStrategy`` (and why):

    * ``setup_environment`` — a data-parallel mesh over all processes (``ModelParallelStrategy``'s
      ``"auto"`` puts the processes of a node on a tensor-parallel dimension): each process
      trains on its own share of the batch;
    * ``setup`` — shards the module's ``model`` with :func:`shard_frozen_base` itself (no
      ``configure_model`` hook needed), after the fingerprint of the base has been taken on the
      full weights, then moves the module and builds the optimizers;
    * ``restore_checkpoint_after_setup`` → False — the checkpoint is restored on the plain
      model before the base is sharded and before the optimizer exists (the adapters are
      resized to the saved ranks first, as under DDP);
    * checkpoint I/O (``lightning_module_state_dict``, ``optimizer_state``, ``save_checkpoint``,
      ``load_checkpoint``, ``load_model_state_dict``, ``load_optimizer_state_dict``,
      ``lightning_restore_optimizer``) — Lightning's single-file path: the state dict leaves
      out the sharded entries (the frozen base, which adarank checkpoints omit), the optimizer
      holds only replicated parameters, and process 0 writes the file;
    * ``optimizer_step`` — averages the replicated gradients right after the backward pass.

    Precision: ``32-true``, ``bf16-mixed``, ``bf16-true`` or ``16-true`` (Lightning's check).
    CPU processes communicate with gloo, GPUs with NCCL.
    """

    def __init__(self, *, reshard_after_forward: bool = True, **kwargs: Any) -> None:
        for key in ("data_parallel_size", "tensor_parallel_size", "save_distributed_checkpoint"):
            if key in kwargs:
                raise TypeError(
                    f"ShardedBaseStrategy({key}=...): not configurable (one data-parallel "
                    "dimension over all processes, single-file adapter-only checkpoints)"
                )
        super().__init__(save_distributed_checkpoint=False, **kwargs)
        self.reshard_after_forward = bool(reshard_after_forward)
        self.shard_report: ShardReport | None = None

    @override
    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        from adarank.lightning import checkpointing

        module = self.lightning_module
        self.accelerator.setup(trainer)
        self.model = self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        target = getattr(module, checkpointing.MODEL_ATTR, None)
        if not isinstance(target, nn.Module):
            raise TypeError(
                f"{STRATEGY_NAME}: the LightningModule ({type(module).__name__}) has no "
                f"'{checkpointing.MODEL_ATTR}' submodule to shard; use it with "
                "adarank.AdaRankModule"
            )
        if not is_sharded(target):
            # from the full weights, cached for every save (adapter files, checkpoints)
            checkpointing.base_fingerprint_of(module)
        self.shard_report = shard_frozen_base(
            target,
            self.device_mesh["data_parallel"],
            reshard_after_forward=self.reshard_after_forward,
        )
        local = torch.tensor([self.shard_report.local_numel], device=self.root_device)
        self.shard_report.local_numel_per_process = self.all_gather(local).flatten().tolist()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            _optimizers_to_device(self.optimizers, self.root_device)

    @property
    @override
    def restore_checkpoint_after_setup(self) -> bool:
        return False

    @property
    @override
    def lightning_restore_optimizer(self) -> bool:
        return True

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        kind = _dtensor_type()
        state = self.lightning_module.state_dict()
        return type(state)((k, v) for k, v in state.items() if not isinstance(v, kind))

    @override
    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return Strategy.optimizer_state(self, optimizer)

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None
    ) -> None:
        Strategy.save_checkpoint(self, checkpoint, filepath, storage_options)

    @override
    def load_checkpoint(
        self, checkpoint_path: Any, weights_only: bool | None = None
    ) -> dict[str, Any]:
        return Strategy.load_checkpoint(self, checkpoint_path, weights_only=weights_only)

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        Strategy.load_model_state_dict(self, checkpoint, strict=strict)

    @override
    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        Strategy.load_optimizer_state_dict(self, checkpoint)

    @override
    def optimizer_step(
        self,
        optimizer: torch.optim.Optimizer,
        closure: Callable[[], Any],
        model: pl.LightningModule | nn.Module | None = None,
        **kwargs: Any,
    ) -> Any:
        def closure_then_average() -> Any:
            result = closure()
            average_gradients(list(replicated_parameters(self.lightning_module).values()))
            return result

        return super().optimizer_step(optimizer, closure_then_average, model, **kwargs)


def register_strategy() -> None:
    """Register :class:`ShardedBaseStrategy` as ``strategy="sharded_base"`` (idempotent)."""
    if STRATEGY_NAME not in StrategyRegistry:
        StrategyRegistry.register(
            STRATEGY_NAME,
            ShardedBaseStrategy,
            description="FSDP2 of the frozen base, replicated adapters (adarank)",
        )


register_strategy()
