"""``adarank fit --resume RUN_DIR``: every check before anything of the run is touched.

A rejected resume (exit code 2) leaves every file of the run byte-identical. The checks, in
order:

1. ``RUN_DIR`` is a directory with a readable ``config.yaml``; ``run.dir`` is not overridden;
2. the overrides only change what a continuation may change (:data:`RESUME_MUTABLE`: the
   Trainer, loggers and callbacks, the non-finite policy, data-loading workers) — model, data,
   adapter, budget, schedule, allocation, optimizer and seed are fixed by the checkpoint;
3. ``checkpoints/last.ckpt`` opens with ``torch.load(weights_only=True)`` and holds what
   ``adarank fit`` writes;
4. the pre-flight of a new run (:func:`adarank.runs.preflight`) passes;
5. the schedules keep their length (a run that did not set ``schedule.total_steps`` cannot
   change ``trainer.max_steps``: its budget and learning-rate schedules span that length);
6. the checkpoint matches the rebuilt model: adapter layers and shapes, budget, the frozen base
   weights (checkpoints do not hold them: the base rebuilt from ``model.*`` must match the
   fingerprint stored at save time), every tensor shape, the labels (``labels.json``), and it
   is not already at the last step.

Under DDP (``trainer.strategy=ddp``) process 0 runs these checks; the processes it launches
join the run (:mod:`adarank.runs_ddp`).

A run that stopped before its first checkpoint (killed, or failed early) has nothing to continue
from: ``--resume`` restarts it from step 0 with its ``config.yaml`` (overrides allowed, as for a
new run) after saying so; the outputs of the stopped attempt are replaced. A finished run whose
checkpoint is gone is refused.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from adarank.config import ConfigError, load_config, validate_config
from adarank.runs import CONFIG_NAME, LABELS_NAME, SUMMARY_NAME, Prepared, preflight

__all__ = ["RESUME_MUTABLE", "check_resume_changes", "prepare_resume", "read_checkpoint"]

#: dotted keys (or prefixes ending in ".") that ``--resume`` may change
RESUME_MUTABLE = (
    "trainer.",
    "logger.",
    "callbacks.",
    "optimizer.nonfinite",
    "optimizer.max_skipped_steps",
    "data.num_workers",
    "run.name",
    "description",
)
_CKPT_KEYS = ("state_dict", "global_step", "optimizer_states", "loops", "adarank")


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, Mapping) and node:
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): node}


def _mutable(key: str) -> bool:
    return any(key == m or (m.endswith(".") and key.startswith(m)) for m in RESUME_MUTABLE)


def check_resume_changes(saved: Mapping, new: Mapping, run_dir: Path) -> None:
    """Raise if ``new`` changes a key of the run's config that a continuation cannot change."""
    a, b = _flat(saved), _flat(new)
    changed = sorted(k for k in set(a) | set(b) if a.get(k, "<unset>") != b.get(k, "<unset>"))
    fixed = [k for k in changed if not _mutable(k)]
    if fixed:
        shown = [f"{k}={b.get(k)!r} (run: {a.get(k, '<unset>')!r})" for k in fixed[:6]]
        raise ConfigError(
            f"--resume {str(run_dir)!r}: {', '.join(shown)}: a resumed run keeps the model, data, "
            "adapter, budget, schedule, allocation, optimizer and seed of its checkpoint; only "
            f"{', '.join(m.rstrip('.') + ('.*' if m.endswith('.') else '') for m in RESUME_MUTABLE)}"
            " may change. Start a new run (another run.dir) to change the rest"
        )


def _unpickling_detail(err: Exception) -> str:
    text = str(err)
    found = re.search(r"Unsupported (?:global: GLOBAL \S+|operand \S+|class \S+)", text)
    return found.group(0) if found else type(err).__name__


def read_checkpoint(path: Path) -> dict:
    """Open a checkpoint the safe way (``weights_only=True``) and check its top-level entries.

    Raises:
        ConfigError: missing, empty, truncated, not a checkpoint, refused by the safe loader, or
            not written by ``adarank fit``.
    """
    import pickle

    import torch

    where = f"checkpoint {str(path)!r}"
    if path.is_dir():
        raise ConfigError(f"{where} is a directory; expected a file written by adarank fit")
    if not path.is_file():
        raise ConfigError(f"{where} does not exist (a broken link?)")
    if path.stat().st_size == 0:
        raise ConfigError(f"{where} is empty (0 bytes): the save was interrupted")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ConfigError(
            f"{where} cannot be read safely ({_unpickling_detail(err)}): an adarank checkpoint "
            "holds only tensors and plain values, so this file is corrupt or was not written by "
            "adarank fit"
        ) from err
    except Exception as err:  # zip / storage errors: truncated or random bytes
        first = (str(err).splitlines() or [""])[0][:160]
        raise ConfigError(
            f"{where} is unreadable (truncated, or not a PyTorch checkpoint): "
            f"{type(err).__name__}: {first}"
        ) from err
    if not isinstance(ckpt, dict):
        raise ConfigError(f"{where} holds a {type(ckpt).__name__}, not a Lightning checkpoint")
    missing = [k for k in _CKPT_KEYS if k not in ckpt]
    if missing:
        raise ConfigError(
            f"{where} lacks {missing}: it was not written by adarank fit (or is damaged)"
        )
    return ckpt


def _check_checkpoint(p: Prepared, ckpt: dict, path: Path) -> None:
    from adarank.lightning import checkpointing

    where = f"checkpoint {str(path)!r}"
    try:
        checkpointing.restore_layers(p.module, ckpt)  # resizes the adapters to the saved ranks
    except (ValueError, TypeError, KeyError) as err:
        raise ConfigError(f"{where}: {err}") from err
    mismatch = checkpointing.check_state_dict(p.module, ckpt["state_dict"])
    if mismatch:
        raise ConfigError(f"{where} does not match the model rebuilt from config.yaml: {mismatch}")
    labels_path = p.run_dir / LABELS_NAME
    names = getattr(p.data, "label_names", None)
    if names and labels_path.is_file():
        try:
            saved = json.loads(labels_path.read_text(encoding="utf-8"))["labels"]
        except (ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"{labels_path}: unreadable ({err})") from err
        if list(saved) != list(names):
            raise ConfigError(
                f"{labels_path} lists labels {saved[:10]} but the data now has {names[:10]}: "
                "the training file changed since the run started"
            )
    step = ckpt["global_step"]
    if not isinstance(step, int) or step < 0:
        raise ConfigError(f"{where}: global_step={step!r} is not a step count")
    if p.total_steps is not None and step >= p.total_steps:
        fixed = p.module.hparams.total_steps
        hint = (
            f"raise trainer.max_steps (up to schedule.total_steps={fixed}) to train further"
            if fixed is not None and fixed > step
            else "the run has completed its schedule; start a new run to train more"
        )
        raise ConfigError(
            f"--resume {str(p.run_dir)!r}: the checkpoint is at step {step} and the trainer "
            f"would stop at step {p.total_steps}: nothing to continue; {hint}"
        )


def _check_schedule_length(p: Prepared, saved: Any) -> None:
    """The budget and learning-rate schedules span the run's length: a resume keeps it."""
    from adarank.config.build import estimate_total_steps

    if p.module.hparams.total_steps is not None:
        return  # schedule.total_steps fixes it
    before = estimate_total_steps(saved, p.data)
    if before != p.total_steps:
        raise ConfigError(
            f"--resume {str(p.run_dir)!r}: the trainer overrides change the length of the run's "
            f"budget and learning-rate schedules ({before} → {p.total_steps} optimizer steps), "
            "which a resume cannot do. Only a run that set schedule.total_steps when it started "
            "can stop at another step"
        )


def _restartable(run_dir: Path) -> None:
    """A run without checkpoint may restart only if it never finished."""
    status = None
    summary = run_dir / SUMMARY_NAME
    if summary.is_file():
        try:
            status = json.loads(summary.read_text(encoding="utf-8")).get("status")
        except (ValueError, AttributeError, UnicodeDecodeError):
            status = "unreadable"
    if status == "ok" or (status is None and (run_dir / "adapter").exists()):
        raise ConfigError(
            f"--resume {str(run_dir)!r}: the run finished but checkpoints/last.ckpt is gone: "
            "nothing to continue from. Start a new run (another run.dir) to train again"
        )


def prepare_resume(run_dir: str | os.PathLike, overrides: list[str] = ()) -> Prepared:
    """Check a run and rebuild it to continue from ``checkpoints/last.ckpt``; writes nothing.

    Returns:
        the prepared run; ``restart`` is True when there is no checkpoint yet (see the module
        docstring).

    Raises:
        ConfigError: any check of the module docstring failed (exit code 2).
    """
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise ConfigError(f"--resume {str(run_dir)!r}: no such directory")
    if not run_dir.is_dir():
        raise ConfigError(f"--resume {str(run_dir)!r}: not a directory")
    cfg_path, ckpt_path = run_dir / CONFIG_NAME, run_dir / "checkpoints" / "last.ckpt"
    if not cfg_path.is_file():
        raise ConfigError(f"--resume {str(run_dir)!r}: no {CONFIG_NAME} (not a run directory?)")
    for item in overrides:
        if item.split("=", 1)[0].strip() == "run.dir":
            raise ConfigError(
                f"override {item!r}: --resume continues {str(run_dir)!r} in place; copy the "
                "directory first to continue it elsewhere"
            )
    forced = [f"run.dir={run_dir}"]
    saved = load_config(cfg_path, forced)
    cfg = load_config(cfg_path, [*overrides, *forced])
    validate_config(cfg)
    if not ckpt_path.exists() and not ckpt_path.is_symlink():
        _restartable(run_dir)
        prepared = preflight(cfg, run_dir)
        prepared.restart = True
        return prepared
    check_resume_changes(
        OmegaConf.to_container(saved, resolve=True),
        OmegaConf.to_container(cfg, resolve=True),
        run_dir,
    )
    ckpt = read_checkpoint(ckpt_path)
    prepared = preflight(cfg, run_dir, ckpt_path)
    _check_checkpoint(prepared, ckpt, ckpt_path)
    _check_schedule_length(prepared, saved)
    return prepared
