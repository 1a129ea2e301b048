"""One source of truth for defaults: the structured schema, the library constants, the YAML files.

(a) The dataclasses of ``adarank.config.structured`` hold every default of the config sections;
    those the library API also has equal the API's: ``add_adapters`` (``adapter``),
    ``AdaRankModule`` (``schedule`` / ``allocation`` / ``optimizer``), ``RankController``,
    ``BudgetSchedule.from_fractions`` and ``AdaRankCallback``.
(b) No shipped fragment or recipe re-states a schema default (a key set to its default is a
    second definition); where a fragment differs from the default — or, for ``model`` / ``data``
    / ``callbacks.generation``, from the builder's signature default — the difference is listed
    in :data:`INTENTIONAL` with its reason, and a listed difference that is gone fails too.
(c) No module of ``adarank/`` re-states a library default as a literal: an AST scan finds every
    binding of a key of ``SCHEDULE_DEFAULTS`` / ``CONTROLLER_DEFAULTS`` / ``ADAPTER_DEFAULTS`` /
    ``OPTIMIZER_DEFAULTS`` (argument default, keyword argument, class field, assignment, dict
    entry) to a constant equal to its default (None, booleans and 0 — "off" — excepted), and
    every product of a schedule fraction/ratio with a budget or step count (``1.5 * budget``);
    only the constants dicts themselves, and the lower-level arguments in :data:`ALLOWED`, may
    hold them.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import adarank
from adarank.allocation import RankController
from adarank.allocation.budget import SCHEDULE_DEFAULTS, BudgetSchedule
from adarank.allocation.controller import CONTROLLER_DEFAULTS
from adarank.config import configs_dir, get_component, recipes_dir
from adarank.config.structured import (
    SECTION_SCHEMAS,
    AdaRankConfig,
    section_args,
    section_defaults,
)
from adarank.integrations.transformers import AdaRankCallback
from adarank.lightning import AdaRankModule
from adarank.lightning.generation import GenerationEvaluator
from adarank.lightning.module import OPTIMIZER_DEFAULTS
from adarank.modules.inject import ADAPTER_DEFAULTS

PACKAGE = Path(adarank.__file__).resolve().parent

#: (fragment, dotted key) → why the shipped value differs from the default
INTENTIONAL = {
    ("adapter/gpt2", "adapter.init_rank"): "tiny GPT-2 smoke recipe: 4 triplets per matrix",
    ("adapter/bert", "adapter.modules_to_save"): "BERT classification preset: train the head",
    ("adapter/planted", "adapter.init_rank"): "planted task: uniform start at rank 4",
    ("adapter/planted", "adapter.scaling"): (
        "planted task: AdaLoRA's scaling 1, for which its lr 1e-2 and the benchmark are tuned"
    ),
    ("schedule/fixed", "allocation.enabled"): "the fixed-rank preset turns allocation off",
    ("logger/default", "logger.wandb"): "the shipped recipes log to W&B (offline) too",
    ("logger/default", "callbacks.snapshot_every_n_steps"): "shipped runs keep snapshots",
    ("logger/default", "callbacks.checkpoint_every_n_steps"): "shipped runs checkpoint often",
    **{
        (f"model/{name}", "model.task"): "decoder presets: causal-LM head"
        for name in ("smollm2", "tiny_gpt2", "tiny_llama")
    },
    ("data/rotten_tomatoes", "data.dataset"): "the preset names its corpus",
    ("data/rotten_tomatoes", "data.val_size"): "fixed 2,000-snippet validation split",
    ("data/rotten_tomatoes", "data.max_length"): "review snippets are short: 64 tokens",
    ("data/text_lm", "data.dataset"): "the preset names its corpus",
    ("data/text_lm", "data.val_size"): "256 validation blocks",
    ("data/text_lm", "data.batch_size"): "tiny GPT-2 preset: batch 16",
    ("data/planted", "data.n_train"): "planted benchmark size",
    ("data/planted", "data.n_val"): "planted benchmark size",
    ("data/planted", "data.batch_size"): "planted benchmark batch",
}
#: keys without a default: every preset sets its own
NO_DEFAULT = {"adapter.target_modules", "adapter.budget"}


def _defaults(fn) -> dict:
    return {
        n: p.default
        for n, p in inspect.signature(fn).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


# ----------------------------------------------------------------------------- (a)
def test_schema_defaults_are_the_api_defaults() -> None:
    api = {
        "adapter": _defaults(adarank.add_adapters),
        **dict.fromkeys(("schedule", "allocation", "optimizer"), _defaults(AdaRankModule)),
    }
    compared = 0
    for section, fn_defaults in api.items():
        defaults = section_defaults(section)
        for key, arg in section_args(section).items():
            if arg not in fn_defaults:
                continue  # target_modules: a required argument
            expected = None if key == "name" else fn_defaults[arg]  # None: the module's own
            assert defaults[key] == expected, (section, key, defaults[key], fn_defaults[arg])
            compared += 1
    assert compared >= 25, compared
    assert _defaults(AdaRankModule)["optimizer"] == OPTIMIZER_DEFAULTS["optimizer"]


def test_schedule_defaults_agree_everywhere() -> None:
    schedule = section_defaults("schedule")
    assert {k: schedule[k] for k in SCHEDULE_DEFAULTS} == SCHEDULE_DEFAULTS
    for fn in (BudgetSchedule.from_fractions, AdaRankModule, AdaRankCallback):
        defaults = _defaults(fn)
        assert {k: defaults[k] for k in SCHEDULE_DEFAULTS} == SCHEDULE_DEFAULTS, fn.__qualname__
    # BudgetSchedule's own defaults round like from_fractions (one rule: schedule_points)
    for final, total in ((1000, 250), (1001, 101), (333, 7), (7, 1000)):
        plain = BudgetSchedule(final_budget=final, total_steps=total)
        assert plain == BudgetSchedule.from_fractions(final, total)
        assert plain.init_budget == round(SCHEDULE_DEFAULTS["init_budget_ratio"] * final)
        assert plain.warmup_steps == round(SCHEDULE_DEFAULTS["warmup_frac"] * total)
        assert plain.final_steps == round(SCHEDULE_DEFAULTS["final_frac"] * total)
    const = BudgetSchedule(final_budget=100, total_steps=100, decay="constant")
    assert const == BudgetSchedule.from_fractions(100, 100, decay="constant")
    assert const.init_budget == 100


def test_controller_defaults_agree() -> None:
    """RankController, AdaRankModule, AdaRankCallback and the allocation section."""
    assert {k: _defaults(RankController)[k] for k in CONTROLLER_DEFAULTS} == CONTROLLER_DEFAULTS
    allocation = section_defaults("allocation")
    assert {k: allocation[k] for k in CONTROLLER_DEFAULTS} == CONTROLLER_DEFAULTS
    for fn in (AdaRankModule, AdaRankCallback):
        defaults = _defaults(fn)
        shared = sorted(set(defaults) & set(CONTROLLER_DEFAULTS))
        assert {"scorer", "grow", "min_rank", "max_rank"} <= set(shared), fn.__qualname__
        assert {k: defaults[k] for k in shared} == {k: CONTROLLER_DEFAULTS[k] for k in shared}


def test_adapter_defaults_are_the_shipped_settings() -> None:
    """A plain-loop user gets the transformer recipes' scaling and learning rate."""
    from adarank.config import load_config

    api = _defaults(adarank.add_adapters)
    for recipe in ("quickstart", "sft", "lora_baseline"):
        cfg = load_config(recipe)
        assert cfg.adapter.scaling == ADAPTER_DEFAULTS["scaling"] == api["scaling"] == 16.0
        assert cfg.optimizer.lr == OPTIMIZER_DEFAULTS["lr"] == _defaults(AdaRankModule)["lr"]
        assert cfg.adapter.factor_init == api["factor_init"]
    assert load_config("quickstart").adapter.init_rank == api["init_rank"]


# ----------------------------------------------------------------------------- (b)
def _api(section: str, node: dict) -> dict:
    """``{key: (where, default)}`` of one section of a YAML file."""
    if section in SECTION_SCHEMAS:
        out = {k: ("schema", v) for k, v in section_defaults(section).items()}
        if section == "callbacks":
            gen = _defaults(GenerationEvaluator)
            out.update({f"generation.{k}": ("GenerationEvaluator", v) for k, v in gen.items()})
        return {k: v for k, v in out.items() if f"{section}.{k}" not in NO_DEFAULT}
    if section == "seed":
        return {"": ("schema", AdaRankConfig.seed)}
    if section in ("model", "data") and isinstance(node, dict) and "_component_" in node:
        path = node["_component_"]
        return {k: (path, v) for k, v in _defaults(get_component(path, section)).items()}
    return {}


def _flat(node, prefix: str = "") -> dict:
    if not isinstance(node, dict):
        return {"": node}
    out = {}
    for key, value in node.items():
        if isinstance(value, dict) and key == "generation":
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _norm(value):
    if isinstance(value, str) and value.replace(",", "").isdigit() and "," in value:
        return [int(v) for v in value.split(",")]  # "16,8,4" lists of ints
    return list(value) if isinstance(value, tuple) else value


def _fragments(cfg: dict) -> dict:
    """The flat ``{dotted key: value}`` a recipe's ``defaults`` fragments give it."""
    out = {}
    for entry in cfg.get("defaults") or []:
        body = OmegaConf.to_container(OmegaConf.load(configs_dir() / f"{entry}.yaml"))
        out.update({f"{s}.{k}".strip("."): v for s, n in body.items() for k, v in _flat(n).items()})
    return out


def yaml_defaults(files: list[tuple[str, Path]]) -> tuple[dict, dict]:
    """``(restated, different)``: (file, key) → value where it equals / differs from a default.

    A recipe's value is compared with what its fragments give it, else with the default (so
    ``logger.wandb: false`` over ``logger/default``'s ``true`` is no re-statement).
    """
    restated, different, compared = {}, {}, 0
    for name, path in files:
        cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        inherited = _fragments(cfg)
        for section, node in cfg.items():
            api = _api(section, node)
            for key, value in _flat(node).items():
                dotted = f"{section}.{key}".strip(".")
                if key not in api or "${" in str(value):  # interpolations follow other keys
                    continue
                compared += 1
                where, default = api[key]
                if dotted in inherited:
                    where, default = "schema", inherited[dotted]
                same = _norm(value) == _norm(default)
                if same and where == "schema":
                    restated[(name, dotted)] = value
                elif not same:
                    different[(name, dotted)] = (value, where, default)
    assert compared > 50, f"only {compared} keys were compared: is the mapping broken?"
    return restated, different


def _shipped(folder: Path, pattern: str) -> list[tuple[str, Path]]:
    return [(str(p.relative_to(folder).with_suffix("")), p) for p in sorted(folder.glob(pattern))]


def test_no_schema_default_restated_in_yaml() -> None:
    files = _shipped(configs_dir(), "*/*.yaml") + _shipped(recipes_dir(), "*.yaml")
    restated, _ = yaml_defaults(files)
    assert not restated, (
        "shipped YAML re-states a default of adarank/config/structured.py or a value its "
        f"fragments already give (delete the key, or change the default there): {restated}"
    )


def test_fragment_differences_are_intentional() -> None:
    _, diffs = yaml_defaults(_shipped(configs_dir(), "*/*.yaml"))
    unexplained = {k: v for k, v in diffs.items() if k not in INTENTIONAL}
    assert not unexplained, (
        "shipped fragments differ from the defaults (fix one side, or list the difference "
        f"in INTENTIONAL with its reason): {unexplained}"
    )
    stale = sorted(set(INTENTIONAL) - set(diffs))
    assert not stale, f"INTENTIONAL lists differences that no longer exist: {stale}"


def test_yaml_scan_catches_a_restated_default(tmp_path: Path) -> None:
    path = tmp_path / "x.yaml"
    path.write_text(
        "seed: 0\nadapter: {scaling: 16.0, budget: 5}\nschedule: {interval: 10}\n"
        "optimizer: {lr: 3.0e-3}\nlogger: {csv: true}\n"
    )
    files = [("x", path)] + _shipped(configs_dir(), "*/*.yaml")
    restated, _ = yaml_defaults(files)
    assert {k for k in restated if k[0] == "x"} == {
        ("x", "seed"),
        ("x", "adapter.scaling"),
        ("x", "schedule.interval"),
        ("x", "optimizer.lr"),
        ("x", "logger.csv"),
    }


# ----------------------------------------------------------------------------- (c)
LIBRARY_DEFAULTS = {
    "budget.py": ("SCHEDULE_DEFAULTS", SCHEDULE_DEFAULTS),
    "controller.py": ("CONTROLLER_DEFAULTS", CONTROLLER_DEFAULTS),
    "inject.py": ("ADAPTER_DEFAULTS", ADAPTER_DEFAULTS),
    "module.py": ("OPTIMIZER_DEFAULTS", OPTIMIZER_DEFAULTS),
}
#: key → its default, for the keys the scan looks for (an "off" value is no tuned default)
SCANNED = {
    k: v
    for _, defaults in LIBRARY_DEFAULTS.values()
    for k, v in defaults.items()
    if v is not None and not isinstance(v, bool) and v != 0
}
#: "file: what" of lower-level arguments that keep their own default, with the reason
ALLOWED = {
    "adarank/modules/svd_lora.py: argument default factor_init='svd'": (
        "SVDLoRALinear's own argument; add_adapters always passes factor_init"
    ),
    "adarank/lightning/divergence.py: argument default max_skipped_steps=10": (
        "NonFiniteGuard's own argument; AdaRankModule always passes max_skipped_steps"
    ),
}


def _const(node) -> object:
    return node.value if isinstance(node, ast.Constant) else None


def _is_default(key: str, node) -> bool:
    value = _const(node)
    return value is not None and not isinstance(value, bool) and value == SCANNED[key]


def literal_redefinitions(source: str, filename: str) -> list[str]:
    """Places in ``source`` that bind a library-default key to its default value as a literal."""
    tree, hits = ast.parse(source), []
    fractions = {SCHEDULE_DEFAULTS[k] for k in ("init_budget_ratio", "warmup_frac", "final_frac")}

    def hit(node, what: str) -> None:
        hits.append(f"{filename}:{node.lineno}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            pos = a.posonlyargs + a.args
            pairs = list(zip(pos[len(pos) - len(a.defaults) :], a.defaults))
            pairs += [(arg, d) for arg, d in zip(a.kwonlyargs, a.kw_defaults) if d is not None]
            for arg, default in pairs:
                if arg.arg in SCANNED and _is_default(arg.arg, default):
                    hit(default, f"argument default {arg.arg}={default.value!r}")
        elif isinstance(node, ast.keyword) and node.arg in SCANNED:
            if _is_default(node.arg, node.value):
                hit(node.value, f"keyword {node.arg}={node.value.value!r}")
        elif isinstance(node, (ast.AnnAssign, ast.Assign)):
            targets = [node.target] if isinstance(node, ast.AnnAssign) else node.targets
            for t in targets:
                name = t.id if isinstance(t, ast.Name) else getattr(t, "attr", None)
                if name in SCANNED and node.value is not None:
                    if _is_default(name, node.value):
                        hit(node, f"{name} = {node.value.value!r}")
        elif isinstance(node, ast.Dict):
            for k, v in zip(node.keys, node.values):
                if _const(k) in SCANNED and _is_default(k.value, v):
                    hit(v, f"dict entry {k.value!r}: {v.value!r}")
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
            for a, b in ((node.left, node.right), (node.right, node.left)):
                other = ast.unparse(b)
                if _const(a) in fractions and ("budget" in other or "steps" in other):
                    hit(node, f"literal {ast.unparse(node)}")
    return hits


def _constants_dict_lines() -> set[str]:
    """``file:line`` of the four constants dicts: the one allowed definition of each default."""
    lines = set()
    for path in PACKAGE.rglob("*.py"):
        if path.name not in LIBRARY_DEFAULTS:
            continue
        name = LIBRARY_DEFAULTS[path.name][0]
        rel = path.relative_to(PACKAGE.parent)
        for n in ast.walk(ast.parse(path.read_text())):
            if isinstance(n, ast.Assign) and ast.unparse(n.targets[0]) == name:
                lines |= {f"{rel}:{i}" for i in range(n.lineno, n.end_lineno + 1)}
    return lines


def test_no_literal_library_defaults_in_the_package() -> None:
    hits = []
    for path in sorted(PACKAGE.rglob("*.py")):
        hits += literal_redefinitions(path.read_text(), str(path.relative_to(PACKAGE.parent)))
    allowed = _constants_dict_lines()
    in_dicts = [h for h in hits if h.split(": ", 1)[0] in allowed]
    assert len(in_dicts) == len(SCANNED), f"the scan must see each constant once: {in_dicts}"
    others = [h for h in hits if h.split(": ", 1)[0] not in allowed]
    unexplained = [h for h in others if f"{h.split(':')[0]}: {h.split(': ', 1)[1]}" not in ALLOWED]
    assert not unexplained, "library defaults re-stated as literals (read the constants):\n" + (
        "\n".join(unexplained)
    )
    stale = set(ALLOWED) - {f"{h.split(':')[0]}: {h.split(': ', 1)[1]}" for h in others}
    assert not stale, f"ALLOWED lists literals that no longer exist: {sorted(stale)}"


@pytest.mark.parametrize(
    "source",
    [
        "def f(warmup_frac=0.1): ...",
        "def f(*, interval: int = 10): ...",
        "class S:\n    decay: str = 'cubic'\n",
        "g(final_frac=0.2)",
        "D = {'init_budget_ratio': 1.5}",
        "b0 = int(1.5 * final_budget)",
        "t_w = round(total_steps * 0.1)",
        "def add(m, scaling: float = 16.0): ...",
        "AdaRankModule(m, 'causal_lm', lr=3e-3)",
        "def c(scorer='energy'): ...",
        "x = {'init_rank': 8}",
    ],
)
def test_scan_catches_a_redefinition(source: str) -> None:
    assert literal_redefinitions(source, "x.py")


def test_scan_ignores_other_values() -> None:
    source = (
        "def f(warmup_frac=0.05, interval=25, noise=0.1, scaling=1.0, min_rank=0, grow=True):\n"
        "    return round(0.1 * span)\n"
    )
    assert literal_redefinitions(source, "x.py") == []


def test_every_section_dataclass_field_has_a_default() -> None:
    for section, cls in SECTION_SCHEMAS.items():
        for f in dataclasses.fields(cls):
            assert f.default is not dataclasses.MISSING, (section, f.name)
