"""One source of truth for defaults: shipped config fragments vs the API, and no re-definitions.

(a) Every key of every shipped fragment (``adarank/configs/<group>/<name>.yaml``) that maps to
    an API argument with a default — ``add_adapters`` (``adapter``), ``AdaRankModule``
    (``schedule`` / ``allocation`` / ``optimizer`` through ``schema.MODULE_ARGS``), the
    ``_component_`` builder or datamodule (``model`` / ``data``), ``GenerationEvaluator``
    (``callbacks.generation``) — holds that default, except the differences listed in
    :data:`INTENTIONAL`, each with its reason; a listed difference that is gone fails too, so
    the list stays true. The schedule defaults agree across ``SCHEDULE_DEFAULTS``,
    ``BudgetSchedule`` / ``BudgetSchedule.from_fractions``, ``AdaRankModule``,
    ``AdaRankCallback`` and ``configs/schedule/adaptive.yaml``.
(b) No module of ``adarank/`` re-states a schedule default as a literal: an AST scan finds every
    binding of a ``SCHEDULE_DEFAULTS`` key (argument default, keyword argument, class field,
    assignment, dict entry) to a constant equal to its default, and every product of such a
    fraction/ratio with a budget or step count (``1.5 * budget``); only the
    ``SCHEDULE_DEFAULTS`` dict itself may hold them.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import adarank
from adarank.allocation import RankController
from adarank.allocation.budget import SCHEDULE_DEFAULTS, BudgetSchedule
from adarank.config import configs_dir, get_component
from adarank.config.build import _ADAPTER_ARGS
from adarank.config.schema import MODULE_ARGS
from adarank.integrations.transformers import AdaRankCallback
from adarank.lightning import AdaRankModule
from adarank.lightning.generation import GenerationEvaluator

PACKAGE = Path(adarank.__file__).resolve().parent

#: (fragment, dotted key) → why the shipped value differs from the API default
INTENTIONAL = {
    **{
        (f"adapter/{name}", "adapter.scaling"): (
            "transformer presets use scaling 16 (LoRA-like learning speed at lr 1e-3–6e-3, "
            "README 'Scaling, initialisation and learning rate'); add_adapters keeps 1.0, "
            "AdaLoRA's parametrisation"
        )
        for name in ("all_linear", "bert", "gpt2", "llama")
    },
    ("adapter/gpt2", "adapter.init_rank"): "tiny GPT-2 smoke recipe: 4 triplets per matrix",
    ("adapter/bert", "adapter.modules_to_save"): "BERT classification preset: train the head",
    ("adapter/planted", "adapter.init_rank"): "planted task: uniform start at rank 4",
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

SCHEDULE_KEYS = tuple(SCHEDULE_DEFAULTS)


def _defaults(fn) -> dict:
    return {
        n: p.default
        for n, p in inspect.signature(fn).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def _norm(value):
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, str) and value.replace(",", "").isdigit() and "," in value:
        return [int(v) for v in value.split(",")]  # "16,8,4" lists of ints
    if isinstance(value, tuple):
        return list(value)
    return value


def _api(section: str, node: dict):
    """``{config key: (API name, default)}`` for one section of a fragment."""
    if section == "adapter":
        defaults = _defaults(adarank.add_adapters)
        return {k: ("add_adapters", defaults[a]) for k, a in _ADAPTER_ARGS.items()}
    if section in MODULE_ARGS:
        defaults = _defaults(AdaRankModule)
        return {k: ("AdaRankModule", defaults[a]) for k, a in MODULE_ARGS[section].items()}
    if section in ("model", "data") and "_component_" in node:
        path = node["_component_"]
        return {k: (path, v) for k, v in _defaults(get_component(path, section)).items()}
    if section == "callbacks":
        defaults = _defaults(GenerationEvaluator)
        return {f"generation.{k}": ("GenerationEvaluator", v) for k, v in defaults.items()}
    return {}


def _flat(node: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in node.items():
        if isinstance(value, dict) and key == "generation":
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def fragment_differences() -> dict[tuple[str, str], tuple]:
    """(fragment, key) → (shipped value, API name, API default) wherever they differ."""
    diffs, compared = {}, 0
    for path in sorted(configs_dir().glob("*/*.yaml")):
        fragment = f"{path.parent.name}/{path.stem}"
        cfg = OmegaConf.load(path)
        for section in cfg:
            if not OmegaConf.is_dict(cfg[section]):
                continue
            node = OmegaConf.to_container(cfg[section], resolve=False)
            api = _api(str(section), node)
            for key, value in _flat(node).items():
                if key not in api or "${" in str(value):  # interpolations follow other keys
                    continue
                compared += 1
                name, default = api[key]
                if _norm(value) != _norm(default):
                    diffs[(fragment, f"{section}.{key}")] = (value, name, default)
    assert compared > 60, f"only {compared} fragment keys were compared: is the mapping broken?"
    return diffs


def test_fragments_hold_the_api_defaults() -> None:
    diffs = fragment_differences()
    unexplained = {k: v for k, v in diffs.items() if k not in INTENTIONAL}
    assert not unexplained, (
        "shipped fragments differ from the API defaults (fix one side, or list the difference "
        f"in INTENTIONAL with its reason): {unexplained}"
    )
    stale = sorted(set(INTENTIONAL) - set(diffs))
    assert not stale, f"INTENTIONAL lists differences that no longer exist: {stale}"


def test_schedule_defaults_agree_everywhere() -> None:
    adaptive = OmegaConf.to_container(OmegaConf.load(configs_dir() / "schedule" / "adaptive.yaml"))
    assert adaptive["schedule"] == SCHEDULE_DEFAULTS
    for fn in (BudgetSchedule.from_fractions, AdaRankModule, AdaRankCallback):
        defaults = _defaults(fn)
        assert {k: defaults[k] for k in SCHEDULE_KEYS} == SCHEDULE_DEFAULTS, fn.__qualname__
    plain = BudgetSchedule(final_budget=1000, total_steps=250)
    assert plain.init_budget == SCHEDULE_DEFAULTS["init_budget_ratio"] * 1000
    assert plain.warmup_steps == round(SCHEDULE_DEFAULTS["warmup_frac"] * 250)
    assert plain.final_steps == round(SCHEDULE_DEFAULTS["final_frac"] * 250)
    assert (plain.interval, plain.decay) == (SCHEDULE_DEFAULTS["interval"], "cubic")
    assert plain == BudgetSchedule.from_fractions(1000, 250)


def test_controller_defaults_agree() -> None:
    """The allocation options AdaRankModule and AdaRankCallback pass on keep RankController's."""
    controller = _defaults(RankController)
    for fn in (AdaRankModule, AdaRankCallback):
        defaults = _defaults(fn)
        shared = sorted(set(defaults) & set(controller) - {"optimizer", "seed"})
        assert {"scorer", "grow", "min_rank", "max_rank"} <= set(shared), fn.__qualname__
        assert {k: defaults[k] for k in shared} == {k: controller[k] for k in shared}


# ----------------------------------------------------------------------------- (b)
def _const(node) -> object:
    return node.value if isinstance(node, ast.Constant) else None


def _is_default(key: str, node) -> bool:
    value = _const(node)
    return value is not None and not isinstance(value, bool) and value == SCHEDULE_DEFAULTS[key]


def literal_redefinitions(source: str, filename: str) -> list[str]:
    """Places in ``source`` that bind a schedule key to its default value as a literal."""
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
                if arg.arg in SCHEDULE_KEYS and _is_default(arg.arg, default):
                    hit(default, f"argument default {arg.arg}={default.value!r}")
        elif isinstance(node, ast.keyword) and node.arg in SCHEDULE_KEYS:
            if _is_default(node.arg, node.value):
                hit(node.value, f"keyword {node.arg}={node.value.value!r}")
        elif isinstance(node, (ast.AnnAssign, ast.Assign)):
            targets = [node.target] if isinstance(node, ast.AnnAssign) else node.targets
            for t in targets:
                name = t.id if isinstance(t, ast.Name) else getattr(t, "attr", None)
                if name in SCHEDULE_KEYS and node.value is not None:
                    if _is_default(name, node.value):
                        hit(node, f"{name} = {node.value.value!r}")
        elif isinstance(node, ast.Dict):
            for k, v in zip(node.keys, node.values):
                if _const(k) in SCHEDULE_KEYS and _is_default(k.value, v):
                    hit(v, f"dict entry {k.value!r}: {v.value!r}")
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
            for a, b in ((node.left, node.right), (node.right, node.left)):
                other = ast.unparse(b)
                if _const(a) in fractions and ("budget" in other or "steps" in other):
                    hit(node, f"literal {ast.unparse(node)}")
    return hits


def _defaults_dict_lines() -> set[str]:
    """``file:line`` of the ``SCHEDULE_DEFAULTS`` dict in budget.py: the one allowed definition."""
    tree = ast.parse((PACKAGE / "allocation" / "budget.py").read_text())
    (node,) = [
        n
        for n in ast.walk(tree)
        if isinstance(n, (ast.Assign, ast.AnnAssign))
        and "SCHEDULE_DEFAULTS"
        in ast.unparse(n.targets[0] if isinstance(n, ast.Assign) else n.target)
    ]
    return {f"adarank/allocation/budget.py:{n}" for n in range(node.lineno, node.end_lineno + 1)}


def test_no_literal_schedule_defaults_in_the_package() -> None:
    hits = []
    for path in sorted(PACKAGE.rglob("*.py")):
        hits += literal_redefinitions(path.read_text(), str(path.relative_to(PACKAGE.parent)))
    allowed = _defaults_dict_lines()
    found_in_dict = [h for h in hits if h.split(": ", 1)[0] in allowed]
    assert len(found_in_dict) == len(SCHEDULE_DEFAULTS), "the scan must see the dict itself"
    others = [h for h in hits if h.split(": ", 1)[0] not in allowed]
    assert not others, "schedule defaults re-stated as literals (use SCHEDULE_DEFAULTS):\n" + (
        "\n".join(others)
    )


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
    ],
)
def test_scan_catches_a_redefinition(source: str) -> None:
    assert literal_redefinitions(source, "x.py")


def test_scan_ignores_other_values() -> None:
    source = "def f(warmup_frac=0.05, interval=25, noise=0.1): return round(0.1 * span)\n"
    assert literal_redefinitions(source, "x.py") == []
