"""``adarank fit`` in several processes (``trainer.strategy=ddp|sharded_base trainer.devices=N``).

Lightning's DDP launcher starts processes 1 … N-1 when ``trainer.fit`` begins, by running the
command line of process 0 again with ``LOCAL_RANK``, ``NODE_RANK``, ``WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT`` set. Process 0 owns the run directory:

* it runs every check of :func:`adarank.runs.preflight` (bad input exits with code 2 before any
  other process exists), creates (or, for a restart, clears) the directory and writes
  ``config.yaml`` and ``labels.json``; then, just before ``trainer.fit``, it puts
  :data:`JOIN_ENV` = ``{"run_dir": ..., "ckpt": ... | null}`` in its environment, which the
  launched processes inherit (:func:`announce`);
* a launched process (:func:`join_request`: ``LOCAL_RANK`` > 0 and :data:`JOIN_ENV` set)
  ignores its command line, rebuilds the run from the ``config.yaml`` process 0 wrote and the
  same checkpoint (:func:`prepare_join`), and joins it: it trains and takes part in the
  collective steps after training (the final checkpoint, the final validation) but writes no
  file of the run;
* only process 0 writes checkpoints, ``adapter/``, the rank files and ``summary.json``. After
  the outcome is written (success, or a divergence, which every process detects at the same
  step) all processes meet at a barrier (:func:`barrier`), so no launched process exits before
  process 0 has finished writing (Lightning kills every process as soon as a launched one exits
  with a non-zero code, which also keeps process 0 from waiting forever on a failed one).

Exit codes are the same in every process: 0 success, 1 failed run, 2 bad input. Strategies that
start their processes with ``multiprocessing`` (``ddp_spawn``, ``ddp_fork``, ``ddp_notebook``)
hand only the weights of process 0 back to the first process, which cannot follow the ranks
the others allocated, and sharded strategies that own the adapters (FSDP, DeepSpeed) cannot
follow parameters that change shape: :func:`check_strategy` refuses both in the pre-flight (exit
code 2). ``trainer.strategy=sharded_base`` (:mod:`adarank.lightning.sharded`: FSDP2 of the frozen
base, replicated adapters) launches its processes like DDP and joins them the same way.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adarank.config import ConfigError

if TYPE_CHECKING:
    from adarank.runs import Prepared

__all__ = [
    "JOIN_ENV",
    "announce",
    "barrier",
    "check_strategy",
    "join_request",
    "prepare_join",
    "process_index",
]

#: environment variable through which process 0 tells launched processes which run to join
JOIN_ENV = "ADARANK_DDP_JOIN"


def process_index() -> int:
    """This process's local rank as set by a launcher (``LOCAL_RANK``; 0 when unset)."""
    value = os.environ.get("LOCAL_RANK", "0").strip() or "0"
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment LOCAL_RANK={value!r}: expected an integer") from None


def check_strategy(cfg: Any, allocation: bool) -> None:
    """Refuse a ``trainer.strategy`` that ``adarank fit`` cannot run (see the module docstring).

    Names that Lightning does not register (``"auto"``, custom strategies) are left to the
    check of :func:`adarank.lightning.checkpointing.check_strategy` at setup.

    Raises:
        ConfigError: a multiprocessing strategy, or a sharded one with rank allocation.
    """
    from lightning.pytorch.strategies import (
        DDPStrategy,
        DeepSpeedStrategy,
        SingleDeviceStrategy,
        StrategyRegistry,
    )

    from adarank.lightning.sharded import STRATEGY_NAME, ShardedBaseStrategy  # registers it

    name = (cfg.get("trainer") or {}).get("strategy", "auto")
    if not isinstance(name, str) or name not in StrategyRegistry:
        return
    entry = StrategyRegistry[name]
    method = entry.get("init_params", {}).get("start_method", "popen")
    if method != "popen":
        fixed = name.replace(f"ddp_{method}", "ddp").replace("ddp_notebook", "ddp")
        raise ConfigError(
            f"trainer.strategy={name!r} starts its processes with multiprocessing ({method}), "
            "which hands only the weights back to the first process: use "
            f"trainer.strategy={fixed!r} (the same training; adarank fit starts the other "
            "processes by running its command line again)"
        )
    allowed = (DDPStrategy, SingleDeviceStrategy, ShardedBaseStrategy)
    cls = entry["strategy"]  # DeepSpeedStrategy subclasses DDPStrategy but shards the adapters
    if allocation and (not issubclass(cls, allowed) or issubclass(cls, DeepSpeedStrategy)):
        raise ConfigError(
            f"trainer.strategy={name!r}: rank allocation (adapter.budget set) replaces adapter "
            "parameters during training, which sharded strategies that own them (FSDP, "
            "DeepSpeed) cannot follow; use trainer.strategy=ddp (adapters are small, so "
            f"replicating them costs little), trainer.strategy={STRATEGY_NAME} (shards the "
            "frozen base, replicates the adapters), or train at fixed ranks "
            "(allocation.enabled=false)"
        )


def join_request() -> dict[str, Any] | None:
    """The run to join when this process was launched by process 0 of ``adarank fit``, else None.

    Raises:
        ConfigError: :data:`JOIN_ENV` is malformed.
    """
    raw = os.environ.get(JOIN_ENV)
    if not raw or process_index() == 0:
        return None
    try:
        record = json.loads(raw)
        ok = isinstance(record["run_dir"], str) and isinstance(
            record.get("ckpt"), (str, type(None))
        )
    except (ValueError, TypeError, KeyError):
        ok = False
    if not ok:
        raise ConfigError(
            f"environment {JOIN_ENV}={raw!r}: expected the JSON object "
            '{"run_dir": str, "ckpt": str | null} that adarank fit sets for the processes it '
            "launches"
        )
    return record


def prepare_join(record: dict[str, Any]) -> Prepared:
    """Rebuild the run process 0 is training, from its ``config.yaml`` (writes nothing).

    Raises:
        ConfigError, ValueError, TypeError, OSError: the run cannot be rebuilt.
    """
    from adarank.config import load_config, validate_config
    from adarank.runs import CONFIG_NAME, preflight

    run_dir = Path(record["run_dir"])
    cfg = load_config(run_dir / CONFIG_NAME, [f"run.dir={run_dir}"])
    validate_config(cfg)
    ckpt = Path(record["ckpt"]) if record.get("ckpt") else None
    prepared = preflight(cfg, run_dir, ckpt)
    prepared.joined = True
    return prepared


@contextlib.contextmanager
def announce(p: Prepared) -> Iterator[None]:
    """Within the block, processes launched from this one join ``p`` (no-op in a joined one)."""
    if p.joined:
        yield
        return
    previous = os.environ.get(JOIN_ENV)
    record = {"run_dir": str(p.run_dir), "ckpt": str(p.ckpt_path) if p.ckpt_path else None}
    os.environ[JOIN_ENV] = json.dumps(record)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(JOIN_ENV, None)
        else:
            os.environ[JOIN_ENV] = previous


def barrier(trainer: Any) -> None:
    """Wait for every process of ``trainer`` (no-op for a single process or no trainer)."""
    if trainer is not None and int(getattr(trainer, "world_size", 1)) > 1:
        trainer.strategy.barrier("adarank.outcome")
