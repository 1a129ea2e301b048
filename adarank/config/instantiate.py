"""Explicit instantiation: ``_component_`` names a builder, the other keys are its arguments.

Like torchtune: a config node ``{_component_: adarank.models.build_hf_model, name_or_path:
minilm}`` becomes ``build_hf_model(name_or_path="minilm")``. Arguments are flat (no nested
components); values that depend on other built objects (``num_labels`` from the data, ``data``
itself for the planted model) are *injected* by the caller and documented in
:data:`INJECTED`. :func:`check_arguments` checks a node against the builder's signature without
calling it.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

from adarank.config.errors import ConfigError

__all__ = [
    "COMPONENT_KEY",
    "INJECTED",
    "check_arguments",
    "check_type",
    "get_component",
    "instantiate",
    "signature_params",
]

COMPONENT_KEY = "_component_"
#: arguments the wiring may pass itself (so a config need not give them)
INJECTED = frozenset({"num_labels", "data"})


def get_component(path: str, key: str) -> Callable:
    """Import ``package.module.attr`` and return it.

    Raises:
        ConfigError: bad path, module not importable or attribute missing (names ``key``).
    """
    from adarank.lightning.optim import import_component

    return import_component(path, key, example="a.b.build_x", error=ConfigError)


def signature_params(fn: Callable) -> dict[str, inspect.Parameter]:
    """Named parameters of ``fn`` (a class: its ``__init__`` without ``self``)."""
    sig = inspect.signature(fn)
    return {
        n: p
        for n, p in sig.parameters.items()
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and n != "self"
    }


def _hints(fn: Callable) -> dict[str, Any]:
    target = fn.__init__ if inspect.isclass(fn) else fn
    try:
        return typing.get_type_hints(target)
    except Exception:  # unresolvable forward references: no type checks for this builder
        return {}


def check_type(value: Any, annotation: Any) -> bool:
    """Whether a plain config value fits ``annotation`` (lenient for types we cannot check).

    Handles ``int``, ``float`` (ints accepted), ``str``, ``bool``, ``None``, ``Union``/``|``,
    ``Literal``, ``list``/``tuple``/``Sequence`` with an item type and ``dict``/``Mapping``.
    Anything else (classes, callables, ``Any``) is accepted.
    """
    if annotation is inspect.Parameter.empty or annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(check_type(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    import collections.abc as abc

    if annotation in (list, tuple) or origin in (list, tuple, abc.Sequence):
        if not isinstance(value, (list, tuple)):
            return False
        item = args[0] if args and args[-1] is not Ellipsis or len(args) == 2 else None
        return item is None or all(check_type(v, item) for v in value)
    if annotation is dict or origin in (dict, abc.Mapping):
        return isinstance(value, Mapping)
    return True


def _type_name(annotation: Any) -> str:
    return (
        str(annotation).replace("typing.", "")
        if not isinstance(annotation, type)
        else (annotation.__name__)
    )


def check_arguments(
    node: Mapping, section: str, *, injected: frozenset[str] = INJECTED
) -> list[str]:
    """Problems with a ``_component_`` node, without calling the builder.

    Returns:
        messages naming the key, the value and what was expected (empty if fine).
    """
    key = f"{section}.{COMPONENT_KEY}"
    if COMPONENT_KEY not in node:
        return [f"{section}: missing {COMPONENT_KEY} (the builder to call, e.g. a.b.build_x)"]
    try:
        fn = get_component(node[COMPONENT_KEY], key)
    except ConfigError as err:
        return err.problems
    params = signature_params(fn)
    hints = _hints(fn)
    problems = []
    for name, value in node.items():
        if name == COMPONENT_KEY:
            continue
        if name not in params:
            problems.append(
                f"{section}.{name}={value!r}: unknown argument of {node[COMPONENT_KEY]}; "
                f"expected one of {sorted(params)}"
            )
            continue
        annotation = hints.get(name, params[name].annotation)
        if not isinstance(annotation, str) and not check_type(value, annotation):
            problems.append(
                f"{section}.{name}={value!r}: wrong type {type(value).__name__}; expected "
                f"{_type_name(annotation)}"
            )
    for name, p in params.items():
        if p.default is inspect.Parameter.empty and name not in node and name not in injected:
            problems.append(f"{section}.{name}: missing required argument of {node[COMPONENT_KEY]}")
    return problems


def instantiate(node: Mapping | DictConfig, section: str, **injected: Any) -> Any:
    """Call the node's builder with its flat arguments plus ``injected`` ones it accepts.

    Injected values never override a value given in the config.
    """
    plain = (
        OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    )
    fn = get_component(plain.pop(COMPONENT_KEY, None), f"{section}.{COMPONENT_KEY}")
    params = signature_params(fn)
    for name, value in injected.items():
        if name in params and name not in plain:
            plain[name] = value
    return fn(**plain)
