"""Load a recipe: compose its ``defaults`` fragments, apply dotted overrides, fill run defaults.

Composition (documented in ``docs/recipes.md``)::

    recipes/quickstart.yaml                 configs/model/minilm.yaml
    ───────────────────────                 ─────────────────────────
    description: ...                        model:
    defaults:                                 _component_: adarank.models.build_hf_model
      - model/minilm          ──merge──►      name_or_path: minilm
      - data/rotten_tomatoes
    trainer: {max_steps: 200}

Each entry of ``defaults`` names a fragment ``configs/<entry>.yaml`` — a mapping of top-level
sections, merged in list order. Fragments may list their own ``defaults`` (merged before their
body). The recipe body is merged after all of its fragments, and command-line overrides
(``trainer.max_steps=20``, ``adapter.budget=0.5%``) last; then every key the sections defined by
:mod:`adarank.config.structured` leave out gets its default. ``${a.b}`` interpolations are
resolved after everything is merged. An entry may also be a path ending in ``.yaml`` (relative to the file
that lists it).

Where the files are: ``adarank/recipes`` and ``adarank/configs`` ship inside the package (package
data, found with :mod:`importlib.resources`, so an installed wheel has them); a source checkout's
own top-level ``recipes/`` / ``configs/``, when present, is searched first (:func:`search_path`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import datetime
from importlib import resources
from pathlib import Path

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from adarank.config.errors import ConfigError
from adarank.config.structured import fill_defaults

__all__ = [
    "configs_dir",
    "list_recipes",
    "load_config",
    "parse_overrides",
    "recipes_dir",
    "resolve_recipe",
    "search_path",
]

#: the repository root when adarank runs from a source checkout (unused for an installed wheel)
_CHECKOUT = Path(__file__).resolve().parents[2]
#: the folders (inside the ``adarank`` package, shipped as package data) per kind
_KINDS = {"recipes": "ADARANK_RECIPES_DIR", "configs": "ADARANK_CONFIGS_DIR"}


def _packaged(kind: str) -> Path:
    """``adarank/<kind>`` found with :mod:`importlib.resources` (a wheel's package data)."""
    return Path(str(resources.files("adarank").joinpath(kind)))


def search_path(kind: str) -> list[Path]:
    """Folders searched for ``"recipes"`` or ``"configs"``, the first match winning.

    ``$ADARANK_RECIPES_DIR`` / ``$ADARANK_CONFIGS_DIR`` alone when set; otherwise a source
    checkout's own top-level ``recipes/`` / ``configs/`` (when present) before the copies shipped
    inside the package.
    """
    env = os.environ.get(_KINDS[kind])
    if env:
        return [Path(env).expanduser()]
    checkout = _CHECKOUT / kind
    is_checkout = (_CHECKOUT / "pyproject.toml").is_file() and checkout.is_dir()
    return [checkout, _packaged(kind)] if is_checkout else [_packaged(kind)]


def recipes_dir() -> Path:
    """The shipped recipes (``$ADARANK_RECIPES_DIR`` or the package's ``recipes/``)."""
    return search_path("recipes")[-1]


def configs_dir() -> Path:
    """The shipped fragments (``$ADARANK_CONFIGS_DIR`` or the package's ``configs/``)."""
    return search_path("configs")[-1]


def _find(kind: str, relative: str) -> Path | None:
    for folder in search_path(kind):
        if (folder / relative).is_file():
            return folder / relative
    return None


def _available(kind: str, pattern: str) -> dict[str, Path]:
    """``{name relative to its folder, without .yaml: path}``; earlier folders win."""
    out: dict[str, Path] = {}
    for folder in reversed(search_path(kind)):
        for path in sorted(folder.glob(pattern)):
            out[str(path.relative_to(folder).with_suffix(""))] = path
    return dict(sorted(out.items()))


def list_recipes() -> list[tuple[str, str, Path]]:
    """``(name, description, path)`` of every shipped recipe, sorted by name."""
    out = []
    for name, path in _available("recipes", "*.yaml").items():
        try:
            desc = _load_yaml(path).get("description", "")
        except ConfigError as err:
            desc = f"(unreadable: {err})"
        out.append((name, str(desc or "").strip().splitlines()[0] if desc else "", path))
    return out


def resolve_recipe(recipe: str | os.PathLike) -> Path:
    """A recipe path, or the shipped recipe with that name.

    Raises:
        ConfigError: neither an existing file nor a shipped recipe name.
    """
    path = Path(recipe).expanduser()
    if path.is_file():
        return path
    if path.suffix in ("", ".yaml") and path.parent == Path("."):
        shipped = _find("recipes", f"{path.stem}.yaml")
        if shipped is not None:
            return shipped
    names = [n for n, _, _ in list_recipes()]
    raise ConfigError(f"recipe {str(recipe)!r}: no such file or shipped recipe; shipped: {names}")


def yaml_error(source: str, err: yaml.YAMLError) -> str:
    """``source:line:column: problem`` for a YAML parse error (one line, no traceback)."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    context = getattr(err, "context", None)
    return f"{where}: invalid YAML: {problem}" + (f" ({context})" if context else "")


def _load_yaml(path: Path) -> DictConfig:
    try:
        cfg = OmegaConf.load(path)
    except yaml.YAMLError as err:
        raise ConfigError(yaml_error(str(path), err)) from err
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start}); "
            "expected a YAML file"
        ) from err
    except IsADirectoryError as err:
        raise ConfigError(f"{path}: is a directory; expected a YAML file") from err
    except (OmegaConfBaseException, OSError, ValueError) as err:
        raise ConfigError(f"{path}: cannot parse YAML ({err})") from err
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return cfg


def _fragment_path(entry: object, parent: Path) -> Path:
    if not isinstance(entry, str) or not entry:
        raise ConfigError(f"{parent}: defaults entry {entry!r}: expected a fragment name string")
    if entry.endswith(".yaml"):
        path = (parent.parent / entry).resolve()
    else:
        path = _find("configs", f"{entry}.yaml") or configs_dir() / f"{entry}.yaml"
    if not path.is_file():
        groups = list(_available("configs", "**/*.yaml"))
        raise ConfigError(
            f"{parent}: defaults entry {entry!r}: no fragment {path}; available: {groups}"
        )
    return path


def _compose(path: Path, stack: tuple[Path, ...] = ()) -> DictConfig:
    if path in stack:
        chain = " -> ".join(str(p) for p in (*stack, path))
        raise ConfigError(f"defaults cycle: {chain}")
    body = _load_yaml(path)
    defaults = body.pop("defaults", None) if "defaults" in body else None
    if defaults is not None and not isinstance(defaults, ListConfig):
        raise ConfigError(f"{path}: defaults={defaults!r}: expected a list of fragment names")
    merged = OmegaConf.create({})
    for entry in defaults or []:
        fragment = _fragment_path(entry, path)
        merged = _merge(merged, _compose(fragment, (*stack, path)), f"{path}: fragment {entry!r}")
    return _merge(merged, body, f"{path}: its body")


def _merge(base: DictConfig, other: DictConfig, what: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except (OmegaConfBaseException, TypeError, ValueError) as err:
        raise ConfigError(f"{what} does not merge: {str(err).splitlines()[0]}") from err


def parse_overrides(overrides: Sequence[str]) -> DictConfig:
    """Dotted ``key=value`` overrides (values parsed as YAML: ``1e-3``, ``[a,b]``, ``null``).

    Raises:
        ConfigError: an item without ``=``, with an empty key or an unparseable value.
    """
    out = OmegaConf.create({})
    for item in overrides:
        key = item.split("=", 1)[0]
        if "=" not in item or not key or key.startswith(".") or key.endswith(".") or ".." in key:
            raise ConfigError(f"override {item!r}: expected dotted.key=value")
        try:
            out = OmegaConf.merge(out, OmegaConf.from_dotlist([item]))
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError(
                f"override {item!r}: the value is not valid YAML ({problem}); quote it, "
                f"e.g. {key}='\"...\"', or close its brackets"
            ) from err
        except OmegaConfBaseException as err:
            raise ConfigError(f"override {item!r}: {str(err).splitlines()[0]}") from err
    return out


def load_config(
    recipe: str | os.PathLike,
    overrides: Sequence[str] = (),
    *,
    resolve: bool = True,
    now: datetime | None = None,
) -> DictConfig:
    """Compose a recipe, apply overrides and fill ``run.name`` / ``run.dir`` defaults.

    Args:
        recipe: path of a recipe YAML or a shipped recipe name (``"quickstart"``).
        overrides: ``dotted.key=value`` strings, applied last.
        resolve: resolve ``${...}`` interpolations (errors become :class:`ConfigError`).
        now: timestamp for the default run directory (tests).

    Returns:
        the config with every default of :mod:`adarank.config.structured` filled in;
        ``run.dir`` defaults to ``runs/<recipe>-<YYYYmmdd-HHMMSS>``.
    """
    path = resolve_recipe(recipe)
    body, extra = _compose(path), parse_overrides(overrides)
    try:
        cfg = OmegaConf.merge(body, extra)
    except (OmegaConfBaseException, TypeError, ValueError) as err:  # e.g. a mapping onto a list
        raise ConfigError(
            f"overrides {list(overrides)} do not fit {path}: {str(err).splitlines()[0]}"
        ) from err
    try:
        _run_defaults(cfg, path, now)
        fill_defaults(cfg)
        if resolve:
            OmegaConf.resolve(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError(f"cannot resolve interpolation: {str(err).splitlines()[0]}") from err
    return cfg


def _run_defaults(cfg: DictConfig, path: Path, now: datetime | None) -> None:
    run = cfg.get("run")
    if run is None:
        cfg.run = {}
    elif not isinstance(run, DictConfig):
        raise ConfigError(f"run={run!r}: expected a mapping with keys name, dir")
    if cfg.run.get("name") is None:
        cfg.run.name = path.stem
    if cfg.run.get("dir") is None:
        stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
        cfg.run.dir = f"runs/{cfg.run.name}-{stamp}"
