"""The wheel carries its recipes: build it, install it into a fresh virtual environment outside
the repository, and run ``adarank recipes`` / ``adarank validate`` there (no network).

The fresh environment has no pip and reuses the already-installed dependencies through a
``.pth`` path entry (a plain path: ``.pth`` files in that folder, such as the editable install of
this checkout, are not processed), so only the wheel provides ``adarank``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHIPPED = {"quickstart", "sft", "planted", "lora_baseline", "causal_lm"}


def _run(cmd: list, *, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, f"{cmd} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}"
    return out


def _build_wheel(tmp: Path) -> Path:
    """``pip wheel`` of a copy of the sources (the checkout gets no build/ or egg-info)."""
    import shutil

    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    shutil.copytree(REPO / "adarank", src / "adarank", ignore=ignore)
    pip = [sys.executable, "-m", "pip"]
    _run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", "dist", src],
        cwd=tmp,
    )
    (wheel,) = (tmp / "dist").glob("adarank-*.whl")
    return wheel


def _fresh_env(tmp: Path, wheel: Path) -> Path:
    """A venv without pip whose ``adarank`` is the wheel's; dependencies from this environment."""
    base = getattr(sys, "_base_executable", None) or sys.executable
    env_dir = tmp / "env"
    _run([base, "-m", "venv", "--without-pip", env_dir], cwd=tmp)
    python = env_dir / "bin" / "python"
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(_run([python, "-c", code], cwd=tmp).stdout.strip())
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "_adarank_test_deps.pth").write_text("".join(f"{d}\n" for d in sorted(deps)))
    pip = [sys.executable, "-m", "pip", "--python", python]
    _run([*pip, "install", "-q", "--no-deps", "--no-index", wheel], cwd=tmp)
    return env_dir


@pytest.mark.slow
def test_wheel_ships_recipes_and_runs_outside_the_repository(tmp_path: Path) -> None:
    wheel = _build_wheel(tmp_path)
    package = REPO / "adarank"
    shipped = {
        f"adarank/{p.relative_to(package).as_posix()}"
        for kind in ("recipes", "configs")
        for p in (package / kind).rglob("*.yaml")
    }
    assert shipped and shipped <= set(zipfile.ZipFile(wheel).namelist())

    env_dir = _fresh_env(tmp_path, wheel)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ADARANK_RECIPES_DIR")}
    env.pop("ADARANK_CONFIGS_DIR", None)
    data_dir = Path(os.environ.get("ADARANK_DATA_DIR", ".cache/data")).resolve()
    env.update(
        ADARANK_DATA_DIR=str(data_dir),
        ADARANK_CACHE_DIR=str(tmp_path / "cache"),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        WANDB_MODE="disabled",
    )
    adarank = env_dir / "bin" / "adarank"
    code = "import adarank.config as c; print(c.__file__); print(c.resolve_recipe('quickstart'))"
    where = _run([env_dir / "bin" / "python", "-c", code], cwd=work, env=env).stdout.split()
    assert all(Path(w).is_relative_to(env_dir) for w in where), where  # not this checkout

    listed = _run([adarank, "recipes"], cwd=work, env=env).stdout
    assert SHIPPED <= {line.split()[0] for line in listed.splitlines() if line.strip()}, listed
    out = _run([adarank, "validate", "planted"], cwd=work, env=env).stdout
    assert "planted: ok" in out
    if not (data_dir / "rotten_tomatoes_corpus_full.csv.bz2").is_file():
        pytest.skip(f"quickstart needs the review corpus in {data_dir} (make data)")
    out = _run([adarank, "validate", "quickstart"], cwd=work, env=env).stdout
    assert "quickstart: ok" in out and "budget 150,000 adapter params" in out
    assert not list(work.iterdir())  # validate writes nothing
