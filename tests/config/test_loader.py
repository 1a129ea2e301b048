"""Recipe composition, overrides and run-directory defaults (adarank.config.loader)."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest

from adarank.config import ConfigError, list_recipes, load_config, parse_overrides, resolve_recipe

SHIPPED = {"quickstart", "planted", "lora_baseline", "causal_lm"}


@pytest.fixture
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private configs/ + recipes/ tree."""
    (tmp_path / "configs" / "model").mkdir(parents=True)
    (tmp_path / "configs" / "trainer").mkdir()
    (tmp_path / "recipes").mkdir()
    (tmp_path / "configs" / "model" / "a.yaml").write_text(
        "model:\n  _component_: x.build\n  name_or_path: first\n  width: 8\n"
    )
    (tmp_path / "configs" / "trainer" / "t.yaml").write_text(
        "defaults: [model/a]\ntrainer:\n  max_steps: 5\nmodel:\n  width: 16\n"
    )
    (tmp_path / "recipes" / "r.yaml").write_text(
        "description: a test recipe\n"
        "defaults: [trainer/t]\n"
        "seed: 3\n"
        "model:\n  name_or_path: second\n"
        "data:\n  tokenizer: ${model.name_or_path}\n  seed: ${seed}\n"
    )
    monkeypatch.setenv("ADARANK_CONFIGS_DIR", str(tmp_path / "configs"))
    monkeypatch.setenv("ADARANK_RECIPES_DIR", str(tmp_path / "recipes"))
    return tmp_path


def test_composition_order_and_interpolation(tree: Path) -> None:
    cfg = load_config("r")
    assert cfg.model.width == 16  # nested fragment body overrides its own defaults
    assert cfg.model.name_or_path == "second"  # recipe body overrides fragments
    assert cfg.model._component_ == "x.build"  # kept from the first fragment
    assert cfg.trainer.max_steps == 5
    assert cfg.data.tokenizer == "second" and cfg.data.seed == 3  # resolved after merging
    assert "defaults" not in cfg


def test_overrides_apply_last_and_parse_values(tree: Path) -> None:
    cfg = load_config(
        tree / "recipes" / "r.yaml",
        ["model.name_or_path=third", "trainer.max_steps=20", "adapter.budget=0.5%", "x.l=[a,b]"],
    )
    assert cfg.data.tokenizer == "third"  # interpolation sees the override
    assert cfg.trainer.max_steps == 20 and isinstance(cfg.trainer.max_steps, int)
    assert cfg.adapter.budget == "0.5%"
    assert list(cfg.x.l) == ["a", "b"]


def test_run_defaults(tree: Path) -> None:
    cfg = load_config("r", now=datetime(2024, 1, 2, 3, 4, 5))
    assert cfg.run.name == "r"
    assert cfg.run.dir == "runs/r-20240102-030405"
    cfg = load_config("r", ["run.dir=/tmp/x", "run.name=n"])
    assert cfg.run.dir == "/tmp/x" and cfg.run.name == "n"


@pytest.mark.parametrize("bad", ["noequals", "=3", ".a=1"])
def test_bad_override_syntax(bad: str) -> None:
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        parse_overrides([bad])


def test_missing_fragment_and_cycle(tree: Path) -> None:
    (tree / "recipes" / "bad.yaml").write_text("defaults: [model/nope]\n")
    with pytest.raises(ConfigError, match="model/nope.*available.*model/a"):
        load_config("bad")
    (tree / "configs" / "model" / "c1.yaml").write_text("defaults: [model/c2]\n")
    (tree / "configs" / "model" / "c2.yaml").write_text("defaults: [model/c1]\n")
    (tree / "recipes" / "cyc.yaml").write_text("defaults: [model/c1]\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config("cyc")


def test_unknown_recipe_and_bad_interpolation(tree: Path) -> None:
    with pytest.raises(ConfigError, match="no such file or shipped recipe.*'r'"):
        resolve_recipe("nope")
    (tree / "recipes" / "interp.yaml").write_text("a: ${missing.key}\n")
    with pytest.raises(ConfigError, match="interpolation"):
        load_config("interp")


def test_shipped_recipes_listed_with_descriptions() -> None:
    recipes = {name: desc for name, desc, _ in list_recipes()}
    assert SHIPPED <= set(recipes)
    assert all(recipes[n] for n in SHIPPED)


def test_shipped_files_are_package_data() -> None:
    """Recipes and fragments live inside the package (what a wheel ships)."""
    import adarank
    from adarank.config.loader import search_path

    package = Path(adarank.__file__).parent
    assert search_path("recipes")[-1] == package / "recipes"
    assert search_path("configs")[-1] == package / "configs"
    assert resolve_recipe("planted") == package / "recipes" / "planted.yaml"


def test_checkout_recipes_and_configs_win(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import adarank.config.loader as loader

    monkeypatch.delenv("ADARANK_RECIPES_DIR", raising=False)
    monkeypatch.delenv("ADARANK_CONFIGS_DIR", raising=False)
    (tmp_path / "recipes").mkdir()
    (tmp_path / "configs" / "trainer").mkdir(parents=True)
    (tmp_path / "recipes" / "planted.yaml").write_text(
        "description: my planted\ndefaults: [model/planted, trainer/cpu]\n"
    )
    (tmp_path / "configs" / "trainer" / "cpu.yaml").write_text("trainer:\n  max_steps: 3\n")
    monkeypatch.setattr(loader, "_CHECKOUT", tmp_path)
    # not a checkout without pyproject.toml: the package's own files only
    assert {n: d for n, d, _ in list_recipes()}["planted"].startswith("Planted-rank")
    (tmp_path / "pyproject.toml").write_text("")
    recipes = {n: d for n, d, _ in list_recipes()}
    assert recipes["planted"] == "my planted" and SHIPPED <= set(recipes)
    assert resolve_recipe("planted") == tmp_path / "recipes" / "planted.yaml"
    cfg = load_config("planted")
    assert cfg.trainer == {"max_steps": 3}  # the checkout's fragment wins ...
    assert cfg.model._component_ == "adarank.models.build_planted_model"  # ... others shipped
    assert "accelerator" not in load_config("quickstart").trainer  # checkout cpu.yaml
