"""Weights & Biases that works where users are: offline without a key, never hanging.

Mode resolution in :func:`make_wandb_logger` (first match wins):

1. ``mode=`` argument (``"online"``, ``"offline"`` or ``"disabled"``);
2. the ``WANDB_MODE`` environment variable (``WANDB_MODE=disabled`` writes nothing);
3. ``"online"`` when an API key is configured (``WANDB_API_KEY`` or a netrc entry for the W&B
   host), otherwise ``"offline"`` — runs land in ``<run_dir>/wandb/offline-run-*`` and can be
   uploaded later with ``wandb sync``.

Offline and disabled runs never touch the network. Online runs use a short ``init_timeout``
(default 30 s instead of wandb's 90 s) so a missing network fails fast with wandb's own error
instead of stalling a training job.
"""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

__all__ = ["WANDB_MODES", "make_wandb_logger", "resolve_wandb_mode", "wandb_api_key_configured"]

WANDB_MODES = ("online", "offline", "disabled")


def wandb_api_key_configured() -> bool:
    """Whether a W&B API key is available (``WANDB_API_KEY`` or a netrc entry for the host)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    path = os.environ.get("NETRC", str(Path.home() / ".netrc"))
    try:
        auth = netrc.netrc(path).authenticators(host or "api.wandb.ai")
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return bool(auth and auth[2])


def resolve_wandb_mode(mode: str | None = None) -> str:
    """Resolve the run mode as described in the module docstring.

    Raises:
        ValueError: ``mode`` (or ``WANDB_MODE``) is not a known mode.
    """
    if mode is None:
        env = os.environ.get("WANDB_MODE")
        if env:
            mode = {"dryrun": "offline", "run": "online"}.get(env, env)
            if mode not in WANDB_MODES:
                raise ValueError(f"WANDB_MODE={env!r} is not one of {list(WANDB_MODES)}")
            return mode
        return "online" if wandb_api_key_configured() else "offline"
    if mode not in WANDB_MODES:
        raise ValueError(f"mode={mode!r} must be one of {list(WANDB_MODES)} or None")
    return mode


def make_wandb_logger(
    project: str,
    run_dir: str | os.PathLike,
    mode: str | None = None,
    *,
    name: str | None = None,
    init_timeout: float = 30.0,
    **kwargs: Any,
):
    """Build a Lightning ``WandbLogger`` writing under ``run_dir`` (``run_dir/wandb/...``).

    Args:
        project: W&B project name.
        run_dir: directory for the run's files (created if missing).
        mode: ``"online"``, ``"offline"``, ``"disabled"`` or None (see module docstring).
        name: display name of the run.
        init_timeout: seconds wandb may wait for its backend/server when starting the run.
        **kwargs: passed to ``WandbLogger`` / ``wandb.init`` (e.g. ``tags``, ``group``).

    Returns:
        a ``lightning.pytorch.loggers.WandbLogger``.
    """
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    if not project or not isinstance(project, str):
        raise ValueError(f"project={project!r} must be a non-empty string")
    if init_timeout <= 0:
        raise ValueError(f"init_timeout={init_timeout} must be positive")
    resolved = resolve_wandb_mode(mode)
    save_dir = Path(run_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    settings = kwargs.pop("settings", None) or wandb.Settings(
        init_timeout=init_timeout, console="off", x_disable_stats=True, silent=True
    )
    if resolved != "online":
        kwargs.pop("log_model", None)  # checkpoints cannot be uploaded offline
    return WandbLogger(
        name=name,
        save_dir=str(save_dir),
        project=project,
        offline=resolved == "offline",
        mode=resolved,
        settings=settings,
        **kwargs,
    )
