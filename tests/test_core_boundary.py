"""The core packages stay plain PyTorch (DESIGN: "imports only point down").

``adarank.modules`` and ``adarank.allocation`` must run in a 15-line PyTorch loop: they import
only torch, numpy and the standard library (plus safetensors for adapter files), never the
training stack (Lightning, W&B, OmegaConf) nor the upper layers of adarank.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import adarank

CORE_PACKAGES = ("modules", "allocation")
FORBIDDEN_LOADED = ("lightning", "pytorch_lightning", "wandb", "omegaconf")
ALLOWED_THIRD_PARTY = {"torch", "numpy", "safetensors"}
PACKAGE_ROOT = Path(adarank.__file__).resolve().parent
PUBLIC_NAMES = (
    "SVDLoRALinear",
    "add_adapters",
    "adapter_layers",
    "save_adapter",
    "load_adapter",
    "merge_adapters",
    "unmerge_adapters",
)


def test_importing_core_packages_loads_no_training_stack():
    code = (
        "import json, sys\n"
        "import adarank.modules, adarank.allocation\n"
        f"print(json.dumps([m for m in {list(FORBIDDEN_LOADED)!r} if m in sys.modules]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(PACKAGE_ROOT.parent)}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def _imported_roots(path: Path) -> list[tuple[int, str]]:
    """``(line, dotted module)`` of every import in a source file (relative ones resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # from . import x / from ..y import z
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            found.append((node.lineno, name))
    return found


def test_core_sources_import_only_torch_numpy_and_stdlib():
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    sources = [p for pkg in CORE_PACKAGES for p in sorted((PACKAGE_ROOT / pkg).rglob("*.py"))]
    assert any(p.parent.name == "modules" for p in sources)  # the scan did look somewhere
    bad = []
    for path in sources:
        for line, name in _imported_roots(path):
            root = name.split(".")[0]
            if root == "adarank":
                ok = name.split(".")[1:2] in ([pkg] for pkg in CORE_PACKAGES)
            else:
                ok = root in stdlib or root in ALLOWED_THIRD_PARTY
            if not ok:
                bad.append(f"{path.relative_to(PACKAGE_ROOT.parent)}:{line} imports {name}")
    assert not bad, "core packages must import only torch/numpy/stdlib:\n" + "\n".join(bad)


def test_public_names_are_exported_from_adarank():
    for name in PUBLIC_NAMES:
        assert hasattr(adarank, name), f"adarank.{name} is missing"
        assert name in adarank.__all__
    assert adarank.SVDLoRALinear.__module__ == "adarank.modules.svd_lora"
